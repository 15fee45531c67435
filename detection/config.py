"""Typed experiment configuration: YAML files validated into pydantic models.

A config file holds any subset of the fields below; everything else takes its default.
``load_config(path, overrides)`` applies ``key.sub=value`` overrides (values parsed as YAML)
before validation, so a typo in a file or an override fails early with the offending key named.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)


ModelT = TypeVar("ModelT", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the file and the field."""


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got the boolean {value}")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
"""An integer field: YAML's true/false is refused, not taken as 1/0."""
Float = Annotated[float, BeforeValidator(_not_bool)]
PositiveInt = Annotated[Int, Field(ge=1)]
Fraction = Annotated[Float, Field(ge=0, le=1)]


class StrictModel(BaseModel):
    """A frozen pydantic model that refuses unknown fields and non-finite floats (``.inf``, ``.nan``) in every
    field (every config and study section)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class BackboneConfig(StrictModel):
    name: Literal["tiny", "resnet50"] = "tiny"
    channels: tuple[PositiveInt, ...] = Field((16, 32, 64, 128), min_length=1)
    """Stage widths of the ``tiny`` backbone (ignored by resnet50)."""
    weights: Path | None = None
    """Local file with the backbone's pre-trained weights (a state_dict; nothing is downloaded)."""
    from_scratch: bool = False
    """Train a backbone meant to be pre-trained (resnet50) from random weights; says so explicitly."""
    trainable_layers: Int = Field(3, ge=0, le=5)

    @model_validator(mode="after")
    def _weights_or_from_scratch(self) -> "BackboneConfig":
        if self.weights is not None and self.from_scratch:
            raise ValueError(f"weights ({self.weights}) and from_scratch: true contradict each other; "
                             "set model.backbone.weights: null to train from scratch, or drop from_scratch")
        if self.name == "resnet50" and self.weights is None and not self.from_scratch:
            raise ValueError("resnet50 is meant to start from ImageNet weights: set model.backbone.weights to a "
                             "local file with torchvision's resnet50 state_dict (e.g. resnet50-0676ba61.pth; "
                             "nothing is downloaded), or model.backbone.from_scratch: true to train it from scratch")
        return self


def _check_iou_thresholds(bg_iou_thresh: float, fg_iou_thresh: float) -> None:
    """Matches below ``bg_iou_thresh`` are negatives, at or above ``fg_iou_thresh`` positives."""
    if bg_iou_thresh > fg_iou_thresh:
        raise ValueError(f"bg_iou_thresh ({bg_iou_thresh}) must not exceed fg_iou_thresh ({fg_iou_thresh})")


class RPNConfig(StrictModel):
    pre_nms_top_n_train: PositiveInt = 2000
    post_nms_top_n_train: PositiveInt = 2000
    pre_nms_top_n_test: PositiveInt = 1000
    post_nms_top_n_test: PositiveInt = 1000
    batch_size_per_image: PositiveInt = 256
    positive_fraction: Float = Field(0.5, gt=0, le=1)
    neg_pos_ub: Int = Field(-1, ge=-1)
    """At most ``neg_pos_ub · max(1, positives)`` sampled negatives per image (mmdet's RandomSampler);
    -1: unbounded."""


class RoIHeadsConfig(StrictModel):
    batch_size_per_image: PositiveInt = 512
    positive_fraction: Float = Field(0.25, gt=0, le=1)
    neg_pos_ub: Int = Field(-1, ge=-1)
    """At most ``neg_pos_ub · max(1, positives)`` sampled negatives per image (mmdet's RandomSampler);
    -1: unbounded."""
    fg_iou_thresh: Float = Field(0.5, gt=0, le=1)
    bg_iou_thresh: Fraction = 0.5
    representation_size: PositiveInt = 1024
    """Width of the two-layer MLP box head."""
    sampling_ratio: Int = Field(2, ge=0)
    """RoIAlign sampling points per bin side (0: adaptive)."""

    @model_validator(mode="after")
    def _thresholds(self) -> "RoIHeadsConfig":
        _check_iou_thresholds(self.bg_iou_thresh, self.fg_iou_thresh)
        return self


