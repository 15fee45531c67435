"""Write a COCO set from the sample data of the `deepforest` wheel (see README.md): this folder, or the full set.

    pip download deepforest==2.1.0 --no-deps -d /tmp/df && unzip -q /tmp/df/deepforest-2.1.0-*.whl -d /tmp/df/whl
    python tests/data/neon_trees/convert.py /tmp/df/whl/deepforest/data --force          # this folder (the tests')
    python tests/data/neon_trees/convert.py /tmp/df/whl/deepforest/data --layout full --out data/neon_trees

The sources are two NEON aerial RGB crops of Yellowstone (0.1 m per pixel) with their Pascal VOC tree-crown boxes.
Each is cut into square tiles on a grid from its top-left corner, saved as JPEG (quality 90); a box is kept, clipped
to its tile, when at least half of its area lies inside the tile. The layouts (:data:`LAYOUTS`):

* ``fixture`` (this folder): 320 px tiles, the rows and columns listed (the second crop's first two columns are bare
  ground); the first crop's last row validates, everything else trains, so no tree is in both splits;
* ``full``: every whole 160 px tile of both crops; the first crop validates (another place than the second, 13 km
  away), the second trains, and its tiles without a box are left out.

It writes into an empty or new folder only (--force to write over files of the same names, as for this folder).
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

FIRST, SECOND = "2019_YELL_2_541000_4977000_image_crop", "2019_YELL_2_528000_4978000_image_crop2"
MIN_INSIDE = 0.5
JPEG_QUALITY = 90


@dataclass(frozen=True)
class Layout:
    """How the crops are cut: the tile size, the grid rows and columns taken per crop (None: every whole tile),
    which tiles validate, and whether training tiles without a box are kept."""

    tile: int
    grid: dict[str, tuple[range, range] | None]
    val_rows: dict[str, tuple[int, ...] | None]
    """Crop -> its grid rows that validate (None: all of them); crops not named train."""
    keep_empty_train: bool


LAYOUTS = {
    "fixture": Layout(tile=320, grid={FIRST: (range(3), range(3)), SECOND: (range(2), range(2, 6))},
                      val_rows={FIRST: (2,)}, keep_empty_train=True),
    "full": Layout(tile=160, grid={FIRST: None, SECOND: None}, val_rows={FIRST: None}, keep_empty_train=False),
}


def voc_boxes(xml_file: Path) -> list[tuple[str, float, float, float, float]]:
    """``(name, x1, y1, x2, y2)`` of every object of a Pascal VOC file."""
    boxes = []
    for item in ElementTree.parse(xml_file).getroot().iter("object"):
        box = item.find("bndbox")
        x1, y1, x2, y2 = (float(box.find(tag).text) for tag in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append((item.find("name").text, x1, y1, x2, y2))
    return boxes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="the deepforest/data folder of the unpacked wheel")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="fixture",
                        help="which set to write (default: fixture, this folder's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="the folder written: annotations/ and images/ (default: this folder)")
    parser.add_argument("--force", action="store_true",
                        help="write into a folder that is not empty, over files of the same names")
    args = parser.parse_args()
    layout = LAYOUTS[args.layout]
    missing = [f"{name}{suffix}" for name in layout.grid for suffix in (".png", ".xml")
               if not (args.source / f"{name}{suffix}").is_file()]
    if missing:
        sys.exit(f"{args.source}: not the deepforest/data folder of the unpacked deepforest 2.1.0 wheel "
                 f"(missing {', '.join(missing)}); see this script's docstring for the commands")
    if args.out.exists() and any(args.out.iterdir()) and not args.force:
        sys.exit(f"{args.out}: not empty; this script writes annotations/ and images/ there, over files of the same "
                 "names: name an empty or new folder, or pass --force")
    boxes = {name: voc_boxes(args.source / f"{name}.xml") for name in layout.grid}
    names = sorted({name for crop in boxes.values() for name, *_ in crop})
    splits: dict[str, dict] = {split: {"images": [], "annotations": [], "categories": [
        {"id": i + 1, "name": name, "supercategory": "tree"} for i, name in enumerate(names)]} for split in ("train", "val")}
    for crop in layout.grid:
        write_tiles(args.source, crop, layout, boxes[crop], names, splits, args.out)
    (args.out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, coco in splits.items():
        (args.out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco, indent=1) + "\n")
        print(f"{split}: {len(coco['images'])} images, {len(coco['annotations'])} boxes")


def tile_boxes(boxes: list[tuple[str, float, float, float, float]], left: int, top: int, tile: int
               ) -> list[tuple[str, float, float, float, float, float]]:
    """``(name, x, y, w, h, area)`` in tile pixels of the boxes at least :data:`MIN_INSIDE` inside the tile."""
    kept = []
    for name, x1, y1, x2, y2 in boxes:
        cx1, cy1 = max(x1 - left, 0.0), max(y1 - top, 0.0)
        cx2, cy2 = min(x2 - left, float(tile)), min(y2 - top, float(tile))
        inside = max(cx2 - cx1, 0.0) * max(cy2 - cy1, 0.0)
        if inside >= MIN_INSIDE * (x2 - x1) * (y2 - y1):
            kept.append((name, cx1, cy1, cx2 - cx1, cy2 - cy1, inside))
    return kept


def write_tiles(source: Path, crop: str, layout: Layout, boxes: list[tuple[str, float, float, float, float]],
                names: list[str], splits: dict[str, dict], out: Path) -> None:
    """Cut ``crop`` into the layout's tiles and add them, and the boxes inside them, to ``splits``."""
    image = Image.open(source / f"{crop}.png").convert("RGB")
    tile = layout.tile
    rows, cols = layout.grid[crop] or (range(image.height // tile), range(image.width // tile))
    for row in rows:
        for col in cols:
            val_rows = layout.val_rows.get(crop, ())
            split = "val" if crop in layout.val_rows and (val_rows is None or row in val_rows) else "train"
            left, top = col * tile, row * tile
            kept = tile_boxes(boxes, left, top, tile)
            if split == "train" and not kept and not layout.keep_empty_train:
                continue
            coco = splits[split]
            image_id = len(coco["images"]) + 1
            file_name = f"{crop}_r{row}c{col}.jpg"
            (out / "images" / split).mkdir(parents=True, exist_ok=True)
            image.crop((left, top, left + tile, top + tile)).save(out / "images" / split / file_name,
                                                                  quality=JPEG_QUALITY)
            coco["images"].append({"id": image_id, "file_name": file_name, "width": tile, "height": tile})
            for name, x, y, w, h, area in kept:
                coco["annotations"].append({
                    "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": names.index(name) + 1,
                    "bbox": [x, y, w, h], "area": area, "iscrowd": 0})


if __name__ == "__main__":
    main()
