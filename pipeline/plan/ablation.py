"""The ablation as DVC runs it: ``params.yaml`` resolved into one experiment config per run.

``params.yaml`` (typed by :mod:`pipeline.plan.params`) holds a ``profile`` (which base config and
budget), the ``data`` and ``trainer`` settings shared by every run, the ``ablation`` (design,
seeds, and per detector its components and the paper-table rows) and, per detector, optional
component knobs. The design selects the runs: ``table``, the papers' rows; ``factorial``, every
combination of the detector's components. Only the selected runs are planned. A run's config is
:func:`pipeline.plan.compose.compose_config` of its detector, the profile, its components and its seed,
so a run depends only on the knobs of the components it uses: setting the Balanced L1 ``alpha`` of
Faster R-CNN changes the configs of the Faster R-CNN runs with BL and nothing else.

Combination names are ``baseline`` or component short names joined by ``+`` in the order of the
detector's ``components`` list, e.g. ``IS+BFP+BL``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from detection.config import DataConfig, ExperimentConfig
from detection.io import digest_files
from detection.ownership import PLAN, replacing
from pipeline.plan.compose import compose_config
from pipeline.plan.params import DETECTOR_COMPONENTS, Params, combination_name, parse_combination
from pipeline.plan.runplan import (DetectorCombinations, PlannedRunEntry, PlanSummary, RunPlan, write_plan_summary,
                              write_run_plan)


def factorial(order: tuple[str, ...]) -> list[str]:
    """Every combination of ``order``: baseline first, then by number of components."""
    return [combination_name(subset, order)
            for k in range(len(order) + 1) for subset in itertools.combinations(order, k)]


@dataclass(frozen=True)
class DetectorAblation:
    detector: str
    components: tuple[str, ...]
    combinations: tuple[str, ...]
    """The combinations the design trains, in report order."""


@dataclass(frozen=True)
class Ablation:
    profile: str
    design: str
    seeds: tuple[int, ...]
    detectors: dict[str, DetectorAblation]
    runs: tuple[RunPlan, ...]
    """The runs the design selects, detector by detector, combination by combination, seed by seed."""

    def summary(self) -> PlanSummary:
        """What ``runs/plan/ablation.yaml`` holds: the design and its runs."""
        return PlanSummary(
            profile=self.profile, design=self.design, seeds=self.seeds,
            detectors={d: DetectorCombinations(components=a.components, combinations=a.combinations)
                       for d, a in self.detectors.items()},
            runs=tuple(PlannedRunEntry(name=r.name, detector=r.detector, combination=r.combination, seed=r.seed,
                                       run_dir=r.run_dir, plan=plan_path(r.detector, r.combination, r.seed))
                       for r in self.runs))


def write_plan(ablation: Ablation, out: Path, force: bool = False) -> None:
    """``out/<detector>/<combination>/seed<k>.yaml`` per run and ``out/ablation.yaml``; ``out`` is replaced
    as a whole, if it is a plan this command wrote (or ``force``, see :mod:`detection.ownership`)."""
    with replacing(out, PLAN, force) as staging:
        for plan in ablation.runs:
            write_run_plan(plan, plan_path(plan.detector, plan.combination, plan.seed, staging))
        write_plan_summary(ablation.summary(), staging / "ablation.yaml")


def plan_path(detector: str, combination: str, seed: int, plan_dir: Path = Path("runs/plan")) -> Path:
    return plan_dir / detector / combination / f"seed{seed}.yaml"


def run_dir(detector: str, combination: str, seed: int, runs_dir: Path = Path("runs")) -> Path:
    return runs_dir / detector / combination / f"seed{seed}"


def resolve_config(params: Params, detector: str, components: tuple[str, ...], seed: int,
                   configs_dir: Path = Path("configs")) -> ExperimentConfig:
    """The experiment config of one run of the ablation's profile."""
    return compose_config(params, detector, params.profile, components, seed, configs_dir=configs_dir)


def data_config(params: Params, configs_dir: Path = Path("configs")) -> DataConfig:
    """The data settings every run of the ablation uses."""
    return resolve_config(params, next(iter(DETECTOR_COMPONENTS)), (), 0, configs_dir).data


def plan_ablation(typed: Params, configs_dir: Path = Path("configs")) -> Ablation:
    """Resolve every run the design of ``typed`` (params.yaml, typed) selects into a :class:`RunPlan`."""
    design = typed.ablation.design
    detectors = {}
    for detector, section in typed.ablation.detectors().items():
        components = section.components or DETECTOR_COMPONENTS[detector]
        combinations = section.table if design == "table" else tuple(factorial(components))
        detectors[detector] = DetectorAblation(detector, components, combinations)
    runs = []
    for detector, det in detectors.items():
        for combination in det.combinations:
            components = parse_combination(combination, det.components)
            config = resolve_config(typed, detector, components, 0, configs_dir).to_dict()
            for seed in typed.ablation.seeds:
                config = {**config, "train": {**config["train"], "seed": seed}}
                runs.append(RunPlan(detector=detector, combination=combination, components=components, seed=seed,
                                    run_dir=run_dir(detector, combination, seed), config=config))
    return Ablation(typed.profile, design, typed.ablation.seeds, detectors, tuple(runs))


def file_digest(paths: list[Path]) -> str:
    """SHA-256 over the bytes of ``paths`` (in order), each prefixed by its name."""
    return digest_files(((Path(path).name, Path(path)) for path in paths), hash_each=False)


def ablation_key(parent_params: dict[str, str], run_keys: list[str]) -> str:
    """Identity of an ablation: the parameters that define it and the keys of its runs."""
    payload = json.dumps({"params": parent_params, "runs": sorted(run_keys)}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
