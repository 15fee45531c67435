"""`libra train`: fit one detector from a YAML config (or an ablation run plan) into a run directory.

SIGTERM or SIGINT stops training after the current step, saves checkpoints/last.ckpt and exits
with 128 + the signal number (143, 130); --resume continues the run. Only a run that trained its
full schedule exits 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="experiment YAML, e.g. configs/faster_rcnn_tiny.yaml")
    source.add_argument("--plan", type=Path,
                        help="run plan written by `libra plan` (runs/plan/<detector>/<combination>/seed<k>.yaml): "
                             "train its resolved config (what `libra dispatch` runs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. components.bfp.enabled=true or trainer.devices=2 (repeatable)")
    parser.add_argument("--out", type=Path, required=True,
                        help="run directory: config.yaml, checkpoints/{last,best}.ckpt, metrics.csv, "
                             "epoch_curves.csv")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from checkpoints/last.ckpt (same config required); "
                             "a run that trained its full schedule is left as it is")
    parser.add_argument("--force", action="store_true",
                        help="start a fresh run in --out even if libra did not make that directory (its config.yaml, "
                             "metrics.csv and checkpoints are overwritten, other files kept)")


def run(args: argparse.Namespace) -> None:
    from detection.config import apply_overrides, validate_config

    if args.plan is not None:
        from pipeline.plan.runplan import read_run_plan

        plan = read_run_plan(args.plan)
        cfg = validate_config(apply_overrides(plan.config, args.overrides), f"{args.plan} with overrides")
    else:
        from detection.config import load_config

        cfg = load_config(args.config, args.overrides)

    from detection.engine.train import TrainingStopped, train

    try:
        train(cfg, args.out, resume=args.resume, force=args.force)
    except TrainingStopped as exc:
        print(f"libra train: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
