"""A profile of params.yaml fitted to a data set: input size, anchors and schedule derived from the data.

Starting from a profile of params.yaml (its base configs ``configs/<detector>_<config>.yaml`` and ``set``),
with the data given by ``data.*`` settings, the fit derives

* ``model.min_size`` / ``model.max_size``: the median short and long side of the training images, so the
  typical image keeps its own resolution (no detail is lost to down-scaling, no compute spent on
  up-scaling);
* ``model.anchor_sizes``: the smallest anchor is the 1st percentile of the training objects' size
  ``sqrt(w · h)`` after that resizing, rounded down to whole pixels, and each coarser pyramid level doubles
  it, as its stride doubles (on the built-in set at 128 px this gives the tiny configs' 8, 16, ..., 128);
* the schedule in optimizer steps: each detector trains at least as many optimizer steps as its base
  config's recipe on the built-in set it was made for (``train.epochs · ⌊data.num_train / batch⌋``; or
  ``steps``), so a small set trains as long as a large one. The profile's ``set`` holds one
  ``train.epochs`` for every detector, so the epochs are those of the detector that needs the most,
  ``max_d ⌈steps_d / steps per epoch_d⌉`` (steps per epoch counted as the data module counts them:
  ``⌊images / devices / batch⌋``); the step decay (``train.milestones``) falls at the same fraction of the
  run as in that detector's base config, and ``train.val_every_n_epochs`` keeps its number of validations.

then checks the anchors by their best possible recall (:mod:`pipeline.own_data.anchors`), refusing a
layout below :data:`MIN_BPR`. A value the user sets (``--set``) is taken as given, never derived.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from detection.config import ConfigError, ExperimentConfig, parse_override, read_yaml, validate_config, with_values
from detection.data import CocoSplit
from detection.engine.splits import load_splits
from detection.io import flatten
from pipeline.own_data.anchors import RPN_POSITIVE_IOU, AnchorLayout, best_possible_recall, resized_boxes
from pipeline.own_data.boxes import SplitBoxes, read_split_boxes
from pipeline.plan.compose import base_config_file, compose_config
from pipeline.plan.params import DETECTOR_COMPONENTS, DataParams, Params, ProfileParams, parse_params

MIN_BPR = 0.8
"""The least best possible recall (at the IoU of :attr:`AnchorLayout.positive_iou`) a fitted layout may have.
Measured on the built-in set: the tiny configs' anchors, with which both detectors learn to 58-59 AP, reach
0.86 (Faster R-CNN: one size per level, so a box between two sizes or off its anchor's centre falls under
0.5) and 0.996 (RetinaNet: three sizes per level); COCO's anchors (32-512 px) on its 128 px images, too large
for its small objects, reach 0.69 for both. Below 0.8 more than one object in five has no anchor its
assigner would take as a positive at that IoU."""
ANCHOR_QUANTILE = 0.01
"""The quantile of the training objects' size that the smallest anchor is set to."""


@dataclass(frozen=True)
class Setting:
    """A value of the fitted profile's ``set`` and where it came from."""

    key: str
    value: Any
    source: str


@dataclass(frozen=True)
class DetectorFit:
    """What the fitted profile trains for one detector, and how well its anchors fit the data."""

    detector: str
    steps_per_epoch: int
    steps: int
    steps_before: int
    """The optimizer steps the base profile would train on this data."""
    target_steps: int
    target_source: str
    recall: float
    """BPR of the fitted layout at ``layout.positive_iou``."""
    recall_before: float
    """BPR of the base profile's layout (its input size and anchors) at the same IoU."""
    layout: AnchorLayout
    rpn_recall: float | None
    """Faster R-CNN only: the fitted layout's BPR at the RPN's positive IoU (see :data:`RPN_POSITIVE_IOU`)."""


@dataclass(frozen=True)
class FittedProfile:
    name: str
    base: str
    profile: ProfileParams
    settings: list[Setting]
    detectors: dict[str, DetectorFit]
    data: dict[str, Any]
    """The ``data.*`` settings (``-S`` of ``dvc exp run``) the profile was fitted to."""
    train_split: CocoSplit
    training_images: int


