"""Initialising a detector from another detector's weights (``model.init_from``: fine-tuning).

The source is a ``libra train`` checkpoint or a torchvision detection state_dict of the same
architecture, whose names are this project's except that a body feeding the FPN from its later stages
sits one level deeper here (``backbone.body.layer2`` is ``backbone.body.body.layer2``). Of a checkpoint
the weights loaded are those its run evaluated: the moving average where it kept one
(``train.ema_decay``), else the trained detector.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from detection.config import ConfigError
from detection.models.weights import few, read_state_dict

LIGHTNING_PREFIX = "model."
"""``DetectionModule`` keeps the detector as ``self.model``."""
EMA_PREFIX = "ema."
"""``DetectionModule`` keeps the detector's moving average (``train.ema_decay``) as ``self.ema``."""
INIT_FROM_FIX = "point model.init_from at a `libra train` checkpoint (checkpoints/last.ckpt) or a detector state_dict"


@dataclass(frozen=True)
class InitReport:
    """What ``model.init_from`` did to each tensor of the detector."""

    source: str
    loaded: list[str]
    reinitialised: list[str]
    """Class-dependent predictor tensors kept at their fresh initialisation (``init_reset_heads``)."""
    not_in_source: list[str]
    """The detector's tensors the source has no counterpart for: kept at their fresh initialisation."""
    not_used: list[str]
    """The source's tensors that match nothing in the detector."""

    def to_dict(self) -> dict[str, Any]:
        return {"init_from": self.source, "loaded": len(self.loaded), "reinitialised": self.reinitialised,
                "not_in_source": self.not_in_source, "not_used": self.not_used}

    def summary(self) -> str:
        return (f"model.init_from {self.source}: loaded {len(self.loaded)} tensors; re-initialised "
                f"{few(self.reinitialised)}; not in the source {few(self.not_in_source)}; "
                f"not used {few(self.not_used)}")


def _evaluated_detector(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Of a ``libra train`` checkpoint's state_dict, the detector its run evaluated (the EMA's where it has
    one), keys without the prefix; any other state_dict as it is."""
    if not state or not all(key.startswith((LIGHTNING_PREFIX, EMA_PREFIX)) for key in state):
        return state
    prefix = EMA_PREFIX if any(key.startswith(EMA_PREFIX) for key in state) else LIGHTNING_PREFIX
    return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}


def _our_name(key: str, own: dict[str, Tensor]) -> str | None:
    for candidate in (key, key.replace("backbone.body.", "backbone.body.body.", 1)):
        if candidate in own:
            return candidate
    return None


def load_detector_weights(model: nn.Module, path: Path, class_layers: tuple[str, ...], reset_heads: bool,
              not_weights: tuple[str, ...] = ()) -> InitReport:
    """Copy the tensors of the detector checkpoint at ``path`` into ``model``.

    Tensors under ``class_layers`` (whose shapes follow the number of classes) are left as built
    when ``reset_heads``; those under ``not_weights`` (a run's statistics) always are. A shape
    mismatch is an error naming the tensors; so is a source of which nothing matches.
    """
    state = _evaluated_detector(read_state_dict(path, "model.init_from", INIT_FROM_FIX))
    own = model.state_dict()
    skipped = not_weights + (class_layers if reset_heads else ())
    mapped: dict[str, Tensor] = {}
    not_used = []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):  # BatchNorm's step counter; frozen BatchNorm has none
            continue
        name = _our_name(key, own)
        if name is None:
            not_used.append(key)
        elif not name.startswith(skipped):
            mapped[name] = value
    mismatched = [name for name, value in mapped.items() if value.shape != own[name].shape]
    if mismatched:
        shapes = few([f"{name} {tuple(mapped[name].shape)} vs {tuple(own[name].shape)}" for name in mismatched])
        hint = ("the number of classes differs: set model.init_reset_heads: true to re-initialise these "
                "predictor layers" if all(name.startswith(class_layers) for name in mismatched)
                else "model.init_from must be a detector of the same architecture (backbone, widths, head)")
        raise ConfigError(f"model.init_from: {path}: shape mismatch (source vs this detector) {shapes}; {hint}")
    if not mapped:
        raise ConfigError(f"model.init_from: {path}: none of its {len(state)} tensors matches this detector "
                          f"(e.g. {few(sorted(state), 3)}); {INIT_FROM_FIX}")
    model.load_state_dict(mapped, strict=False)
    reinitialised = [name for name in own if reset_heads and name.startswith(class_layers)]
    not_in_source = [name for name in own if name not in mapped and not name.startswith(skipped)]
    return InitReport(str(path), sorted(mapped), reinitialised, not_in_source, not_used)