class BoxLossConfig(StrictModel):
    """The detector's own box regression loss, replaced by Balanced L1 when that is enabled."""

    type: Literal["smooth_l1", "l1"] = "smooth_l1"
    beta: Float = Field(1.0 / 9.0, ge=0)


class RetinaNetConfig(StrictModel):
    """RetinaNet-only settings; the defaults are the paper's (Lin et al. 2017)."""

    min_level: Literal[2, 3] = 3
    """Finest level: P3 (the paper's P3-P7) or P2 (Faster R-CNN's P2-P6, for small images)."""
    scales_per_octave: PositiveInt = 3
    """Anchor sizes per level: ``size · 2^(i/n)`` for ``i < n`` (not rounded)."""
    extra_from: Literal["p5", "c5"] = "p5"
    """Input of the P6 conv (P7 is computed from P6): the FPN's P5 (torchvision's v1) or the body's C5
    (the paper's and mmdet's ``add_extra_convs='on_input'``). Needs ``min_level: 3``."""
    head_convs: Int = Field(4, ge=1, le=4)
    """3x3 conv layers in each subnet before its predictor."""
    head_norm: Literal["none", "group"] = "none"
    """Subnet convs plain (the paper's) or with GroupNorm (torchvision's v2; converges faster)."""
    head_init: Literal["normal", "kaiming"] = "normal"
    """Subnet conv weights: N(0, 0.01) (the paper's) or Kaiming-normal (fan-out, ReLU). The
    predictors keep N(0, 0.01) and the prior-probability bias either way."""
    fg_iou_thresh: Float = Field(0.5, gt=0, le=1)
    """Anchors with IoU >= this to a ground truth are its positives."""
    bg_iou_thresh: Fraction = 0.4
    """Anchors with IoU < this to every ground truth are negatives (in between: ignored)."""
    focal_alpha: Fraction = 0.25
    focal_gamma: Float = Field(2.0, ge=0)
    prior_prob: Float = Field(0.01, gt=0, lt=1)
    """Foreground probability every class logit starts at: the classification predictor's bias is
    ``-log((1 - prior_prob) / prior_prob)`` (the paper's π = 0.01), so the many background anchors do not
    swamp the focal loss in the first steps."""

    @model_validator(mode="after")
    def _thresholds(self) -> "RetinaNetConfig":
        _check_iou_thresholds(self.bg_iou_thresh, self.fg_iou_thresh)
        if self.extra_from == "c5" and self.min_level == 2:
            raise ValueError("extra_from: c5 needs min_level: 3 (with min_level: 2 the pyramid's P6 is max-pooled "
                             "from P5); set min_level: 3 or extra_from: p5")
        return self


class ModelConfig(StrictModel):
    detector: Literal["faster_rcnn", "retinanet"] = "faster_rcnn"
    backbone: BackboneConfig = BackboneConfig()
    init_from: Path | None = None
    """Detector weights loaded before a fresh run's first step (not on resume): a ``libra train``
    checkpoint or a torchvision detection state_dict of the same architecture."""
    init_reset_heads: bool = False
    """With ``init_from``: keep the class-dependent predictor layers freshly initialised instead of
    loading them (fine-tuning on a different set of classes)."""
    fpn_channels: PositiveInt = 64
    min_size: PositiveInt = 128
    max_size: PositiveInt = 128
    anchor_sizes: tuple[Annotated[int | float, BeforeValidator(_not_bool), Field(gt=0)], ...] = Field(
        (16, 32, 64, 128, 256), min_length=1)
    """Base anchor size per pyramid level, finest first (one per FPN output level); integers stay integers."""
    aspect_ratios: tuple[Annotated[Float, Field(gt=0)], ...] = Field((0.5, 1.0, 2.0), min_length=1)
    rpn: RPNConfig = RPNConfig()
    roi_heads: RoIHeadsConfig = RoIHeadsConfig()
    box_loss: BoxLossConfig = BoxLossConfig()
    retinanet: RetinaNetConfig = RetinaNetConfig()
    score_thresh: Fraction = 0.05
    nms_thresh: Fraction = 0.5
    detections_per_img: PositiveInt = 100

    @model_validator(mode="after")
    def _sizes(self) -> "ModelConfig":
        if self.max_size < self.min_size:
            raise ValueError(f"max_size ({self.max_size}) must not be below min_size ({self.min_size})")
        if self.init_reset_heads and self.init_from is None:
            raise ValueError("init_reset_heads: true needs init_from (the detector checkpoint to fine-tune)")
        return self


