"""Tuning profiles: the ablation's profiles of ``params.yaml`` (smoke, tiny, coco_1x), reused as they are.

A trial's config is :func:`pipeline.plan.compose.compose_config` of the study's detector, the profile
and the component under study, exactly as an ablation run's, with the ``data``, ``trainer`` and
per-detector component knobs of ``params.yaml``; so a trial of the ``tiny`` profile trains like a
``tiny`` ablation run. Tuning then pins each trial to one device (``TRIAL_DEVICE``): trials run
side by side in workers, not through DDP.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from typing import Any

from pipeline.plan.compose import profile_values
from detection.config import ConfigError
from pipeline.plan.params import Params, load_params

DEFAULT_PROFILE = "tiny"
PARAMS_FILE = Path("params.yaml")
TRIAL_DEVICE: dict[str, Any] = {"trainer.devices": 1, "trainer.num_nodes": 1, "trainer.strategy": "auto"}


@dataclass(frozen=True)
class Profile:
    name: str
    params: Params
    source: Path

    @property
    def config(self) -> str:
        """Base config suffix: the study's detector ``d`` trains from ``configs/<d>_<config>.yaml``."""
        return self.params.profile_params(self.name).config

    @property
    def values(self) -> dict[str, Any]:
        """What every trial of the profile sets on its base config before the study's own settings."""
        return {**profile_values(self.params, self.name), **TRIAL_DEVICE}


def get_profile(name: str, params_file: Path = PARAMS_FILE) -> Profile:
    """The profile ``name`` of ``params.yaml``; raises StudyError naming the known ones."""
    from pipeline.tuning.space import StudyError

    try:
        params = load_params(params_file)
    except ConfigError as exc:
        raise StudyError(str(exc)) from None
    if name not in params.profiles:
        raise StudyError(f"unknown profile {name!r} (profiles in {params_file}: {', '.join(params.profiles)})")
    return Profile(name, params, params_file)
