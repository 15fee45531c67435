"""The built-in synthetic detection set: filled shapes on cluttered backgrounds, written as COCO.

Every image is drawn from its own ``numpy.random.Generator(PCG64([seed, split, index]))``, so the
set is a pure function of its arguments: the same seed gives byte-identical files.

Per image: a smooth low-contrast background with faint lines and blobs, 0-6 annotated objects of
the classes in :data:`CLASSES` and 0-2 unannotated distractors (hollow outlines, elongated
ellipses, stars) in the same colors and sizes. No shape's box may cover more than half of
another's; shapes are drawn in random order, so later ones partly occlude earlier ones. An object
keeps its full box unless less than :data:`MIN_VISIBLE_FRACTION` of it stays visible, in which
case it is dropped from the annotations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from detection.io import digest_files
from detection.ownership import PREPARE, replacing

__all__ = ["CLASSES", "DISTRACTORS", "MIN_VISIBLE_FRACTION", "SHAPE_LABELS", "render_shape_example", "write_synthetic_coco"]

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
DISTRACTORS: tuple[str, ...] = ("ring", "frame", "ellipse", "star")
MIN_VISIBLE_FRACTION = 0.3
SHAPE_LABELS: tuple[str, ...] = CLASSES + DISTRACTORS + ("none",)
"""Labels of the pre-training classification set: every shape kind, or no shape at all."""

_SPLITS = ("train", "val")
_DESCRIPTION = "balanced-learning synthetic shapes"
_OBJECTS_PER_IMAGE_PROBS = (0.10, 0.15, 0.20, 0.20, 0.15, 0.10, 0.10)
_MAX_DISTRACTORS = 2
# (min side, max side, probability), sides as fractions of the image size: 8-16, 16-40, 40-80
# and 96-112 px at 128 px, so every COCO area range (small < 32², large > 96²) is populated.
_SIZE_BUCKETS = ((0.0625, 0.125, 0.15), (0.125, 0.3125, 0.55), (0.3125, 0.625, 0.25), (0.75, 0.875, 0.05))
_MAX_ASPECT = 1.33
_ELLIPSE_ASPECT = (2.2, 3.5)
_MAX_COVER = 0.5
_PLACEMENT_TRIES = 20
_MIN_COLOR_DISTANCE = 90.0
_CLUTTER_SHIFT = (6.0, 15.0)
_OUTLINE_WIDTH = 0.06
_PIXEL_NOISE_STD = 4.0
_PNG_COMPRESS_LEVEL = 6


@dataclass
class _Shape:
    kind: str
    mask: np.ndarray
    box: tuple[int, int, int, int]  # tight x, y, w, h of the full (unoccluded) mask


def write_synthetic_coco(
    out: Path, seed: int = 0, num_train: int = 960, num_val: int = 96, image_size: int = 128, force: bool = False
) -> dict:
    """Generate the synthetic set under ``out``, replacing a previous one there.

    Layout: ``out/images/{train,val}/NNNNNN.png`` (``file_name`` is relative to the split's image
    directory; image and annotation ids start at 1) and ``out/annotations/instances_{train,val}.json``.
    The set is built in a temporary directory beside ``out`` and moved into place only when
    complete, so a failure never leaves a partial set over a previous one. Only an empty directory
    or a set written by `libra prepare` (its marker, see :mod:`detection.ownership`) is replaced, unless
    ``force``: any other ``out`` is refused before anything is written. The marker is not in ``digest``.

    Returns:
        A JSON-serialisable summary: per split the number of images, objects, empty images,
        distractors drawn, objects dropped as occluded and the fraction of objects in each COCO
        area range; plus ``digest``, a SHA-256 over every file's relative path and bytes.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train} and {num_val}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    with replacing(Path(out), PREPARE, force) as staging:
        splits = {
            split: _write_split(staging, split, split_index, count, seed, image_size)
            for split_index, (split, count) in enumerate(zip(_SPLITS, (num_train, num_val)))
        }
        return {
            "seed": seed,
            "image_size": image_size,
            "classes": list(CLASSES),
            "splits": splits,
            "digest": _digest(staging),
        }


def _write_split(root: Path, split: str, split_index: int, count: int, seed: int, size: int) -> dict:
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True)
    images, annotations = [], []
    stats = {"distractors": 0, "occluded_dropped": 0, "empty_images": 0}
    for index in range(count):
        image_id = index + 1
        rng = np.random.Generator(np.random.PCG64([seed, split_index, index]))
        pixels, objects, num_distractors, num_dropped = _render_image(rng, size)
        file_name = f"{image_id:06d}.png"
        _write_png(image_dir / file_name, pixels)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for category_id, (x, y, w, h) in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "area": float(w * h),
                    "iscrowd": 0,
                }
            )
        stats["distractors"] += num_distractors
        stats["occluded_dropped"] += num_dropped
        stats["empty_images"] += not objects
    coco = {
        "info": {"description": _DESCRIPTION, "seed": seed},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)
        ],
    }
    annotation_dir = root / "annotations"
    annotation_dir.mkdir(exist_ok=True)
    text = json.dumps(coco, sort_keys=True, separators=(",", ":")) + "\n"
    (annotation_dir / f"instances_{split}.json").write_text(text, encoding="utf-8")
    areas = np.array([a["area"] for a in annotations])
    num_objects = len(annotations)
    return {
        "images": count,
        "objects": num_objects,
        **stats,
        "area_fractions": {
            name: round(float(np.count_nonzero(in_range)) / max(num_objects, 1), 4)
            for name, in_range in (
                ("small", areas < 32**2),
                ("medium", (areas >= 32**2) & (areas <= 96**2)),
                ("large", areas > 96**2),
            )
        },
    }


