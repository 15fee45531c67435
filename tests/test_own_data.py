"""A researcher's own data set: the statistics of `libra prepare`, the anchors' best possible recall against
torchvision's own anchors, and `libra fit-profile` end to end on real aerial images (tests/data/neon_trees,
17 tiles of NEON imagery with DeepForest's tree-crown boxes: README.md there)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision.ops import box_iou

from conftest import ROOT
from detection.config import ConfigError, load_config
from detection.data import write_synthetic_coco
from detection.engine.splits import load_splits
from detection.models.detectors import build_detector
from pipeline.own_data.anchors import AnchorLayout, best_anchor_iou, paired_iou, resized_boxes
from pipeline.own_data.boxes import read_split_boxes
from pipeline.own_data.profile import MIN_BPR, fit_profile
from pipeline.own_data.statistics import data_statistics
from pipeline.plan.params import ReportConfig
from stages.cli import main

NEON_TREES = ROOT / "tests/data/neon_trees"
NEON_DATA = ["data.source=coco", f"data.root={NEON_TREES}"]
NEON_COUNTS = {"train": (14, 258), "val": (3, 70)}
"""Images and boxes per split, as tests/data/neon_trees/convert.py printed them."""


def tiny_config(detector: str, *overrides: str):
    return load_config(ROOT / f"configs/{detector}_tiny.yaml", ["model.backbone.weights=null", *overrides])


def write_coco(root: Path, splits: dict[str, list[tuple[int, int, list[tuple[int, list[float]]]]]],
               categories: tuple[str, ...] = ("a", "b")) -> None:
    """A COCO set of blank images: per split, images as ``(width, height, [(category id, [x, y, w, h])])``."""
    for split, images in splits.items():
        coco = {"images": [], "annotations": [],
                "categories": [{"id": i + 1, "name": name} for i, name in enumerate(categories)]}
        (root / "images" / split).mkdir(parents=True)
        for image_id, (width, height, boxes) in enumerate(images, start=1):
            Image.new("RGB", (width, height), (90, 120, 60)).save(root / "images" / split / f"{image_id}.png")
            coco["images"].append({"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height})
            for category, box in boxes:
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id,
                                            "category_id": category, "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


MIXED_SIZES = [(200, 120, [(1, [3, 4, 20, 11]), (1, [150, 80, 49, 39]), (2, [0, 0, 200, 120])]),
               (96, 160, [(1, [40.5, 70.2, 9.1, 30.7]), (2, [1, 150, 6, 9])]),
               (320, 320, [(1, [100, 100, 64, 32]), (1, [300, 2, 19, 17])])]


@pytest.mark.parametrize("detector", ["faster_rcnn", "retinanet"])
@pytest.mark.parametrize("min_size, max_size", [(100, 150), (320, 480)])
def test_best_anchor_iou_equals_torchvisions_anchors_by_brute_force(tmp_path, detector, min_size, max_size):
    write_coco(tmp_path, {"train": MIXED_SIZES, "val": MIXED_SIZES[:1]})
    cfg = tiny_config(detector, "data.source=coco", f"data.root={tmp_path}", f"model.min_size={min_size}",
                      f"model.max_size={max_size}")
    boxes = read_split_boxes(load_splits(cfg.data)[0])
    model = build_detector(cfg, 2).eval()
    generator = model.rpn.anchor_generator if detector == "faster_rcnn" else model.anchor_generator
    xyxy, _ = resized_boxes(boxes, min_size, max_size)
    expected = []
    for index, (width, height) in enumerate(boxes.image_sizes.int().tolist()):
        rows = boxes.image_index == index
        images, targets = model.transform([torch.zeros(3, height, width)], [{"boxes": boxes.xyxy()[rows].float()}])
        anchors = generator(images, list(model.backbone(images.tensors).values()))[0]
        torch.testing.assert_close(xyxy[rows], targets[0]["boxes"])
        expected.append(box_iou(targets[0]["boxes"], anchors).max(dim=1).values)
    torch.testing.assert_close(best_anchor_iou(AnchorLayout.of(cfg), boxes), torch.cat(expected))


def test_paired_iou_is_the_diagonal_of_box_iou():
    a = torch.tensor([[0.0, 0, 10, 10], [5, 5, 15, 25], [0, 0, 1, 1]])
    b = torch.tensor([[5.0, 5, 15, 15], [5, 5, 15, 25], [2, 2, 3, 3]])
    torch.testing.assert_close(paired_iou(a, b), box_iou(a, b).diagonal())


def test_statistics_count_and_warn_with_the_fix(tmp_path):
    """A class only in training, boxes under half the smallest anchor's area, too few validation images."""
    train = [(100, 100, [(1, [10, 10, 30, 30]), (2, [50, 50, 4, 4])]), (100, 100, [])]
    write_coco(tmp_path, {"train": train, "val": [(100, 100, [(1, [0, 0, 50, 50])])]})
    cfg = tiny_config("faster_rcnn", "data.source=coco", f"data.root={tmp_path}", "model.min_size=100",
                      "model.max_size=100")
    stats = data_statistics(*load_splits(cfg.data), {"faster_rcnn": cfg}, min_val_images=30)
    assert stats.splits["train"].images == 2 and stats.splits["train"].empty_images == 1
    assert stats.splits["train"].classes == {"a": 1, "b": 1} and stats.splits["val"].classes == {"a": 1, "b": 0}
    assert stats.splits["train"].box_size_px == {"min": 4.0, "p5": 5.3, "p25": 10.5, "median": 17.0, "p75": 23.5,
                                                 "p95": 28.7, "max": 30.0}, "sizes 4 and 30, interpolated"
    assert stats.small_boxes["faster_rcnn"].objects == {"train": 1, "val": 0}, "4 px against the 8 px anchor"
    text = "\n".join(stats.warnings)
    assert "1 validation images, fewer than the 30" in text and "report.min_val_images" in text
    assert "class 'b' has no object in val" in text and "move images holding it" in text
    assert "faster_rcnn: 1 of 2 train" in text and "libra fit-profile" in text
    assert json.loads(json.dumps(stats.to_json()))["splits"]["val"]["objects"] == 1


