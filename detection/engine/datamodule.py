"""Lightning data module over a validated COCO-format dataset.

Sharding is done here rather than by Lightning so that a global batch holds the same images
however it is split across processes: one permutation per epoch (seeded by ``seed + epoch``),
process ``r`` of ``w`` takes every ``w``-th index starting at ``r``.

The training loader is resumable mid-epoch (Lightning's ``state_dict``/``load_state_dict`` loader
protocol): a checkpoint records the next batch to train, and a resumed run skips the batches of
that epoch it already trained on, so it sees the same batches as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from detection.config import ExperimentConfig
from detection.data import CocoDetectionDataset, collate_detection
from detection.engine.splits import coco_subset, load_splits

__all__ = ["DetectionDataModule", "ShardedSampler", "coco_subset", "load_splits"]


class ShardedSampler(Sampler[int]):
    """Every ``world``-th index of a (seeded, per-epoch) permutation; forwards the epoch to the dataset."""

    def __init__(self, dataset: CocoDetectionDataset, rank: int, world: int, shuffle: bool, seed: int, drop_tail: bool):
        self.dataset, self.rank, self.world = dataset, rank, world
        self.shuffle, self.seed, self.drop_tail = shuffle, seed, drop_tail
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def resume(self, epoch: int, skip: int) -> None:
        """The next iteration is of ``epoch`` and starts after its first ``skip`` indices."""
        self.set_epoch(epoch)
        self._resume = (epoch, skip)

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
        indices = self._indices()
        if self._resume is not None:
            epoch, skip = self._resume
            self._resume = None
            if epoch == self.epoch:
                indices = indices[skip:]
        return iter(indices)

    def __len__(self) -> int:
        return len(self._indices())


class ResumableLoader(DataLoader):
    """A training loader whose state is the next batch to train: ``position()`` gives the epoch and
    the batches of it trained so far; loading the state makes the sampler skip those batches."""

    def __init__(self, *args, position: Callable[[], tuple[int, int]], **kwargs):
        super().__init__(*args, **kwargs)
        self._position = position

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self._position()
        if batches >= len(self):
            epoch, batches = epoch + 1, 0
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume(state["epoch"], state["batches"] * self.batch_size)


class DetectionDataModule(L.LightningDataModule):
    def __init__(self, cfg: ExperimentConfig):
        super().__init__()
        self.cfg = cfg
        self.train_split, self.evaluation_split = load_splits(cfg.data)
        """The validated val split, all of it: what the run's evaluation scores."""
        self.val_split = self.evaluation_split
        """What validation during training scores: the first ``train.val_max_images`` of it, if set."""
        if cfg.train.val_max_images is not None:
            self.val_split = dataclasses.replace(self.val_split, image_ids=self.val_split.image_ids[:cfg.train.val_max_images])
        cache_mb = cfg.data.cache_mb
        self.train_dataset = CocoDetectionDataset(self.train_split, train=True, seed=cfg.train.seed,
                                                  drop_empty=cfg.data.filter_empty, cache_mb=cache_mb)
        self.val_dataset = CocoDetectionDataset(self.val_split, train=False, cache_mb=cache_mb)
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
        if self.cfg.data.num_workers > 0:
            dataset.preload()  # in the workers' memory from the fork on; what they decode is lost with them
        sampler = ShardedSampler(dataset, rank, world, shuffle=train, seed=self.cfg.train.seed, drop_tail=train)
        options = dict(batch_size=batch_size, sampler=sampler, drop_last=train, collate_fn=collate_detection,
                       num_workers=self.cfg.data.num_workers, persistent_workers=False)
        if train:
            return ResumableLoader(dataset, position=self._train_position, **options)
        return DataLoader(dataset, **options)

    def _train_position(self) -> tuple[int, int]:
        trainer = self.trainer
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.completed

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, self.cfg.train.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, self.cfg.eval.batch_size, train=False)
