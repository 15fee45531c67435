"""The one composition of a run's experiment config, used by the ablation and by the tuning studies.

Later wins::

    configs/<detector>_<profiles.<profile>.config>.yaml   (with every default of detection/config.py)
      <- profiles.<profile>.set                            (budget: epochs, batch, ...; the config's structure)
      <- profiles.<profile>.data, then data.* and trainer.* that are not null
      <- train.seed = seed                                 (when given)
      <- components.<c>.enabled = true and the knobs of params <detector>.<c>, for each enabled c only
      <- overrides                                         (a study's fixed, --set and sampled values)

so a run depends only on the knobs of the components it enables.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detection.config import ConfigError, ExperimentConfig, load_config
from detection.io import flatten
from pipeline.plan.params import COMPONENTS, Params


def _overrides(prefix: str, values: dict[str, Any]) -> list[str]:
    """Non-null entries as ``prefix.key=<JSON value>`` (JSON is YAML, so values keep their types)."""
    return [f"{prefix}{key}={json.dumps(value)}" for key, value in values.items() if value is not None]


def base_config_file(params: Params, profile: str, detector: str, configs_dir: Path = Path("configs")) -> Path:
    suffix = params.profile_params(profile).config
    path = configs_dir / f"{detector}_{suffix}.yaml"
    if not path.exists():
        raise ConfigError(f"{path}: no such config for profile {profile!r} (profiles.{profile}.config: {suffix})")
    return path


def profile_overrides(params: Params, profile: str) -> list[str]:
    """The overrides every run of ``profile`` shares: its ``set`` and ``data`` sizes, then ``data`` and ``trainer``."""
    settings = params.profile_params(profile)
    data = {**settings.data.model_dump(exclude_none=True), **params.data.model_dump(exclude_unset=True)}
    return [*_overrides("", flatten(settings.set)), *_overrides("data.", data),
            *_overrides("trainer.", params.trainer.model_dump())]


def component_overrides(params: Params, detector: str, components: Sequence[str]) -> list[str]:
    """Each component of ``components`` (short names) enabled, with the knobs ``params`` sets for it."""
    knobs = params.knobs(detector)
    sets: list[str] = []
    for short in components:
        section = COMPONENTS[short]
        sets += [f"components.{section}.enabled=true", *_overrides(f"components.{section}.", getattr(knobs, section))]
    return sets


def compose_config(params: Params, detector: str, profile: str, components: Sequence[str] = (),
                   seed: int | None = None, overrides: Sequence[str] = (),
                   configs_dir: Path = Path("configs")) -> ExperimentConfig:
    """The experiment config of one run (see the module docstring for the precedence)."""
    seeded = [f"train.seed={seed}"] if seed is not None else []
    return load_config(base_config_file(params, profile, detector, configs_dir),
                       [*profile_overrides(params, profile), *seeded,
                        *component_overrides(params, detector, components), *overrides])
