"""`libra prepare`: write the built-in synthetic set, or validate a COCO-format set, before training."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.config import load_config
from pipeline.data import write_synthetic_coco
from pipeline.engine.datamodule import load_splits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="write the built-in synthetic COCO set here "
                        "(images/{train,val}/*.png + annotations/instances_{train,val}.json)")
    parser.add_argument("--seed", type=int, default=None, help="synthetic set seed (default: data.seed of the config, 0)")
    parser.add_argument("--num-train", type=int, default=None, help="synthetic training images (default: data.num_train)")
    parser.add_argument("--num-val", type=int, default=None, help="synthetic validation images (default: data.num_val)")
    parser.add_argument("--image-size", type=int, default=None, help="synthetic image side in pixels (default: data.image_size)")
    parser.add_argument("--config", type=Path, help="experiment YAML; with data.source=coco, validate that set instead")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. data.max_images=100 (repeatable)")


def run(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    data = cfg.data
    if data.source == "synthetic":
        out = args.out or data.root
        summary = write_synthetic_coco(
            out,
            seed=data.seed if args.seed is None else args.seed,
            num_train=args.num_train or data.num_train,
            num_val=args.num_val or data.num_val,
            image_size=args.image_size or data.image_size,
        )
        print(f"wrote the synthetic set to {out}: {json.dumps(summary)}")
    train, val = load_splits(data if data.source == "coco" or args.out is None else data.model_copy(update={"root": args.out}))
    print(f"valid: train {len(train.image_ids)} images / {train.num_annotations} boxes, "
          f"val {len(val.image_ids)} images / {val.num_annotations} boxes, {len(train.categories)} categories")
