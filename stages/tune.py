"""`libra tune`: run an Optuna study over a component's knobs (resumable, parallel, pruned, tracked in MLflow).

Studies (configs/studies/<name>.yaml): balanced_l1 (alpha, gamma; Faster R-CNN), sampler (IoU-balanced
sampling num_bins, floor_thr, floor_fraction; Faster R-CNN), iou_balanced (eta, lambda; RetinaNet).
The objective is the validation AP of the chosen profile at the last epoch, pruned per epoch by a
median pruner. --n-trials is the study's target total of finished (complete + pruned) trials:
rerunning the same command resumes an interrupted study and stops at that total; failed trials
(a killed worker's included) are replaced.

Outputs in --out (default reports/tuning/<study>): best_overrides.yaml, summary.json, trials.csv,
history.png, importances.png, contour.png, intermediate.png; every trial is a nested MLflow run under
the study's parent run (experiment tune-<study name>). Train with the best values:

  libra train --config configs/faster_rcnn_tiny.yaml \\
      $(sed -n 's/^- /--set /p' reports/tuning/balanced_l1/best_overrides.yaml) --out runs/best_balanced_l1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.tuning import TuneOptions, run_tuning
from pipeline.tuning.profiles import DEFAULT_PROFILE


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--study", required=True, metavar="NAME",
                        help="study to run: balanced_l1, sampler or iou_balanced (a file NAME.yaml in --studies-dir)")
    parser.add_argument("--profile", default=DEFAULT_PROFILE, metavar="P",
                        help="training budget per trial, a profile of params.yaml resolved as the ablation does: "
                             "smoke (seconds, for tests), tiny (default; CPU, built-in data) or coco_1x (paper "
                             "recipe on COCO); every trial trains on one device")
    parser.add_argument("--n-trials", type=_count, default=None, metavar="N",
                        help="target total of finished (complete + pruned) trials in the study, over all runs and "
                             "workers (default: n_trials of the study file); a finished study only rewrites reports")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help="where the study lives: sqlite:///PATH (default for one worker: ./optuna.db), "
                             "journal:PATH (default with --workers > 1: ./optuna.journal), or any SQLAlchemy URL "
                             "such as postgresql://user:pass@host/db for workers on several hosts "
                             "(env LIBRA_OPTUNA_STORAGE also sets it); relative paths are made absolute")
    parser.add_argument("--workers", type=_count, default=1, metavar="N",
                        help="worker processes on this host, each running trials of the same study (default 1: "
                             "in this process); CPU workers share the cores, GPU workers get one GPU each")
    parser.add_argument("--study-name", default=None, metavar="NAME",
                        help="name of the study in the storage (default: <study>-<profile>); the MLflow "
                             "experiment is tune-<study name>")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every trial, e.g. data.root=/data/synthetic or "
                             "trainer.accelerator=gpu (repeatable; may not set a searched parameter)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="report directory (default: reports/tuning/<study>)")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/tuning"), metavar="DIR",
                        help="trial run directories: DIR/<study name>-<id>/trial_NNNNN with config.yaml and "
                             "metrics.csv (default: runs/tuning)")
    parser.add_argument("--studies-dir", type=Path, default=Path("configs/studies"), metavar="DIR",
                        help="where study files are looked up (default: configs/studies)")
    parser.add_argument("--seed", type=int, default=None,
                        help="sampler seed (default: sampler.seed of the study file); trial n uses seed + n")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each trial's Lightning checkpoints (default: deleted when the trial ends)")
    parser.add_argument("--max-failures", type=_count, default=3, metavar="N",
                        help="stop a worker after N failed trials in a row (default 3)")
    parser.add_argument("--report-only", action="store_true",
                        help="run no trial: rewrite the reports of an existing study")
    parser.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                        help="seconds to wait for a database server before giving up (default 10)")
    parser.add_argument("--worker-process", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> None:
    summary = run_tuning(TuneOptions(
        study=args.study, profile=args.profile, n_trials=args.n_trials, storage=args.storage, workers=args.workers,
        study_name=args.study_name, overrides=list(args.overrides), out=args.out, work_dir=args.work_dir,
        studies_dir=args.studies_dir, seed=args.seed, keep_checkpoints=args.keep_checkpoints,
        max_failures=args.max_failures, report_only=args.report_only, connect_timeout=args.connect_timeout,
        worker_process=args.worker_process))
    if not args.worker_process:
        print(json.dumps({k: summary[k] for k in ("study_name", "counts", "best_value", "best_params")}))
