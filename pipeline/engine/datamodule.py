"""Lightning data module over a validated COCO-format dataset.

Sharding is done here rather than by Lightning so that a global batch holds the same images
however it is split across processes: one permutation per epoch (seeded by ``seed + epoch``),
process ``r`` of ``w`` takes every ``w``-th index starting at ``r``.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from pipeline.config import ExperimentConfig
from pipeline.data import CocoDetectionDataset, collate_detection
from pipeline.engine.splits import coco_subset, load_splits

__all__ = ["DetectionDataModule", "ShardedSampler", "coco_subset", "load_splits"]


class ShardedSampler(Sampler[int]):
    """Every ``world``-th index of a (seeded, per-epoch) permutation; forwards the epoch to the dataset."""

    def __init__(self, dataset: CocoDetectionDataset, rank: int, world: int, shuffle: bool, seed: int, drop_tail: bool):
        self.dataset, self.rank, self.world = dataset, rank, world
        self.shuffle, self.seed, self.drop_tail = shuffle, seed, drop_tail
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def _indices(self) -> list[int]:
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(n))
        if self.drop_tail:
            order = order[: n - n % self.world]
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


class DetectionDataModule(L.LightningDataModule):
    def __init__(self, cfg: ExperimentConfig):
        super().__init__()
        self.cfg = cfg
        self.train_split, self.val_split = load_splits(cfg.data)
        self.train_dataset = CocoDetectionDataset(self.train_split, train=True, seed=cfg.train.seed)
        self.val_dataset = CocoDetectionDataset(self.val_split, train=False)
        self.val_gt = coco_subset(self.val_split)

    @property
    def num_classes(self) -> int:
        return self.train_dataset.num_classes

    @property
    def label_to_category_id(self) -> dict[int, int]:
        return self.train_dataset.label_to_category_id

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def steps_per_epoch(self, world: int) -> int:
        return max(1, len(self.train_dataset) // world // self.cfg.train.batch_size)

    def _loader(self, dataset: CocoDetectionDataset, batch_size: int, train: bool) -> DataLoader:
        rank, world = self._rank_world()
        sampler = ShardedSampler(dataset, rank, world, shuffle=train, seed=self.cfg.train.seed, drop_tail=train)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=train,
                          collate_fn=collate_detection, num_workers=self.cfg.data.num_workers,
                          persistent_workers=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, self.cfg.train.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, self.cfg.eval.batch_size, train=False)
