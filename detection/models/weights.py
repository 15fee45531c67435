"""Weight files: read as tensors only (nothing in a file runs), and their key names mapped to ours.

Checkpoints of other tools wrap or rename a state_dict: ``{"state_dict": ...}`` (Lightning, mmdet),
``{"model": ...}`` (Detectron2), a ``backbone.`` prefix (mmdet detectors), Detectron2's ResNet names.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from torch import Tensor

from detection.config import ConfigError

PICKLE_SUFFIXES = (".pkl", ".pickle")
BACKBONE_PREFIXES = ("backbone.bottom_up.", "backbone.")
"""The backbone's part of a Detectron2 / mmdet detector checkpoint (the first that occurs is kept)."""

_DETECTRON2_BLOCK = re.compile(r"^res([2-5])\.(\d+)\.(conv[1-3]|shortcut)\.(norm\.)?(.+)$")
_DETECTRON2_STEM = re.compile(r"^stem\.conv1\.(norm\.)?(.+)$")
_TORCHVISION_LAYER = {"conv1": ("conv1", "bn1"), "conv2": ("conv2", "bn2"), "conv3": ("conv3", "bn3"),
                      "shortcut": ("downsample.0", "downsample.1")}


def require_file(path: Path, field: str, fix: str) -> Path:
    """``path`` if it is a file; a ConfigError naming ``field`` and how to ``fix`` it otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{field}: {path} does not exist; {fix}")
    return path


def read_state_dict(path: Path, field: str, fix: str) -> dict[str, Tensor]:
    """The tensors saved in ``path`` with ``torch.save``, loaded with ``weights_only=True``; a
    checkpoint's ``state_dict`` (or ``model``) entry where the file holds a whole checkpoint."""
    path = require_file(path, field, fix)
    if path.suffix in PICKLE_SUFFIXES:
        raise ConfigError(f"{field}: {path} is a pickle, which is not loaded (unpickling can run code); convert "
                          "it with torch where you trust it: torch.save({name: torch.as_tensor(array)}, 'file.pth')")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{field}: {path} is not a loadable state_dict ({detail})") from None
    for entry in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(entry), dict):
            state = state[entry]
            break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"{field}: {path} does not hold a state_dict of tensors")
    return state


def resnet_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A ResNet state_dict in torchvision's names (``conv1``, ``bn1``, ``layer1.0.downsample.0``),
    from torchvision's or mmdet's own (the same), a detector's ``backbone.`` part, or Detectron2's
    (``stem.conv1.norm``, ``res2.0.shortcut``: ``res<k>`` is ``layer<k-1>``)."""
    for prefix in BACKBONE_PREFIXES:
        if any(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
            break
    return {_torchvision_resnet_key(key): value for key, value in state.items()}


def _torchvision_resnet_key(key: str) -> str:
    if stem := _DETECTRON2_STEM.match(key):
        return f"{'bn1' if stem[1] else 'conv1'}.{stem[2]}"
    if block := _DETECTRON2_BLOCK.match(key):
        stage, index, layer, norm, rest = block.groups()
        return f"layer{int(stage) - 1}.{index}.{_TORCHVISION_LAYER[layer][bool(norm)]}.{rest}"
    return key


def few(keys: list[str], shown: int = 4) -> str:
    """``keys`` for an error message: the count and the first few."""
    more = ", ..." if len(keys) > shown else ""
    return f"{len(keys)} [{', '.join(keys[:shown])}{more}]"
