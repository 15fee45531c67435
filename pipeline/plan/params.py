"""``params.yaml`` validated into typed models: the ablation's profiles, shared settings and design.

Every section is checked when the file is read, so a typo or a bad value fails before any run is
planned, with the field named (``params.yaml: ablation.seeds: ...``). Values that end up in a
run's experiment config (``data``, ``trainer``, ``profiles.<p>.set``, the component knobs) are
checked once more, with their defaults, by :mod:`detection.config` when the config is composed
(:mod:`pipeline.plan.compose`). ``execution`` is typed by :class:`pipeline.plan.execution.ExecutionSettings`;
``pretrain``, ``report`` and ``mlflow`` by :class:`detection.config.PretrainConfig`,
:class:`ReportConfig` and :class:`MlflowConfig` (here: they set what the report and tracking do, not
what a run executes), their defaults' one home.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from detection.config import ConfigError, Float, Int, PositiveInt, PretrainConfig, StrictModel, read_yaml, validate_model
from pipeline.plan.execution import ExecutionSettings

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
SYNTHETIC_ROOT = Path("data/synthetic")
"""Where the prepare stage writes the built-in set (its DVC output)."""


def combination_name(components: tuple[str, ...] | list[str], order: tuple[str, ...]) -> str:
    chosen = [c for c in order if c in components]
    return "+".join(chosen) if chosen else BASELINE


def parse_combination(name: str, order: tuple[str, ...], where: str = "combination") -> tuple[str, ...]:
    """``"IS+BL"`` -> ``("IS", "BL")``, checked against the detector's components and their order."""
    if name == BASELINE:
        return ()
    parts = tuple(name.split("+"))
    unknown = [p for p in parts if p not in order]
    if unknown:
        raise ConfigError(f"{where} {name!r}: unknown component(s) {unknown}; known here: {list(order)}")
    if len(set(parts)) != len(parts) or combination_name(parts, order) != name:
        raise ConfigError(f"{where} {name!r}: write each component once, in the order {'+'.join(order)} "
                          f"(here: {combination_name(parts, order)!r})")
    return parts


class SyntheticSizeParams(StrictModel):
    """``profiles.<p>.data``: the size of the built-in set (``data.num_train`` ... of the config)."""

    num_train: Int | None = None
    num_val: Int | None = None
    image_size: Int | None = None


class ProfileParams(StrictModel):
    config: str
    """Base config suffix: detector ``d`` trains from ``configs/<d>_<config>.yaml``."""
    data: SyntheticSizeParams = SyntheticSizeParams()
    pretrain: dict[str, Any] = {}
    """Overrides of the ``pretrain`` section (validated with it into :class:`detection.config.PretrainConfig`)."""
    set: dict[str, Any] = {}
    """Config overrides for every run, in the structure of the experiment config."""


class DataParams(StrictModel):
    """``data``: shared by every run; a field left out or null keeps the profile config's value."""

    source: Literal["synthetic", "coco"] | None = "synthetic"
    root: str | None = None
    seed: Int | None = None
    max_images: Int | None = None
    train_annotations: str | None = None
    val_annotations: str | None = None
    train_images: str | None = None
    val_images: str | None = None
    num_workers: Int | None = None

    @model_validator(mode="after")
    def _synthetic_root(self) -> DataParams:
        if self.source == "synthetic" and self.root is not None and Path(self.root) != SYNTHETIC_ROOT:
            raise ValueError(f"data.root={self.root!r} with data.source=synthetic; the prepare stage writes the "
                             f"built-in set to {SYNTHETIC_ROOT} (its DVC output), so leave data.root there")
        return self


class TrainerParams(StrictModel):
    """``trainer``: Lightning settings for every run; null keeps the profile config's value."""

    accelerator: str | None = None
    devices: Int | Literal["auto"] | None = None
    num_nodes: Int | None = None
    strategy: str | None = None
    precision: str | None = None


class DetectorAblationParams(StrictModel):
    components: tuple[str, ...] = ()
    """The components the ablation varies, in combination-name order (empty: all the detector has)."""
    table: tuple[str, ...] = ()
    """The rows of the ``table`` design."""


class AblationParams(StrictModel):
    design: Literal["table", "factorial"]
    seeds: tuple[Int, ...] = Field(min_length=1)
    faster_rcnn: DetectorAblationParams | None = None
    retinanet: DetectorAblationParams | None = None

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"must be distinct, got {list(seeds)}")
        return seeds

    @model_validator(mode="after")
    def _combinations(self) -> AblationParams:
        for detector, known in DETECTOR_COMPONENTS.items():
            section: DetectorAblationParams | None = getattr(self, detector)
            if section is None:
                continue
            where = detector
            bad = [c for c in section.components if c not in known]
            if bad:
                raise ValueError(f"{where}.components: {bad} are not wired into {detector} (it has {list(known)})")
            for name in section.table:
                parse_combination(name, section.components or known, f"{where}.table: combination")
            if len(set(section.table)) != len(section.table):
                raise ValueError(f"{where}.table lists a combination twice: {list(section.table)}")
            if self.design == "table" and not section.table:
                raise ValueError(f"{where}.table is empty; list the rows to train, e.g. [baseline, ...]")
        return self

    def detectors(self) -> dict[str, DetectorAblationParams]:
        """The detectors the ablation trains, in :data:`DETECTOR_COMPONENTS` order."""
        return {d: getattr(self, d) for d in DETECTOR_COMPONENTS if getattr(self, d) is not None}


