"""`libra prepare`: write the built-in synthetic set, or validate a COCO-format set, before training.

With --params (the DVC prepare stage) the data settings come from params.yaml (profile + data)
and a manifest with the set's size and digest is written for the stages that train on it.
Either way it prints the set's statistics (pipeline/own_data/statistics.py) and warns, naming the fix,
about what would spoil an ablation on it: too few validation images for the report's intervals, a
class missing from a split, objects smaller than a detector's smallest anchor.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="write the built-in synthetic COCO set here "
                        "(images/{train,val}/*.png + annotations/instances_{train,val}.json); replaces only an "
                        "empty directory or a set written by libra prepare")
    parser.add_argument("--force", action="store_true",
                        help="replace --out even if libra prepare did not write it (deletes what it holds)")
    parser.add_argument("--seed", type=_at_least(0), default=None,
                        help="synthetic set seed (default: data.seed of the config, 0)")
    parser.add_argument("--num-train", type=_at_least(1), default=None,
                        help="synthetic training images (default: data.num_train)")
    parser.add_argument("--num-val", type=_at_least(1), default=None,
                        help="synthetic validation images (default: data.num_val)")
    parser.add_argument("--image-size", type=_at_least(32), default=None,
                        help="synthetic image side in pixels, >= 32 (default: data.image_size)")
    parser.add_argument("--config", type=Path, help="experiment YAML; with data.source=coco, validate that set instead")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. data.max_images=100 (repeatable)")
    parser.add_argument("--params", type=Path, default=None,
                        help="take the data settings from this params.yaml (its profile and data sections) "
                             "instead of --config/--set, as the DVC prepare stage does")
    parser.add_argument("--manifest", type=Path, default=None,
                        help="also write a JSON manifest of the set (source, sizes, digest) here")
    parser.add_argument("--statistics", type=Path, default=None,
                        help="also write the set's statistics and warnings as JSON here")


def run(args: argparse.Namespace) -> None:
    from detection.config import load_config
    from detection.data import write_synthetic_coco
    from detection.engine.splits import load_splits
    from detection.io import write_json_atomic
    from pipeline.own_data.statistics import data_statistics

    if args.params is not None:
        from detection.io import write_text_atomic
        from pipeline.plan.ablation import resolve_config
        from pipeline.plan.params import DETECTOR_COMPONENTS, SYNTHETIC_ROOT, load_params

        params = load_params(args.params)
        configs = {detector: resolve_config(params, detector, (), 0) for detector in DETECTOR_COMPONENTS}
        report = params.report
        data = next(iter(configs.values())).data
        if data.source != "synthetic":  # the DVC stage always has the built-in set's directory as an output
            write_text_atomic(SYNTHETIC_ROOT / "NOT_USED.txt", f"data.source={data.source}: the ablation trains on "
                              f"{data.root}; the built-in synthetic set is not written.\n")
    else:
        from pipeline.plan.params import ReportConfig

        config = load_config(args.config, args.overrides)
        configs, report, data = {config.model.detector: config}, ReportConfig(), config.data
    summary = None
    if data.source == "synthetic":
        out = args.out or data.root
        summary = write_synthetic_coco(
            out,
            seed=data.seed if args.seed is None else args.seed,
            num_train=data.num_train if args.num_train is None else args.num_train,
            num_val=data.num_val if args.num_val is None else args.num_val,
            image_size=data.image_size if args.image_size is None else args.image_size,
            force=args.force,
        )
        print(f"wrote the synthetic set to {out}: {json.dumps(summary)}")
        if args.out is not None:
            data = data.model_copy(update={"root": args.out})
    train, val = load_splits(data)
    print(f"valid: train {len(train.image_ids)} images / {train.num_annotations} boxes, "
          f"val {len(val.image_ids)} images / {val.num_annotations} boxes, {len(train.categories)} categories")
    statistics = data_statistics(train, val, configs, report.min_val_images)
    print("\n".join(["statistics:", *statistics.lines()]))
    for warning in statistics.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.statistics is not None:
        write_json_atomic(args.statistics, statistics.to_json())
        print(f"wrote {args.statistics}")
    if args.manifest is not None:
        from pipeline.plan.ablation import file_digest
        from detection.io import write_text_atomic

        manifest = {
            "source": data.source,
            "root": data.root.as_posix(),
            "max_images": data.max_images,
            "splits": {name: {"annotation_file": split.annotation_file.as_posix(), "images": len(split.image_ids),
                              "annotations": split.num_annotations}
                       for name, split in (("train", train), ("val", val))},
            "categories": {str(k): v for k, v in sorted(train.categories.items())},
            # the synthetic writer hashes every file; for a COCO set the annotation files stand for it
            "digest": summary["digest"] if summary else file_digest([train.annotation_file, val.annotation_file]),
            "digest_covers": "every file of the set" if summary else "the train and val annotation files",
        }
        if summary:
            manifest["synthetic"] = {k: summary[k] for k in ("seed", "image_size")}
        write_text_atomic(args.manifest, json.dumps(manifest, indent=1) + "\n")
        print(f"wrote {args.manifest}")
