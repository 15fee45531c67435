"""Feature pyramids for the detectors: a backbone body, torchvision's FPN, and an optional neck.

The neck is where Libra R-CNN's Balanced Feature Pyramid plugs in (``nn.Identity`` otherwise).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from torch import Tensor, nn
from torchvision.models import resnet50
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from detection.components import BalancedFeaturePyramid
from detection.config import BackboneConfig, BFPConfig, ConfigError, ModelConfig
from detection.models.init_streams import init_stream
from detection.models.tiny_backbone import TinyBackbone
from detection.models.torchvision_internals import IntermediateLayerGetter
from detection.models.weights import few, read_state_dict, resnet_names


class _SelectStages(nn.Module):
    """Keeps the body's stages ``first`` to ``stop - 1``, renumbered from '0'."""

    def __init__(self, body: nn.Module, first: int, stop: int):
        super().__init__()
        self.body = body
        self.first, self.stop = first, stop

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        stages = list(self.body(x).values())[self.first : self.stop]
        return OrderedDict((str(i), s) for i, s in enumerate(stages))


class PyramidBackbone(nn.Module):
    """body -> FPN -> neck; ``out_channels`` as torchvision's detectors expect."""

    def __init__(self, body: nn.Module, fpn: FeaturePyramidNetwork, neck: nn.Module, out_channels: int):
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.neck = neck
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return self.neck(self.fpn(self.body(x)))


def backbone_weights_fix(cfg: BackboneConfig) -> str:
    """How to provide ``model.backbone.weights`` for ``cfg``'s backbone."""
    if cfg.name == "tiny":
        return (f"create it (`libra pretrain --out {cfg.weights}`) or set model.backbone.weights: null "
                "to train the tiny backbone from scratch")
    return ("put torchvision's ImageNet resnet50 state_dict there (e.g. resnet50-0676ba61.pth; nothing is "
            "downloaded) or point model.backbone.weights at it")


def load_weights(net: nn.Module, state: dict[str, Tensor], source: str, kind: str,
                 unused: tuple[str, ...] = ()) -> None:
    """Load the backbone ``state`` read from the file ``source`` into ``net``. Keys starting with a
    prefix in ``unused`` (parts the detector does not build, such as a classifier) may be absent or
    extra; any other missing or unexpected key, or a shape mismatch, is an error naming the file."""
    own = net.state_dict()
    missing = [k for k in own if not k.startswith(unused) and k not in state]
    unexpected = [k for k in state if not k.startswith(unused) and k not in own
                  and not k.endswith("num_batches_tracked")]  # BatchNorm's counter; frozen BN has none
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                  for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        problems = {"missing": missing, "unexpected": unexpected, "shape mismatch": mismatched}
        raise ConfigError(f"model.backbone.weights: {source} is not a {kind} state_dict: "
                          + "; ".join(f"{name} {few(keys)}" for name, keys in problems.items() if keys))
    net.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def _read_backbone_weights(cfg: BackboneConfig) -> dict[str, Tensor]:
    return read_state_dict(cfg.weights, "model.backbone.weights", backbone_weights_fix(cfg))


def _resnet50_body(cfg: BackboneConfig, num_stages: int) -> tuple[nn.Module, tuple[int, ...]]:
    """torchvision's ResNet-50 with frozen BatchNorm, from ``cfg.weights`` (torchvision's, mmdet's
    or Detectron2's names) unless ``cfg.from_scratch``; the first ``5 - trainable_layers`` of
    conv1, layer1..layer4 are frozen."""
    net = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    if cfg.weights is not None:
        load_weights(net, resnet_names(_read_backbone_weights(cfg)), str(cfg.weights), "ResNet-50", unused=("fc.",))
    layers = ["layer4", "layer3", "layer2", "layer1", "conv1"][: cfg.trainable_layers]
    for name, param in net.named_parameters():
        if not any(name.startswith(layer) for layer in layers):
            param.requires_grad_(False)
    body = IntermediateLayerGetter(net, {f"layer{i}": str(i - 1) for i in range(1, num_stages + 1)})
    return body, (256, 512, 1024, 2048)[:num_stages]


