"""mmdet 3 configs translated into :class:`detection.config.ExperimentConfig` (``libra import-mmdet``).

An mmdet config (a name from the installed mmdet wheel, e.g. ``libra-faster-rcnn_r50_fpn_1x_coco``,
or a user's own ``.py`` file) is read as data (its syntax tree: nothing in it runs; a statement or expression that is not
plain data is refused, naming its line) and resolved with its ``_base_`` inheritance as mmengine
does, without importing mmdet or mmengine. The resolved dict is flattened into leaves, ``model.neck[1].refine_level = 2``,
and every leaf is accounted for as one of::

    mapped      translated into a field of ours (the field is named)
    fixed       ours does exactly this and has no field for it (the value is checked)
    difference  ours does it differently, a known and documented difference (docs/recipe.md;
                the value is checked: any other value is an error)
    ignored     no effect on what is trained or measured (a variable the dataloaders copy, ...)
    warning     not mapped, and does not change training (hooks, logging, visualizer)
    error       not mapped, and may change training

A fixed or difference leaf with another value than ours expects is an error, so nothing is dropped
silently. Two leaves mapped to one field (the FPN width and the heads' input widths) must agree.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from detection.config import ConfigError, ExperimentConfig, validate_config
from detection.io import flatten

__all__ = ["Imported", "Leaf", "Translation", "find_mmdet_config", "import_mmdet", "load_mmdet_config", "nested",
           "render_yaml_header", "translate"]

NO_TRAINING_EFFECT = {
    "default_hooks": "hooks: checkpoints, logging, timers, visualization",
    "log_processor": "log settings",
    "log_level": "log settings",
    "visualizer": "visualizer",
    "vis_backends": "visualizer",
    "env_cfg": "process settings (cudnn benchmark, start method, dist backend)",
    "default_scope": "mmdet's registry scope",
    "resume": "ours resumes from the run directory's last checkpoint",
    "launcher": "ours starts processes with Lightning (trainer.*)",
    "work_dir": "ours writes to the run directory",
    "tta_model": "test-time augmentation: ours does not use it",
    "tta_pipeline": "test-time augmentation: ours does not use it",
    "img_scales": "test-time augmentation: ours does not use it",
}
"""Top-level keys whose leaves, when not mapped, are warnings rather than errors."""

COPIED_VARIABLES = {"data_root", "dataset_type", "backend_args", "train_pipeline", "test_pipeline"}
"""Top-level helper variables of mmdet's base configs that the dataloaders copy; read there."""

IMAGENET_MEAN = [123.675, 116.28, 103.53]
IMAGENET_STD = [58.395, 57.12, 57.375]
"""torchvision's normalization (ImageNet mean and std x 255), as mmdet's data_preprocessor sets it."""

TORCHVISION_RESNET50 = "data/pretrained/resnet50-0676ba61.pth"
"""Where ours expects the file mmdet's ``torchvision://resnet50`` names (nothing is downloaded)."""

_MISSING = object()

KeyPath = tuple[Any, ...]
"""A leaf's place in the config: keys and list indices, e.g. ("model", "neck", 1, "refine_level")."""


def _format(path: KeyPath) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _flatten(node: Any, path: KeyPath = ()) -> dict[KeyPath, Any]:
    if isinstance(node, dict) and node:
        return {leaf: value for key, child in node.items() for leaf, value in _flatten(child, path + (key,)).items()}
    if isinstance(node, (list, tuple)) and node and any(isinstance(item, (dict, list, tuple)) for item in node):
        return {leaf: value for i, child in enumerate(node) for leaf, value in _flatten(child, path + (i,)).items()}
    return {path: node}


