"""The ablation as DVC runs it: ``params.yaml`` resolved into one experiment config per run.

``params.yaml`` holds a ``profile`` (which base config and budget), the ``data`` and ``trainer``
settings shared by every run, the ``ablation`` (design, seeds, and per detector its components and
the paper-table rows) and one section of component knobs per detector. The design selects the
runs: ``table``, the papers' rows; ``factorial``, every combination of the detector's components.
Only the selected runs are planned. A run's config is::

    configs/<detector>_<profile.config>.yaml
      <- profiles.<profile>.set                      (budget: epochs, batch, ...; the config's structure)
      <- data.* and trainer.* that are not null      (e.g. data.source=coco, trainer.devices=8)
      <- train.seed = seed
      <- components.<c>.enabled = true and the knobs of <detector>.<c>, for the enabled c only

so a run depends only on the knobs of the components it uses: changing the Balanced L1 ``alpha``
of Faster R-CNN changes the configs of the Faster R-CNN runs with BL and nothing else.

Combination names are ``baseline`` or component short names joined by ``+`` in the order of the
detector's ``components`` list, e.g. ``IS+BFP+BL``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ConfigError, DataConfig, ExperimentConfig, load_config
from pipeline.io import digest_files, flatten, write_text_atomic
from pipeline.runplan import RunPlan, write_run_plan

COMPONENTS: dict[str, str] = {
    "IS": "iou_balanced_sampling",
    "BFP": "bfp",
    "BL": "balanced_l1",
    "IoU-cls": "iou_balanced_cls",
    "IoU-loc": "iou_balanced_loc",
}
"""Short name (used in combination names and report columns) -> section of ``components`` in the config."""

DETECTOR_COMPONENTS: dict[str, tuple[str, ...]] = {
    "faster_rcnn": ("IS", "BFP", "BL"),
    "retinanet": ("BFP", "BL", "IoU-cls", "IoU-loc"),
}
"""The components each detector's builder wires in (IS acts in the R-CNN head sampler only)."""

BASELINE = "baseline"
DESIGNS = ("table", "factorial")
DETECTOR_ABLATION_KEYS = {"components", "table"}
SYNTHETIC_ROOT = Path("data/synthetic")
"""Where the prepare stage writes the built-in set (its DVC output)."""

PROFILE_KEYS = {"config", "data", "set", "pretrain"}
DATA_PARAM_KEYS = {"source", "root", "seed", "max_images", "train_annotations", "val_annotations",
                   "train_images", "val_images", "num_workers"}
SYNTHETIC_SIZE_KEYS = {"num_train", "num_val", "image_size"}


def combo_name(components: tuple[str, ...] | list[str], order: tuple[str, ...]) -> str:
    chosen = [c for c in order if c in components]
    return "+".join(chosen) if chosen else BASELINE


def parse_combo(name: str, order: tuple[str, ...], where: str = "combination") -> tuple[str, ...]:
    """``"IS+BL"`` -> ``("IS", "BL")``, checked against the detector's components and their order."""
    if name == BASELINE:
        return ()
    parts = tuple(name.split("+"))
    unknown = [p for p in parts if p not in order]
    if unknown:
        raise ConfigError(f"{where} {name!r}: unknown component(s) {unknown}; known here: {list(order)}")
    if len(set(parts)) != len(parts) or combo_name(parts, order) != name:
        raise ConfigError(f"{where} {name!r}: write each component once, in the order {'+'.join(order)} "
                          f"(here: {combo_name(parts, order)!r})")
    return parts


def factorial(order: tuple[str, ...]) -> list[str]:
    """Every combination of ``order``: baseline first, then by number of components."""
    return [combo_name(subset, order) for k in range(len(order) + 1) for subset in itertools.combinations(order, k)]


def _section(params: dict[str, Any], key: str, where: str = "params.yaml") -> dict[str, Any]:
    value = params.get(key)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: '{key}' must be a mapping, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class DetectorAblation:
    detector: str
    components: tuple[str, ...]
    variants: tuple[str, ...]
    """The combinations the design trains, in report order."""


