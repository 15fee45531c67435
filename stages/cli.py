"""The `libra` command: one sub-command per pipeline stage."""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from stages import evaluate, prepare, train

STAGES: dict[str, ModuleType] = {"prepare": prepare, "train": train, "evaluate": evaluate}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="libra", description="Balanced-learning ablations for object detectors.")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="{" + ",".join(STAGES) + "}")
    for name, module in STAGES.items():
        stage_parser = sub.add_parser(name, help=module.__doc__.split(":", 1)[1].strip(), description=module.__doc__)
        module.add_arguments(stage_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        STAGES[args.stage].run(args)
    except (ValueError, FileExistsError, RuntimeError) as exc:
        print(f"libra {args.stage}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
