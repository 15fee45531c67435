"""What one study runs: the study file, the profile and the user's overrides, composed into trial configs.

A trial's config is :func:`pipeline.plan.compose.compose_config`, the same composition as an ablation
run's: the detector of the study's ``base_config`` (``configs/<detector>_<c>.yaml`` with the
profile's config suffix ``c``), the profile's overrides, the components the study's ``fixed``
enables (with the knobs ``params.yaml`` sets for them), then one device per trial, the study's
``fixed`` overrides, the user's ``--set`` overrides, and last the sampled parameters (later wins).
A study's ``baseline: defaults`` becomes the values of the searched keys in that config without
sampled values.
``TuningPlan.validate`` builds the config at every corner of the search space, so a bad key or an
out-of-range value fails before any trial is created.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.plan.compose import base_config_file, compose_config
from pydantic import ValidationError

from detection.config import ConfigError, ExperimentConfig, parse_override, read_yaml
from detection.io import flatten
from pipeline.plan.params import COMPONENTS
from pipeline.report.results import AP_UNIT
from pipeline.tuning.profiles import TRIAL_DEVICE, Profile
from pipeline.tuning.space import StudyError, StudySpec

SEED_KEY = "train.seed"
"""The config key of a training's seed: its data order and every module's initial weights (paired seeds)."""


def enabled_components(overrides: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Short names of the components that ``components.<section>.enabled=true`` overrides switch on."""
    enabled = set()
    for text in overrides:
        key, value = parse_override(text)
        if len(key) == 3 and key[0] == "components" and key[2] == "enabled" and value is True:
            enabled.add(key[1])
    return tuple(short for short, section in COMPONENTS.items() if section in enabled)


@dataclass(frozen=True)
class TuningPlan:
    study: str
    """Study file name (``balanced_l1``, ``sampler``, ``iou_balanced``)."""
    spec: StudySpec
    profile_name: str
    profile: Profile
    overrides: tuple[str, ...] = ()
    """The user's ``--set`` overrides, applied to every trial."""
    detector: str = "faster_rcnn"
    base_config: Path = Path()

    @classmethod
    def create(cls, study: str, spec: StudySpec, profile_name: str, profile: Profile,
               overrides: list[str] | tuple[str, ...] = ()) -> TuningPlan:
        try:
            detector = read_yaml(spec.base_config).get("model", {}).get("detector", "faster_rcnn")
            base = base_config_file(profile.params, profile_name, detector, spec.base_config.parent)
        except ConfigError as exc:
            raise StudyError(f"study {study!r}: {exc}") from None
        searched = {p.key for p in spec.params.values()}
        for text in overrides:
            key = ".".join(parse_override(text)[0])
            if key in searched:
                raise StudyError(f"--set {text}: {key} is searched by study {study!r}; drop the override")
        for key in [*(".".join(parse_override(text)[0]) for text in [*spec.fixed, *overrides]), *searched]:
            if key == SEED_KEY:
                raise StudyError(f"study {study!r}: {SEED_KEY} is set per training by the study (--trial-seeds, "
                                 "--validate-seeds); neither the study file nor --set may set it")
        plan = cls(study, spec, profile_name, profile, tuple(overrides), detector, base)
        if spec.baseline == "defaults":
            plan = dataclasses.replace(plan, spec=plan.spec_with_default_baseline())
        return plan

    def spec_with_default_baseline(self) -> StudySpec:
        """The study with ``baseline`` set to the searched keys' values in the trial config composed
        without sampled values (checked, like any baseline, to lie in the search space)."""
        values = flatten(self.config({}).to_dict())
        missing = [p.key for p in self.spec.params.values() if p.key not in values]
        if missing:
            raise ConfigError(f"study {self.study}: baseline: defaults: the config has no field {missing}")
        baseline = {name: values[p.key] for name, p in self.spec.params.items()}
        try:
            return StudySpec.model_validate({**self.spec.model_dump(), "baseline": baseline})
        except ValidationError as exc:
            problems = "; ".join(err["msg"].removeprefix("Value error, ") for err in exc.errors())
            raise StudyError(f"study {self.study!r}: baseline: defaults ({baseline}): {problems}") from None

    @property
    def default_values(self) -> dict[str, Any]:
        """``{config key: value}`` of the default configuration, the one every trial is compared with: the
        study's ``baseline`` (with ``baseline: defaults``, the values the config has without sampling)."""
        return {self.spec.params[name].key: value for name, value in (self.spec.baseline or {}).items()}

    def config(self, values: dict[str, Any], seed: int | None = None) -> ExperimentConfig:
        """The config of the trial that samples ``{config key: value}``, trained at ``seed`` (``train.seed``:
        its data order and initial weights; None: the base config's)."""
        try:
            cfg = compose_config(self.profile.params, self.detector, self.profile_name,
                                 enabled_components(self.spec.fixed), seed, values={**TRIAL_DEVICE, **values},
                                 overrides=[*self.spec.fixed, *self.overrides], configs_dir=self.base_config.parent)
        except ConfigError as exc:
            raise ConfigError(f"study {self.study}, profile {self.profile_name}: {exc}") from None
        check_single_device(cfg)
        return cfg

    def validate(self) -> ExperimentConfig:
        """Build the config at each corner of the search space; returns the first (for data checks)."""
        configs = [self.config(point) for point in self.spec.corner_points()]
        return configs[0]

    @property
    def metric(self) -> str:
        """The validation metric a training is scored by, e.g. ``val/AP`` (AP points)."""
        return f"val/{self.spec.metric}"

    @property
    def objective_name(self) -> str:
        """What a trial's value is, with its unit (optuna-dashboard and the figures show it)."""
        return f"{self.metric} minus the default's, mean over paired seeds ({AP_UNIT})"

    def fingerprint(self) -> str:
        """Identifies what the study optimises: resuming it with another space or profile is refused."""
        payload = {"spec": self.spec.model_dump(mode="json", exclude={"n_trials", "description"}),
                   "profile": self.profile_name, "base_config": str(self.base_config),
                   "profile_values": self.profile.values}
        knobs = self.profile.params.knobs(self.detector)
        set_knobs = {COMPONENTS[c]: getattr(knobs, COMPONENTS[c]) for c in enabled_components(self.spec.fixed)
                     if getattr(knobs, COMPONENTS[c])}
        if set_knobs:  # only then: studies begun before params.yaml could set knobs keep their fingerprint
            payload["component_knobs"] = set_knobs
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def check_single_device(cfg: ExperimentConfig) -> None:
    """Trials train in the worker's own process on one device; parallelism comes from workers."""
    t = cfg.trainer
    if str(t.devices) != "1" or t.num_nodes != 1 or "ddp" in t.strategy:
        raise ConfigError(
            f"a tuning trial trains on one device (got trainer.devices={t.devices}, num_nodes={t.num_nodes}, "
            f"strategy={t.strategy}); run trials in parallel with --workers (one per GPU) or on several hosts "
            "with a shared --storage, and pass --set trainer.devices=1 --set trainer.strategy=auto")
