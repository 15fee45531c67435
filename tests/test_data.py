"""Tests of detection.data: the synthetic generator, COCO validation and the dataset."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from detection.data import (
    CLASSES,
    CocoDetectionDataset,
    CocoSplit,
    DatasetError,
    collate_detection,
    validate_coco,
    write_synthetic_coco,
)
from detection.data import synthetic


def _hash_tree(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _load(root: Path, split: str) -> dict[str, Any]:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def _split(root: Path, split: str) -> CocoSplit:
    return validate_coco(root / "annotations" / f"instances_{split}.json", root / "images" / split)


def _iou_xywh(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / (a[2] * a[3] + b[2] * b[3] - ix * iy)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small") / "synthetic"
    write_synthetic_coco(root, seed=0, num_train=8, num_val=4)
    return root


@pytest.fixture(scope="module")
def larger_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("larger") / "synthetic"
    return root, write_synthetic_coco(root, seed=3, num_train=60, num_val=4)


# --- synthetic generator ---------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    first = write_synthetic_coco(tmp_path / "a", seed=5, num_train=8, num_val=4)
    second = write_synthetic_coco(tmp_path / "b", seed=5, num_train=8, num_val=4)
    other = write_synthetic_coco(tmp_path / "c", seed=6, num_train=8, num_val=4)

    hashes = _hash_tree(tmp_path / "a")
    assert len(hashes) == 8 + 4 + 2 + 1, "images, annotations and the marker of libra prepare"
    assert hashes == _hash_tree(tmp_path / "b")
    assert first == second
    assert other["digest"] != first["digest"]
    differing = {name for name, digest in _hash_tree(tmp_path / "c").items() if hashes[name] != digest}
    assert differing == set(hashes) - {".libra"}


def test_layout_and_coco_schema(small_set: Path) -> None:
    for split, count in (("train", 8), ("val", 4)):
        coco = _load(small_set, split)
        assert coco["categories"] == [
            {"id": i, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES, start=1)
        ]
        assert 3 <= len(CLASSES) <= 5
        image_ids = [image["id"] for image in coco["images"]]
        assert image_ids == list(range(1, count + 1))
        ann_ids = [ann["id"] for ann in coco["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids) and min(ann_ids) >= 1
        sizes = {image["id"]: (image["width"], image["height"]) for image in coco["images"]}
        for image in coco["images"]:
            assert image["file_name"] == f"{image['id']:06d}.png"
            with Image.open(small_set / "images" / split / image["file_name"]) as handle:
                assert handle.size == (128, 128) and handle.mode == "RGB"
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            width, height = sizes[ann["image_id"]]
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= width and y + h <= height
            assert ann["area"] == w * h and ann["iscrowd"] == 0
            assert 1 <= ann["category_id"] <= len(CLASSES)
        split_info = _split(small_set, split)
        assert split_info.image_ids == image_ids
        assert split_info.num_annotations == len(coco["annotations"])


def test_content_has_empty_images_sizes_occlusion_and_distractors(larger_set: tuple[Path, dict]) -> None:
    root, summary = larger_set
    coco = _load(root, "train")
    train = summary["splits"]["train"]
    objects_per_image = Counter(ann["image_id"] for ann in coco["annotations"])
    counts = [objects_per_image[image["id"]] for image in coco["images"]]
    assert train["images"] == 60 and train["objects"] == len(coco["annotations"])
    assert 0 < counts.count(0) == train["empty_images"] < 30
    assert max(counts) <= 6

    sides = [min(ann["bbox"][2:]) for ann in coco["annotations"]]
    assert min(sides) <= 12 and max(sides) >= 60
    assert set(Counter(ann["category_id"] for ann in coco["annotations"])) == set(range(1, len(CLASSES) + 1))
    assert sum(train["area_fractions"].values()) == pytest.approx(1.0, abs=1e-3)

    boxes_by_image: dict[int, list[list[float]]] = {}
    for ann in coco["annotations"]:
        boxes_by_image.setdefault(ann["image_id"], []).append(ann["bbox"])
    overlaps = [
        _iou_xywh(a, b) for boxes in boxes_by_image.values() for a, b in itertools.combinations(boxes, 2)
    ]
    assert sum(iou > 0 for iou in overlaps) >= 5

    # Distractors leave no annotation, so the generator's own count of those it drew is the check.
    assert train["distractors"] >= 30


def test_failed_write_leaves_previous_set_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "synthetic"
    write_synthetic_coco(out, seed=0, num_train=4, num_val=2)
    before = _hash_tree(out)
    real_write_png = synthetic._write_png
    calls = 0

    def failing_write_png(path: Path, pixels: np.ndarray) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError("disk full")
        real_write_png(path, pixels)

    monkeypatch.setattr(synthetic, "_write_png", failing_write_png)
    with pytest.raises(OSError, match="disk full"):
        write_synthetic_coco(out, seed=1, num_train=4, num_val=2)
    assert _hash_tree(out) == before
    calls = 0
    with pytest.raises(OSError, match="disk full"):
        write_synthetic_coco(tmp_path / "fresh", seed=1, num_train=4, num_val=2)
    assert [path.name for path in tmp_path.iterdir()] == ["synthetic"]

    monkeypatch.undo()
    replaced = write_synthetic_coco(out, seed=1, num_train=4, num_val=2)
    assert _hash_tree(out) != before and replaced["seed"] == 1
    assert [path.name for path in tmp_path.iterdir()] == ["synthetic"]


# --- validation ------------------------------------------------------------------------------


def _first_annotation(coco: dict[str, Any]) -> dict[str, Any]:
    return coco["annotations"][0]


def _where(ann: dict[str, Any]) -> str:
    return f"annotation id {ann['id']} (image_id {ann['image_id']})"


def _bbox_width_zero(coco: dict[str, Any]) -> str:
    ann = _first_annotation(coco)
    ann["bbox"][2] = 0
    return f"{_where(ann)}: bbox w=0 <= 0"


def _bbox_height_negative(coco: dict[str, Any]) -> str:
    ann = _first_annotation(coco)
    ann["bbox"][3] = -2.0
    return f"{_where(ann)}: bbox h=-2.0 <= 0"


def _bbox_outside(coco: dict[str, Any]) -> str:
    ann = _first_annotation(coco)
    ann["bbox"] = [120.0, 10.0, 20.0, 10.0]
    return f"{_where(ann)}: bbox [120.0, 10.0, 20.0, 10.0] is outside the 128x128 image"


def _bbox_wrong_length(coco: dict[str, Any]) -> str:
    ann = _first_annotation(coco)
    ann["bbox"] = [1.0, 2.0, 3.0]
    return f"{_where(ann)}: bbox must be a list [x, y, w, h]"


def _bbox_not_numeric(coco: dict[str, Any]) -> str:
    ann = _first_annotation(coco)
    ann["bbox"][0] = "3"
    return f"{_where(ann)}: bbox values must be finite numbers"


def _unknown_category(coco: dict[str, Any]) -> str:
    ann = _first_annotation(coco)
    ann["category_id"] = 99
    return f"{_where(ann)}: unknown category_id 99"


def _unknown_image(coco: dict[str, Any]) -> str:
    ann = _first_annotation(coco)
    ann["image_id"] = 999
    return f"annotation id {ann['id']} (image_id 999): unknown image_id"


def _duplicate_image_id(coco: dict[str, Any]) -> str:
    coco["images"][1]["id"] = coco["images"][0]["id"]
    return f"duplicate image id {coco['images'][0]['id']} (at index 1)"


def _duplicate_annotation_id(coco: dict[str, Any]) -> str:
    coco["annotations"][1]["id"] = coco["annotations"][0]["id"]
    return f"duplicate annotation id {coco['annotations'][0]['id']} (at index 1)"


def _duplicate_category_id(coco: dict[str, Any]) -> str:
    coco["categories"][1]["id"] = coco["categories"][0]["id"]
    return f"duplicate category id {coco['categories'][0]['id']} (at index 1)"


def _empty_split(coco: dict[str, Any]) -> str:
    coco["images"], coco["annotations"] = [], []
    return "empty split (no images)"


def _missing_key(coco: dict[str, Any]) -> str:
    del coco["annotations"]
    return "missing top-level key 'annotations'"


def _wrong_type(coco: dict[str, Any]) -> str:
    coco["images"] = {"id": 1}
    return "'images' must be a list, got dict"


def _missing_image_file(coco: dict[str, Any]) -> str:
    coco["images"][2]["file_name"] = "absent.png"
    return f"image id {coco['images'][2]['id']}: image file "


def _image_size_mismatch(coco: dict[str, Any]) -> str:
    coco["images"][0]["width"] = 64
    return f"image id {coco['images'][0]['id']}: image file "


@pytest.mark.parametrize(
    "corrupt",
    [
        _bbox_width_zero,
        _bbox_height_negative,
        _bbox_outside,
        _bbox_wrong_length,
        _bbox_not_numeric,
        _unknown_category,
        _unknown_image,
        _duplicate_image_id,
        _duplicate_annotation_id,
        _duplicate_category_id,
        _empty_split,
        _missing_key,
        _wrong_type,
        _missing_image_file,
        _image_size_mismatch,
    ],
)
def test_bad_annotations_raise_dataset_error_naming_file_and_record(
    small_set: Path, tmp_path: Path, corrupt: Callable[[dict[str, Any]], str]
) -> None:
    coco = _load(small_set, "train")
    assert len(coco["annotations"]) >= 2
    expected = corrupt(coco)
    annotation_file = tmp_path / "instances_train.json"
    annotation_file.write_text(json.dumps(coco))
    with pytest.raises(DatasetError) as error:
        validate_coco(annotation_file, small_set / "images" / "train")
    assert str(error.value).startswith(f"{annotation_file}: ")
    assert expected in str(error.value)


def test_malformed_json_names_line_and_column(small_set: Path, tmp_path: Path) -> None:
    annotation_file = tmp_path / "instances_val.json"
    annotation_file.write_text('{"images": [],\n  "annotations": [,]}')
    with pytest.raises(DatasetError, match=r"instances_val\.json: malformed JSON at line 2 column 19"):
        validate_coco(annotation_file, small_set / "images" / "val")


def test_missing_annotation_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"instances_train\.json: annotation file not found"):
        validate_coco(tmp_path / "instances_train.json", tmp_path)


def test_max_images_selects_lowest_ids_and_must_be_positive(small_set: Path) -> None:
    annotation_file = small_set / "annotations" / "instances_train.json"
    coco = _load(small_set, "train")
    split = validate_coco(annotation_file, small_set / "images" / "train", max_images=3)
    assert split.image_ids == [1, 2, 3]
    assert split.num_annotations == sum(ann["image_id"] <= 3 for ann in coco["annotations"])
    with pytest.raises(DatasetError, match=r"instances_train\.json: max_images must be >= 1, got 0"):
        validate_coco(annotation_file, small_set / "images" / "train", max_images=0)


def test_max_images_checks_files_of_selected_images_only(small_set: Path, tmp_path: Path) -> None:
    coco = _load(small_set, "train")
    coco["images"][-1]["file_name"] = "absent.png"
    annotation_file = tmp_path / "instances_train.json"
    annotation_file.write_text(json.dumps(coco))
    assert validate_coco(annotation_file, small_set / "images" / "train", max_images=2).image_ids == [1, 2]


def test_categories_must_match_expected(small_set: Path) -> None:
    train = _split(small_set, "train")
    val_file = small_set / "annotations" / "instances_val.json"
    assert validate_coco(val_file, small_set / "images" / "val", categories=train.categories).categories == (
        train.categories
    )
    expected = {**train.categories, 5: "star"}
    with pytest.raises(DatasetError, match=r"instances_val\.json: categories .* differ from the expected"):
        validate_coco(val_file, small_set / "images" / "val", categories=expected)


def test_images_without_objects_and_boxes_within_tolerance_are_valid(small_set: Path, tmp_path: Path) -> None:
    coco = _load(small_set, "train")
    no_objects = copy.deepcopy(coco)
    no_objects["annotations"] = []
    annotation_file = tmp_path / "instances_train.json"
    annotation_file.write_text(json.dumps(no_objects))
    assert validate_coco(annotation_file, small_set / "images" / "train").num_annotations == 0

    coco["annotations"][0]["bbox"] = [-0.5, 100.0, 20.0, 28.5]
    annotation_file.write_text(json.dumps(coco))
    validate_coco(annotation_file, small_set / "images" / "train")


# --- dataset ---------------------------------------------------------------------------------


def test_dataset_returns_images_and_xyxy_targets(small_set: Path) -> None:
    split = _split(small_set, "train")
    coco = _load(small_set, "train")
    dataset = CocoDetectionDataset(split)
    assert len(dataset) == 8 and dataset.num_classes == len(CLASSES)
    for index in range(len(dataset)):
        image, target = dataset[index]
        assert image.shape == (3, 128, 128) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        anns = [ann for ann in coco["annotations"] if ann["image_id"] == target["image_id"]]
        xywh = [ann["bbox"] for ann in anns]
        expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in xywh]).reshape(-1, 4)
        assert target["image_id"] == split.image_ids[index]
        assert target["boxes"].dtype == torch.float32 and torch.equal(target["boxes"], expected)
        assert target["labels"].dtype == torch.int64
        assert target["labels"].tolist() == [dataset.category_id_to_label[a["category_id"]] for a in anns]

    images, targets = collate_detection([dataset[0], dataset[1]])
    assert len(images) == len(targets) == 2 and targets[1]["image_id"] == split.image_ids[1]


def test_sparse_category_ids_map_to_contiguous_labels_and_modes_convert(tmp_path: Path) -> None:
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    Image.new("L", (40, 30), 200).save(image_dir / "gray.png")
    Image.new("RGBA", (40, 30), (10, 20, 30, 128)).save(image_dir / "rgba.png")
    coco = {
        "images": [
            {"id": 7, "file_name": "gray.png", "width": 40, "height": 30},
            {"id": 9, "file_name": "rgba.png", "width": 40, "height": 30},
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 10, "bbox": [1, 2, 10, 5], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [20, 2, 10, 10], "iscrowd": 1},
            {"id": 3, "image_id": 9, "category_id": 3, "bbox": [0, 0, 40, 30]},
        ],
        "categories": [{"id": 10, "name": "c"}, {"id": 3, "name": "a"}, {"id": 7, "name": "b"}],
    }
    annotation_file = tmp_path / "instances.json"
    annotation_file.write_text(json.dumps(coco))
    dataset = CocoDetectionDataset(validate_coco(annotation_file, image_dir))

    assert dataset.num_classes == 3
    assert dataset.category_id_to_label == {3: 1, 7: 2, 10: 3}
    assert dataset.label_to_category_id == {1: 3, 2: 7, 3: 10}
    gray, gray_target = dataset[0]
    assert gray.shape == (3, 30, 40) and torch.allclose(gray, torch.full_like(gray, 200 / 255))
    assert gray_target["labels"].tolist() == [3]
    assert gray_target["boxes"].tolist() == [[1.0, 2.0, 11.0, 7.0]]
    rgba, rgba_target = dataset[1]
    assert rgba.shape == (3, 30, 40) and torch.allclose(rgba[:, 0, 0], torch.tensor([10, 20, 30]) / 255)
    assert rgba_target["labels"].tolist() == [1]


def test_horizontal_flip_moves_boxes_with_pixels(small_set: Path) -> None:
    split = _split(small_set, "train")
    plain = CocoDetectionDataset(split)
    flipped = CocoDetectionDataset(split, train=True, hflip_prob=1.0)
    for index in range(len(plain)):
        image, target = plain[index]
        flipped_image, flipped_target = flipped[index]
        assert torch.equal(flipped_image, image.flip(-1))
        boxes = target["boxes"]
        expected = torch.stack([128 - boxes[:, 2], boxes[:, 1], 128 - boxes[:, 0], boxes[:, 3]], dim=1)
        assert torch.equal(flipped_target["boxes"], expected)
        assert torch.equal(flipped_target["labels"], target["labels"])
    assert torch.equal(CocoDetectionDataset(split, train=True, hflip_prob=0.0)[0][0], plain[0][0])


def test_flip_is_deterministic_per_seed_epoch_and_index(small_set: Path) -> None:
    split = _split(small_set, "train")
    plain = [image for image, _ in CocoDetectionDataset(split)]

    def flips(dataset: CocoDetectionDataset, epoch: int) -> list[bool]:
        dataset.set_epoch(epoch)
        return [not torch.equal(dataset[i][0], plain[i]) for i in range(len(dataset))]

    running = CocoDetectionDataset(split, train=True, seed=0)
    schedule = [flips(running, epoch) for epoch in range(4)]
    resumed = CocoDetectionDataset(split, train=True, seed=0)
    assert flips(resumed, 3) == schedule[3]
    assert flips(resumed, 1) == schedule[1]
    assert any(schedule) and not all(all(epoch) for epoch in schedule)
    assert len({tuple(epoch) for epoch in schedule}) > 1
    other_seed = CocoDetectionDataset(split, train=True, seed=1)
    assert [flips(other_seed, epoch) for epoch in range(4)] != schedule


def test_image_cache_gives_the_uncached_tensors_bit_for_bit(small_set: Path) -> None:
    split = _split(small_set, "train")
    plain = CocoDetectionDataset(split, train=True, seed=3)
    cached = CocoDetectionDataset(split, train=True, seed=3, cache_mb=64)
    assert cached.cached and not plain.cached and cached.cache_bytes == 3 * 4 * 128 * 128 * len(cached)
    for epoch in range(3):  # the first epoch fills the cache, the later ones read it (with other flips)
        plain.set_epoch(epoch)
        cached.set_epoch(epoch)
        for index in range(len(plain)):
            (image, target), (cached_image, cached_target) = plain[index], cached[index]
            assert cached_image.dtype == image.dtype and cached_image.stride() == image.stride()
            assert torch.equal(cached_image, image)
            assert torch.equal(cached_target["boxes"], target["boxes"])
            assert torch.equal(cached_target["labels"], target["labels"])
    assert all(image is not None for image in cached._images)
    too_small = CocoDetectionDataset(split, cache_mb=1) if cached.cache_bytes > 2**20 else None
    assert too_small is None or not too_small.cached
    with pytest.raises(ValueError, match="cache_mb"):
        CocoDetectionDataset(split, cache_mb=-1)


def test_cached_datamodule_loads_the_batches_of_the_uncached_one(small_set: Path) -> None:
    from detection.config import load_config
    from detection.engine.datamodule import DetectionDataModule

    def batches(cache_mb: int, num_workers: int = 0) -> list:
        cfg = load_config(None, [f"data.root={small_set}", f"data.cache_mb={cache_mb}", "train.batch_size=2",
                                 f"data.num_workers={num_workers}", "eval.batch_size=3"])
        data = DetectionDataModule(cfg)
        out = []
        for epoch in range(2):
            loader = data.train_dataloader()
            loader.sampler.set_epoch(epoch)
            out += list(loader)
        return out + list(data.val_dataloader())

    plain = batches(0)
    for cached in (batches(1024), batches(1024, num_workers=1)):
        assert len(cached) == len(plain)
        for (images, targets), (cached_images, cached_targets) in zip(plain, cached):
            assert all(torch.equal(a, b) for a, b in zip(images, cached_images))
            assert [t["image_id"] for t in targets] == [t["image_id"] for t in cached_targets]
            assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(targets, cached_targets))


def test_val_max_images_validates_training_on_the_first_images(small_set: Path) -> None:
    from detection.config import load_config
    from detection.engine.datamodule import DetectionDataModule

    full = DetectionDataModule(load_config(None, [f"data.root={small_set}"]))
    part = DetectionDataModule(load_config(None, [f"data.root={small_set}", "train.val_max_images=2"]))
    assert part.val_dataset.image_ids == full.val_dataset.image_ids[:2]
    assert [im["id"] for im in part.val_gt["images"]] == full.val_dataset.image_ids[:2]
    assert {a["image_id"] for a in part.val_gt["annotations"]} <= set(full.val_dataset.image_ids[:2])
    assert part.train_dataset.image_ids == full.train_dataset.image_ids
