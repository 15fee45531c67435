"""The one composition of a run's experiment config, used by the ablation and by the tuning studies.

Later wins::

    configs/<detector>_<profiles.<profile>.config>.yaml   (with every default of detection/config.py)
      <- profiles.<profile>.set                            (budget: epochs, batch, ...; the config's structure)
      <- profiles.<profile>.data, then data.* and trainer.* that are not null
      <- train.seed = seed                                 (when given)
      <- components.<c>.enabled = true and the knobs of params <detector>.<c>, for each enabled c only
      <- values                                            (a study's sampled values)
      <- overrides                                         (``key=value`` texts: a study's fixed and --set)

so a run depends only on the knobs of the components it enables. Every layer but the last is typed data
merged into the base config (dotted key -> value); only the ``key=value`` texts a user wrote are parsed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from detection.config import ConfigError, ExperimentConfig, apply_overrides, read_yaml, validate_config, with_values
from detection.io import flatten
from pipeline.plan.params import COMPONENTS, Params


def _set(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    """The non-null entries of ``values`` under dotted keys ``prefix`` + key."""
    return {f"{prefix}{key}": value for key, value in values.items() if value is not None}


def base_config_file(params: Params, profile: str, detector: str, configs_dir: Path = Path("configs")) -> Path:
    suffix = params.profile_params(profile).config
    path = configs_dir / f"{detector}_{suffix}.yaml"
    if not path.exists():
        raise ConfigError(f"{path}: no such config for profile {profile!r} (profiles.{profile}.config: {suffix})")
    return path


def profile_values(params: Params, profile: str) -> dict[str, Any]:
    """What every run of ``profile`` sets: its ``set`` and ``data`` sizes, then ``data`` and ``trainer``."""
    settings = params.profile_params(profile)
    data = {**settings.data.model_dump(exclude_none=True), **params.data.model_dump(exclude_unset=True)}
    return {**_set("", flatten(settings.set)), **_set("data.", data), **_set("trainer.", params.trainer.model_dump())}


def component_values(params: Params, detector: str, components: Sequence[str]) -> dict[str, Any]:
    """Each component of ``components`` (short names) enabled, with the knobs ``params`` sets for it."""
    knobs = params.knobs(detector)
    values: dict[str, Any] = {}
    for short in components:
        section = COMPONENTS[short]
        values |= {f"components.{section}.enabled": True, **_set(f"components.{section}.", getattr(knobs, section))}
    return values


def compose_config(params: Params, detector: str, profile: str, components: Sequence[str] = (),
                   seed: int | None = None, *, values: Mapping[str, Any] | None = None,
                   overrides: Sequence[str] = (), configs_dir: Path = Path("configs")) -> ExperimentConfig:
    """The experiment config of one run (see the module docstring for the precedence)."""
    base = base_config_file(params, profile, detector, configs_dir)
    layers = {**profile_values(params, profile), **({"train.seed": seed} if seed is not None else {}),
              **component_values(params, detector, components), **(values or {})}
    source = f"{base} (profile {profile}{', ' + '+'.join(components) if components else ''})"
    return validate_config(apply_overrides(with_values(read_yaml(base), layers), list(overrides)), source)
