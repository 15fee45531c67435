"""Write this folder's COCO set from the sample data of the `deepforest` wheel (see README.md).

    pip download deepforest==2.1.0 --no-deps -d /tmp/df && unzip -q /tmp/df/deepforest-2.1.0-*.whl -d /tmp/df/whl
    python tests/data/neon_trees/convert.py /tmp/df/whl/deepforest/data

The sources are two NEON aerial RGB crops of Yellowstone (0.1 m per pixel) with their Pascal VOC tree-crown
boxes. Each is cut into 320 px tiles on a grid from its top-left corner (:data:`TILES`: the rows and columns
of the grid taken; the second crop's first two columns are bare ground), saved as JPEG (quality 90): the first crop's last row validates, everything else trains, so no tree is in both splits. A
box is kept, clipped to its tile, when at least half of its area lies inside the tile.
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from PIL import Image

TILES = {"2019_YELL_2_541000_4977000_image_crop": (range(3), range(3)),
         "2019_YELL_2_528000_4978000_image_crop2": (range(2), range(2, 6))}
"""Source crop -> the rows and columns of its 320 px grid cut into tiles."""
VAL_ROWS = {"2019_YELL_2_541000_4977000_image_crop": (2,)}
TILE = 320
MIN_INSIDE = 0.5
JPEG_QUALITY = 90
OUT = Path(__file__).resolve().parent


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
    source = parser.parse_args().source
    boxes = {name: voc_boxes(source / f"{name}.xml") for name in TILES}
    names = sorted({name for crop in boxes.values() for name, *_ in crop})
    splits: dict[str, dict] = {split: {"images": [], "annotations": [], "categories": [
        {"id": i + 1, "name": name, "supercategory": "tree"} for i, name in enumerate(names)]} for split in ("train", "val")}
    for crop, (rows, cols) in TILES.items():
        write_tiles(source, crop, rows, cols, boxes[crop], names, splits)
    (OUT / "annotations").mkdir(exist_ok=True)
    for split, coco in splits.items():
        (OUT / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco, indent=1) + "\n")
        print(f"{split}: {len(coco['images'])} images, {len(coco['annotations'])} boxes")


def write_tiles(source: Path, crop: str, rows: range, cols: range, boxes: list[tuple[str, float, float, float, float]],
                names: list[str], splits: dict[str, dict]) -> None:
    """Cut the ``rows x cols`` tiles of ``crop`` and add them, and the boxes inside them, to ``splits``."""
    image = Image.open(source / f"{crop}.png").convert("RGB")
    for row in rows:
        for col in cols:
            split = "val" if row in VAL_ROWS.get(crop, ()) else "train"
            coco = splits[split]
            image_id = len(coco["images"]) + 1
            file_name = f"{crop}_r{row}c{col}.jpg"
            left, top = col * TILE, row * TILE
            (OUT / "images" / split).mkdir(parents=True, exist_ok=True)
            image.crop((left, top, left + TILE, top + TILE)).save(OUT / "images" / split / file_name,
                                                                  quality=JPEG_QUALITY)
            coco["images"].append({"id": image_id, "file_name": file_name, "width": TILE, "height": TILE})
            for name, x1, y1, x2, y2 in boxes:
                cx1, cy1 = max(x1 - left, 0.0), max(y1 - top, 0.0)
                cx2, cy2 = min(x2 - left, float(TILE)), min(y2 - top, float(TILE))
                inside = max(cx2 - cx1, 0.0) * max(cy2 - cy1, 0.0)
                if inside < MIN_INSIDE * (x2 - x1) * (y2 - y1):
                    continue
                coco["annotations"].append({
                    "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": names.index(name) + 1,
                    "bbox": [cx1, cy1, cx2 - cx1, cy2 - cy1], "area": inside, "iscrowd": 0})


if __name__ == "__main__":
    main()
