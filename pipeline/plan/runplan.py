"""The plan on disk: one plan file per planned ablation run, and the summary of the whole plan.

``libra plan`` writes one YAML file per (detector, combination, seed) that the ablation design selects::

    detector: faster_rcnn
    combination: IS+BFP
    components: [IS, BFP]
    seed: 0
    run_dir: runs/faster_rcnn/IS+BFP/seed0
    config: {...}           # the resolved experiment config (what `libra train --config` takes)

and ``runs/plan/ablation.yaml`` holds the :class:`PlanSummary` (design, seeds, per detector its
combinations, and every run with its plan file). This module imports nothing heavy, so reading plans
stays cheap.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pydantic import Field

from pipeline.plan.code_digest import code_digest
from detection.config import ConfigError, ExperimentConfig, Int, StrictModel, load_yaml, validate_config, validate_model
from detection.io import write_text_atomic
from detection.run_dir import RunDir


@dataclass(frozen=True)
class RunPlan:
    detector: str
    combination: str
    components: tuple[str, ...]
    seed: int
    run_dir: Path
    config: dict[str, Any]

    @property
    def name(self) -> str:
        """``detector/combination/seed<k>``, the run's name in reports and MLflow."""
        return f"{self.detector}/{self.combination}/seed{self.seed}"

    def experiment_config(self) -> ExperimentConfig:
        return validate_config(self.config, f"plan of {self.name}")

    def to_dict(self) -> dict[str, Any]:
        return {"detector": self.detector, "combination": self.combination, "components": list(self.components),
                "seed": self.seed, "run_dir": self.run_dir.as_posix(),
                "config": self.config}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<plan>") -> RunPlan:
        try:
            return cls(detector=str(raw["detector"]), combination=str(raw["combination"]),
                       components=tuple(raw["components"]), seed=int(raw["seed"]),
                       run_dir=Path(raw["run_dir"]), config=dict(raw["config"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: not a run plan written by `libra plan` ({exc!r})") from None


def write_run_plan(plan: RunPlan, path: Path) -> None:
    write_text_atomic(path, yaml.safe_dump(plan.to_dict(), sort_keys=False))


def read_run_plan(path: Path) -> RunPlan:
    try:
        raw = load_yaml(Path(path).read_text(), str(path))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the run plan ({exc.strerror}); run `libra plan` first") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: not a run plan written by `libra plan`")
    return RunPlan.from_dict(raw, str(path))



class DetectorCombinations(StrictModel):
    components: tuple[str, ...]
    combinations: tuple[str, ...]
    """The combinations the design trains, in report order."""


class PlannedRunEntry(StrictModel):
    name: str
    detector: str
    combination: str
    seed: Int
    run_dir: Path
    plan: Path
    """The run's plan file, relative to the repository."""


class PlanSummary(StrictModel):
    """``runs/plan/ablation.yaml``: the design and its runs, in plan order."""

    profile: str
    design: str
    seeds: tuple[Int, ...] = Field(min_length=1)
    detectors: dict[str, DetectorCombinations]
    runs: tuple[PlannedRunEntry, ...]


def write_plan_summary(summary: PlanSummary, path: Path) -> None:
    write_text_atomic(path, yaml.safe_dump(summary.model_dump(mode="json"), sort_keys=False))


def read_plan_summary(plan_dir: Path) -> PlanSummary:
    path = Path(plan_dir) / "ablation.yaml"
    try:
        raw = load_yaml(path.read_text(), str(path))
    except OSError as exc:
        raise ConfigError(f"{path}: no ablation plan ({exc.strerror}); run `libra plan` (or `dvc repro`) first") from None
    return validate_model(PlanSummary, raw, f"{path} (written by `libra plan`)")


EVALUATION_STARTED = "libra run: training finished; evaluating"
"""The line ``libra run`` prints between its two steps: a failure after it is the evaluation's."""

def compute_run_key(config: dict[str, Any], data_digest: str, weights_digest: str | None,
                    init_digest: str | None = None) -> str:
    """The identity of a run's result: its resolved config (seed included), its data, its backbone
    weights, the detector it starts from (``model.init_from``, when set) and the code it executes
    (:func:`pipeline.plan.code_digest.code_digest`: the ``detection`` package less the components it does
    not enable). Every description of a run key points here."""
    identity = {"config": config, "data": data_digest, "weights": weights_digest, "code": code_digest(config)}
    if init_digest is not None:
        identity["init_from"] = init_digest
    payload = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def read_run_key(run_dir: Path) -> str:
    """The key ``libra dispatch`` wrote to ``run_dir``; a ConfigError naming the file when there is none."""
    path = RunDir(run_dir).run_key
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing; the run was not made by `libra dispatch` (run `dvc repro`)") from None
