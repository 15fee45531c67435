"""One planned ablation run on disk: its plan file, and what a run outside the design leaves behind.

``libra plan`` writes one YAML file per (detector, combination, seed) of the DVC matrix::

    detector: faster_rcnn
    combo: IS+BFP
    components: [IS, BFP]
    seed: 0
    selected: true          # false: not in the chosen ablation.design; the run is skipped
    run_dir: runs/faster_rcnn/IS+BFP/seed0
    config: {...}           # the resolved experiment config (what `libra train --config` takes)

The matrix spans every combination DVC may be asked for (its list is static), so runs the design
does not select still exist as stages; they write the small marker outputs below in a fraction of
a second instead of training. This module imports nothing heavy, so such a stage stays cheap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ConfigError, ExperimentConfig, validate_config
from pipeline.io import write_text_atomic

SKIP_MARKER = "SKIPPED"
"""File in ``<run>/checkpoints/`` that marks a run the design does not select."""


@dataclass(frozen=True)
class RunPlan:
    detector: str
    combo: str
    components: tuple[str, ...]
    seed: int
    selected: bool
    run_dir: Path
    config: dict[str, Any]

    @property
    def name(self) -> str:
        """``detector/combo/seed<k>``, the run's name in reports and MLflow."""
        return f"{self.detector}/{self.combo}/seed{self.seed}"

    def experiment_config(self) -> ExperimentConfig:
        return validate_config(self.config, f"plan of {self.name}")

    def to_dict(self) -> dict[str, Any]:
        return {"detector": self.detector, "combo": self.combo, "components": list(self.components),
                "seed": self.seed, "selected": self.selected, "run_dir": self.run_dir.as_posix(),
                "config": self.config}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<plan>") -> RunPlan:
        try:
            return cls(detector=str(raw["detector"]), combo=str(raw["combo"]),
                       components=tuple(raw["components"]), seed=int(raw["seed"]),
                       selected=bool(raw["selected"]), run_dir=Path(raw["run_dir"]), config=dict(raw["config"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: not a run plan written by `libra plan` ({exc!r})") from None


def write_run_plan(plan: RunPlan, path: Path) -> None:
    write_text_atomic(path, yaml.safe_dump(plan.to_dict(), sort_keys=False))


def read_run_plan(path: Path) -> RunPlan:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the run plan ({exc.strerror}); run `libra plan` first") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: not a run plan written by `libra plan`")
    return RunPlan.from_dict(raw, str(path))


def is_skipped(run_dir: Path) -> bool:
    return (Path(run_dir) / "checkpoints" / SKIP_MARKER).exists()


def write_skipped_training(plan: RunPlan, run_dir: Path, reason: str) -> None:
    """The train stage's outputs for a run outside the design: no checkpoint, empty logs and curves."""
    run_dir = Path(run_dir)
    write_text_atomic(run_dir / "checkpoints" / SKIP_MARKER, f"{plan.name}: {reason}\n")
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(plan.config, sort_keys=False))
    write_text_atomic(run_dir / "metrics.csv", "epoch,step\n")
    write_text_atomic(run_dir / "curves" / "train_loss.csv", "epoch,train_loss\n")
    write_text_atomic(run_dir / "curves" / "val_AP.csv", "epoch,val_AP\n")


def write_skipped_evaluation(run_dir: Path) -> None:
    """The evaluate stage's outputs for a skipped run."""
    reason = (Path(run_dir) / "checkpoints" / SKIP_MARKER).read_text().strip()
    write_text_atomic(Path(run_dir) / "metrics.json", json.dumps({"skipped": True, "reason": reason}, indent=1))
    write_text_atomic(Path(run_dir) / "detections.json", "[]")