class IoUBalancedSamplingConfig(StrictModel):
    """Libra R-CNN IoU-balanced negative sampling (+ instance-balanced positives) in the R-CNN head."""

    enabled: bool = False
    num_bins: PositiveInt = 3
    floor_thr: Float = -1.0
    floor_fraction: Fraction = 0.0
    bin_range: Literal["negatives", "mmdet"] = "negatives"
    instance_balanced_pos: bool = False
    """Positives drawn evenly over ground truths; Libra R-CNN's (on for Faster R-CNN by
    :data:`DETECTOR_COMPONENT_DEFAULTS`)."""

    @model_validator(mode="after")
    def _floor(self) -> "IoUBalancedSamplingConfig":
        if not (self.floor_thr == -1.0 or 0.0 <= self.floor_thr < 1.0):
            raise ValueError(f"floor_thr must be -1 (no floor) or in [0, 1), got {self.floor_thr}")
        return self


class BFPConfig(StrictModel):
    """Libra R-CNN Balanced Feature Pyramid after the FPN."""

    enabled: bool = False
    refine_level: Int = Field(4, ge=2)
    """Pyramid level ``k`` of ``P_k`` (stride ``2^k``) the levels are gathered to and refined at, on every
    detector and profile: Libra R-CNN's 4 ("integrate at C4's resolution": mmdet's index 2 of Faster
    R-CNN's P2-P6, 1 of RetinaNet's P3-P7). A level the detector's pyramid lacks is refused when it is built."""
    refine_type: Literal["none", "conv", "non_local"] = "non_local"


class BalancedL1Config(StrictModel):
    """Libra R-CNN Balanced L1 loss replacing the box regression loss."""

    enabled: bool = False
    alpha: Float = Field(0.5, gt=0)
    gamma: Float = Field(1.5, gt=0)
    beta: Float = Field(1.0, gt=0)
    """Where the loss turns linear; per detector in :data:`DETECTOR_COMPONENT_DEFAULTS`."""
    formula: Literal["exact", "mmdet"] = "exact"
    """``exact`` or ``mmdet`` (see :func:`detection.components.balanced_l1.balanced_l1_loss`)."""
    loss_weight: Float = Field(1.0, ge=0)


class IoUBalancedClsConfig(StrictModel):
    """IoU-balanced classification loss (Wu et al. 2019): positive weights u^eta, sum preserved."""

    enabled: bool = False
    eta: Float = Field(1.5, ge=0)


class IoUBalancedLocConfig(StrictModel):
    """IoU-balanced localization loss (Wu et al. 2019): positive box-loss weights w_loc * u^lambda."""

    enabled: bool = False
    lam: Float = Field(1.5, ge=0)
    w_loc: Annotated[Float, Field(gt=0)] | Literal["auto"] = "auto"


class ComponentsConfig(StrictModel):
    iou_balanced_sampling: IoUBalancedSamplingConfig = IoUBalancedSamplingConfig()
    bfp: BFPConfig = BFPConfig()
    balanced_l1: BalancedL1Config = BalancedL1Config()
    iou_balanced_cls: IoUBalancedClsConfig = IoUBalancedClsConfig()
    iou_balanced_loc: IoUBalancedLocConfig = IoUBalancedLocConfig()