def fit_profile(params_file: Path, name: str, base: str | None = None, overrides: tuple[str, ...] = (),
                steps: int | None = None, min_bpr: float = MIN_BPR, configs_dir: Path = Path("configs")) -> FittedProfile:
    """Fit profile ``name`` to the data ``overrides`` select, from ``base`` (default: params' ``profile``).

    ``overrides`` are ``key=value`` texts: ``data.*`` keys of params.yaml's ``data`` section select the data
    (and go to ``dvc exp run -S``); every other one is a setting of the profile, taken as given.

    Raises:
        ConfigError: a bad setting, too few training images for a batch, no training objects, or a fitted
            layout whose best possible recall is under ``min_bpr`` (nothing is derived then).
    """
    raw = read_yaml(params_file)
    params = parse_params(raw, str(params_file))
    base = base or params.profile
    explicit = {".".join(path): value for path, value in map(parse_override, overrides)}
    data = {k: v for k, v in explicit.items() if k.startswith("data.") and k[5:] in DataParams.model_fields}
    given = {k: v for k, v in explicit.items() if k not in data}
    configs = {d: compose_config(params, d, base, values=data, configs_dir=configs_dir) for d in DETECTOR_COMPONENTS}
    data_config = _updated(next(iter(configs.values())), {k: v for k, v in given.items() if k.startswith("data.")}).data
    train, _ = load_splits(data_config)
    boxes = read_split_boxes(train)
    if not int(boxes.objects.sum()):
        raise ConfigError(f"{train.annotation_file}: no training objects (crowd regions aside) to fit anchors to")
    images = len(train.image_ids) - (_empty_images(boxes) if data_config.filter_empty else 0)

    derived = _input_size(boxes, configs, given)
    sized = {d: _updated(c, {**given, **_values(derived)}) for d, c in configs.items()}
    derived += _anchor_sizes(boxes, sized, given)
    fitted = {d: _updated(c, {**given, **_values(derived)}) for d, c in configs.items()}
    targets = {d: _target_steps(params, base, d, steps, configs_dir) for d in configs}
    derived += _schedule(fitted, configs, targets, images, given)

    profile_params = params.profile_params(base)
    values = {**_values(derived), **given}
    profile = profile_params.model_copy(update={"set": with_values(profile_params.set, values)})
    final = _compose_fitted(raw, params_file, name, profile, data, configs_dir)
    settings = derived + [Setting(k, v, "--set") for k, v in given.items()]
    settings += [Setting(k, v, f"profiles.{base}.set") for k, v in flatten(profile_params.set).items()
                 if k not in values]
    detectors = {d: _detector_fit(final[d], configs[d], boxes, images, *targets[d]) for d in final}
    low = {d: fit for d, fit in detectors.items() if fit.recall < min_bpr}
    if low:
        raise ConfigError("; ".join(
            f"{d}: the anchors {list(final[d].model.anchor_sizes)} reach a best possible recall of {fit.recall:.3f} "
            f"at IoU {fit.layout.positive_iou:g} ({fit.layout.positive_iou_source}) on the training objects of "
            f"{train.annotation_file}, under the minimum {min_bpr:g}" for d, fit in low.items())
            + "; fix: set model.anchor_sizes (one size per pyramid level) and model.aspect_ratios to cover the "
              "objects' sizes and shapes in the statistics of `libra prepare`, or lower --min-bpr knowingly")
    return FittedProfile(name, base, profile, settings, detectors, data, train, images)


def _empty_images(boxes: SplitBoxes) -> int:
    return len(boxes.image_sizes) - len(set(boxes.image_index.tolist()))


def _values(settings: list[Setting]) -> dict[str, Any]:
    return {s.key: s.value for s in settings}


def _updated(config: ExperimentConfig, values: dict[str, Any]) -> ExperimentConfig:
    """``config`` with ``values`` (dotted key -> value) set, validated."""
    source = f"the {config.model.detector} config with " + ", ".join(f"{k}={v}" for k, v in values.items())
    return validate_config(with_values(config.to_dict(), values), source)


