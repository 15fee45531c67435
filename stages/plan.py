"""`libra plan`: resolve params.yaml into one experiment config per ablation run (the DVC plan stage).

Writes runs/plan/<detector>/<combination>/seed<k>.yaml for every run the ablation design selects and
runs/plan/ablation.yaml, the design and its runs. `libra dispatch` identifies a run by its plan
file (with the data and weights digests), so a parameter change retrains exactly the runs whose
resolved config changed.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the DVC parameters file")
    parser.add_argument("--configs", type=Path, default=Path("configs"), help="directory of the detector configs")
    parser.add_argument("--out", type=Path, default=Path("runs/plan"), help="where the plan files go (replaced)")


def run(args: argparse.Namespace) -> None:
    from pipeline.ablation import plan_ablation, read_params, write_plan

    ablation = plan_ablation(read_params(args.params), args.configs)
    write_plan(ablation, args.out)
    chosen = ", ".join(f"{d}: {len(a.combinations)} combinations" for d, a in ablation.detectors.items())
    print(f"planned {len(ablation.runs)} runs (profile {ablation.profile}, design {ablation.design}, "
          f"seeds {list(ablation.seeds)}; {chosen}) in {args.out}")
