"""`libra track`: log the ablation to MLflow, a parent run per ablation and a child run per training run.

The parent holds what `libra report` wrote; a child its run directory's files and what the report drew
and measured for it (figures, IoU distributions).

Store: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db (the main repository's, also from a
`dvc exp` temporary copy). Re-running reuses unchanged runs and replaces changed ones; see
pipeline/tracking.py. Writes a JSON record of the parent and child run ids (--out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="parameters file (mlflow.experiment, and the ablation's parameters) (default: %(default)s)")
    parser.add_argument("--plan", type=Path, default=Path("runs/plan"), help="plan directory written by `libra plan` (default: %(default)s)")
    parser.add_argument("--manifest", type=Path, default=Path("data/manifest.json"),
                        help="data manifest written by `libra prepare --manifest` (its digest tags the runs) (default: %(default)s)")
    parser.add_argument("--report", type=Path, default=Path("reports"),
                        help="report directory written by `libra report` (logged as it is, nothing is recomputed) (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None,
                        help="record of the logged runs (default: mlflow.json in the --report directory)")


def run(args: argparse.Namespace) -> None:
    from detection.io import write_json_atomic
    from pipeline.plan.params import load_params
    from pipeline.report.report_dir import ReportDir
    from pipeline.tracking.ablation import log_ablation

    params = load_params(args.params)
    experiment = params.mlflow.experiment
    manifest = json.loads(args.manifest.read_text())
    record = log_ablation(args.plan, args.report, manifest, params, experiment)
    write_json_atomic(args.out or ReportDir(args.report).tracking_record, record)
    actions = [r["action"] for r in record["runs"].values()]
    counts = ", ".join(f"{actions.count(a)} {a}" for a in ("created", "replaced", "reused") if a in actions)
    print(f"MLflow {record['tracking_uri']}, experiment {experiment!r}: parent run {record['parent_run_id']} "
          f"({'created' if record['parent_created'] else 'reused'}), child runs: {counts}")