def test_prepare_prints_and_writes_the_statistics_of_a_real_set(tmp_path, capsys):
    out = tmp_path / "statistics.json"
    assert main(["prepare", *(w for s in NEON_DATA for w in ("--set", s)), "--statistics", str(out)]) == 0
    printed = capsys.readouterr()
    assert "class 'Tree'" in printed.out and "3 validation images, fewer than the 30" in printed.err
    stats = json.loads(out.read_text())
    for split, (images, objects) in NEON_COUNTS.items():
        coco = json.loads((NEON_TREES / f"annotations/instances_{split}.json").read_text())
        sizes = np.sqrt([a["bbox"][2] * a["bbox"][3] for a in coco["annotations"]])
        got = stats["splits"][split]
        assert (got["images"], got["objects"], got["classes"]) == (images, objects, {"Tree": objects})
        assert got["image_sizes"] == {"320x320": images} and got["empty_images"] == got["crowd_regions"] == 0
        assert got["box_size_px"]["median"] == pytest.approx(np.median(sizes), abs=0.01)
        assert got["box_size_px"]["max"] == pytest.approx(sizes.max(), abs=0.01)
        assert got["box_size_relative"]["median"] == pytest.approx(np.median(sizes) / 320, abs=0.01)
    assert stats["min_val_images"] == ReportConfig().min_val_images