def build_body(cfg: BackboneConfig, num_stages: int) -> tuple[nn.Module, tuple[int, ...]]:
    """The body's first ``num_stages`` stages (later ones are not built, so no parameter goes unused)."""
    if cfg.name == "tiny":
        body = TinyBackbone(cfg.channels[:num_stages])
        if cfg.weights is not None:
            load_weights(body, _read_backbone_weights(cfg), str(cfg.weights),
                         f"tiny backbone (channels {list(cfg.channels)})",
                         unused=tuple(f"stages.{i}." for i in range(num_stages, len(cfg.channels))))
        return body, body.channels
    return _resnet50_body(cfg, num_stages)


def build_neck(cfg: BFPConfig, channels: int, levels: range, detector: str) -> nn.Module:
    """The Balanced Feature Pyramid over the pyramid ``levels`` (``k`` of each ``P_k``, finest first),
    gathering at ``P_{refine_level}``, when enabled; the identity otherwise."""
    if not cfg.enabled:
        return nn.Identity()
    if cfg.refine_level not in levels:
        raise ConfigError(f"components.bfp.refine_level={cfg.refine_level}: the {detector} pyramid has no "
                          f"P{cfg.refine_level}; its levels are P{levels[0]}-P{levels[-1]} "
                          f"(refine_level one of {list(levels)})")
    return BalancedFeaturePyramid(channels, len(levels), levels.index(cfg.refine_level), cfg.refine_type)


def build_pyramid_backbone(model: ModelConfig, bfp: BFPConfig, stages: slice,
                           extra_levels: Callable[[int], ExtraFPNBlock], seed: int) -> PyramidBackbone:
    """The body's ``stages`` feed the FPN; ``extra_levels(width of the last stage)`` adds the coarser levels.
    Stage ``i`` (stride ``4 · 2^i``) gives ``P_{i+2}``. Body, FPN and neck are initialised from their own
    streams of the run's ``seed`` (:mod:`detection.models.init_streams`)."""
    with init_stream(seed, "backbone.body"):
        body, channels = build_body(model.backbone, stages.stop)
    selected = channels[stages]
    if len(selected) != len(channels):
        body = _SelectStages(body, stages.start, stages.stop)
    with init_stream(seed, "backbone.fpn"):
        extra = extra_levels(selected[-1])
        fpn = FeaturePyramidNetwork(list(selected), model.fpn_channels, extra_blocks=extra)
    num_levels = len(selected) + (2 if isinstance(extra, LastLevelP6P7) else 1)
    if len(model.anchor_sizes) != num_levels:
        raise ConfigError(f"model.anchor_sizes has {len(model.anchor_sizes)} entries but the "
                          f"{model.detector} pyramid has {num_levels} levels")
    levels = range(stages.start + 2, stages.start + 2 + num_levels)
    with init_stream(seed, "backbone.neck"):
        neck = build_neck(bfp, model.fpn_channels, levels, model.detector)
    return PyramidBackbone(body, fpn, neck, model.fpn_channels)


def faster_rcnn_backbone(model: ModelConfig, bfp: BFPConfig, seed: int) -> PyramidBackbone:
    """P2-P5 from the four stages plus a max-pooled P6 (torchvision's 'pool')."""
    return build_pyramid_backbone(model, bfp, slice(0, 4), extra_levels=lambda _: LastLevelMaxPool(), seed=seed)


def retinanet_extra_levels(model: ModelConfig, c5_channels: int) -> LastLevelP6P7:
    """``P6 = conv3x3/2(x)`` with ``x`` = P5 or C5 (``retinanet.extra_from``), ``P7 = conv3x3/2(ReLU(P6))``."""
    from_c5 = model.retinanet.extra_from == "c5"
    extra = LastLevelP6P7(c5_channels if from_c5 else model.fpn_channels, model.fpn_channels)
    extra.use_P5 = not from_c5  # torchvision infers it from equal widths, which C5 may also have
    return extra


def retinanet_backbone(model: ModelConfig, bfp: BFPConfig, seed: int) -> PyramidBackbone:
    """P3-P5 from stages 2-4 plus P6, P7 (:func:`retinanet_extra_levels`); with
    ``retinanet.min_level: 2``, the Faster R-CNN pyramid: P2-P5 from stages 1-4 plus a max-pooled P6."""
    if model.retinanet.min_level == 2:
        return faster_rcnn_backbone(model, bfp, seed)
    return build_pyramid_backbone(model, bfp, slice(1, 4),
                                  extra_levels=lambda c5_channels: retinanet_extra_levels(model, c5_channels),
                                  seed=seed)
