"""The `libra` command: one sub-command per pipeline stage.

Stage modules are imported only when their sub-command runs (their one-line help is read from the
module docstring without importing it), so a cheap stage, such as `libra plan` or a `libra
dispatch` that reuses every run, does not pay for importing torch, Lightning or Optuna.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import logging
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

STAGES: dict[str, str] = {
    "prepare": "stages.prepare",
    "fit-profile": "stages.fit_profile",
    "pretrain": "stages.pretrain",
    "plan": "stages.plan",
    "train": "stages.train",
    "evaluate": "stages.evaluate",
    "run": "stages.run",
    "dispatch": "stages.dispatch",
    "report": "stages.report",
    "track": "stages.track",
    "tune": "stages.tune",
    "import-mmdet": "stages.import_mmdet",
}
"""Sub-command -> module with ``add_arguments(parser)`` and ``run(args)``."""

LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
"""The loggers Lightning's ``rank_zero_info`` writes to (its advertising tips among them)."""
LIGHTNING_DROPPED_INFO = ("💡 Tip:", "GPU available:", "TPU available:", "HPU available:", "IPU available:")
"""Starts of the ``rank_zero_info`` lines dropped: advertising for litlogger / litmodels, and the accelerators
the machine has (a run prints the device it trains on instead: :func:`detection.engine.train.device_line`)."""
LIGHTNING_NOT_EMPTY_WARNINGS = (r"Experiment logs directory .* exists and is not empty",
                                r"Checkpoint directory .* exists and is not empty")
"""Lightning on a run directory it finds non-empty: expected when a run resumes (its rows and
checkpoints are kept, see ``detection.engine.train``)."""


class _DropLightningInfo(logging.Filter):
    """Drops the Lightning records of :data:`LIGHTNING_DROPPED_INFO`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LIGHTNING_DROPPED_INFO)


def quiet_third_party_output() -> None:
    """Keep the console to what concerns the run: no Lightning tips or accelerator inventory, no deprecation warnings raised in
    third-party code, no "previous log files will be deleted" or "checkpoint directory is not empty" on a
    run directory, no MLflow or alembic INFO lines.

    Warnings of this project (modules ``detection``, ``pipeline``, ``stages``) and every error are kept.
    """
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(?!detection\b|pipeline\b|stages\b)")
    for message in LIGHTNING_NOT_EMPTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    for name in LIGHTNING_INFO_LOGGERS:
        logging.getLogger(name).addFilter(_DropLightningInfo())
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("alembic").setLevel(logging.WARNING)


def stage_module(name: str) -> ModuleType:
    return importlib.import_module(STAGES[name])


def _docstring(name: str) -> str:
    spec = importlib.util.find_spec(STAGES[name])
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    """The parser; the options of ``stage`` (or of every stage, if None) are added by importing it."""
    parser = argparse.ArgumentParser(prog="libra", description="Balanced-learning ablations for object detectors.")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="{" + ",".join(STAGES) + "}")
    for name in STAGES:
        doc = _docstring(name)
        summary = doc.splitlines()[0].split(":", 1)[1].strip() if doc else ""
        stage_parser = sub.add_parser(name, help=summary, description=doc)
        if stage is None or stage == name:
            stage_module(name).add_arguments(stage_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    quiet_third_party_output()
    args = build_parser(chosen if chosen in STAGES else None).parse_args(argv)
    try:
        stage_module(args.stage).run(args)
    except (ValueError, FileExistsError, RuntimeError) as exc:
        print(f"libra {args.stage}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    except OSError as exc:  # read-only, full or missing target, a path through a file: the path and the reason
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"libra {args.stage}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"libra {args.stage}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