def test_fit_profile_on_a_real_set_plans_an_ablation(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    fit = fit_profile(ROOT / "params.yaml", "fitted", overrides=tuple(NEON_DATA))
    boxes = read_split_boxes(fit.train_split)
    sizes = (boxes.boxes[:, 2] * boxes.boxes[:, 3]).sqrt()
    anchors = fit.profile.set["model"]["anchor_sizes"]
    assert fit.training_images == NEON_COUNTS["train"][0]
    assert fit.profile.set["model"]["min_size"] == fit.profile.set["model"]["max_size"] == 320
    assert anchors == [10, 20, 40, 80, 160], "the 1% quantile of the sizes (10.3 px), doubling"
    assert anchors[0] <= torch.quantile(sizes, 0.01) and anchors[-1] >= sizes.max()
    for detector, f in fit.detectors.items():
        assert MIN_BPR <= f.recall <= 1 and 0 <= f.recall_before <= 1
        assert f.steps >= f.target_steps >= 360 and f.steps_before < 20, detector
    assert fit.detectors["retinanet"].steps == fit.profile.set["train"]["epochs"] * 3  # 14 images // batch 4
    assert fit.profile.set["train"]["val_max_images"] == 96, "the base profile's other settings stay"

    out = tmp_path / "fitted.yaml"
    assert main(["fit-profile", *(w for s in NEON_DATA for w in ("--set", s)), "--out", str(out)]) == 0
    assert "dvc exp run -S profile=fitted -S data.source=coco" in capsys.readouterr().out
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["profiles"].update(yaml.safe_load(out.read_text())["profiles"])
    params["profile"], params["data"] = "fitted", {**params["data"], "source": "coco", "root": str(NEON_TREES)}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["plan", "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "plan")]) == 0
    planned = yaml.safe_load((tmp_path / "plan/retinanet/baseline/seed0.yaml").read_text())["config"]
    assert planned["model"]["anchor_sizes"] == anchors and planned["train"]["epochs"] == fit.profile.set["train"]["epochs"]
    assert planned["data"]["root"] == str(NEON_TREES)
    assert main(["fit-profile", *(w for s in NEON_DATA for w in ("--set", s)), "--out", str(out)]) == 0, \
        "its own file is replaced"


@pytest.mark.trains
def test_the_ablation_runs_on_real_tiles_and_says_why_no_claim_is_testable(tmp_path, monkeypatch, capsys,
                                                                            tiny_weights):
    """The user's path on the fixture's real tiles, every command in turn (prepare, fit-profile, plan, dispatch,
    report), Faster R-CNN's baseline and IS trained for one step: the report describes the set and refuses the
    claim a verdict for both reasons, 3 validation images and a baseline that cannot have learned (about 40 s)."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    data = [w for s in NEON_DATA for w in ("--set", s)]
    assert main(["fit-profile", *data, "--params", str(ROOT / "params.yaml"), "--name", "fitted",
                 "--out", "fitted.yaml"]) == 0
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    fitted = yaml.safe_load(Path("fitted.yaml").read_text())["profiles"]["fitted"]
    fitted["set"]["train"].update(max_steps=1, epochs=1, milestones=[], batch_size=4, warmup_steps=1)
    fitted["set"]["model"]["backbone"] = {"weights": str(tiny_weights)}
    params.update(profile="fitted", profiles={"fitted": fitted},
                  data={**params["data"], "source": "coco", "root": str(NEON_TREES)},
                  ablation={"design": "table", "seeds": [0], "faster_rcnn": {"table": ["baseline", "IS"]}})
    Path("params.yaml").write_text(yaml.safe_dump(params))
    for command in (["prepare", "--params", "params.yaml", "--manifest", "data/manifest.json",
                     "--statistics", "data/statistics.json"],
                    ["plan", "--params", "params.yaml", "--out", "runs/plan"],
                    ["dispatch", "--executor", "inline"],
                    ["report", "--out", "reports"]):
        assert main(command) == 0, command
    statistics = json.loads(Path("data/statistics.json").read_text())
    assert [statistics["splits"][split]["images"] for split in ("train", "val")] == [14, 3]
    planned = yaml.safe_load(Path("runs/plan/faster_rcnn/IS/seed0.yaml").read_text())["config"]
    assert planned["model"]["anchor_sizes"] == fitted["set"]["model"]["anchor_sizes"]
    claim = json.loads(Path("reports/metrics.json").read_text())["claims"]["frcnn_IS_gt_baseline"]
    assert claim["verdict"] == claim["adjusted_verdict"] == "not testable" and "delta" not in claim
    assert "the faster_rcnn baseline did not learn (seed 0: AP" in claim["reason"]
    assert "3 validation images, fewer than the 30" in claim["reason"]
    markdown = Path("reports/ablation.md").read_text()
    assert f"Profile `fitted`, design `table`, seeds [0], coco data ({NEON_TREES}, digest " in markdown
    assert "**not testable**" in markdown


def test_a_setting_given_wins_over_the_fit(monkeypatch):
    monkeypatch.chdir(ROOT)
    fit = fit_profile(ROOT / "params.yaml", "mine", overrides=(*NEON_DATA, "model.min_size=256", "train.epochs=60"))
    sources = {s.key: s.source for s in fit.settings}
    assert fit.profile.set["model"]["min_size"] == 256 and sources["model.min_size"] == "--set"
    assert fit.profile.set["model"]["max_size"] == 320, "still derived, and at least min_size"
    assert fit.profile.set["train"]["epochs"] == 60 and fit.profile.set["train"]["milestones"] == [40], \
        "the step decay where Faster R-CNN, which needs the most epochs here, has it: after 4 of 6"
    assert "data.root" not in sources and fit.data == {"data.source": "coco", "data.root": str(NEON_TREES)}


def test_refusals_name_the_value_and_the_fix_and_write_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "fitted.yaml"
    args = ["fit-profile", *(w for s in NEON_DATA for w in ("--set", s)), "--out", str(out)]
    assert main([*args, "--set", "model.anchor_sizes=[64, 128, 256, 512, 1024]"]) == 2
    error = capsys.readouterr().err
    assert "best possible recall of 0.260 at IoU 0.5" in error and "fix: set model.anchor_sizes" in error
    assert not out.exists()
    with pytest.raises(ConfigError, match="3 training images fill no whole batch of train.batch_size 8"):
        fit_profile(ROOT / "params.yaml", "fitted", overrides=(*NEON_DATA, "data.max_images=3"))
    out.write_text("mine\n")
    assert main(args) == 2 and out.read_text() == "mine\n"
    assert "not written by `libra fit-profile`" in capsys.readouterr().err


def test_fit_on_the_built_in_set_recovers_the_tiny_configs(tmp_path, monkeypatch):
    """The rules give back the hand-made tiny configs' input size and anchors on the set they were made for."""
    monkeypatch.chdir(ROOT)
    write_synthetic_coco(tmp_path, seed=0, num_train=64, num_val=16, image_size=128)
    fit = fit_profile(ROOT / "params.yaml", "fitted", overrides=("data.source=coco", f"data.root={tmp_path}"))
    assert fit.profile.set["model"] == {"min_size": 128, "max_size": 128, "anchor_sizes": [8, 16, 32, 64, 128]}
    assert {d: f.recall for d, f in fit.detectors.items()} == pytest.approx({"faster_rcnn": 0.87, "retinanet": 1.0},
                                                                            abs=0.02)


def load_convert():
    """tests/data/neon_trees/convert.py, the script that writes the real set from the deepforest wheel."""
    spec = importlib.util.spec_from_file_location("neon_convert", NEON_TREES / "convert.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_a_tile_keeps_a_box_clipped_when_at_least_half_of_it_is_inside():
    tile_boxes = load_convert().tile_boxes
    boxes = [("Tree", 10, 10, 30, 50),     # inside: kept as is
             ("Tree", 150, 0, 170, 10),    # half inside the tile [0, 160): kept, clipped to 10 x 10
             ("Tree", 151, 0, 171, 10),    # 9 of 20 columns inside: left out
             ("Tree", -20, -20, 180, 180)]  # holds the tile: 160 x 160 of 200 x 200 inside, kept
    assert tile_boxes(boxes, 0, 0, 160) == [("Tree", 10, 10, 20, 40, 800), ("Tree", 150, 0, 10, 10, 100),
                                            ("Tree", 0, 0, 160, 160, 160 * 160)]
    assert tile_boxes([("Tree", 170, 165, 190, 185)], 160, 160, 160) == [("Tree", 10, 5, 20, 20, 400)]


@pytest.mark.parametrize("layout, counts", [
    ("fixture", {"train": (14, 6 * 4 + (0 + 2 + 4 + 4) + 4 * 4), "val": (3, 3 * 4)}),  # 320 px: 4 cells a tile
    ("full", {"train": (12 * 4 - 7 * 2, 12 * 4 - 7 * 2), "val": (6 * 6, 6 * 6)})])  # 160 px: bare tiles left out
def test_convert_cuts_the_layouts_tiles_and_splits_by_place(tmp_path, monkeypatch, layout, counts):
    """On two blank crops with one box in the middle of every 160 px cell, each layout writes its tiles, their boxes
    in tile pixels, and validation images from the first crop only (the second crop's top-left 7 x 2 cells are
    bare: the fixture keeps their tiles, the full layout leaves them out)."""
    convert = load_convert()
    source = tmp_path / "source"
    source.mkdir()
    for crop, (width, height) in {convert.FIRST: (960, 960), convert.SECOND: (1920, 640)}.items():
        Image.new("RGB", (width, height), (90, 120, 60)).save(source / f"{crop}.png")
        cells = [(x, y) for y in range(0, height, 160) for x in range(0, width, 160)]
        if crop == convert.SECOND:
            cells = [(x, y) for x, y in cells if x >= 1120 or y >= 320]  # cells without a box: bare ground
        objects = "".join(f"<object><name>Tree</name><bndbox><xmin>{x + 60}</xmin><ymin>{y + 60}</ymin>"
                          f"<xmax>{x + 100}</xmax><ymax>{y + 100}</ymax></bndbox></object>" for x, y in cells)
        (source / f"{crop}.xml").write_text(f"<annotation>{objects}</annotation>")
    monkeypatch.setattr("sys.argv", ["convert.py", str(source), "--layout", layout, "--out", str(tmp_path / "out")])
    convert.main()
    tile = convert.LAYOUTS[layout].tile
    for split, (images, boxes) in counts.items():
        coco = json.loads((tmp_path / f"out/annotations/instances_{split}.json").read_text())
        names = {image["file_name"] for image in coco["images"]}
        assert (len(coco["images"]), len(coco["annotations"])) == (images, boxes)
        assert names == {path.name for path in (tmp_path / "out/images" / split).iterdir()}
        assert all(Image.open(tmp_path / "out/images" / split / name).size == (tile, tile) for name in names)
        assert (split == "val") == all(name.startswith(convert.FIRST) for name in names)
        assert all(0 <= a["bbox"][0] and a["bbox"][0] + a["bbox"][2] <= tile and a["bbox"][2] == 40
                   for a in coco["annotations"])


def test_convert_refuses_a_wrong_source_and_a_folder_with_files_and_writes_nothing(tmp_path, monkeypatch):
    convert = load_convert()
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    source = tmp_path / "source"
    source.mkdir()
    for name in (convert.FIRST, convert.SECOND):
        (source / f"{name}.png").touch()
        (source / f"{name}.xml").touch()
    for argv, message in ([str(tmp_path), "--out", str(tmp_path / "new")], "missing 2019_YELL"), \
                         ([str(source), "--out", str(out)], "not empty"):
        monkeypatch.setattr("sys.argv", ["convert.py", *argv])
        with pytest.raises(SystemExit, match=message):
            convert.main()
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and not (tmp_path / "new").exists()