def _render_image(
    rng: np.random.Generator, size: int
) -> tuple[np.ndarray, list[tuple[int, tuple[int, int, int, int]]], int, int]:
    """Draw one image; returns pixels, [(category_id, box)], distractors drawn, objects dropped."""
    background = _background(rng, size)
    canvas = background.copy()
    _add_clutter(rng, canvas, size)

    num_objects = int(rng.choice(len(_OBJECTS_PER_IMAGE_PROBS), p=_OBJECTS_PER_IMAGE_PROBS))
    num_distractors = int(rng.integers(0, _MAX_DISTRACTORS + 1))
    kinds = [CLASSES[i] for i in rng.integers(0, len(CLASSES), num_objects)]
    kinds += [DISTRACTORS[i] for i in rng.integers(0, len(DISTRACTORS), num_distractors)]
    extents = [_sample_extent(rng, kind, size) for kind in kinds]

    # Largest first, so big shapes still find room; the drawing order is random.
    placed: list[_Shape] = []
    for k in sorted(range(len(kinds)), key=lambda k: -extents[k][0] * extents[k][1]):
        shape = _place_shape(rng, kinds[k], extents[k], size, [s.box for s in placed])
        if shape is not None:
            placed.append(shape)
    placed = [placed[i] for i in rng.permutation(len(placed))]

    owner = np.full((size, size), -1, dtype=np.int16)
    for index, shape in enumerate(placed):
        local = background[shape.mask].mean(axis=0)
        canvas[shape.mask] = _contrasting_color(rng, local)
        owner[shape.mask] = index if shape.kind in CLASSES else -1

    objects, dropped = [], 0
    for index, shape in enumerate(placed):
        if shape.kind not in CLASSES:
            continue
        visible = np.count_nonzero(owner == index) / np.count_nonzero(shape.mask)
        if visible < MIN_VISIBLE_FRACTION:
            dropped += 1
        else:
            objects.append((CLASSES.index(shape.kind) + 1, shape.box))
    drawn_distractors = sum(s.kind in DISTRACTORS for s in placed)

    canvas += rng.normal(0.0, _PIXEL_NOISE_STD, canvas.shape)
    pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return pixels, objects, drawn_distractors, dropped


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A base color plus smooth low-frequency noise, float [size, size, 3]."""
    base = rng.uniform(70.0, 185.0, 3)
    cells = int(rng.integers(3, 6))
    channels = []
    for _ in range(3):
        grid = Image.fromarray(rng.normal(0.0, 1.0, (cells, cells)).astype(np.float32))
        channels.append(np.asarray(grid.resize((size, size), Image.Resampling.BILINEAR)))
    amplitude = rng.uniform(6.0, 14.0)
    return base + amplitude * np.stack(channels, axis=-1).astype(np.float64)


def _add_clutter(rng: np.random.Generator, canvas: np.ndarray, size: int) -> None:
    """Faint straight lines and blobs, each shifting the colors under it by a few levels."""
    for _ in range(int(rng.integers(2, 7))):
        layer = Image.new("L", (size, size), 0)
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, size, 4))
        ImageDraw.Draw(layer).line([(x0, y0), (x1, y1)], fill=255, width=int(rng.integers(1, 3)))
        _shift(rng, canvas, np.asarray(layer) > 0)
    for _ in range(int(rng.integers(1, 5))):
        layer = Image.new("L", (size, size), 0)
        cx, cy = (int(v) for v in rng.integers(0, size, 2))
        rx, ry = (int(v) for v in rng.integers(2, max(3, size // 10), 2))
        ImageDraw.Draw(layer).ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        _shift(rng, canvas, np.asarray(layer) > 0)


def _shift(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray) -> None:
    direction = rng.normal(0.0, 1.0, 3)
    canvas[mask] += rng.uniform(*_CLUTTER_SHIFT) * direction / np.linalg.norm(direction)


def _place_shape(
    rng: np.random.Generator,
    kind: str,
    extent: tuple[int, int],
    size: int,
    taken: list[tuple[int, int, int, int]],
) -> _Shape | None:
    """Draw ``kind`` at a random position where its box and every box in ``taken`` cover at most
    _MAX_COVER of each other, so that occlusion stays partial; None if no position is found."""
    w, h = extent
    for _ in range(_PLACEMENT_TRIES):
        x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        if all(_cover((x, y, w, h), other) <= _MAX_COVER for other in taken):
            mask = _shape_mask(rng, kind, (x, y, w, h), size)
            ys, xs = np.nonzero(mask)
            x0, y0 = int(xs.min()), int(ys.min())
            box = (x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1)
            return _Shape(kind, mask, box)
    return None


def _sample_extent(rng: np.random.Generator, kind: str, size: int) -> tuple[int, int]:
    bucket = int(rng.choice(len(_SIZE_BUCKETS), p=[b[2] for b in _SIZE_BUCKETS]))
    low, high, _ = _SIZE_BUCKETS[bucket]
    return _extent_of(rng, kind, rng.uniform(low, high) * size, size)


def _extent_of(rng: np.random.Generator, kind: str, side: float, size: int) -> tuple[int, int]:
    """Width and height of a ``kind`` shape of about ``side`` pixels, with its kind's aspect ratio."""
    if kind in ("circle", "ring"):
        w = h = side
    elif kind == "ellipse":
        w, h = side, side / rng.uniform(*_ELLIPSE_ASPECT)
        if rng.random() < 0.5:
            w, h = h, w
    else:
        aspect = np.exp(rng.uniform(-np.log(_MAX_ASPECT), np.log(_MAX_ASPECT)))
        w, h = side * np.sqrt(aspect), side / np.sqrt(aspect)
    min_side = max(4, size // 32)
    return int(np.clip(round(w), min_side, size - 2)), int(np.clip(round(h), min_side, size - 2))


def _shape_mask(rng: np.random.Generator, kind: str, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    x, y, w, h = box
    x1, y1 = x + w - 1, y + h - 1
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    outline = max(1, round(min(w, h) * _OUTLINE_WIDTH))
    if kind in ("circle", "ellipse"):
        draw.ellipse([x, y, x1, y1], fill=255)
    elif kind == "square":
        draw.rectangle([x, y, x1, y1], fill=255)
    elif kind == "triangle":
        apex_y, base_y = (y, y1) if rng.random() < 0.5 else (y1, y)
        draw.polygon([(x, base_y), (x1, base_y), ((x + x1) / 2, apex_y)], fill=255)
    elif kind == "cross":
        bar_w, bar_h = max(2, round(w * 0.34)), max(2, round(h * 0.34))
        bar_x, bar_y = x + (w - bar_w) // 2, y + (h - bar_h) // 2
        draw.rectangle([bar_x, y, bar_x + bar_w - 1, y1], fill=255)
        draw.rectangle([x, bar_y, x1, bar_y + bar_h - 1], fill=255)
    elif kind == "ring":
        draw.ellipse([x, y, x1, y1], outline=255, width=outline)
    elif kind == "frame":
        draw.rectangle([x, y, x1, y1], outline=255, width=outline)
    elif kind == "star":
        angles = rng.uniform(0.0, 2 * np.pi) + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        cx, cy = (x + x1) / 2, (y + y1) / 2
        points = [
            (float(cx + r * (w / 2) * np.cos(a)), float(cy + r * (h / 2) * np.sin(a)))
            for r, a in zip(radii, angles)
        ]
        draw.polygon(points, fill=255)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")
    return np.asarray(layer) > 0


def _contrasting_color(rng: np.random.Generator, local: np.ndarray) -> np.ndarray:
    """A random RGB color at least _MIN_COLOR_DISTANCE from the background under the shape."""
    while True:
        color = rng.uniform(0.0, 255.0, 3)
        if np.linalg.norm(color - local) >= _MIN_COLOR_DISTANCE:
            return color


def _cover(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection of two x, y, w, h boxes over the area of the smaller one."""
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / min(a[2] * a[3], b[2] * b[3])


def _write_png(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(path, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)


def _digest(root: Path) -> str:
    return digest_files((path.relative_to(root).as_posix(), path)
                        for path in sorted(p for p in root.rglob("*") if p.is_file()))


_EXAMPLE_SIDE = (0.2, 0.9)


def render_shape_example(rng: np.random.Generator, size: int) -> tuple[np.ndarray, int]:
    """One image of the classification set that pre-trains the tiny backbone.

    Background, clutter, colours and noise are drawn as in the detection set; the image holds one
    shape of a uniformly drawn kind (objects and distractors alike) of side 20-90 % of ``size``,
    or none. Returns uint8 pixels [size, size, 3] and the index of its label in :data:`SHAPE_LABELS`.
    """
    background = _background(rng, size)
    canvas = background.copy()
    _add_clutter(rng, canvas, size)
    label = int(rng.integers(0, len(SHAPE_LABELS)))
    kind = SHAPE_LABELS[label]
    if kind != "none":
        extent = _extent_of(rng, kind, rng.uniform(*_EXAMPLE_SIDE) * size, size)
        shape = _place_shape(rng, kind, extent, size, [])
        canvas[shape.mask] = _contrasting_color(rng, background[shape.mask].mean(axis=0))
    canvas += rng.normal(0.0, _PIXEL_NOISE_STD, canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), label
