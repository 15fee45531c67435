"""What one study runs: the study file, the profile and the user's overrides, composed into trial configs.

A trial's config is built in this order (later wins): the base config (``configs/<detector>_<c>.yaml``
with the detector of the study's ``base_config`` and the profile's config suffix ``c``), the
profile's overrides (as the ablation resolves them, then one device per trial), the study's
``fixed`` overrides, the user's ``--set`` overrides, and last the sampled parameters. ``TuningPlan.validate``
builds the config at every corner of the search space, so a bad key or an out-of-range value fails
before any trial is created.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, ExperimentConfig, apply_overrides, parse_override, read_yaml, validate_config
from pipeline.tuning.profiles import Profile
from pipeline.tuning.space import StudyError, StudySpec, format_override


@dataclass(frozen=True)
class TuningPlan:
    study: str
    """Study file name (``balanced_l1``, ``sampler``, ``iou_balanced``)."""
    spec: StudySpec
    profile_name: str
    profile: Profile
    overrides: tuple[str, ...] = ()
    """The user's ``--set`` overrides, applied to every trial."""
    base_raw: dict[str, Any] = field(default_factory=dict, compare=False)
    base_config: Path = Path()

    @classmethod
    def create(cls, study: str, spec: StudySpec, profile_name: str, profile: Profile,
               overrides: list[str] | tuple[str, ...] = ()) -> TuningPlan:
        try:
            detector = read_yaml(spec.base_config).get("model", {}).get("detector", "faster_rcnn")
            base = profile.base_config(detector, spec.base_config.parent)
            if not base.exists():
                raise ConfigError(f"{base}: no {detector} config for profile {profile.name!r} "
                                  f"(its config: {profile.config})")
            raw = read_yaml(base)
        except ConfigError as exc:
            raise StudyError(f"study {study!r}: {exc}") from None
        searched = {p.key for p in spec.params.values()}
        for text in overrides:
            key = ".".join(parse_override(text)[0])
            if key in searched:
                raise StudyError(f"--set {text}: {key} is searched by study {study!r}; drop the override")
        return cls(study, spec, profile_name, profile, tuple(overrides), raw, base)

    def trial_overrides(self, values: dict[str, Any]) -> list[str]:
        """All overrides on top of the base config for sampled ``{config key: value}``."""
        return [*self.profile.overrides, *self.spec.fixed, *self.overrides,
                *(format_override(k, v) for k, v in values.items())]

    def config(self, values: dict[str, Any]) -> ExperimentConfig:
        overrides = self.trial_overrides(values)
        cfg = validate_config(apply_overrides(self.base_raw, overrides),
                              f"{self.base_config} (study {self.study}, profile {self.profile_name}) with "
                              + " ".join(overrides))
        check_single_device(cfg)
        return cfg

    def validate(self) -> ExperimentConfig:
        """Build the config at each corner of the search space; returns the first (for data checks)."""
        configs = [self.config(point) for point in self.spec.corner_points()]
        return configs[0]

    def fingerprint(self) -> str:
        """Identifies what the study optimises: resuming it with another space or profile is refused."""
        payload = {"spec": self.spec.model_dump(mode="json", exclude={"n_trials", "description"}),
                   "profile": self.profile_name, "base_config": str(self.base_config),
                   "profile_overrides": list(self.profile.overrides)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def check_single_device(cfg: ExperimentConfig) -> None:
    """Trials train in the worker's own process on one device; parallelism comes from workers."""
    t = cfg.trainer
    if str(t.devices) != "1" or t.num_nodes != 1 or "ddp" in t.strategy:
        raise ConfigError(
            f"a tuning trial trains on one device (got trainer.devices={t.devices}, num_nodes={t.num_nodes}, "
            f"strategy={t.strategy}); run trials in parallel with --workers (one per GPU) or on several hosts "
            "with a shared --storage, and pass --set trainer.devices=1 --set trainer.strategy=auto")