def _input_size(boxes: SplitBoxes, configs: dict[str, ExperimentConfig], given: dict[str, Any]) -> list[Setting]:
    config = next(iter(configs.values()))
    sides = boxes.image_sizes.sort(dim=1).values
    short, long = (round(float(torch.quantile(side, 0.5))) for side in sides.unbind(1))
    found = []
    if "model.min_size" not in given:
        found.append(Setting("model.min_size", short, f"the median short side of the {len(sides)} training images "
                                                       f"(was {config.model.min_size})"))
    if "model.max_size" not in given:
        found.append(Setting("model.max_size", max(long, given.get("model.min_size", short)),
                             f"the median long side, at least model.min_size (was {config.model.max_size})"))
    return found


def _anchor_sizes(boxes: SplitBoxes, configs: dict[str, ExperimentConfig], given: dict[str, Any]) -> list[Setting]:
    if "model.anchor_sizes" in given:
        return []
    config = next(iter(configs.values()))
    levels = {len(c.model.anchor_sizes) for c in configs.values()}
    if len(levels) != 1:
        raise ConfigError(f"the detectors' pyramids have different numbers of levels ({levels}), but a profile sets "
                          "one model.anchor_sizes for all; set it with --set model.anchor_sizes=[...]")
    xyxy, _ = resized_boxes(boxes, config.model.min_size, config.model.max_size)
    sizes = ((xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])).sqrt()
    low = float(torch.quantile(sizes, ANCHOR_QUANTILE))
    smallest = max(1, math.floor(low))
    anchors = [smallest * 2**level for level in range(levels.pop())]
    return [Setting("model.anchor_sizes", anchors,
                    f"the smallest: the {ANCHOR_QUANTILE:.0%} quantile of the training objects' size sqrt(w*h) "
                    f"after resizing ({low:.1f} px), doubled per pyramid level as the stride doubles "
                    f"(was {list(config.model.anchor_sizes)})")]