@dataclass(frozen=True)
class Ablation:
    profile: str
    design: str
    seeds: tuple[int, ...]
    detectors: dict[str, DetectorAblation]
    runs: tuple[RunPlan, ...]
    """The runs the design selects, detector by detector, combination by combination, seed by seed."""

    def summary(self) -> dict[str, Any]:
        """What ``runs/plan/ablation.yaml`` holds: the design and its runs."""
        return {
            "profile": self.profile, "design": self.design, "seeds": list(self.seeds),
            "detectors": {d: {"components": list(a.components), "variants": list(a.variants)}
                          for d, a in self.detectors.items()},
            "runs": [{"name": r.name, "detector": r.detector, "combo": r.combo, "seed": r.seed,
                      "run_dir": r.run_dir.as_posix(), "plan": plan_path(r.detector, r.combo, r.seed).as_posix()}
                     for r in self.runs],
        }


def write_plan(ablation: Ablation, out: Path) -> None:
    """``out/<detector>/<combo>/seed<k>.yaml`` per run and ``out/ablation.yaml``; ``out`` is replaced as a whole."""
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    for plan in ablation.runs:
        write_run_plan(plan, plan_path(plan.detector, plan.combo, plan.seed, staging))
    write_text_atomic(staging / "ablation.yaml", yaml.safe_dump(ablation.summary(), sort_keys=False))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def plan_path(detector: str, combo: str, seed: int, plan_dir: Path = Path("runs/plan")) -> Path:
    return plan_dir / detector / combo / f"seed{seed}.yaml"


def run_dir(detector: str, combo: str, seed: int, runs_dir: Path = Path("runs")) -> Path:
    return runs_dir / detector / combo / f"seed{seed}"


def _profile(params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    name = params.get("profile")
    profiles = _section(params, "profiles")
    if name not in profiles:
        raise ConfigError(f"params.yaml: profile {name!r} is not one of profiles: {sorted(profiles)}")
    profile = profiles[name]
    if not isinstance(profile, dict) or "config" not in profile:
        raise ConfigError(f"params.yaml: profiles.{name} must be a mapping with at least 'config'")
    unknown = set(profile) - PROFILE_KEYS
    if unknown:
        raise ConfigError(f"params.yaml: profiles.{name} has unknown keys {sorted(unknown)}; allowed: {sorted(PROFILE_KEYS)}")
    return name, profile


def _overrides(prefix: str, values: dict[str, Any]) -> list[str]:
    """Non-null entries as ``prefix.key=<JSON value>`` (JSON is YAML, so values keep their types)."""
    return [f"{prefix}{key}={json.dumps(value)}" for key, value in values.items() if value is not None]


def _data_overrides(params: dict[str, Any], profile: dict[str, Any]) -> list[str]:
    data = _section(params, "data")
    unknown = set(data) - DATA_PARAM_KEYS
    if unknown:
        raise ConfigError(f"params.yaml: data has unknown keys {sorted(unknown)}; allowed: {sorted(DATA_PARAM_KEYS)}")
    sizes = profile.get("data") or {}
    unknown = set(sizes) - SYNTHETIC_SIZE_KEYS
    if unknown:
        raise ConfigError(f"params.yaml: profiles.{params['profile']}.data has unknown keys {sorted(unknown)}; "
                          f"allowed: {sorted(SYNTHETIC_SIZE_KEYS)}")
    if data.get("source", "synthetic") == "synthetic":
        root = data.get("root")
        if root is not None and Path(root) != SYNTHETIC_ROOT:
            raise ConfigError(f"params.yaml: data.root={root!r} with data.source=synthetic; the prepare stage "
                              f"writes the built-in set to {SYNTHETIC_ROOT} (its DVC output), so leave data.root there")
    return _overrides("data.", {**sizes, **data})


def base_overrides(params: dict[str, Any]) -> tuple[str, list[str]]:
    """The profile's config suffix and the overrides every run shares (profile budget, data, trainer)."""
    _, profile = _profile(params)
    sets = profile.get("set") or {}
    if not isinstance(sets, dict):
        raise ConfigError(f"params.yaml: profiles.{params['profile']}.set must be a mapping in the config's "
                          "structure, e.g. {train: {epochs: 6}}")
    trainer = params.get("trainer") or {}
    return str(profile["config"]), [*_overrides("", flatten(sets)), *_data_overrides(params, profile),
                                    *_overrides("trainer.", trainer)]


def resolve_config(params: dict[str, Any], detector: str, components: tuple[str, ...], seed: int,
                   configs_dir: Path = Path("configs")) -> ExperimentConfig:
    """The experiment config of one run (see the module docstring for the precedence)."""
    suffix, shared = base_overrides(params)
    config_file = configs_dir / f"{detector}_{suffix}.yaml"
    if not config_file.exists():
        raise ConfigError(f"{config_file}: no such config for profile {params['profile']!r} "
                          f"(profiles.{params['profile']}.config: {suffix})")
    knobs = params.get(detector) or {}
    sets = [*shared, f"train.seed={seed}"]
    for short in components:
        section = COMPONENTS[short]
        values = knobs.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"params.yaml: {detector}.{section} must map knob names to values")
        sets += [f"components.{section}.enabled=true", *_overrides(f"components.{section}.", values)]
    return load_config(config_file, sets)


