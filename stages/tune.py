"""`libra tune`: an Optuna study of a component's knobs; a tuned value is adopted only if it beats the default on fresh seeds.

Studies (configs/studies/<name>.yaml): balanced_l1 (alpha, gamma; Faster R-CNN), sampler (IoU-balanced
sampling num_bins, floor_thr, floor_fraction; Faster R-CNN), iou_balanced (eta, lambda; RetinaNet).
Each trial trains at --trial-seeds paired seeds (same data order and initial weights as the default
configuration at that seed, which is trained once per seed per study) and scores the mean paired
difference of its validation AP to the default's; pruned per epoch by a median pruner on that
difference. --n-trials is the study's target total of finished (complete + pruned) trials: rerunning
the same command resumes an interrupted study and stops at that total; failed trials (a killed
worker's included) are replaced. When the study reaches it, the top --validate-top trials and the
default are trained again at --validate-seeds fresh seeds and compared on the whole validation set
with the ablation report's statistics (two-level bootstrap, guards, MDE).

Outputs in --out (default reports/tuning/<study>): summary.json (with the validation, the decision and
the compute spent), trials.csv, history.png, importances.png, contour.png, intermediate.png,
validation.png, and best_overrides.yaml only when a trial beat the default on fresh seeds; every trial
is a nested MLflow run under the study's parent run (experiment tune-<study name>). Train with it:

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
                        help="run directories, with config.yaml and metrics.csv: DIR/<study name>-<id>/"
                             "trial_NNNNN/seed<k>, .../default/seed<k> and .../validation/{default,trial_NNNNN}/"
                             "seed<k> (default: runs/tuning)")
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
    parser.add_argument("--trial-seeds", type=_count, default=TuneOptions.trial_seeds, metavar="N",
                        help="paired seeds each trial trains at, 0..N-1 (default %(default)s); the default "
                             "configuration is trained once per seed per study, and a trial's value is its mean "
                             "val AP difference to it; a study keeps the N it began with")
    parser.add_argument("--validate-top", type=int, default=TuneOptions.validate_top, metavar="K",
                        help="when the study reaches its target, train its K best trials and the default again at "
                             "fresh seeds and compare them on the whole validation set (default %(default)s; 0: no "
                             "validation, and no best_overrides.yaml)")
    parser.add_argument("--validate-seeds", type=_count, default=TuneOptions.validate_seeds, metavar="N",
                        help="fresh seeds of that validation, the N after the search's (default %(default)s; at "
                             "least 2)")
    parser.add_argument("--force", action="store_true",
                        help="replace or delete a best_overrides.yaml in --out that libra tune did not write "
                             "(default: refused, nothing deleted)")
    parser.add_argument("--worker-process", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> None:
    summary = run_tuning(TuneOptions(
        study=args.study, profile=args.profile, n_trials=args.n_trials, storage=args.storage, workers=args.workers,
        study_name=args.study_name, overrides=list(args.overrides), out=args.out, work_dir=args.work_dir,
        studies_dir=args.studies_dir, seed=args.seed, keep_checkpoints=args.keep_checkpoints,
        max_failures=args.max_failures, report_only=args.report_only, connect_timeout=args.connect_timeout,
        trial_seeds=args.trial_seeds, validate_top=args.validate_top, validate_seeds=args.validate_seeds,
        force=args.force, worker_process=args.worker_process))
    if not args.worker_process:
        print(json.dumps({k: summary[k] for k in ("study_name", "counts", "best_value", "best_params", "decision")}))