class ComponentKnobs(StrictModel):
    """Per detector, knobs (mmdet's names) of the ablation's and studies' runs that enable the component;
    empty: the defaults of :mod:`detection.config`. Validated with the run's config."""

    iou_balanced_sampling: dict[str, Any] = {}
    bfp: dict[str, Any] = {}
    balanced_l1: dict[str, Any] = {}
    iou_balanced_cls: dict[str, Any] = {}
    iou_balanced_loc: dict[str, Any] = {}


class ReportConfig(StrictModel):
    """The ``report`` section of params.yaml: the statistics of ``libra report`` and ``libra plan --power``."""

    bootstrap_resamples: PositiveInt = 1000
    """Paired image resamples for the ΔAP confidence intervals."""
    confidence: Float = Field(0.95, gt=0, lt=1)
    """Confidence level of the intervals (before the Bonferroni adjustment over claims)."""
    seed: Int = Field(0, ge=0)
    """Seed of the bootstrap resampling."""
    rope: Float = Field(0.5, gt=0)
    """Region of practical equivalence, in AP points: a difference whose interval lies inside ±rope is
    'equivalent'."""
    power: Float = Field(0.8, gt=0, lt=1)
    """Target power of the minimum detectable effect (MDE)."""
    target_mde: Float = Field(1.0, gt=0)
    """The MDE, in AP points, that the power table asks the seeds for (``libra plan --power``'s default)."""
    learned_margin: Float = Field(5.0, gt=0)
    """AP points a detector's baseline must gain, at every seed, over the same detector before training (same
    config, seed, initial weights and validation images) to count as learned; claims on a detector whose
    baseline did not learn are 'not testable'. 5 AP is over twice the largest gain the papers claim (+2.3 AP
    at IoU 0.9), so an effect of the claimed size, in either direction, stays clear of the untrained floor."""
    min_val_images: PositiveInt = 30
    """The fewest validation images the image bootstrap's verdicts rest on; with fewer, every claim is 'not
    testable'. A percentile interval over n images covers near its level only once the resampled AP is close
    to normal (the usual n ≥ 30); below, it is too narrow (its variance is (n - 1)/n of the sample's) and its
    tails are a few distinct multisets (2 images have 3)."""
    equivalence_rope_share: Float = Field(0.02, gt=0, lt=1)
    """The largest share of the baseline's AP (mean over seeds) that ±rope may be for a claim to be called
    'equivalent'; above it the verdict is 'not resolved'. The papers' typical gains are 2.0-2.5% of their
    baselines' AP (+0.7 to +0.9 AP on about 36): a wider rope would call an effect of the paper's relative
    size on our baseline 'equivalent' to none (rope 0.5 AP needs a baseline of at least 25 AP)."""


class MlflowConfig(StrictModel):
    """The ``mlflow`` section of params.yaml (the store is ``$MLFLOW_TRACKING_URI``, else the repository's)."""

    experiment: str = Field("libra-ablation", min_length=1)
    """The MLflow experiment ``libra track`` logs the ablation to."""


class Params(StrictModel):
    profile: str
    profiles: dict[str, ProfileParams] = Field(min_length=1)
    data: DataParams = DataParams()
    trainer: TrainerParams = TrainerParams()
    ablation: AblationParams
    faster_rcnn: ComponentKnobs = ComponentKnobs()
    retinanet: ComponentKnobs = ComponentKnobs()
    pretrain: PretrainConfig = PretrainConfig()
    execution: ExecutionSettings = ExecutionSettings()
    report: ReportConfig = ReportConfig()
    mlflow: MlflowConfig = MlflowConfig()

    @model_validator(mode="after")
    def _known_profile(self) -> Params:
        self.profile_params(self.profile)
        return self

    @model_validator(mode="after")
    def _profile_pretrain(self) -> Params:
        for name, profile in self.profiles.items():
            try:
                PretrainConfig.model_validate({**self.pretrain.model_dump(exclude_unset=True), **profile.pretrain})
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                raise ValueError(f"profiles.{name}.pretrain: {problems}") from None
        return self

    def profile_params(self, name: str) -> ProfileParams:
        if name not in self.profiles:
            raise ConfigError(f"profile {name!r} is not one of profiles: {sorted(self.profiles)}")
        return self.profiles[name]

    def knobs(self, detector: str) -> ComponentKnobs:
        return getattr(self, detector)


def parse_params(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    return validate_model(Params, raw, source)


def load_params(path: Path = Path("params.yaml")) -> Params:
    return parse_params(read_yaml(path), str(path))
