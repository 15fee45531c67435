"""`libra evaluate`: COCO-evaluate a trained run on its validation split."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, required=True, help="run directory written by `libra train --out`")
    parser.add_argument("--checkpoint", default="last", choices=["last", "best"],
                        help="which checkpoint to evaluate (best: highest val AP during training) (default: %(default)s)")
    parser.add_argument("--backend", choices=["faster_coco_eval", "pycocotools"], default=None,
                        help="COCO evaluation library (default: eval.backend of the run's config)")
    parser.add_argument("--device", default="cpu",
                        help="torch device for inference, e.g. cpu or cuda; auto: cuda if available, else cpu")


def run(args: argparse.Namespace) -> None:
    from detection.engine.completion import cut_short
    from detection.engine.evaluate import evaluate_run, resolve_device
    from detection.run_dir import RunDir

    metrics = evaluate_run(args.run, args.checkpoint, args.backend, resolve_device(args.device))
    print(json.dumps({"bbox": metrics["bbox"], "detections": metrics["num_detections"]}))
    run = RunDir(args.run)
    print(f"wrote {run.metrics} and {run.detections}")
    reason = cut_short(metrics)
    if reason:
        print(f"libra evaluate: warning: {args.run} is not finished, it {reason}; {run.metrics} says "
              f"\"complete\": false. Continue it with `libra train --resume`, then evaluate again", file=sys.stderr)