DETECTOR_COMPONENT_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "faster_rcnn": {"iou_balanced_sampling": {"instance_balanced_pos": True}, "balanced_l1": {"beta": 1.0}},
    "retinanet": {"balanced_l1": {"beta": 0.11}},
}
"""Libra's component settings that differ by detector (mmdet's libra_rcnn configs), filled in
wherever a config leaves the field unset: ``detector -> section of components -> {field: value}``.
Balanced L1's ``beta`` is the smooth-L1 ``beta`` of the loss it replaces."""


def with_detector_defaults(raw: Any) -> Any:
    """``raw`` (an experiment config as a mapping) with :data:`DETECTOR_COMPONENT_DEFAULTS` of its
    ``model.detector`` under the component fields it does not set; anything else unchanged."""
    model = raw.get("model", {}) if isinstance(raw, dict) else None
    detector = model.get("detector", ModelConfig.model_fields["detector"].default) if isinstance(model, dict) else None
    components = raw.get("components", {}) if isinstance(raw, dict) else None
    if detector not in DETECTOR_COMPONENT_DEFAULTS or not isinstance(components, dict):
        return raw
    filled = dict(components)
    for section, defaults in DETECTOR_COMPONENT_DEFAULTS[detector].items():
        fields = filled.get(section, {})
        if isinstance(fields, dict):
            filled[section] = {**defaults, **fields}
    return {**raw, "components": filled}


class DataConfig(StrictModel):
    source: Literal["synthetic", "coco"] = "synthetic"
    root: Path = Path("data/synthetic")
    train_annotations: Path = Path("annotations/instances_train.json")
    val_annotations: Path = Path("annotations/instances_val.json")
    train_images: Path = Path("images/train")
    val_images: Path = Path("images/val")
    """Paths relative to ``root`` unless absolute."""
    max_images: PositiveInt | None = None
    """Use only the first N images (sorted ids) of each split."""
    seed: Int = Field(0, ge=0)
    """Seed of the synthetic set (``source: synthetic``)."""
    num_train: PositiveInt = 960
    num_val: PositiveInt = 96
    image_size: Int = Field(128, ge=32)
    num_workers: Int = Field(0, ge=0)
    cache_mb: Int = Field(1024, ge=0)
    """Keep a split's decoded images in memory (float32, decoded once) when they take at most this many
    MiB (sizes from the annotation file; the built-in 960 training images: 180 MiB); 0: decode every time."""
    max_image_pixels: PositiveInt = 89_478_485
    filter_empty: bool = False
    """Leave training images without any annotation out of training (mmdet's ``filter_empty_gt``);
    validation keeps every image."""
    """Images whose header declares more pixels are refused before decoding (Pillow's bomb limit)."""

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else self.root / path


