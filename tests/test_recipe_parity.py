"""The coco_1x configs against mmdet 3.3's official configs, setting by setting.

Each official config is translated by ``libra import-mmdet``'s code; every field it sets must equal
the one the ablation's coco_1x profile resolves for the same row (baseline, or the Libra row with
its components enabled), except the fields in RECIPE_EXCEPTIONS, each explained in docs/recipe.md.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from detection.config import read_yaml
from pipeline.plan.ablation import resolve_config
from pipeline.plan.params import parse_params
from detection.io import flatten
from pipeline.mmdet_import import import_mmdet

ROOT = Path(__file__).resolve().parents[1]
RECIPE_DOC = ROOT / "docs" / "recipe.md"

ROWS = [
    ("faster-rcnn_r50_fpn_1x_coco", "faster_rcnn", ()),
    ("libra-faster-rcnn_r50_fpn_1x_coco", "faster_rcnn", ("IS", "BFP", "BL")),
    ("retinanet_r50_fpn_1x_coco", "retinanet", ()),
    ("libra-retinanet_r50_fpn_1x_coco", "retinanet", ("BFP", "BL")),
]
"""mmdet config name -> the ablation row of ours it is compared with."""

RECIPE_EXCEPTIONS = (
    "model.rpn.neg_pos_ub",
    "model.rpn.post_nms_top_n_train",
    "model.roi_heads.sampling_ratio",
    "model.box_loss.type",
    "components.iou_balanced_sampling.bin_range",
    "components.balanced_l1.formula",
    "train.grad_clip",
    "train.warmup_ratio",
    "eval.batch_size",
)
"""Fields where ours keeps the papers' (mmdetection v1) recipe or its own choice; rows of docs/recipe.md."""


def _ours(detector: str, components: tuple[str, ...]) -> dict:
    params = read_yaml(ROOT / "params.yaml")
    params["profile"] = "coco_1x"
    params["data"].update(source="coco", root="data/coco")
    return flatten(resolve_config(parse_params(params), detector, components, 0, ROOT / "configs").to_dict())


@pytest.fixture(scope="module")
def differences() -> dict[str, dict[str, tuple]]:
    """mmdet config -> field -> (mmdet's value, ours), for every mapped field that differs."""
    found = {}
    for name, detector, components in ROWS:
        imported = import_mmdet(name)
        assert not imported.of_kind("error"), [(leaf.path, leaf.note) for leaf in imported.of_kind("error")]
        ours = _ours(detector, components)
        theirs = imported.config_fields()
        found[name] = {f: (v, ours[f]) for f, v in theirs.items() if v != ours[f]}
    return found


def test_coco_1x_configs_match_mmdet_except_documented_rows(differences):
    unexplained = {name: {f: d for f, d in diff.items() if f not in RECIPE_EXCEPTIONS}
                   for name, diff in differences.items()}
    assert unexplained == {name: {} for name in differences}


def test_every_exception_is_needed_and_documented(differences):
    used = {f for diff in differences.values() for f in diff}
    assert set(RECIPE_EXCEPTIONS) <= used, f"stale exceptions: {sorted(set(RECIPE_EXCEPTIONS) - used)}"
    doc = RECIPE_DOC.read_text()
    rows = set(re.findall(r"^\|\s*`([a-z_.0-9]+)`", doc, flags=re.M))
    assert set(RECIPE_EXCEPTIONS) <= rows, f"not in a row of docs/recipe.md: {sorted(set(RECIPE_EXCEPTIONS) - rows)}"


def test_the_libra_rows_enable_exactly_their_components(differences):
    imported = import_mmdet("libra-faster-rcnn_r50_fpn_1x_coco").config
    assert imported.components.iou_balanced_sampling.enabled and imported.components.bfp.enabled
    assert imported.components.balanced_l1.enabled and imported.components.iou_balanced_sampling.instance_balanced_pos
    retina = import_mmdet("libra-retinanet_r50_fpn_1x_coco").config
    assert retina.components.bfp.enabled and retina.components.balanced_l1.enabled
    assert not retina.components.iou_balanced_sampling.enabled
    assert retina.components.bfp.refine_level == 4 and retina.model.retinanet.extra_from == "c5"  # mmdet's index 1 of P3-P7
    assert imported.components.bfp.refine_level == 4  # mmdet's index 2 of P2-P6
