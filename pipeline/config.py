"""Typed experiment configuration: YAML files validated into pydantic models.

A config file holds any subset of the fields below; everything else takes its default.
``load_config(path, overrides)`` applies ``key.sub=value`` overrides (values parsed as YAML)
before validation, so a typo in a file or an override fails early with the offending key named.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


ModelT = TypeVar("ModelT", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackboneConfig(_Strict):
    name: Literal["tiny", "resnet50"] = "tiny"
    channels: tuple[int, ...] = (16, 32, 64, 128)
    """Stage widths of the ``tiny`` backbone (ignored by resnet50)."""
    weights: Path | None = None
    """Local file with ImageNet backbone weights (state_dict); ``None`` trains from scratch."""
    trainable_layers: int = Field(3, ge=0, le=5)


class RPNConfig(_Strict):
    pre_nms_top_n_train: int = 2000
    post_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_test: int = 1000
    batch_size_per_image: int = 256
    positive_fraction: float = Field(0.5, gt=0, le=1)


class RoIHeadsConfig(_Strict):
    batch_size_per_image: int = 512
    positive_fraction: float = Field(0.25, gt=0, le=1)
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    representation_size: int = Field(1024, ge=1)
    """Width of the two-layer MLP box head."""
    sampling_ratio: int = Field(2, ge=0)
    """RoIAlign sampling points per bin side (0: adaptive)."""


class BoxLossConfig(_Strict):
    """The detector's own box regression loss, replaced by Balanced L1 when that is enabled."""

    type: Literal["smooth_l1", "l1"] = "smooth_l1"
    beta: float = Field(1.0 / 9.0, ge=0)


class RetinaNetConfig(_Strict):
    """RetinaNet-only settings; the defaults are the paper's (Lin et al. 2017)."""

    min_level: Literal[2, 3] = 3
    """Finest level: P3 (the paper's P3-P7) or P2 (Faster R-CNN's P2-P6, for small images)."""
    scales_per_octave: int = Field(3, ge=1)
    """Anchor sizes per level: ``size · 2^(i/n)`` for ``i < n``."""
    head_convs: int = Field(4, ge=1, le=4)
    """3x3 conv layers in each subnet before its predictor."""
    head_norm: Literal["none", "group"] = "none"
    """Subnet convs plain (the paper's) or with GroupNorm (torchvision's v2; converges faster)."""
    head_init: Literal["normal", "kaiming"] = "normal"
    """Subnet conv weights: N(0, 0.01) (the paper's) or Kaiming-normal (fan-out, ReLU). The
    predictors keep N(0, 0.01) and the prior-probability bias either way."""
    fg_iou_thresh: float = Field(0.5, gt=0, le=1)
    """Anchors with IoU >= this to a ground truth are its positives."""
    bg_iou_thresh: float = Field(0.4, ge=0, le=1)
    """Anchors with IoU < this to every ground truth are negatives (in between: ignored)."""
    focal_alpha: float = Field(0.25, ge=0, le=1)
    focal_gamma: float = Field(2.0, ge=0)

    @model_validator(mode="after")
    def _thresholds(self) -> "RetinaNetConfig":
        if self.bg_iou_thresh > self.fg_iou_thresh:
            raise ValueError(
                f"bg_iou_thresh ({self.bg_iou_thresh}) must not exceed fg_iou_thresh ({self.fg_iou_thresh})"
            )
        return self


class ModelConfig(_Strict):
    detector: Literal["faster_rcnn", "retinanet"] = "faster_rcnn"
    backbone: BackboneConfig = BackboneConfig()
    fpn_channels: int = 64
    min_size: int = 128
    max_size: int = 128
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128, 256)
    """Base anchor size per pyramid level, finest first (one per FPN output level)."""
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn: RPNConfig = RPNConfig()
    roi_heads: RoIHeadsConfig = RoIHeadsConfig()
    box_loss: BoxLossConfig = BoxLossConfig()
    retinanet: RetinaNetConfig = RetinaNetConfig()
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100


class IoUBalancedSamplingConfig(_Strict):
    """Libra R-CNN IoU-balanced negative sampling (+ instance-balanced positives) in the R-CNN head."""

    enabled: bool = False
    num_bins: int = Field(3, ge=1)
    floor_thr: float = -1.0
    floor_fraction: float = Field(0.0, ge=0, le=1)
    bin_range: Literal["negatives", "mmdet"] = "negatives"
    instance_balanced_pos: bool = False

    @model_validator(mode="after")
    def _floor(self) -> "IoUBalancedSamplingConfig":
        if not (self.floor_thr == -1.0 or 0.0 <= self.floor_thr < 1.0):
            raise ValueError(f"floor_thr must be -1 (no floor) or in [0, 1), got {self.floor_thr}")
        return self


class BFPConfig(_Strict):
    """Libra R-CNN Balanced Feature Pyramid after the FPN."""

    enabled: bool = False
    refine_level: int = Field(2, ge=0)
    refine_type: Literal["none", "conv", "non_local"] = "non_local"


