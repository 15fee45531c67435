"""Shared fixtures: one small built-in data set per test session, and helpers to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from detection.config import PretrainConfig
from detection.data import write_synthetic_coco
from detection.engine.pretrain import pretrain

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(2)


def tiny_weights_path(root: Path) -> Path:
    """The pre-trained tiny backbone that the ``synthetic_root`` fixture writes beside its set."""
    return root.parent / "pretrained" / "tiny_backbone.pt"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A 64/16-image built-in set and, beside it, a tiny backbone pre-trained for a few seconds."""
    root = tmp_path_factory.mktemp("data") / "synthetic"
    write_synthetic_coco(root, seed=0, num_train=64, num_val=16, image_size=128)
    pretrain(PretrainConfig(num_train=512, num_val=64, epochs=1), tiny_weights_path(root), progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_weights(synthetic_root) -> Path:
    return tiny_weights_path(synthetic_root)


def tiny_overrides(root: Path, **extra: object) -> list[str]:
    """Overrides that turn a tiny config into a seconds-long run on ``root`` (from the fixture's backbone)."""
    sets = {"data.root": str(root), "model.backbone.weights": str(tiny_weights_path(root)), "train.epochs": 1,
            "train.milestones": "[]",
            "train.batch_size": 4, "train.warmup_steps": 2, "train.log_every_n_steps": 1, "eval.batch_size": 8,
            "data.max_images": 16}
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


def libra(*args: str, check: bool = True, timeout: float = 600, **popen) -> subprocess.CompletedProcess:
    """Run the `libra` CLI in a fresh process (as a user would; required for DDP)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "stages.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"libra {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def checkpoint_complete(path: Path) -> bool:
    """Whether ``path`` is a whole checkpoint: Lightning writes it in place, so it exists while being written,
    and a process killed then leaves a torn file. torch's zip format ends with its directory, written last."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False
