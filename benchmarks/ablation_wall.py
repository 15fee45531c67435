"""Benchmark: wall time of an ablation's runs one after another vs through the local executor.

Sequential: `libra dispatch --executor inline`, one run at a time with every core's torch threads.
Parallel: `libra dispatch --executor local --jobs J`, J runs at once with cores / J threads each, each
kept to cores of its own. The threads are the executors' own choice (no run config sets them). Both
train and evaluate the same runs, the design's first N of each detector, alternating detectors (profile
--profile, data and pre-trained backbone prepared once), into their own run directories. Run it on an
otherwise idle machine. Prints human-readable lines, then one JSON object on the last line.

    python benchmarks/ablation_wall.py --runs 2                  # tiny profile: 4 runs per mode
    python benchmarks/ablation_wall.py --runs 1 --profile smoke  # a quick check of the benchmark itself
"""

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from detection.config import read_yaml
from pipeline.plan.params import parse_params
from pipeline.plan.ablation import Ablation, plan_ablation, write_plan
from pipeline.dispatch import ExecutionSettings, dispatch
from pipeline.dispatch.processes import cores
from detection.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]


def prepare(workdir: Path, profile: str) -> dict:
    """params.yaml for ``profile`` in ``workdir``, its data set and pre-trained backbone."""
    params = read_yaml(ROOT / "params.yaml")
    params["profile"] = profile
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (workdir / "configs").symlink_to(ROOT / "configs")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for stage in (["prepare", "--params", "params.yaml", "--manifest", "data/manifest.json"],
                  ["pretrain", "--params", "params.yaml", "--out", "data/pretrained/tiny_backbone.pt"]):
        subprocess.run([sys.executable, "-m", "stages.cli", *stage], cwd=workdir, env=env, check=True,
                       stdout=subprocess.DEVNULL)
    return params


def timed_dispatch(workdir: Path, ablation: Ablation, name: str, settings: ExecutionSettings) -> float:
    """Seconds to train and evaluate ``ablation``'s runs in a fresh root ``workdir/name``."""
    root = workdir / name
    root.mkdir()
    (root / "data").symlink_to(workdir / "data")
    write_plan(ablation, root / "runs" / "plan")
    start = time.perf_counter()
    outcome = dispatch(root / "runs/plan", root / "data/manifest.json", settings, root / "runs/index.json",
                       root / "runs/curves.csv", root=root, say=lambda line: print(f"  {name}: {line}", flush=True))
    seconds = time.perf_counter() - start
    if outcome.exit_code:
        logs = RunDir(root / "runs/*/*/*").dispatch_log()
        raise SystemExit(f"{name}: runs did not finish: {outcome.unfinished}; see {logs}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2,
                        help="runs of each detector to train per mode, the design's first ones (default: %(default)s)")
    parser.add_argument("--profile", default="tiny",
                        help="profile of params.yaml (tiny: the default ablation) (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once with the local executor (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to work, a new directory that is kept (default: a temporary one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ablation_wall.") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=args.workdir is None)
        params = prepare(workdir, args.profile)
        full = plan_ablation(parse_params(params), workdir / "configs")
        per_detector = [[r for r in full.runs if r.detector == d][:args.runs] for d in full.detectors]
        chosen = tuple(r for group in itertools.zip_longest(*per_detector) for r in group if r is not None)
        ablation = Ablation(full.profile, full.design, full.seeds, full.detectors, chosen)
        n = len(ablation.runs)
        print(f"{n} runs of profile {args.profile} ({', '.join(r.name for r in ablation.runs)}); {cores()} cores")
        job_dir = workdir / "jobs"
        sequential = timed_dispatch(workdir, ablation, "sequential", ExecutionSettings(executor="inline", job_dir=job_dir))
        threads = max(1, cores() // args.jobs)  # what the local executor gives each job
        parallel = timed_dispatch(workdir, ablation, "parallel",
                                  ExecutionSettings(executor="local", jobs=args.jobs, job_dir=job_dir))
    print(f"sequential (1 x {cores()} threads): {sequential:.0f} s, {sequential / n:.0f} s per run")
    print(f"local ({args.jobs} x {threads} threads): {parallel:.0f} s, {parallel / n:.0f} s per run")
    print(f"sequential / local: {sequential / parallel:.2f}")
    print(json.dumps({"runs": n, "profile": args.profile, "cores": cores(), "jobs": args.jobs,
                      "threads_per_job": threads, "sequential_s": round(sequential, 1),
                      "local_s": round(parallel, 1), "ratio": round(sequential / parallel, 3)}))


if __name__ == "__main__":
    main()
