"""Pre-train the tiny backbone as an image classifier: the tiny profile's stand-in for ImageNet.

The papers start every detector from an ImageNet-trained ResNet-50. On the built-in set the
same role is played by a classification set of single shapes (objects and distractors) and
empty images, generated from :attr:`PretrainConfig.seed` in streams of its own, so it shares no
image with the detection set. The classifier is the backbone, global average pooling and one
linear layer; only the backbone's weights are kept.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detection.config import PretrainConfig
from detection.data import SHAPE_LABELS, render_shape_example
from detection.io import write_bytes_atomic
from detection.models.tiny_backbone import TinyBackbone

_STREAM = 7  # keeps the classification set's random streams apart from the detection set's
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
"""The normalisation of torchvision's detection transform, so the features match what the detectors see."""


def shape_images(seed: int, split: int, count: int, size: int) -> tuple[Tensor, Tensor]:
    """``count`` images of the classification set (uint8 [N, 3, size, size]) and their labels."""
    pixels, labels = [], []
    for index in range(count):
        rng = np.random.Generator(np.random.PCG64([seed, _STREAM, split, index]))
        image, label = render_shape_example(rng, size)
        pixels.append(image)
        labels.append(label)
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


class ShapeClassifier(nn.Module):
    """Backbone -> global average pool of its last stage -> linear layer over :data:`SHAPE_LABELS`."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        self.backbone = TinyBackbone(channels)
        self.classifier = nn.Linear(channels[-1], len(SHAPE_LABELS))

    def forward(self, images: Tensor) -> Tensor:
        x = (images.float() / 255.0 - _MEAN) / _STD
        last = list(self.backbone(x).values())[-1]
        return self.classifier(last.mean(dim=(2, 3)))


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int) -> float:
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])
    model.train()
    return float((predicted == labels).float().mean())


def pretrain(cfg: PretrainConfig, out: Path, progress: bool = True) -> dict[str, Any]:
    """Train the classifier, save the backbone's ``state_dict`` to ``out`` (atomically).

    Returns a summary: sizes, train/val accuracy, chance level, seconds spent generating and training.
    """
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    train_x, train_y = shape_images(cfg.seed, 0, cfg.num_train, cfg.image_size)
    val_x, val_y = shape_images(cfg.seed, 1, cfg.num_val, cfg.image_size)
    generated = time.perf_counter()

    model = ShapeClassifier(cfg.channels)
    steps_per_epoch = -(-cfg.num_train // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total, pct_start=0.15)
    order_rng = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(cfg.epochs):
        order = torch.randperm(cfg.num_train, generator=order_rng)
        for i in range(steps_per_epoch):
            batch = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            images = train_x[batch]
            flip = torch.rand(len(batch), generator=order_rng) < 0.5
            images[flip] = images[flip].flip(-1)
            loss = F.cross_entropy(model(images), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if progress:
            print(f"pretrain epoch {epoch + 1}/{cfg.epochs}: loss {loss.item():.3f}", flush=True)
    trained = time.perf_counter()

    summary = {
        "labels": list(SHAPE_LABELS),
        "num_train": cfg.num_train,
        "num_val": cfg.num_val,
        "image_size": cfg.image_size,
        "train_accuracy": accuracy(model, train_x[:cfg.num_val], train_y[:cfg.num_val], cfg.batch_size),
        "val_accuracy": accuracy(model, val_x, val_y, cfg.batch_size),
        "chance_accuracy": 1.0 / len(SHAPE_LABELS),
        "seconds_generate": round(generated - start, 2),
        "seconds_train": round(trained - generated, 2),
    }
    write_bytes_atomic(out, state_dict_bytes(model.backbone.state_dict()))
    return summary


def state_dict_bytes(state: dict[str, Tensor]) -> bytes:
    """``torch.save`` of ``state`` into memory: the same tensors give the same bytes (saved to a file, the
    archive inside is named after that file, and a temporary file's name differs between runs)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()

