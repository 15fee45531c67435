"""`libra plan`: resolve params.yaml into one experiment config per ablation run (the DVC plan stage).

Writes runs/plan/<detector>/<combo>/seed<k>.yaml for every entry of the DVC train matrix (the
entries the ablation design does not select are marked `selected: false` and are skipped) and
runs/plan/ablation.yaml, the design and its selected runs. Each train stage depends on its own
plan file only, so a parameter change retrains exactly the runs whose resolved config changed.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the DVC parameters file")
    parser.add_argument("--configs", type=Path, default=Path("configs"), help="directory of the detector configs")
    parser.add_argument("--out", type=Path, default=Path("runs/plan"), help="where the plan files go (replaced)")


def run(args: argparse.Namespace) -> None:
    import yaml

    from pipeline.ablation import plan_ablation, plan_path, read_params
    from pipeline.io import write_text_atomic
    from pipeline.runplan import write_run_plan

    ablation = plan_ablation(read_params(args.params), args.configs)
    staging = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    for plan in ablation.runs:
        write_run_plan(plan, plan_path(plan.detector, plan.combo, plan.seed, staging))
    write_text_atomic(staging / "ablation.yaml", yaml.safe_dump(ablation.summary(), sort_keys=False))
    shutil.rmtree(args.out, ignore_errors=True)
    staging.rename(args.out)
    chosen = ", ".join(f"{d}: {len(a.selected)} of {len(a.combos)}" for d, a in ablation.detectors.items())
    print(f"planned {len(ablation.runs)} matrix runs, {len(ablation.selected_runs)} to train "
          f"(profile {ablation.profile}, design {ablation.design}, seeds {list(ablation.seeds)}; {chosen}) in {args.out}")
