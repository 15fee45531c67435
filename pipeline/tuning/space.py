"""Study definitions: one YAML file per study (``configs/studies/<name>.yaml``), validated into typed objects.

A study file names the detector config it tunes, the fixed overrides that switch the component on,
and the search space, each parameter bound to the config field it sets::

    base_config: configs/faster_rcnn_tiny.yaml
    fixed: [components.balanced_l1.enabled=true]
    params:
      alpha: {key: components.balanced_l1.alpha, type: float, low: 0.1, high: 1.0}
      gamma: {key: components.balanced_l1.gamma, type: float, low: 0.5, high: 3.0}

Everything is checked when the file is loaded (unknown fields, empty or inverted ranges, a contour
or baseline naming a parameter that is not searched), so a typo fails before any trial starts.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import optuna
from pydantic import Field, ValidationError, field_validator, model_validator

from detection.config import ConfigError, StrictModel, parse_override, read_yaml
from detection.engine.coco_eval import BOX_METRICS

Scalar = bool | int | float | str


class StudyError(ValueError):
    """A study name, study file or search space is invalid; the message names the file and the field."""


def _check_range(low: float, high: float, log: bool, step: float | None) -> None:
    """A numeric search range must be non-empty, ordered, log-able if log, and wider than its step."""
    if low > high:
        raise ValueError(f"inverted range: low {low} > high {high}")
    if low == high:
        raise ValueError(f"empty range: low = high = {low} (put a single value in `fixed`)")
    if log and low <= 0:
        raise ValueError(f"log scale needs low > 0, got {low}")
    if log and step is not None:
        raise ValueError("step and log cannot be combined")
    if step is not None and step > high - low:
        raise ValueError(f"step {step} is wider than the range [{low}, {high}]")


class _Param(StrictModel):
    key: str = Field(min_length=1)
    """Dotted config field the sampled value is written to, e.g. ``components.balanced_l1.alpha``."""


class FloatParam(_Param):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _range(self) -> FloatParam:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"low and high must be finite numbers, got [{self.low}, {self.high}]")
        _check_range(self.low, self.high, self.log, self.step)
        return self

    def suggest(self, trial: optuna.Trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step)

    def corners(self) -> list[Any]:
        return [self.low, self.high]

    def contains(self, value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high


class IntParam(_Param):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _range(self) -> IntParam:
        _check_range(self.low, self.high, self.log, None if self.step == 1 else self.step)
        return self

    def suggest(self, trial: optuna.Trial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, log=self.log, step=self.step)

    def corners(self) -> list[Any]:
        return [self.low, self.high - (self.high - self.low) % self.step]

    def contains(self, value: Any) -> bool:
        return (isinstance(value, int) and not isinstance(value, bool) and self.low <= value <= self.high
                and (value - self.low) % self.step == 0)


class CategoricalParam(_Param):
    type: Literal["categorical"]
    choices: tuple[Scalar, ...]

    @field_validator("choices")
    @classmethod
    def _choices(cls, choices: tuple[Scalar, ...]) -> tuple[Scalar, ...]:
        if len(choices) == 0:
            raise ValueError("empty choices")
        if len(choices) == 1:
            raise ValueError(f"a single choice {choices[0]!r} is not a search (put it in `fixed`)")
        if len(set(choices)) != len(choices):
            raise ValueError(f"duplicate choices in {list(choices)}")
        return choices

    def suggest(self, trial: optuna.Trial, name: str) -> Scalar:
        return trial.suggest_categorical(name, list(self.choices))

    def corners(self) -> list[Any]:
        return list(self.choices)

    def contains(self, value: Any) -> bool:
        return value in self.choices


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


class SamplerSpec(StrictModel):
    """Optuna 5's TPE (multivariate, constant liar: its defaults), seeded."""

    seed: int = 0
    """Base seed; the sampler of trial ``n`` is seeded with ``seed + n``, so a study is reproducible."""
    n_startup_trials: int = Field(10, ge=0)
    """Random trials before TPE starts modelling."""


class PrunerSpec(StrictModel):
    """Pruning on the per-epoch validation metric."""

    type: Literal["median", "threshold", "none"] = "median"
    n_startup_trials: int = Field(4, ge=0)
    """median: trials that are never pruned, to build the median from."""
    n_warmup_steps: int = Field(1, ge=0)
    """median: epochs (0-based index) before a trial may be pruned."""
    interval_steps: int = Field(1, ge=1)
    lower: float | None = None
    """threshold: prune a trial whose metric falls below this value."""

    @model_validator(mode="after")
    def _threshold(self) -> PrunerSpec:
        if self.type == "threshold" and self.lower is None:
            raise ValueError("pruner type threshold needs `lower`")
        return self

    def build(self) -> optuna.pruners.BasePruner:
        if self.type == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=self.n_startup_trials,
                                               n_warmup_steps=self.n_warmup_steps, interval_steps=self.interval_steps)
        if self.type == "threshold":
            return optuna.pruners.ThresholdPruner(lower=self.lower, n_warmup_steps=self.n_warmup_steps,
                                                  interval_steps=self.interval_steps)
        return optuna.pruners.NopPruner()


