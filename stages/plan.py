"""`libra plan`: resolve params.yaml into one experiment config per ablation run (the DVC plan stage).

Writes runs/plan/<detector>/<combination>/seed<k>.yaml for every run the ablation design selects and
runs/plan/ablation.yaml, the design and its runs. `libra dispatch` identifies a run by its key (its plan
file with the digests of its data, weights and executed code: pipeline/plan/runplan.py compute_run_key),
so a parameter change retrains exactly the runs whose resolved config changed.

With --power it plans nothing: it reads a finished ablation's report (reports/metrics.json) and prints,
per claim, the minimum detectable effect of that design and how many seeds a target MDE needs with
as many validation images as it had, or with the counts given by --images.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the DVC parameters file (default: %(default)s)")
    parser.add_argument("--configs", type=Path, default=Path("configs"), help="directory of the detector configs (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/plan"),
                        help="where the plan files go; replaces only an empty folder or a plan libra plan wrote (default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="replace --out even if libra plan did not write it (deletes what it holds)")
    power = parser.add_argument_group("power (plans nothing: what a finished ablation's design can detect)")
    power.add_argument("--power", action="store_true",
                       help="print per claim the MDE of the finished ablation and the seeds a target MDE needs")
    power.add_argument("--report", type=Path, default=Path("reports/metrics.json"),
                       help="the finished ablation's report metrics (written by `libra report`) (default: %(default)s)")
    power.add_argument("--target-mde", type=float, default=None,
                       help="target minimum detectable effect in AP points (default: params report.target_mde)")
    power.add_argument("--images", type=float, nargs="+", default=None,
                       help="validation set sizes to plan for (default: as measured, 4x and 16x; inf allowed)")


def print_power(args: argparse.Namespace) -> None:
    import json

    from detection.config import ConfigError
    from pipeline.plan.params import load_params
    from pipeline.report.power import power_plan, read_splits

    settings = load_params(args.params).report
    try:
        metrics = json.loads(args.report.read_text())
        splits = read_splits(metrics)
    except OSError as exc:
        raise ConfigError(f"{args.report}: {exc.strerror}; run the ablation first (`dvc repro`)") from None
    except ValueError as exc:
        raise ConfigError(f"{args.report}: {exc}") from None
    if not splits:
        raise ConfigError(f"{args.report}: no claim was tested (the design holds no pair of combinations a claim "
                          "compares)")
    target = args.target_mde if args.target_mde is not None else settings.target_mde
    if target <= 0:
        raise ConfigError(f"--target-mde must be > 0 AP points, got {target}")
    measured = next(iter(splits.values())).images
    images = args.images or [measured, 4 * measured, 16 * measured]
    rows = power_plan(splits, target, settings.confidence, settings.power, images)
    seeds = next(iter(splits.values())).seeds
    print(f"{args.report}: {seeds} seeds, {measured} validation images; seeds for MDE <= {target:g} AP "
          f"({round(100 * settings.power)}% power, two-sided {round(100 * settings.confidence)}%; -: unreachable "
          "with that many images)")
    header = f"{'claim':28s} {'MDE now':>8s}" + "".join(f" {f'{n:g} img':>10s}" for n in images)
    print(header)
    for row in rows:
        needed = "".join(f" {'-' if s is None else s:>10}" for s in row["seeds_needed"].values())
        print(f"{row['claim']:28s} {row['mde']:8.2f}{needed}")
    worst = {n: [r["seeds_needed"][n] for r in rows] for n in images}
    for n, counts in worst.items():
        print(f"every claim with {n:g} images: "
              + ("unreachable" if None in counts else f"{max(counts)} seeds"))


def run(args: argparse.Namespace) -> None:
    if args.power:
        print_power(args)
        return
    from pipeline.plan.ablation import plan_ablation, write_plan
    from pipeline.plan.params import load_params

    ablation = plan_ablation(load_params(args.params), args.configs)
    write_plan(ablation, args.out, args.force)
    chosen = ", ".join(f"{d}: {len(a.combinations)} combinations" for d, a in ablation.detectors.items())
    print(f"planned {len(ablation.runs)} runs (profile {ablation.profile}, design {ablation.design}, "
          f"seeds {list(ablation.seeds)}; {chosen}) in {args.out}")
