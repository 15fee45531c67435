"""`libra report`: the ablation report: AP tables with bootstrap intervals and figures (the DVC report stage).

Reads the plan (runs/plan/ablation.yaml) and every planned run's metrics.json, detections.json,
metrics.csv and checkpoint, and writes <out>/ablation.md, ablation.csv, metrics.json, figures/*.png and
each run's figures, runs/<detector>/<combination>/seed<k>/*.png (what `libra track` logs on its MLflow run).
Runs that runs/index.json records as failed are listed with their reason instead (DVC runs this
stage only after every run finished; run `libra report` by hand to see a partial ablation).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="parameters file (its report section: pipeline/plan/params.py ReportConfig) (default: %(default)s)")
    parser.add_argument("--plan", type=Path, default=Path("runs/plan"), help="plan directory written by `libra plan` (default: %(default)s)")
    parser.add_argument("--manifest", type=Path, default=Path("data/manifest.json"),
                        help="data manifest written by `libra prepare --manifest` (optional) (default: %(default)s)")
    parser.add_argument("--index", type=Path, default=Path("runs/index.json"),
                        help="run index written by `libra dispatch`: its failed runs are listed, not reported (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="report directory (default: %(default)s)")


def run(args: argparse.Namespace) -> None:
    from pipeline.plan.params import load_params
    from pipeline.report.build import write_report
    from pipeline.report.report_dir import ReportDir

    settings = load_params(args.params).report
    manifest = json.loads(args.manifest.read_text()) if args.manifest.exists() else None
    metrics = write_report(args.plan, args.out, settings, manifest, index=args.index)
    print("\n".join(summary_lines(metrics)))
    report = ReportDir(args.out)
    print(f"wrote {report.markdown}, {report.table}, {report.figures} and {report.runs}")


def summary_lines(metrics: dict) -> list[str]:
    """The console summary of a report's ``metrics.json``: AP and ΔAP per combination, then each claim
    (with one seed a claim has no seed part of its standard error; a claim not testable has its reason)."""
    metrics = dict(metrics)
    claims = metrics.pop("claims")
    lines = []
    for detector, combinations in metrics.items():
        for combination, values in combinations.items():
            delta = (f", ΔAP {values['dAP']:+.1f} [{values.get('dAP_ci_low', float('nan')):+.1f}, "
                     f"{values.get('dAP_ci_high', float('nan')):+.1f}]") if "dAP" in values else ""
            lines.append(f"{detector:12s} {combination:24s} AP {values['AP']:5.1f}{delta}")
    for key, claim in claims.items():
        if "delta" not in claim:
            lines.append(f"{key:28s} {claim['verdict']}: {claim['reason']}")
            continue
        seed_part = f"{claim['se_seed']:.2f}" if "se_seed" in claim else "unknown, one seed"
        reason = f" ({claim['reason']})" if "reason" in claim else ""
        lines.append(f"{key:28s} {claim['delta']:+.2f} [{claim['ci_low']:+.2f}, {claim['ci_high']:+.2f}] "
                     f"{claim['verdict']:13s} MDE {claim['mde']:.2f} (SE seeds {seed_part}, images "
                     f"{claim['se_image']:.2f}){reason}")
    return lines
