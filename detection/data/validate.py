"""Validation of a COCO-format detection split, with errors that name the file and the record."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from PIL import Image

__all__ = [
    "BOX_TOLERANCE",
    "MAX_IMAGE_PIXELS",
    "CocoSplit",
    "DatasetError",
    "load_coco_json",
    "read_image",
    "validate_coco",
    "with_coco_defaults",
]

BOX_TOLERANCE = 1.0
"""How far, in pixels, a box may extend past the image border (rounding in exported boxes)."""
MAX_IMAGE_PIXELS = 89_478_485
"""Largest width x height an image file may declare (Pillow's own default): a bigger one is refused
before it is decoded, as a likely decompression bomb."""


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names file and record."""


@dataclass(frozen=True)
class CocoSplit:
    """A validated split: the selected image ids (sorted) and the split's categories."""

    annotation_file: Path
    image_dir: Path
    image_ids: list[int]
    num_annotations: int
    categories: dict[int, str]
    missing_area: int = 0
    """Annotations of the selected images without ``area`` (COCO's default, bbox w*h, is used)."""
    missing_iscrowd: int = 0
    """Annotations of the selected images without ``iscrowd`` (COCO's default, 0, is used)."""
    max_image_pixels: int = MAX_IMAGE_PIXELS
    """The pixel limit the image files were checked against (the dataset reads them with it too)."""


def load_coco_json(annotation_file: Path) -> dict[str, Any]:
    """Read an annotation file and check its top-level structure.

    Raises:
        DatasetError: the file is missing, unreadable, not JSON, or lacks the ``images``,
            ``annotations`` and ``categories`` lists.
    """
    annotation_file = Path(annotation_file)
    try:
        text = annotation_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{annotation_file}: annotation file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{annotation_file}: cannot read annotation file: {error}") from None
    try:
        coco = json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(
            f"{annotation_file}: malformed JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from None
    if not isinstance(coco, dict):
        raise DatasetError(f"{annotation_file}: top level must be an object, got {type(coco).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in coco:
            raise DatasetError(f"{annotation_file}: missing top-level key '{key}'")
        if not isinstance(coco[key], list):
            raise DatasetError(f"{annotation_file}: '{key}' must be a list, got {type(coco[key]).__name__}")
    return coco


def validate_coco(
    annotation_file: Path,
    image_dir: Path,
    max_images: int | None = None,
    categories: dict[int, str] | None = None,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> CocoSplit:
    """Check a COCO-format split completely before anything uses it.

    Every record in the annotation file is checked; image files are checked (existence, pixel
    count and size from the file header, then a full decode) only for the selected images: the
    first ``max_images`` ids in sorted order, or all. Images without annotations are valid;
    annotations without ``area`` or ``iscrowd`` are valid and counted (see :func:`with_coco_defaults`).

    Args:
        annotation_file: the ``instances_*.json`` file.
        image_dir: the directory that ``file_name`` of each image is relative to.
        max_images: keep only this many images (>= 1), the lowest ids.
        categories: the expected ``{id: name}``, e.g. the training split's for a validation split.
        max_image_pixels: refuse an image file whose header declares more pixels than this.

    Raises:
        DatasetError: on the first problem found, naming the file and the offending record.
    """
    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    if max_images is not None and max_images < 1:
        raise DatasetError(f"{annotation_file}: max_images must be >= 1, got {max_images}")
    if max_image_pixels < 1:
        raise DatasetError(f"{annotation_file}: max_image_pixels must be >= 1, got {max_image_pixels}")
    coco = load_coco_json(annotation_file)
    found_categories = _check_categories(annotation_file, coco["categories"])
    if categories is not None and found_categories != categories:
        raise DatasetError(
            f"{annotation_file}: categories {found_categories} differ from the expected {categories}"
        )
    images = _check_images(annotation_file, coco["images"])
    image_ids = sorted(images)[:max_images]
    selected = set(image_ids)
    num_annotations = missing_area = missing_iscrowd = 0
    for record in _unique_records(annotation_file, coco["annotations"], "annotation"):
        if _check_annotation(annotation_file, record, images, found_categories) in selected:
            num_annotations += 1
            missing_area += "area" not in record
            missing_iscrowd += "iscrowd" not in record
    for image_id in image_ids:
        _check_image_file(annotation_file, image_dir, images[image_id], max_image_pixels)
    return CocoSplit(annotation_file, image_dir, image_ids, num_annotations, found_categories,
                     missing_area, missing_iscrowd, max_image_pixels)


def with_coco_defaults(annotation: dict[str, Any]) -> dict[str, Any]:
    """A copy of a validated annotation with COCO's defaults for what it lacks: ``area`` = bbox w*h
    and ``iscrowd`` = 0 (COCO evaluation needs both: ``area`` for APs/APm/APl, ``iscrowd`` for ignores)."""
    _, _, w, h = annotation["bbox"]
    return {"iscrowd": 0, "area": w * h, **annotation}


def read_image(path: Path, where: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The image file at ``path``, fully decoded and converted to RGB.

    Raises:
        DatasetError: prefixed with ``where`` (file and record): the file is missing, not an image,
            truncated or corrupt, or declares more than ``max_pixels`` pixels (checked from the
            header, before decoding).
    """
    try:
        with _no_pillow_pixel_limit(), Image.open(path) as handle:
            width, height = handle.size
            if width * height <= max_pixels:
                return _to_rgb(handle, path, where)
    except FileNotFoundError:
        raise DatasetError(f"{where}: image file {path} not found") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise DatasetError(f"{where}: cannot decode image file {path} (truncated or corrupt?): {error}") from None
    raise DatasetError(f"{where}: image file {path} declares {width}x{height} = {width * height} pixels, over the "
                       f"limit of {max_pixels} (a decompression bomb?); raise the pixel limit if the image is genuine")


@contextmanager
def _no_pillow_pixel_limit() -> Iterator[None]:
    """Pillow's global decompression-bomb check off (warning or error by its own limit): the caller checks
    the pixel count against its limit instead, with a message that names the record."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _check_categories(file: Path, records: list[Any]) -> dict[int, str]:
    categories: dict[int, str] = {}
    for record in _unique_records(file, records, "category"):
        name = record.get("name")
        if not isinstance(name, str) or not name:
            raise DatasetError(f"{file}: category id {record['id']}: 'name' must be a non-empty string")
        categories[record["id"]] = name
    if not categories:
        raise DatasetError(f"{file}: no categories")
    return categories


def _check_images(file: Path, records: list[Any]) -> dict[int, dict[str, Any]]:
    images: dict[int, dict[str, Any]] = {}
    for record in _unique_records(file, records, "image"):
        where = f"{file}: image id {record['id']}"
        file_name = record.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise DatasetError(f"{where}: 'file_name' must be a non-empty string")
        if PurePath(file_name).is_absolute() or ".." in PurePath(file_name).parts:
            raise DatasetError(f"{where}: 'file_name' {file_name!r} must be a path inside the image directory "
                               "(relative, without '..')")
        for key in ("width", "height"):
            value = record.get(key)
            if not _is_int(value) or value <= 0:
                raise DatasetError(f"{where}: '{key}' must be a positive integer, got {value!r}")
        images[record["id"]] = record
    if not images:
        raise DatasetError(f"{file}: empty split (no images)")
    return images


def _unique_records(file: Path, records: list[Any], kind: str) -> list[dict[str, Any]]:
    """Check that every record is an object with an integer ``id`` and that the ids are unique."""
    seen: set[int] = set()
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            kind_of = type(record).__name__
            raise DatasetError(f"{file}: {kind} at index {index} must be an object, got {kind_of}")
        record_id = record.get("id")
        if not _is_int(record_id):
            raise DatasetError(f"{file}: {kind} at index {index}: 'id' must be an integer, got {record_id!r}")
        if record_id in seen:
            raise DatasetError(f"{file}: duplicate {kind} id {record_id} (at index {index})")
        seen.add(record_id)
    return records


def _check_annotation(
    file: Path,
    record: dict[str, Any],
    images: dict[int, dict[str, Any]],
    categories: dict[int, str],
) -> int:
    """Check one annotation; returns its image id."""
    image_id = record.get("image_id")
    where = f"{file}: annotation id {record['id']} (image_id {image_id!r})"
    if not _is_int(image_id) or image_id not in images:
        raise DatasetError(f"{where}: unknown image_id")
    category_id = record.get("category_id")
    if not _is_int(category_id) or category_id not in categories:
        raise DatasetError(f"{where}: unknown category_id {category_id!r}")
    iscrowd = record.get("iscrowd", 0)
    if not _is_int(iscrowd) or iscrowd not in (0, 1):
        raise DatasetError(f"{where}: 'iscrowd' must be 0 or 1, got {iscrowd!r}")
    area = record.get("area", 0)
    if not _is_number(area) or area < 0:
        raise DatasetError(f"{where}: 'area' must be a finite number >= 0, got {area!r}")
    bbox = record.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4:
        raise DatasetError(f"{where}: bbox must be a list [x, y, w, h], got {bbox!r}")
    if not all(_is_number(v) for v in bbox):
        raise DatasetError(f"{where}: bbox values must be finite numbers, got {bbox!r}")
    x, y, w, h = bbox
    if w <= 0:
        raise DatasetError(f"{where}: bbox w={w} <= 0")
    if h <= 0:
        raise DatasetError(f"{where}: bbox h={h} <= 0")
    width, height = images[image_id]["width"], images[image_id]["height"]
    inside = (
        x >= -BOX_TOLERANCE
        and y >= -BOX_TOLERANCE
        and x + w <= width + BOX_TOLERANCE
        and y + h <= height + BOX_TOLERANCE
        and min(x + w, width) > max(x, 0)
        and min(y + h, height) > max(y, 0)
    )
    if not inside:
        raise DatasetError(f"{where}: bbox {bbox} is outside the {width}x{height} image")
    return image_id


def _to_rgb(image: Image.Image, path: Path, where: str) -> Image.Image:
    """8-bit RGB. 16-bit grayscale (Pillow's ``I;16*``, or ``I`` holding 16-bit values) is scaled to 8 bits
    (value // 256): Pillow's own conversion clips every value above 255 to white."""
    if image.mode == "F" or (image.mode == "I" and image.getextrema()[1] > 0xFFFF):
        raise DatasetError(f"{where}: image file {path} has {image.mode!r} pixels (32-bit) with no defined scale to "
                           "8 bits; save it as 8- or 16-bit")
    if image.mode.startswith("I"):
        image = image.point(lambda value: value / 256, "F").convert("L")
    return image.convert("RGB")


def _check_image_file(file: Path, image_dir: Path, image: dict[str, Any], max_pixels: int) -> None:
    path = image_dir / image["file_name"]
    where = f"{file}: image id {image['id']}"
    if not path.is_file():
        raise DatasetError(f"{where}: image file {path} not found")
    size = read_image(path, where, max_pixels).size
    if size != (image["width"], image["height"]):
        raise DatasetError(
            f"{where}: image file {path} is {size[0]}x{size[1]}, "
            f"the annotation says {image['width']}x{image['height']}"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
