"""`libra dispatch`: train and evaluate every planned ablation run through an executor (the DVC runs stage).

Reuses each run that finished with the same key (its resolved config, data, backbone weights, init_from
checkpoint and executed code: pipeline/plan/runplan.py compute_run_key), resumes each unfinished one from its last checkpoint, trains the others; a failed run does
not stop the others. Writes runs/index.json (per run: status reused/resumed/trained/failed/stopped,
reason, key, metrics) and runs/curves.csv (run, epoch, train_loss, val_AP). Exits 1 if a run failed
(rerun to retry it), 128 + the signal number if stopped by SIGTERM/SIGINT (jobs save a checkpoint).
Defaults come from the execution section of params.yaml; options given here override them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _sbatch_flag(text: str) -> tuple[str, str | bool]:
    key, sep, value = text.partition("=")
    if not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE or KEY (a flag without value), got {text!r}")
    return key, value if sep else True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan", type=Path, default=Path("runs/plan"), help="plan directory written by `libra plan`")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="parameters file (its execution section)")
    parser.add_argument("--manifest", type=Path, default=Path("data/manifest.json"),
                        help="data manifest written by `libra prepare --manifest` (its digest is part of each run's key)")
    parser.add_argument("--index", type=Path, default=Path("runs/index.json"), help="per-run status and metrics (JSON)")
    parser.add_argument("--curves", type=Path, default=Path("runs/curves.csv"), help="every run's per-epoch curves (CSV)")
    parser.add_argument("--force", action="store_true",
                        help="discard and retrain a planned run's directory even if libra dispatch did not make it")
    parser.add_argument("--executor", choices=["inline", "local", "slurm"], default=None,
                        help="inline: one run after another in this process; local: --jobs runs at once "
                             "(submitit); slurm: one sbatch job per run (submitit)")
    parser.add_argument("-j", "--jobs", type=int, default=None, help="runs at once with the local executor")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: cores / jobs; slurm: --cpus-per-task)")
    parser.add_argument("--job-dir", type=Path, default=None, help="submitit's pickles and logs (default runs/.submitit)")
    slurm = parser.add_argument_group("slurm executor")
    slurm.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's)")
    slurm.add_argument("--nodes", type=int, default=None,
                       help="nodes per run; must equal trainer.num_nodes (default: taken from it)")
    slurm.add_argument("--gpus-per-node", type=int, default=None,
                       help="GPUs per node; must equal trainer.devices (default: taken from it, 0 for accelerator cpu)")
    slurm.add_argument("--cpus-per-task", type=int, default=None,
                       help="CPUs per task, i.e. per DDP process (also its torch threads unless --threads)")
    slurm.add_argument("--mem-gb", type=float, default=None, help="memory per node")
    slurm.add_argument("--time-min", type=int, default=None, help="time limit per job; at the limit it requeues")
    slurm.add_argument("--max-timeouts", type=int, default=None, help="requeues at the time limit before a run fails")
    slurm.add_argument("--sbatch-extra", type=_sbatch_flag, action="append", default=None, metavar="KEY=VALUE",
                       help="another #SBATCH flag, e.g. account=proj or exclusive (repeatable)")


def run(args: argparse.Namespace) -> None:
    from pipeline.dispatch import dispatch, execution_settings
    from pipeline.plan.params import load_params

    slurm = {"partition": args.partition, "nodes": args.nodes, "gpus_per_node": args.gpus_per_node,
             "cpus_per_task": args.cpus_per_task, "mem_gb": args.mem_gb, "time_min": args.time_min,
             "max_timeouts": args.max_timeouts, "extra": dict(args.sbatch_extra) if args.sbatch_extra else None}
    settings = execution_settings(load_params(args.params).execution, {
        "executor": args.executor, "jobs": args.jobs, "threads": args.threads, "job_dir": args.job_dir, "slurm": slurm})
    outcome = dispatch(args.plan, args.manifest, settings, args.index, args.curves, force=args.force)
    counts = [s.status for s in outcome.statuses.values()]
    summary = ", ".join(f"{counts.count(s)} {s}" for s in ("reused", "resumed", "trained", "failed", "stopped")
                        if s in counts)
    print(f"wrote {args.index} and {args.curves}: {summary}")
    if outcome.unfinished:
        print(f"libra dispatch: {len(outcome.unfinished)} run(s) unfinished: {', '.join(outcome.unfinished)}; "
              "run `dvc repro` (or `libra dispatch`) again to retry only these", file=sys.stderr)
    if outcome.exit_code:
        raise SystemExit(outcome.exit_code)