class TrainConfig(StrictModel):
    seed: Int = Field(0, ge=0, le=2**32 - 1)
    epochs: PositiveInt = 12
    max_steps: Int = Field(-1, ge=-1)
    """Stop after this many optimizer steps (-1: run all epochs)."""
    batch_size: PositiveInt = 8
    """Images per device per step; the global batch is batch_size * devices * num_nodes."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: Float = Field(0.02, gt=0)
    lr_scaling_batch: PositiveInt | None = None
    """If set, ``lr`` is for this global batch and is scaled linearly to the actual global batch."""
    momentum: Float = Field(0.9, ge=0, lt=1)
    weight_decay: Float = Field(1e-4, ge=0)
    warmup_steps: Int = Field(500, ge=0)
    warmup_ratio: Float = Field(0.001, gt=0, le=1)
    schedule: Literal["step", "cosine"] = "step"
    """The learning rate after warm-up, as a factor of ``lr`` at optimizer step ``t`` of the run's ``T``:
    ``step``: ``lr_gamma ** (milestones passed)``; ``cosine``: ``(1 + cos(π t / T)) / 2``, from 1 at the first
    step to 0 at the end (needs ``milestones: []``). The linear warm-up multiplies either."""
    milestones: tuple[PositiveInt, ...] = (8, 11)
    """Epochs after which the learning rate is multiplied by ``lr_gamma`` (increasing)."""
    lr_gamma: Float = Field(0.1, gt=0)
    grad_clip: Annotated[Float, Field(gt=0)] | None = None
    """Clip the total L2 norm of all gradients to this before each step (None: no clipping)."""
    ema_decay: Annotated[Float, Field(gt=0, lt=1)] | None = None
    """Validate, checkpoint as best and evaluate an exponential moving average of the weights instead of the
    weights themselves (None: no average). After optimizer step ``t`` of ``T``, every floating tensor
    becomes ``avg ← d_t · avg + (1 - d_t) · w`` with ``d_t = ema_decay · (1 - exp(-t / (ema_ramp · T)))``:
    the average starts as the weights and reaches its full memory, ``1 / (1 - ema_decay)`` steps, after a
    few ``ema_ramp · T`` steps."""
    ema_ramp: Float = Field(0.05, gt=0, le=1)
    """Time constant of the EMA's warm-up ramp, as a fraction of the run's optimizer steps (see ``ema_decay``)."""
    val_every_n_epochs: PositiveInt = 1
    val_max_images: PositiveInt | None = None
    """Validate during training on only the first N validation images (sorted ids; val/AP, best.ckpt);
    None: all. ``libra evaluate`` always evaluates every validation image."""
    log_every_n_steps: PositiveInt = 10

    @field_validator("max_steps")
    @classmethod
    def _max_steps(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be -1 (run all epochs) or a number of steps >= 1, got 0")
        return value

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError(f"must be strictly increasing epochs, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _milestones_within_schedule(self) -> "TrainConfig":
        late = [m for m in self.milestones if m >= self.epochs]
        if late:
            raise ValueError(f"milestones {late} are not before the last epoch (epochs: {self.epochs}), so they "
                             "would never lower the learning rate; drop them or raise train.epochs")
        if self.schedule == "cosine" and self.milestones:
            raise ValueError(f"schedule: cosine lowers the learning rate at every step, so milestones "
                             f"{list(self.milestones)} would be ignored; set train.milestones: [] or schedule: step")
        return self


class TrainerConfig(StrictModel):
    """Passed to Lightning's Trainer: multi-GPU with ``devices``, multi-node with ``num_nodes``."""

    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "cpu"
    devices: PositiveInt | Literal["auto"] = 1
    """Devices per node (select GPUs with CUDA_VISIBLE_DEVICES)."""
    num_nodes: PositiveInt = 1
    strategy: str = "auto"
    precision: Literal["32-true", "16-mixed", "bf16-mixed"] = "32-true"

    @model_validator(mode="before")
    @classmethod
    def _threads_are_not_config(cls, values: Any) -> Any:
        if isinstance(values, dict) and "num_threads" in values:
            raise ValueError("trainer.num_threads is not a config field: a run's torch threads follow where it runs "
                             "(libra dispatch: execution.threads in params.yaml, or cores / jobs; libra train: "
                             "OMP_NUM_THREADS, else torch's default), so they are not part of its run key; remove it")
        return values


class EvalConfig(StrictModel):
    backend: Literal["faster_coco_eval", "pycocotools"] = "faster_coco_eval"
    batch_size: PositiveInt = 8


class PretrainConfig(StrictModel):
    """Pre-training of the tiny backbone as an image classifier on a synthetic shapes set.

    The tiny profile's stand-in for ImageNet: the set (:func:`detection.data.render_shape_example`)
    is generated from ``seed`` in its own random streams, so it shares no image with the
    detection set. Saves the backbone's ``state_dict`` for ``model.backbone.weights``.
    """

    seed: Int = Field(0, ge=0)
    channels: tuple[PositiveInt, ...] = Field((16, 32, 64, 128), min_length=1)
    """Stage widths; must equal ``model.backbone.channels`` of the detectors that load the weights."""
    num_train: PositiveInt = 12000
    num_val: PositiveInt = 1000
    image_size: Int = Field(64, ge=32)
    epochs: PositiveInt = 4
    batch_size: PositiveInt = 128
    lr: Float = Field(0.004, gt=0)
    weight_decay: Float = Field(1e-4, ge=0)
    num_threads: PositiveInt | None = None