def _plain(value: Any) -> Any:
    """Tuples as lists, so that (1333, 800) equals [1333, 800]."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _equal(a: Any, b: Any) -> bool:
    a, b = _plain(a), _plain(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


@dataclass(frozen=True)
class Leaf:
    path: str
    value: Any
    kind: str
    note: str
    """The field it maps to (mapped) or why it is fixed, different, ignored or not mapped."""


@dataclass
class Translation:
    """The leaves of one resolved mmdet config, how each is accounted for, and the fields of ours."""

    tree: dict[str, Any]
    source: str
    fields: dict[str, Any] = field(default_factory=dict)
    """Our dotted field -> value, for every field the mmdet config sets."""
    field_paths: dict[str, str] = field(default_factory=dict)
    accounted: dict[KeyPath, tuple[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = _flatten(self.tree)

    def value(self, path: KeyPath, default: Any = _MISSING) -> Any:
        node: Any = self.tree
        for part in path:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, (list, tuple)) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                return default
        return node

    def has(self, path: KeyPath) -> bool:
        return self.value(path) is not _MISSING

    def entries(self, path: KeyPath) -> list[KeyPath]:
        """Paths of the items of a list (or of a single dict) at ``path``: necks, schedulers, transforms."""
        node = self.value(path)
        if isinstance(node, (list, tuple)):
            return [path + (i,) for i in range(len(node))]
        return [path] if isinstance(node, dict) else []

    def _mark(self, path: KeyPath, kind: str, note: str) -> None:
        for leaf in self.values:
            if leaf[: len(path)] == path and leaf not in self.accounted:
                self.accounted[leaf] = (kind, note)

    def set_field(self, name: str, value: Any, path: KeyPath | None = None) -> None:
        """Set one of our fields; a second setting with another value is an error naming both paths."""
        where = _format(path) if path is not None else "(implied)"
        if name in self.fields and not _equal(self.fields[name], value):
            if path is not None:
                self._mark(path, "error", f"sets {name} = {value!r}, but {self.field_paths[name]} set "
                                          f"{self.fields[name]!r}; ours has one value")
            return
        self.fields.setdefault(name, value)
        self.field_paths.setdefault(name, where)
        if path is not None:
            self._mark(path, "mapped", name)

    def map(self, path: KeyPath, name: str, convert: Callable[[Any], Any] = lambda v: v) -> None:
        if self.has(path):
            self.set_field(name, convert(self.value(path)), path)

    def check(self, path: KeyPath, expected: Any, note: str, kind: str = "fixed") -> bool:
        """A leaf (or subtree) ours does one way: accounted as ``kind`` if it equals ``expected``."""
        if not self.has(path):
            return True
        if _equal(self.value(path), expected):
            self._mark(path, kind, note)
            return True
        self._mark(path, "error", f"ours supports only {expected!r} here ({note})")
        return False

    def differs(self, path: KeyPath, expected: Any, note: str) -> bool:
        return self.check(path, expected, note + " (docs/recipe.md)", kind="difference")

    def ignore(self, path: KeyPath, note: str) -> None:
        self._mark(path, "ignored", note)

    def warn(self, path: KeyPath, note: str) -> None:
        self._mark(path, "warning", note)

    def error(self, path: KeyPath, note: str) -> None:
        self._mark(path, "error", note)

    def finish(self) -> list[Leaf]:
        """Every leaf with its account; leaves nothing accounted for become warnings or errors."""
        for leaf in self.values:
            if leaf not in self.accounted:
                top = leaf[0]
                if top in NO_TRAINING_EFFECT:
                    self.accounted[leaf] = ("warning", NO_TRAINING_EFFECT[top])
                else:
                    self.accounted[leaf] = ("error", "ours has no setting for it")
        return [Leaf(_format(p), _plain(v), *self.accounted[p]) for p, v in self.values.items()]


def mmdet_config_dir() -> Path:
    """``configs/`` of the installed mmdet wheel, found without importing mmdet (it needs mmcv)."""
    spec = importlib.util.find_spec("mmdet")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("mmdet is not installed: install mmdet 3.3 (pip install mmdet==3.3.0) to import its "
                          "configs by name, or pass the path of a config file")
    return Path(list(spec.submodule_search_locations)[0]) / ".mim" / "configs"


def find_mmdet_config(name_or_path: str) -> Path:
    """A ``.py`` file as given, or the config of that name (``.py`` optional) in the mmdet wheel."""
    given = Path(name_or_path)
    if given.suffix == ".py" and given.is_file():
        return given
    if given.suffix == ".py" and (given.parent != Path(".") or given.is_absolute()):
        raise ConfigError(f"{name_or_path}: no such mmdet config file")
    root = mmdet_config_dir()
    stem = given.name.removesuffix(".py")
    found = sorted(root.glob(f"**/{stem}.py"))
    if not found:
        raise ConfigError(f"{name_or_path}: neither a config file nor a config name in {root} "
                          "(names look like libra-faster-rcnn_r50_fpn_1x_coco)")
    if len(found) > 1:
        raise ConfigError(f"{name_or_path}: {len(found)} configs of that name in {root} "
                          f"({', '.join(str(f.relative_to(root)) for f in found)}); pass the path of one")
    return found[0]


_OPERATORS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
"""The arithmetic a config may hold (``1.0 / 3``, ``data_root + 'annotations/'``)."""


def _not_plain(path: Path, node: ast.AST, what: str) -> ConfigError:
    return ConfigError(f"{path}:{node.lineno}: {what} is not plain data; libra import-mmdet reads a config "
                       "without running it: only assignments of literals, dict(...), earlier names, arithmetic and "
                       "[... for x in list]")


def _value(node: ast.expr, names: dict[str, Any], path: Path) -> Any:
    """The value of a plain-data expression: a literal, list, tuple, dict, ``dict(...)``, a name assigned
    earlier in the file or a base's (``_base_.key``, ``{{_base_.key}}``), an item of one, a sign or arithmetic
    on those, a list made for each item of one. Anything else is refused, naming its line."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_value(item, names, path) for item in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        result: dict[Any, Any] = {}
        for key, item in zip(node.keys, node.values):
            if key is None:
                result.update(_value(item, names, path))
            else:
                result[_value(key, names, path)] = _value(item, names, path)
        return result
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        result = {}
        for keyword in node.keywords:
            value = _value(keyword.value, names, path)
            if keyword.arg is None:
                result.update(value)
            else:
                result[keyword.arg] = value
        return result
    if isinstance(node, ast.Set) and len(node.elts) == 1 and isinstance(node.elts[0], ast.Set):
        return _value(node.elts[0].elts[0], names, path)  # mmengine's {{_base_.key}}: the base's value
    if isinstance(node, ast.Attribute) and isinstance(node.value, (ast.Name, ast.Attribute)):
        owner = _value(node.value, names, path)
        if not (isinstance(owner, dict) and node.attr in owner):
            raise _not_plain(path, node, f"{ast.unparse(node)} (no such key)")
        return owner[node.attr]
    if (isinstance(node, ast.ListComp) and len(node.generators) == 1 and not node.generators[0].ifs
            and isinstance(node.generators[0].target, ast.Name)):  # [dict(scale=s) for s in scales]
        loop = node.generators[0]
        return [_value(node.elt, {**names, loop.target.id: item}, path) for item in _value(loop.iter, names, path)]
    if isinstance(node, ast.Subscript):
        return _value(node.value, names, path)[_value(node.slice, names, path)]
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise _not_plain(path, node, f"the name {node.id!r} (not assigned earlier in the file)")
        return names[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _value(node.operand, names, path)
        return -operand if isinstance(node.op, ast.USub) else +operand
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_value(node.left, names, path), _value(node.right, names, path))
    raise _not_plain(path, node, ast.unparse(node)[:60])


