"""`libra run`: train one planned run, then evaluate it, in one process (what `libra dispatch` runs per run).

The same metrics as `libra train --plan P --out RUN` followed by `libra evaluate --run RUN --device D`,
with torch and Lightning imported once, the trained module evaluated in memory and each data split
validated once. Under DDP every rank trains and rank 0 alone evaluates; the other
ranks exit after training. SIGTERM or SIGINT during training stops it after the current step, saves
checkpoints/last.ckpt and exits with 128 + the signal number (143, 130); --resume continues the run.
Exits 0 only when the run trained its full schedule and was evaluated.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan", type=Path, required=True,
                        help="run plan written by `libra plan` (runs/plan/<detector>/<combination>/seed<k>.yaml): "
                             "its resolved config is trained")
    parser.add_argument("--out", type=Path, required=True,
                        help="run directory: config.yaml, checkpoints/{last,best}.ckpt, metrics.csv, "
                             "epoch_curves.csv, then metrics.json and detections.json")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from checkpoints/last.ckpt (same config required); "
                             "a run that trained its full schedule is only evaluated")
    parser.add_argument("--device", default="auto",
                        help="torch device of the evaluation (training follows the plan's trainer settings), "
                             "e.g. cpu or cuda; auto (default): cuda if available, else cpu")


def run(args: argparse.Namespace) -> None:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from detection.config import validate_config
    from detection.engine.evaluate import evaluate_run, evaluate_trained, resolve_device
    from detection.engine.train import TrainingStopped, train
    from detection.run_dir import RunDir
    from pipeline.plan.runplan import EVALUATION_STARTED, read_run_plan

    cfg = validate_config(read_run_plan(args.plan).config, str(args.plan))
    try:
        trained = train(cfg, args.out, resume=args.resume)
    except TrainingStopped as exc:
        print(f"libra run: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    if rank_zero_only.rank != 0:  # Lightning's global rank of this process
        return
    device = resolve_device(args.device)
    print(f"{EVALUATION_STARTED} {args.out} on {device}", flush=True)
    if trained is None:  # resumed a run that had trained its whole schedule: its checkpoint is evaluated
        metrics = evaluate_run(args.out, "last", None, device)
    else:
        metrics = evaluate_trained(trained, args.out, device)
    print(f"bbox {metrics['bbox']}, {metrics['num_detections']} detections; "
          f"wrote {RunDir(args.out).metrics} and {RunDir(args.out).detections}")