class StudySpec(StrictModel):
    description: str = ""
    base_config: Path
    """The detector config of the default profile (relative to the project root). It names the detector:
    a profile with config suffix ``c`` trains from ``<same dir>/<detector>_<c>.yaml``."""
    fixed: tuple[str, ...] = ()
    """KEY=VALUE overrides applied to every trial, e.g. the one that enables the component."""
    params: dict[str, Param]
    """Search space: Optuna parameter name -> distribution and the config field it sets."""
    metric: Literal[BOX_METRICS] = "AP"  # type: ignore[valid-type]
    """Objective: this validation metric (maximised), at the last validated epoch."""
    n_trials: int = Field(20, ge=1)
    """Default target number of finished trials (``--n-trials`` overrides)."""
    contour: tuple[str, str] | None = None
    """The two parameters of the contour plot (default: the first two)."""
    baseline: dict[str, Scalar] | Literal["defaults"] | None = None
    """Parameter values enqueued as the study's first trial; ``defaults``: the values a trial's config has
    for the searched keys without sampling (the defaults of detection/config.py and the knobs params.yaml
    sets), resolved by :meth:`pipeline.tuning.plan.TuningPlan.create`, so no study file restates a default."""
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()

    @field_validator("fixed")
    @classmethod
    def _fixed(cls, fixed: tuple[str, ...]) -> tuple[str, ...]:
        for text in fixed:
            parse_override(text)
        return fixed

    @field_validator("params")
    @classmethod
    def _params(cls, params: dict[str, Any]) -> dict[str, Any]:
        if not params:
            raise ValueError("no parameters to search")
        keys = [p.key for p in params.values()]
        duplicated = sorted({k for k in keys if keys.count(k) > 1})
        if duplicated:
            raise ValueError(f"several parameters set the same config field: {duplicated}")
        return params

    @model_validator(mode="after")
    def _references(self) -> StudySpec:
        fixed_keys = {".".join(parse_override(text)[0]) for text in self.fixed}
        searched = fixed_keys & {p.key for p in self.params.values()}
        if searched:
            raise ValueError(f"{sorted(searched)} both fixed and searched")
        if self.contour is not None:
            unknown = [name for name in self.contour if name not in self.params]
            if unknown or self.contour[0] == self.contour[1]:
                raise ValueError(f"contour must name two different searched parameters "
                                 f"({', '.join(self.params)}), got {list(self.contour)}")
        if isinstance(self.baseline, dict):
            for name, value in self.baseline.items():
                if name not in self.params:
                    raise ValueError(f"baseline names {name!r}, which is not searched ({', '.join(self.params)})")
                if not self.params[name].contains(value):
                    raise ValueError(f"baseline {name}={value!r} is outside its search space")
        return self

    @property
    def contour_params(self) -> tuple[str, str] | None:
        if self.contour is not None:
            return self.contour
        names = list(self.params)
        return (names[0], names[1]) if len(names) >= 2 else None

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample every parameter; returns ``{config key: value}``."""
        return {p.key: p.suggest(trial, name) for name, p in self.params.items()}

    def as_overrides(self, params: dict[str, Any]) -> list[str]:
        """``{optuna name: value}`` (a trial's params) -> ``["config.key=value", ...]``."""
        return [format_override(self.params[name].key, value) for name, value in params.items() if name in self.params]

    def corner_points(self, limit: int = 256) -> list[dict[str, Any]]:
        """Combinations of each parameter's extremes (all choices of categoricals), to validate configs early."""
        grids = [[(p.key, v) for v in p.corners()] for p in self.params.values()]
        return [dict(point) for point in itertools.islice(itertools.product(*grids), limit)]


def format_override(key: str, value: Any) -> str:
    """``key=value`` with the value written so that ``parse_override`` reads it back unchanged."""
    if isinstance(value, float):
        text = repr(value)
    elif isinstance(value, str):
        import yaml

        text = yaml.safe_dump(value, default_flow_style=True).strip()
        if text.endswith("..."):
            text = text[:-3].strip()
    else:
        text = str(value).lower() if isinstance(value, bool) else str(value)
    return f"{key}={text}"


def available_studies(studies_dir: Path) -> list[str]:
    return sorted(p.stem for p in Path(studies_dir).glob("*.yaml"))


def study_path(name: str, studies_dir: Path) -> Path:
    path = Path(studies_dir) / f"{name}.yaml"
    if "/" in name or not path.is_file():
        known = ", ".join(available_studies(studies_dir)) or "none"
        raise StudyError(f"unknown study {name!r}: no {path} (studies in {studies_dir}: {known})")
    return path


def load_study_spec(name: str, studies_dir: Path) -> StudySpec:
    """Read and validate ``<studies_dir>/<name>.yaml``."""
    path = study_path(name, studies_dir)
    try:
        raw = read_yaml(path)
    except ConfigError as exc:
        raise StudyError(str(exc)) from None
    try:
        return StudySpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<top>'}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        raise StudyError(f"{path}: {problems}") from None