def _read_config_file(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """The names a config file assigns, read from its syntax tree (nothing in it runs), with ``_base_`` the
    merged names of its base files (``_base_.key`` reads them)."""
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read this config: {exc}") from None
    except SyntaxError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: not valid Python: {exc.msg}") from None
    names: dict[str, Any] = {}
    for statement in tree.body:
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
            continue  # a docstring
        if not (isinstance(statement, ast.Assign) and all(isinstance(t, ast.Name) for t in statement.targets)):
            raise _not_plain(path, statement, f"the statement `{ast.unparse(statement).splitlines()[0][:60]}`")
        value = _value(statement.value, names, path)
        if [t.id for t in statement.targets] == ["_base_"]:
            value = _load_bases(path, [value] if isinstance(value, str) else value, seen)
        names.update((target.id, value) for target in statement.targets)
    return names


def _load_bases(path: Path, bases: list[str], seen: tuple[Path, ...]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = path.parent / base
        if not base_path.is_file():
            raise ConfigError(f"{path}: _base_ file {base} not found ({base_path})")
        inherited = load_mmdet_config(base_path, (*seen, path.resolve()))
        if clash := sorted(set(merged) & set(inherited)):
            raise ConfigError(f"{path}: its _base_ files both set {', '.join(clash)}")
        merged.update(inherited)
    return merged


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``base`` as mmengine merges: dicts key by key (unless the child's has ``_delete_=True``),
    any other value replaced."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and not value.get("_delete_"):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = {k: v for k, v in value.items() if k != "_delete_"} if isinstance(value, dict) else value
    return merged


def load_mmdet_config(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The config with its ``_base_`` files merged (``_delete_`` honoured), read as data: nothing runs."""
    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: its _base_ files include it again ({' -> '.join(map(str, _seen))})")
    names = _read_config_file(path, _seen)
    return _merge(names.pop("_base_", {}), names)


def _backbone(t: Translation) -> None:
    b = ("model", "backbone")
    t.check(b + ("type",), "ResNet", "torchvision's ResNet")
    depth = t.value(b + ("depth",))
    if depth == 50:
        t.set_field("model.backbone.name", "resnet50", b + ("depth",))
    elif depth is not _MISSING:
        t.error(b + ("depth",), "ours has ResNet-50 only (depth 50)")
    t.check(b + ("num_stages",), 4, "four stages")
    t.check(b + ("out_indices",), [0, 1, 2, 3], "the FPN takes every stage")
    t.check(b + ("style",), "pytorch", "stride 2 in the 3x3 conv, torchvision's")
    frozen = t.value(b + ("frozen_stages",))
    if isinstance(frozen, int) and -1 <= frozen <= 4:
        t.set_field("model.backbone.trainable_layers", 5 if frozen == -1 else 4 - frozen, b + ("frozen_stages",))
    elif frozen is not _MISSING:
        t.error(b + ("frozen_stages",), "expected -1 (none frozen) to 4 (all stages frozen)")
    t.check(b + ("norm_eval",), True, "batch-norm statistics frozen")
    t.check(b + ("norm_cfg", "type"), "BN", "batch norm")
    t.differs(b + ("norm_cfg", "requires_grad"), True,
              "ours freezes the batch-norm affine parameters too (torchvision's FrozenBatchNorm2d)")
    init = t.value(b + ("init_cfg",), None)
    if init is None:
        t.set_field("model.backbone.from_scratch", True)
    elif _equal(init, {"type": "Pretrained", "checkpoint": "torchvision://resnet50"}):
        t.set_field("model.backbone.weights", TORCHVISION_RESNET50, b + ("init_cfg",))
    else:
        t.error(b + ("init_cfg",), "ours starts from torchvision's ImageNet ResNet-50 (model.backbone.weights) "
                                   "or from scratch")
    p = ("model", "data_preprocessor")
    t.check(p + ("type",), "DetDataPreprocessor", "torchvision's transform")
    t.check(p + ("mean",), IMAGENET_MEAN, "torchvision's ImageNet mean")
    t.check(p + ("std",), IMAGENET_STD, "torchvision's ImageNet std")
    t.check(p + ("bgr_to_rgb",), True, "images are read as RGB")
    t.check(p + ("pad_size_divisor",), 32, "torchvision pads batches to multiples of 32")


def _neck(t: Translation, detector: str) -> int:
    """The FPN (and BFP) settings; returns the finest pyramid level (2: P2, 3: P3)."""
    min_level = 2
    for path in t.entries(("model", "neck")):
        kind = t.value(path + ("type",))
        if kind == "FPN":
            t.ignore(path + ("type",), "the FPN")
            t.check(path + ("in_channels",), [256, 512, 1024, 2048], "ResNet-50's stage widths")
            t.map(path + ("out_channels",), "model.fpn_channels")
            t.check(path + ("num_outs",), 5, "five pyramid levels")
            start = t.value(path + ("start_level",), 0)
            extra = t.value(path + ("add_extra_convs",), False)
            if detector == "faster_rcnn":
                t.check(path + ("start_level",), 0, "P2-P5 from the four stages")
                t.check(path + ("add_extra_convs",), False, "P6 max-pooled from P5")
            elif start in (0, 1):
                min_level = start + 2
                t.set_field("model.retinanet.min_level", min_level, path + ("start_level",))
                if start == 0:
                    t.check(path + ("add_extra_convs",), False, "with P2, P6 is max-pooled from P5")
                elif extra in ("on_input", True):
                    t.set_field("model.retinanet.extra_from", "c5", path + ("add_extra_convs",))
                elif extra == "on_output":
                    t.set_field("model.retinanet.extra_from", "p5", path + ("add_extra_convs",))
                else:
                    t.error(path + ("add_extra_convs",), "ours computes P6-P7 from C5 (on_input) or P5 (on_output)")
            else:
                t.error(path + ("start_level",), "ours starts the pyramid at C2 (P2) or C3 (P3)")
            t.check(path + ("relu_before_extra_convs",), True, "ours applies ReLU before P7 (torchvision's)")
        elif kind == "BFP":
            t.ignore(path + ("type",), "the Balanced Feature Pyramid")
            t.set_field("components.bfp.enabled", True)
            t.map(path + ("in_channels",), "model.fpn_channels")
            t.check(path + ("num_levels",), 5, "five pyramid levels")
            # mmdet's refine_level indexes the FPN's outputs, ours names the level P_k
            t.map(path + ("refine_level",), "components.bfp.refine_level", lambda index: min_level + index)
            t.map(path + ("refine_type",), "components.bfp.refine_type", lambda v: "none" if v is None else v)
    return min_level


def _box_loss(t: Translation, path: KeyPath) -> None:
    """Regression loss of the R-CNN head or of RetinaNet: Balanced L1, smooth L1 or L1."""
    kind = t.value(path + ("type",))
    if kind == "BalancedL1Loss":
        t.ignore(path + ("type",), "Balanced L1")
        t.set_field("components.balanced_l1.enabled", True)
        t.set_field("components.balanced_l1.formula", "mmdet")
        for name in ("alpha", "gamma", "beta", "loss_weight"):
            t.map(path + (name,), f"components.balanced_l1.{name}")
        t.check(path + ("reduction",), "mean", "mean over the sampled boxes")
    elif kind in ("SmoothL1Loss", "L1Loss"):
        t.set_field("model.box_loss.type", "smooth_l1" if kind == "SmoothL1Loss" else "l1", path + ("type",))
        if kind == "SmoothL1Loss":
            t.map(path + ("beta",), "model.box_loss.beta")
        t.check(path + ("loss_weight",), 1.0, "box loss weight 1")
        t.check(path + ("reduction",), "mean", "mean over the sampled boxes")


def _anchors_rpn(t: Translation) -> None:
    a = ("model", "rpn_head", "anchor_generator")
    t.check(a + ("type",), "AnchorGenerator", "one anchor size per level")
    strides, scales = t.value(a + ("strides",)), t.value(a + ("scales",))
    t.check(a + ("strides",), [4, 8, 16, 32, 64], "P2-P6")
    if isinstance(scales, (list, tuple)) and len(scales) == 1 and strides is not _MISSING:
        t.set_field("model.anchor_sizes", [scales[0] * s for s in strides], a + ("scales",))
    elif scales is not _MISSING:
        t.error(a + ("scales",), "ours has one anchor size per level (one scale)")
    t.map(a + ("ratios",), "model.aspect_ratios")


def _sampler(t: Translation, path: KeyPath, prefix: str, add_gt: bool) -> None:
    """RandomSampler (RPN, R-CNN) or CombinedSampler (Libra R-CNN, R-CNN only)."""
    kind = t.value(path + ("type",))
    t.check(path + ("add_gt_as_proposals",), add_gt, "torchvision's")
    if kind == "RandomSampler":
        t.ignore(path + ("type",), "random sampling")
        t.map(path + ("num",), f"{prefix}.batch_size_per_image")
        t.map(path + ("pos_fraction",), f"{prefix}.positive_fraction")
        t.map(path + ("neg_pos_ub",), f"{prefix}.neg_pos_ub")
    elif kind == "CombinedSampler" and prefix == "model.roi_heads":
        t.ignore(path + ("type",), "positive and negative samplers of their own")
        t.map(path + ("num",), f"{prefix}.batch_size_per_image")
        t.map(path + ("pos_fraction",), f"{prefix}.positive_fraction")
        pos, neg = path + ("pos_sampler",), path + ("neg_sampler",)
        instance = t.value(pos + ("type",)) == "InstanceBalancedPosSampler"
        iou_neg = t.value(neg + ("type",)) == "IoUBalancedNegSampler"
        if t.value(pos + ("type",)) not in ("InstanceBalancedPosSampler", "RandomSampler"):
            t.error(pos, "ours samples positives at random or instance-balanced")
        elif instance and not iou_neg:
            t.error(pos, "ours has instance-balanced positives only with IoUBalancedNegSampler negatives")
        else:
            t.set_field("components.iou_balanced_sampling.instance_balanced_pos", instance, pos + ("type",))
        if iou_neg:
            t.set_field("components.iou_balanced_sampling.enabled", True, neg + ("type",))
            t.set_field("components.iou_balanced_sampling.bin_range", "mmdet")
            for name in ("floor_thr", "floor_fraction", "num_bins"):
                t.map(neg + (name,), f"components.iou_balanced_sampling.{name}")
        else:
            t.check(neg + ("type",), "RandomSampler", "random or IoU-balanced negatives")


def _two_stage(t: Translation) -> None:
    r = ("model", "rpn_head")
    t.check(r + ("type",), "RPNHead", "torchvision's RPN head")
    t.map(r + ("in_channels",), "model.fpn_channels")
    t.map(r + ("feat_channels",), "model.fpn_channels")
    _anchors_rpn(t)
    t.check(r + ("bbox_coder",), {"type": "DeltaXYWHBBoxCoder", "target_means": [0.0] * 4, "target_stds": [1.0] * 4},
            "box deltas with weights (1, 1, 1, 1)")
    t.check(r + ("loss_cls",), {"type": "CrossEntropyLoss", "use_sigmoid": True, "loss_weight": 1.0},
            "binary cross-entropy objectness")
    if t.value(r + ("loss_bbox", "type")) == "SmoothL1Loss":
        t.check(r + ("loss_bbox",), {"type": "SmoothL1Loss", "beta": 1.0 / 9.0, "loss_weight": 1.0},
                "torchvision's RPN smooth L1, beta 1/9")
    else:
        t.differs(r + ("loss_bbox",), {"type": "L1Loss", "loss_weight": 1.0},
                  "ours: the RPN's smooth L1 with beta 1/9 (torchvision's and mmdetection v1's)")

    rpn = ("model", "train_cfg", "rpn")
    t.check(rpn + ("assigner", "type"), "MaxIoUAssigner", "IoU matching")
    t.check(rpn + ("assigner", "pos_iou_thr"), 0.7, "torchvision's RPN")
    t.check(rpn + ("assigner", "neg_iou_thr"), 0.3, "torchvision's RPN")
    t.check(rpn + ("assigner", "match_low_quality"), True, "torchvision's RPN")
    t.differs(rpn + ("assigner", "min_pos_iou"), 0.3,
              "ours keeps each ground truth's best anchors whatever their IoU (torchvision's)")
    t.check(rpn + ("assigner", "ignore_iof_thr"), -1, "no ignore regions")
    _sampler(t, rpn + ("sampler",), "model.rpn", add_gt=False)
    t.check(rpn + ("allowed_border",), -1, "anchors crossing the border are kept")
    t.check(rpn + ("pos_weight",), -1, "positive weight 1")
    t.ignore(rpn + ("debug",), "debug output")

    for stage, split in ((("model", "train_cfg", "rpn_proposal"), "train"), (("model", "test_cfg", "rpn"), "test")):
        t.map(stage + ("nms_pre",), f"model.rpn.pre_nms_top_n_{split}")
        t.map(stage + ("max_per_img",), f"model.rpn.post_nms_top_n_{split}")
        t.check(stage + ("nms",), {"type": "nms", "iou_threshold": 0.7}, "torchvision's RPN NMS")
        t.check(stage + ("min_bbox_size",), 0, "no proposal is dropped for its size")

    h = ("model", "roi_head")
    t.check(h + ("type",), "StandardRoIHead", "torchvision's RoI heads")
    e = h + ("bbox_roi_extractor",)
    t.check(e + ("type",), "SingleRoIExtractor", "one pyramid level per RoI")
    t.check(e + ("roi_layer", "type"), "RoIAlign", "RoIAlign")
    t.check(e + ("roi_layer", "output_size"), 7, "7x7 RoI features")
    t.map(e + ("roi_layer", "sampling_ratio"), "model.roi_heads.sampling_ratio")
    t.map(e + ("out_channels",), "model.fpn_channels")
    t.check(e + ("featmap_strides",), [4, 8, 16, 32], "RoIs pooled from P2-P5")
    b = h + ("bbox_head",)
    t.check(b + ("type",), "Shared2FCBBoxHead", "two shared fully connected layers")
    t.map(b + ("in_channels",), "model.fpn_channels")
    t.map(b + ("fc_out_channels",), "model.roi_heads.representation_size")
    t.check(b + ("roi_feat_size",), 7, "7x7 RoI features")
    t.ignore(b + ("num_classes",), "ours: the categories of data.train_annotations")
    t.check(b + ("reg_class_agnostic",), False, "one box per class")
    t.check(b + ("bbox_coder",), {"type": "DeltaXYWHBBoxCoder", "target_means": [0.0] * 4,
                                  "target_stds": [0.1, 0.1, 0.2, 0.2]}, "box deltas with weights (10, 10, 5, 5)")
    t.check(b + ("loss_cls",), {"type": "CrossEntropyLoss", "use_sigmoid": False, "loss_weight": 1.0},
            "softmax cross-entropy")
    _box_loss(t, b + ("loss_bbox",))

    rc = ("model", "train_cfg", "rcnn")
    t.check(rc + ("assigner", "type"), "MaxIoUAssigner", "IoU matching")
    t.map(rc + ("assigner", "pos_iou_thr"), "model.roi_heads.fg_iou_thresh")
    t.map(rc + ("assigner", "neg_iou_thr"), "model.roi_heads.bg_iou_thresh")
    t.check(rc + ("assigner", "match_low_quality"), False, "no low-quality matches in the R-CNN head")
    t.ignore(rc + ("assigner", "min_pos_iou"), "used only with match_low_quality")
    t.check(rc + ("assigner", "ignore_iof_thr"), -1, "no ignore regions")
    _sampler(t, rc + ("sampler",), "model.roi_heads", add_gt=True)
    t.check(rc + ("pos_weight",), -1, "positive weight 1")
    t.ignore(rc + ("debug",), "debug output")
    _detections(t, ("model", "test_cfg", "rcnn"))


def _detections(t: Translation, path: KeyPath) -> None:
    t.map(path + ("score_thr",), "model.score_thresh")
    t.check(path + ("nms", "type"), "nms", "class-wise NMS")
    t.map(path + ("nms", "iou_threshold"), "model.nms_thresh")
    t.map(path + ("max_per_img",), "model.detections_per_img")


def _one_stage(t: Translation, min_level: int) -> None:
    h = ("model", "bbox_head")
    t.check(h + ("type",), "RetinaHead", "RetinaNet's subnets")
    t.ignore(h + ("num_classes",), "ours: the categories of data.train_annotations")
    t.map(h + ("in_channels",), "model.fpn_channels")
    t.map(h + ("feat_channels",), "model.fpn_channels")
    t.map(h + ("stacked_convs",), "model.retinanet.head_convs")
    if t.value(h + ("norm_cfg", "type")) == "GN":
        t.set_field("model.retinanet.head_norm", "group", h + ("norm_cfg", "type"))
        t.check(h + ("norm_cfg", "num_groups"), 32, "32 groups")
        t.check(h + ("norm_cfg", "requires_grad"), True, "trained")
    a = h + ("anchor_generator",)
    t.check(a + ("type",), "AnchorGenerator", "anchors per level")
    strides = [2 ** (min_level + i) for i in range(5)]
    t.check(a + ("strides",), strides, f"the strides of P{min_level}-P{min_level + 4}")
    base = t.value(a + ("octave_base_scale",))
    if isinstance(base, (int, float)):
        t.set_field("model.anchor_sizes", [base * s for s in strides], a + ("octave_base_scale",))
    t.map(a + ("scales_per_octave",), "model.retinanet.scales_per_octave")
    t.map(a + ("ratios",), "model.aspect_ratios")
    t.check(h + ("bbox_coder",), {"type": "DeltaXYWHBBoxCoder", "target_means": [0.0] * 4, "target_stds": [1.0] * 4},
            "box deltas with weights (1, 1, 1, 1)")
    c = h + ("loss_cls",)
    t.check(c + ("type",), "FocalLoss", "focal loss")
    t.check(c + ("use_sigmoid",), True, "sigmoid focal loss")
    t.map(c + ("gamma",), "model.retinanet.focal_gamma")
    t.map(c + ("alpha",), "model.retinanet.focal_alpha")
    t.check(c + ("loss_weight",), 1.0, "classification loss weight 1")
    _box_loss(t, h + ("loss_bbox",))

    tc = ("model", "train_cfg")
    t.check(tc + ("assigner", "type"), "MaxIoUAssigner", "IoU matching")
    t.map(tc + ("assigner", "pos_iou_thr"), "model.retinanet.fg_iou_thresh")
    t.map(tc + ("assigner", "neg_iou_thr"), "model.retinanet.bg_iou_thresh")
    t.check(tc + ("assigner", "min_pos_iou"), 0, "each ground truth's best anchors are positives at any IoU")
    t.check(tc + ("assigner", "match_low_quality"), True, "each ground truth's best anchors are positives")
    t.check(tc + ("assigner", "ignore_iof_thr"), -1, "no ignore regions")
    t.check(tc + ("sampler", "type"), "PseudoSampler", "every anchor counts")
    t.check(tc + ("allowed_border",), -1, "anchors crossing the border are kept")
    t.check(tc + ("pos_weight",), -1, "positive weight 1")
    t.ignore(tc + ("debug",), "debug output")
    te = ("model", "test_cfg")
    t.check(te + ("nms_pre",), 1000, "torchvision keeps the 1000 best anchors per level")
    t.check(te + ("min_bbox_size",), 0, "no detection is dropped for its size")
    _detections(t, te)


def _transforms(t: Translation, pipeline: KeyPath, train: bool) -> None:
    steps = t.entries(pipeline)
    flips = [p for p in steps if t.value(p + ("type",)) == "RandomFlip"]
    if train and steps and not any(t.has(p + ("prob",)) for p in flips):
        t.error(pipeline, "no RandomFlip with a prob (mmdet then flips nothing); ours flips training images "
                          "horizontally with probability 0.5")
    for path in steps:
        kind = t.value(path + ("type",))
        if kind == "LoadImageFromFile":
            t.ignore(path + ("type",), "images are read from data.*_images")
            t.check(path + ("backend_args",), None, "local files")
        elif kind == "LoadAnnotations":
            t.ignore(path + ("type",), "boxes are read from data.*_annotations")
            t.check(path + ("with_bbox",), True, "boxes")
        elif kind == "Resize":
            t.ignore(path + ("type",), "resize")
            t.check(path + ("keep_ratio",), True, "aspect ratio kept")
            scale = t.value(path + ("scale",))
            if isinstance(scale, (list, tuple)) and len(scale) == 2:
                t.set_field("model.max_size", max(scale), path + ("scale",))
                t.set_field("model.min_size", min(scale), path + ("scale",))
        elif kind == "RandomFlip" and train:
            t.ignore(path + ("type",), "flip")
            t.check(path + ("prob",), 0.5, "horizontal flip with probability 0.5")
            t.check(path + ("direction",), "horizontal", "horizontal flip")
        elif kind == "PackDetInputs":
            t.ignore(path, "which image facts travel with the batch")


def _data(t: Translation) -> None:
    d = ("train_dataloader",)
    t.map(d + ("batch_size",), "train.batch_size")
    t.ignore(d + ("num_workers",), "speed only: set data.num_workers for your machine")
    t.ignore(d + ("persistent_workers",), "speed only")
    t.check(d + ("sampler",), {"type": "DefaultSampler", "shuffle": True}, "shuffled every epoch")
    t.differs(d + ("batch_sampler",), {"type": "AspectRatioBatchSampler"},
              "ours does not group batches by aspect ratio (only the padding differs)")
    for split, loader in (("train", d), ("val", ("val_dataloader",))):
        ds = loader + ("dataset",)
        if t.check(ds + ("type",), "CocoDataset", "COCO json annotations") and t.has(ds + ("type",)):
            t.set_field("data.source", "coco", ds + ("type",))
        t.map(ds + ("data_root",), "data.root", lambda v: str(Path(v)))
        t.map(ds + ("ann_file",), f"data.{split}_annotations", lambda v: str(Path(v)))
        t.map(ds + ("data_prefix", "img"), f"data.{split}_images", lambda v: str(Path(v)))
        t.check(ds + ("backend_args",), None, "local files")
        _transforms(t, ds + ("pipeline",), train=split == "train")
    ds = d + ("dataset",)
    t.map(ds + ("filter_cfg", "filter_empty_gt"), "data.filter_empty")
    t.differs(ds + ("filter_cfg", "min_size"), 32, "ours keeps images of every size")
    v = ("val_dataloader",)
    t.map(v + ("batch_size",), "eval.batch_size")
    t.ignore(v + ("num_workers",), "ours uses data.num_workers for every loader (speed only)")
    t.ignore(v + ("persistent_workers",), "speed only")
    t.check(v + ("drop_last",), False, "every image is evaluated")
    t.check(v + ("sampler",), {"type": "DefaultSampler", "shuffle": False}, "in order")
    t.check(v + ("dataset", "test_mode"), True, "every image, none filtered")
    for leaf in [p for p in t.values if p[0] == "test_dataloader"]:
        twin = ("val_dataloader",) + leaf[1:]
        if t.has(twin) and _equal(t.value(twin), t.values[leaf]):
            t.ignore(leaf, "same as val_dataloader: ours evaluates one set")
        else:
            t.warn(leaf, "ours evaluates on val_dataloader's set (data.val_*) only")
    for name in ("val_evaluator", "test_evaluator"):
        t.check((name, "type"), "CocoMetric", "COCO box AP")
        t.check((name, "metric"), "bbox", "COCO box AP")
        t.check((name, "format_only"), False, "metrics are computed")
        t.ignore((name, "ann_file"), "ours evaluates against data.val_annotations")
        t.ignore((name, "backend_args"), "local files")
    for name in COPIED_VARIABLES:
        t.ignore((name,), "a variable the dataloaders copy (read there)")


def _choice(t: Translation, path: KeyPath, name: str, choices: dict[str, str]) -> None:
    """A type name of mmdet mapped to one of our field's values; any other name is an error."""
    kind = t.value(path)
    if kind in choices:
        t.set_field(name, choices[kind], path)
    elif kind is not _MISSING:
        t.error(path, f"ours has {', '.join(choices)} here ({name})")


def _schedule(t: Translation) -> None:
    t.check(("train_cfg", "type"), "EpochBasedTrainLoop", "training by epochs")
    t.map(("train_cfg", "max_epochs"), "train.epochs")
    t.map(("train_cfg", "val_interval"), "train.val_every_n_epochs")
    t.ignore(("val_cfg",), "the validation loop")
    t.ignore(("test_cfg",), "the test loop")
    o = ("optim_wrapper",)
    _choice(t, o + ("type",), "trainer.precision", {"OptimWrapper": "32-true", "AmpOptimWrapper": "16-mixed"})
    t.check(o + ("loss_scale",), "dynamic", "Lightning's dynamic loss scaling")
    _choice(t, o + ("optimizer", "type"), "train.optimizer", {"SGD": "sgd", "AdamW": "adamw"})
    for name in ("lr", "momentum", "weight_decay"):
        t.map(o + ("optimizer", name), f"train.{name}")
    clip = t.value(o + ("clip_grad",), None)
    if clip is None:
        t.set_field("train.grad_clip", None)
        t.ignore(o + ("clip_grad",), "no clipping")
    else:
        t.map(o + ("clip_grad", "max_norm"), "train.grad_clip")
        t.check(o + ("clip_grad", "norm_type"), 2, "L2 norm of all gradients")
    kinds = [t.value(p + ("type",)) for p in t.entries(("param_scheduler",))]
    for path, kind in zip(t.entries(("param_scheduler",)), kinds):
        if kind == "LinearLR":
            t.ignore(path + ("type",), "linear warm-up")
            t.check(path + ("begin",), 0, "from the first step")
            t.check(path + ("by_epoch",), False, "counted in steps")
            t.map(path + ("end",), "train.warmup_steps")
            t.map(path + ("start_factor",), "train.warmup_ratio")
            t.check(path + ("end_factor",), 1.0, "up to the full learning rate")
        elif kind == "MultiStepLR":
            t.ignore(path + ("type",), "step decay")
            t.check(path + ("begin",), 0, "from the first epoch")
            t.check(path + ("by_epoch",), True, "counted in epochs")
            t.check(path + ("end",), t.value(("train_cfg", "max_epochs")), "to the last epoch")
            t.map(path + ("milestones",), "train.milestones")
            t.map(path + ("gamma",), "train.lr_gamma")
    if "LinearLR" not in kinds:
        t.set_field("train.warmup_steps", 0)
    if "MultiStepLR" not in kinds:
        t.set_field("train.milestones", [])
    t.map(("auto_scale_lr", "base_batch_size"), "train.lr_scaling_batch")
    t.ignore(("auto_scale_lr", "enable"), "ours always scales lr linearly from lr_scaling_batch to the global batch "
                                          "(the same lr at that batch)")
    t.map(("randomness", "seed"), "train.seed")
    if t.value(("load_from",)) is None:
        t.ignore(("load_from",), "no checkpoint to start from")
    else:
        t.map(("load_from",), "model.init_from")


def translate(tree: dict[str, Any], source: str) -> Translation:
    """Every leaf of a resolved mmdet config accounted for, and the fields of ours it sets."""
    t = Translation(tree, source)
    detector = {"FasterRCNN": "faster_rcnn", "RetinaNet": "retinanet"}.get(t.value(("model", "type")))
    if detector is None:
        t.error(("model", "type"), "ours has FasterRCNN and RetinaNet")
        return t
    t.set_field("model.detector", detector, ("model", "type"))
    _backbone(t)
    min_level = _neck(t, detector)
    if detector == "faster_rcnn":
        _two_stage(t)
    else:
        _one_stage(t, min_level)
    _data(t)
    _schedule(t)
    return t


def nested(fields: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    tree: dict[str, Any] = {}
    for name, value in fields.items():
        *parents, last = name.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


@dataclass(frozen=True)
class Imported:
    config: ExperimentConfig
    fields: dict[str, Any]
    """Our dotted fields the mmdet config sets, with their values (what the output YAML holds)."""
    leaves: list[Leaf]
    source: Path

    def of_kind(self, kind: str) -> list[Leaf]:
        return [leaf for leaf in self.leaves if leaf.kind == kind]

    def config_fields(self) -> dict[str, Any]:
        """The mapped fields as validated (paths and numbers in our form), dotted name -> value."""
        resolved = flatten(self.config.to_dict())
        return {name: resolved[name] for name in self.fields}


def import_mmdet(name_or_path: str) -> Imported:
    """Resolve, translate and validate an mmdet config; errors are listed, not raised (see ``Imported``)."""
    path = find_mmdet_config(name_or_path)
    t = translate(load_mmdet_config(path), str(path))
    leaves = t.finish()
    config = validate_config(nested(t.fields), f"{path} (translated)")
    return Imported(config, dict(t.fields), leaves, path)


def render_yaml_header(imported: Imported) -> str:
    """The comment block at the top of the output YAML: every leaf not mapped or fixed, and why."""
    lines = [f"# Translated by `libra import-mmdet` from {imported.source.name}.",
             "# Fields not in this file take the defaults of pipeline/config.py. mmdet sets the GPUs at launch:",
             "# set trainer.devices (and num_nodes); train.lr is for a global batch of train.lr_scaling_batch",
             "# (when set) and is scaled linearly to the global batch you run."]
    titles = {"error": "NOT MAPPED, may change training (written with --allow-unmapped)",
              "difference": "known differences of ours (docs/recipe.md)",
              "warning": "not mapped, no effect on training"}
    for kind, title in titles.items():
        leaves = imported.of_kind(kind)
        if leaves:
            lines.append(f"# {title}:")
            lines += [f"#   {leaf.path} = {leaf.value!r}: {leaf.note}" for leaf in leaves]
    return "\n".join(lines) + "\n"