class BalancedL1Config(_Strict):
    """Libra R-CNN Balanced L1 loss replacing the box regression loss."""

    enabled: bool = False
    alpha: float = Field(0.5, gt=0)
    gamma: float = Field(1.5, gt=0)
    beta: float = Field(1.0, gt=0)
    variant: Literal["exact", "mmdet"] = "exact"
    loss_weight: float = Field(1.0, ge=0)


class IoUBalancedClsConfig(_Strict):
    """IoU-balanced classification loss (Wu et al. 2019): positive weights u^eta, sum preserved."""

    enabled: bool = False
    eta: float = Field(1.5, ge=0)


class IoUBalancedLocConfig(_Strict):
    """IoU-balanced localization loss (Wu et al. 2019): positive box-loss weights w_loc * u^lambda."""

    enabled: bool = False
    lam: float = Field(1.5, ge=0)
    w_loc: float | Literal["auto"] = "auto"


class ComponentsConfig(_Strict):
    iou_balanced_sampling: IoUBalancedSamplingConfig = IoUBalancedSamplingConfig()
    bfp: BFPConfig = BFPConfig()
    balanced_l1: BalancedL1Config = BalancedL1Config()
    iou_balanced_cls: IoUBalancedClsConfig = IoUBalancedClsConfig()
    iou_balanced_loc: IoUBalancedLocConfig = IoUBalancedLocConfig()


class DataConfig(_Strict):
    source: Literal["synthetic", "coco"] = "synthetic"
    root: Path = Path("data/synthetic")
    train_annotations: Path = Path("annotations/instances_train.json")
    val_annotations: Path = Path("annotations/instances_val.json")
    train_images: Path = Path("images/train")
    val_images: Path = Path("images/val")
    """Paths relative to ``root`` unless absolute."""
    max_images: int | None = Field(None, ge=1)
    """Use only the first N images (sorted ids) of each split."""
    seed: int = 0
    """Seed of the synthetic set (``source: synthetic``)."""
    num_train: int = Field(480, ge=1)
    num_val: int = Field(96, ge=1)
    image_size: int = Field(128, ge=32)
    num_workers: int = Field(0, ge=0)

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else self.root / path


class TrainConfig(_Strict):
    seed: int = 0
    epochs: int = Field(12, ge=1)
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run all epochs)."""
    batch_size: int = Field(8, ge=1)
    """Images per device per step; the global batch is batch_size * devices * num_nodes."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.02, gt=0)
    lr_scaling_batch: int | None = Field(None, ge=1)
    """If set, ``lr`` is for this global batch and is scaled linearly to the actual global batch."""
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = Field(500, ge=0)
    warmup_ratio: float = Field(0.001, gt=0, le=1)
    milestones: tuple[int, ...] = (8, 11)
    """Epochs after which the learning rate is multiplied by ``lr_gamma``."""
    lr_gamma: float = 0.1
    grad_clip: float | None = None
    val_every_n_epochs: int = Field(1, ge=1)
    log_every_n_steps: int = Field(10, ge=1)


class TrainerConfig(_Strict):
    """Passed to Lightning's Trainer: multi-GPU with ``devices``, multi-node with ``num_nodes``."""

    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "cpu"
    devices: int | str = 1
    num_nodes: int = Field(1, ge=1)
    strategy: str = "auto"
    precision: Literal["32-true", "16-mixed", "bf16-mixed"] = "32-true"
    num_threads: int | None = Field(None, ge=1)
    """torch intra-op threads per process (None: torch's default)."""


class EvalConfig(_Strict):
    backend: Literal["faster_coco_eval", "pycocotools"] = "faster_coco_eval"
    batch_size: int = Field(8, ge=1)


class PretrainConfig(_Strict):
    """Pre-training of the tiny backbone as an image classifier on a synthetic shapes set.

    The tiny profile's stand-in for ImageNet: the set (:func:`pipeline.data.render_shape_example`)
    is generated from ``seed`` in its own random streams, so it shares no image with the
    detection set. Saves the backbone's ``state_dict`` for ``model.backbone.weights``.
    """

    seed: int = 0
    channels: tuple[int, ...] = (16, 32, 64, 128)
    """Stage widths; must equal ``model.backbone.channels`` of the detectors that load the weights."""
    num_train: int = Field(12000, ge=1)
    num_val: int = Field(1000, ge=1)
    image_size: int = Field(64, ge=32)
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.004, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    num_threads: int | None = Field(None, ge=1)


class ExperimentConfig(_Strict):
    model: ModelConfig = ModelConfig()
    components: ComponentsConfig = ComponentsConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    trainer: TrainerConfig = TrainerConfig()
    eval: EvalConfig = EvalConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (["a", "b", "c"], yaml-parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=0.01")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict; unknown keys are caught by validation."""
    merged = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return merged


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from exc
    try:
        raw = yaml.safe_load(text) or {}
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
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None


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
    """The ``pretrain`` section of a params.yaml (defaults without one), with ``key=value`` overrides."""
    raw = read_yaml(params).get("pretrain") or {} if params is not None else {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{params}: pretrain must be a mapping, got {type(raw).__name__}")
    source = f"{params or '<defaults>'}: pretrain" + (" with overrides " + " ".join(overrides) if overrides else "")
    return validate_model(PretrainConfig, apply_overrides(raw, overrides or []), source)