class ExperimentConfig(StrictModel):
    model: ModelConfig = ModelConfig()
    components: ComponentsConfig = ComponentsConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    trainer: TrainerConfig = TrainerConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="before")
    @classmethod
    def _detector_defaults(cls, raw: Any) -> Any:
        return with_detector_defaults(raw)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (["a", "b", "c"], yaml-parsed value: plain values only, no tags)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=0.01")
    try:
        value = load_yaml(raw, f"override {text!r}") if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"override {text!r}: {key.strip()}: not a plain YAML value ({problem}); quote strings, "
                          "close brackets, e.g. train.milestones=[8, 11]") from None
    return key.strip().split("."), value


def with_values(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the nested ``raw`` with each ``{"a.b.c": value}`` set; unknown keys are caught by validation."""
    merged = copy.deepcopy(raw)
    for dotted, value in values.items():
        *sections, last = dotted.split(".")
        node = merged
        for part in sections:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{dotted}: {part!r} is a value, not a section")
            node = child
        node[last] = copy.deepcopy(value)
    return merged


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``raw`` with ``key=value`` texts (``--set``, a study's ``fixed``) parsed and set in order."""
    for text in overrides:
        path, value = parse_override(text)
        try:
            raw = with_values(raw, {".".join(path): value})
        except ConfigError as exc:
            raise ConfigError(f"override {text!r}: {exc}") from None
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that holds a key twice (plain YAML keeps the last silently)."""

    source = "<yaml>"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may set keys again: YAML's own rule
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise ConfigError(f"{self.source}: line {line}: key {key!r} appears twice in one mapping (first at "
                                  f"line {first_line[key]}); keep one")
            first_line[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(text: str, source: str) -> Any:
    """The one way configs, params and ``--set`` values are read: plain YAML values (no tags), no key twice
    in a mapping (a :class:`ConfigError` naming ``source``, the key and its line)."""
    loader = _UniqueKeyLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8") from None
    try:
        raw = load_yaml(text, str(path)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def validate_model(model: type[ModelT], raw: Any, source: str) -> ModelT:
    """``raw`` validated into ``model``; a ConfigError naming ``source`` and every bad field otherwise."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems: dict[str, list[str]] = {}
        for err in exc.errors():
            # a union's members appear in the path as e.g. "literal['auto']": the field is the rest
            path = ".".join(str(p) for p in err["loc"] if "[" not in str(p))
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                parent, _, key = path.rpartition(".")
                message += f" ({parent or 'the top level'} has unknown keys ['{key}'])"
            problems.setdefault(path, []).append(message)
        summary = "; ".join(f"{path}: {' or '.join(msgs)}" if path else " or ".join(msgs)
                            for path, msgs in problems.items())
        raise ConfigError(f"{source}: {summary}") from None


def validate_config(raw: dict[str, Any], source: str = "<config>") -> ExperimentConfig:
    return validate_model(ExperimentConfig, raw, source)


def load_config(path: Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    raw = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        source += " with overrides " + " ".join(overrides)
    return validate_config(apply_overrides(raw, overrides or []), source)


def save_config(config: ExperimentConfig, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def load_pretrain_config(params: Path | None, overrides: list[str] | None = None) -> PretrainConfig:
    """The ``pretrain`` section of a params.yaml, updated by its profile's ``pretrain`` section
    (defaults without a params file), with ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    if params is not None:
        tree = read_yaml(params)
        profile = (tree.get("profiles") or {}).get(tree.get("profile")) or {}
        for section, name in ((tree.get("pretrain"), "pretrain"), (profile.get("pretrain"), "the profile's pretrain")):
            if not isinstance(section or {}, dict):
                raise ConfigError(f"{params}: {name} must be a mapping, got {type(section).__name__}")
            raw.update(section or {})
    source = f"{params or '<defaults>'}: pretrain" + (" with overrides " + " ".join(overrides) if overrides else "")
    return validate_model(PretrainConfig, apply_overrides(raw, overrides or []), source)
