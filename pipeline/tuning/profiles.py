"""Tuning profiles: the ablation's profiles of ``params.yaml`` (smoke, tiny, coco_1x), reused as they are.

A profile names the base config suffix (``configs/<detector>_<config>.yaml``) and the budget
overrides; ``pipeline.ablation.base_overrides`` turns it, with the ``data`` and ``trainer``
sections of ``params.yaml``, into the overrides every ablation run shares, so a trial of the
``tiny`` profile trains exactly like a ``tiny`` ablation run. Tuning then pins each trial to one
device (``TRIAL_DEVICE``): trials run side by side in workers, not through DDP.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError

DEFAULT_PROFILE = "tiny"
PARAMS_FILE = Path("params.yaml")
TRIAL_DEVICE = ("trainer.devices=1", "trainer.num_nodes=1", "trainer.strategy=auto")


@dataclass(frozen=True)
class Profile:
    name: str
    config: str
    """Base config suffix: the study's detector ``d`` trains from ``configs/<d>_<config>.yaml``."""
    overrides: tuple[str, ...]
    source: Path

    def base_config(self, detector: str, configs_dir: Path = Path("configs")) -> Path:
        return configs_dir / f"{detector}_{self.config}.yaml"


def profile_names(params_file: Path = PARAMS_FILE) -> list[str]:
    from pipeline.ablation import read_params

    profiles = read_params(params_file).get("profiles")
    return sorted(profiles) if isinstance(profiles, dict) else []


def get_profile(name: str, params_file: Path = PARAMS_FILE) -> Profile:
    """The profile ``name`` of ``params.yaml``; raises StudyError naming the known ones."""
    from pipeline.ablation import base_overrides, read_params
    from pipeline.tuning.space import StudyError

    try:
        params = read_params(params_file)
        profiles = params.get("profiles")
        if not isinstance(profiles, dict) or not profiles:
            raise StudyError(f"{params_file}: no `profiles:` section")
        if name not in profiles:
            raise StudyError(f"unknown profile {name!r} (profiles in {params_file}: {', '.join(profiles)})")
        suffix, overrides = base_overrides({**params, "profile": name})
    except ConfigError as exc:
        raise StudyError(str(exc)) from None
    return Profile(name, suffix, (*overrides, *TRIAL_DEVICE), params_file)