def data_config(params: dict[str, Any], configs_dir: Path = Path("configs")) -> DataConfig:
    """The data settings every run of the ablation uses."""
    detector = next(iter(DETECTOR_COMPONENTS))
    return resolve_config(params, detector, (), 0, configs_dir).data


def _detector_ablation(params: dict[str, Any], detector: str, design: str) -> DetectorAblation:
    where = f"params.yaml: ablation.{detector}"
    section = _section(_section(params, "ablation"), detector, "params.yaml: ablation")
    unknown = set(section) - DETECTOR_ABLATION_KEYS
    if unknown:
        raise ConfigError(f"{where} has unknown keys {sorted(unknown)}; allowed: {sorted(DETECTOR_ABLATION_KEYS)}")
    known = DETECTOR_COMPONENTS[detector]
    components = tuple(section.get("components") or known)
    bad = [c for c in components if c not in known]
    if bad:
        raise ConfigError(f"{where}.components: {bad} are not wired into {detector} (it has {list(known)})")
    table = tuple(section.get("table") or ())
    for name in table:
        parse_combo(name, components, f"{where}.table: combination")
    if len(set(table)) != len(table):
        raise ConfigError(f"{where}.table lists a combination twice: {list(table)}")
    if design == "table":
        if not table:
            raise ConfigError(f"{where}.table is empty; list the rows to train, e.g. [baseline, ...]")
        variants = table
    else:
        variants = tuple(factorial(components))
    return DetectorAblation(detector, components, variants)


def plan_ablation(params: dict[str, Any], configs_dir: Path = Path("configs")) -> Ablation:
    """Validate ``params`` and resolve every run the design selects into a :class:`RunPlan`."""
    profile, _ = _profile(params)
    ablation = _section(params, "ablation")
    design = ablation.get("design")
    if design not in DESIGNS:
        raise ConfigError(f"params.yaml: ablation.design must be one of {list(DESIGNS)}, got {design!r}")
    seeds = ablation.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"params.yaml: ablation.seeds must be a non-empty list of distinct integers, got {seeds!r}")
    unknown = set(ablation) - {"design", "seeds", *DETECTOR_COMPONENTS}
    if unknown:
        raise ConfigError(f"params.yaml: ablation has unknown keys {sorted(unknown)}")
    detectors = {d: _detector_ablation(params, d, design) for d in DETECTOR_COMPONENTS if d in ablation}
    runs = []
    for detector, det in detectors.items():
        for combo in det.variants:
            components = parse_combo(combo, det.components)
            config = resolve_config(params, detector, components, 0, configs_dir).to_dict()
            for seed in seeds:
                config = {**config, "train": {**config["train"], "seed": seed}}
                runs.append(RunPlan(detector=detector, combo=combo, components=components, seed=seed,
                                    run_dir=run_dir(detector, combo, seed), config=config))
    return Ablation(profile, design, tuple(seeds), detectors, tuple(runs))


def run_key(config: dict[str, Any], dataset_digest: str) -> str:
    """Identity of a run's result: its resolved config (seed included) and its data."""
    payload = json.dumps({"config": config, "data": dataset_digest}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def file_digest(paths: list[Path]) -> str:
    """SHA-256 over the bytes of ``paths`` (in order), each prefixed by its name."""
    return digest_files(((Path(path).name, Path(path)) for path in paths), hash_each=False)


def read_params(path: Path = Path("params.yaml")) -> dict[str, Any]:
    from pipeline.config import read_yaml

    return read_yaml(path)


def ablation_key(parent_params: dict[str, str], run_keys: list[str]) -> str:
    """Identity of an ablation: the parameters that define it and the keys of its runs."""
    payload = json.dumps({"params": parent_params, "runs": sorted(run_keys)}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