def _target_steps(params: Params, base: str, detector: str, steps: int | None,
                  configs_dir: Path) -> tuple[int, str]:
    """The optimizer steps ``detector`` should train at least, and where that number comes from."""
    if steps is not None:
        return steps, "--steps"
    path = base_config_file(params, base, detector, configs_dir)
    recipe = validate_config(read_yaml(path), str(path))
    if recipe.data.source != "synthetic":
        raise ConfigError(f"{path}: trains on a COCO set whose size it does not state, so its recipe's number of "
                          "optimizer steps is unknown; give the steps to train with --steps")
    per_epoch = max(1, recipe.data.num_train // recipe.train.batch_size)
    total = _scheduled_steps(recipe, per_epoch)
    return total, (f"{path}: {recipe.train.epochs} epochs x {per_epoch} steps ({recipe.data.num_train} built-in "
                   f"images / batch {recipe.train.batch_size})")


def _scheduled_steps(config: ExperimentConfig, per_epoch: int) -> int:
    """Optimizer steps of ``config``'s schedule (``detection.engine.module.schedule_steps``)."""
    steps = config.train.epochs * per_epoch
    return min(steps, config.train.max_steps) if config.train.max_steps > 0 else steps


def _steps_per_epoch(config: ExperimentConfig, images: int) -> int:
    """Optimizer steps per epoch on ``images`` training images, as the data module counts them (whole batches)."""
    devices = config.trainer.devices
    if devices == "auto":
        raise ConfigError("trainer.devices is auto, so the steps per epoch are unknown; set trainer.devices")
    per_epoch = images // (devices * config.trainer.num_nodes) // config.train.batch_size
    if per_epoch < 1:
        raise ConfigError(f"{config.model.detector}: {images} training images fill no whole batch of "
                          f"train.batch_size {config.train.batch_size} on {devices * config.trainer.num_nodes} "
                          "device(s), so an epoch trains nothing; add training images or set a smaller "
                          "train.batch_size (--set)")
    return per_epoch


def _schedule(configs: dict[str, ExperimentConfig], before: dict[str, ExperimentConfig],
              targets: dict[str, tuple[int, str]], images: int, given: dict[str, Any]) -> list[Setting]:
    """Epochs, step decay and validations of ``configs`` (the fitted ones), from the recipes of ``before``."""
    per_epoch = {d: _steps_per_epoch(c, images) for d, c in configs.items()}
    needed = {d: math.ceil(targets[d][0] / per_epoch[d]) for d in configs}
    binding = max(needed, key=needed.get)
    recipe = before[binding].train
    found = []
    epochs = given.get("train.epochs", needed[binding])
    if "train.epochs" not in given:
        found.append(Setting("train.epochs", epochs, f"{binding} needs the most epochs for its {targets[binding][0]} "
                                                     f"steps at {per_epoch[binding]} per epoch (was {recipe.epochs})"))
    if "train.milestones" not in given:
        milestones = sorted({round(m * epochs / recipe.epochs) for m in recipe.milestones} & set(range(1, epochs)))
        found.append(Setting("train.milestones", milestones,
                             f"{binding}'s step decay at the same fraction of the run (was {list(recipe.milestones)} "
                             f"of {recipe.epochs} epochs)"))
    if "train.val_every_n_epochs" not in given:
        found.append(Setting("train.val_every_n_epochs", max(1, epochs // recipe.epochs),
                             f"{binding}'s {recipe.epochs} validations per run (was {recipe.val_every_n_epochs})"))
    return found


def _compose_fitted(raw: dict[str, Any], params_file: Path, name: str, profile: ProfileParams, data: dict[str, Any],
                    configs_dir: Path) -> dict[str, ExperimentConfig]:
    """Each detector's config as the ablation will compose it from params.yaml with the fitted profile added
    and selected, on the fitted data: what is reported is what the runs will train."""
    with_profile = {**raw, "profile": name, "profiles": {**raw.get("profiles", {}), name: profile.model_dump()},
                    "data": {**(raw.get("data") or {}), **{k.removeprefix("data."): v for k, v in data.items()}}}
    params = parse_params(with_profile, f"{params_file} with the fitted profile {name!r}")
    return {d: compose_config(params, d, name, configs_dir=configs_dir) for d in DETECTOR_COMPONENTS}


def _detector_fit(config: ExperimentConfig, before: ExperimentConfig, boxes: SplitBoxes, images: int,
                  target: int, target_source: str) -> DetectorFit:
    layout = AnchorLayout.of(config)
    per_epoch = _steps_per_epoch(config, images)
    rpn = best_possible_recall(layout, boxes, RPN_POSITIVE_IOU) if config.model.detector == "faster_rcnn" else None
    return DetectorFit(config.model.detector, per_epoch, _scheduled_steps(config, per_epoch),
                       _scheduled_steps(before, _steps_per_epoch(before, images)), target, target_source,
                       best_possible_recall(layout, boxes), best_possible_recall(AnchorLayout.of(before), boxes),
                       layout, rpn)


def report_lines(fit: FittedProfile) -> list[str]:
    """The fitted values with their sources, and per detector its schedule and anchor recall."""
    lines = [f"profile {fit.name!r} fitted from profile {fit.base!r} to {fit.train_split.annotation_file} "
             f"({fit.training_images} training images):"]
    lines += [f"  {s.key} = {s.value}: {s.source}" for s in fit.settings]
    for d, f in fit.detectors.items():
        rpn = f"; at the RPN's {RPN_POSITIVE_IOU:g}: {f.rpn_recall:.3f}" if f.rpn_recall is not None else ""
        lines.append(f"  {d}: {f.steps} optimizer steps ({f.steps_per_epoch} per epoch; profile {fit.base}: "
                     f"{f.steps_before}), at least the {f.target_steps} of {f.target_source}; "
                     f"anchors' best possible recall {f.recall:.3f} at IoU "
                     f"{f.layout.positive_iou:g} ({f.layout.positive_iou_source}; profile {fit.base}'s: "
                     f"{f.recall_before:.3f}{rpn})")
    return lines


def dvc_command(fit: FittedProfile) -> str:
    """The command that runs the ablation with the fitted profile (once params.yaml holds it) on its data."""
    return shlex.join(["dvc", "exp", "run", "-S", f"profile={fit.name}",
                       *(word for key, value in fit.data.items() for word in ("-S", f"{key}={value}"))])


def profile_yaml(fit: FittedProfile, command: str) -> str:
    """The profile as a ``profiles:`` section of params.yaml, its sources and its use in comments."""
    header = [f"Written by `{command}`.", *report_lines(fit),
              "Add the profile under `profiles:` in params.yaml and run the ablation with it on the data:",
              f"  {dvc_command(fit)}"]
    body = yaml.safe_dump({"profiles": {fit.name: fit.profile.model_dump()}}, sort_keys=False, default_flow_style=None)
    return "".join(f"# {line}\n" for line in header) + body
