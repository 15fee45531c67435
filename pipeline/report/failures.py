"""Runs that `libra dispatch` could not finish, as the report shows them (from runs/index.json)."""

from __future__ import annotations

import json
from pathlib import Path

UNFINISHED = ("failed", "stopped")


def read_failures(index: Path) -> dict[str, str]:
    """Run name -> reason, for every run ``index`` (written by `libra dispatch`) records as failed or
    stopped; empty when there is no index."""
    if not Path(index).exists():
        return {}
    try:
        runs = json.loads(Path(index).read_text())["runs"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{index}: not a run index written by `libra dispatch` ({exc!r}); "
                         "rerun `libra dispatch` or delete the file") from None
    return {name: entry.get("reason") or entry["status"] for name, entry in runs.items()
            if entry.get("status") in UNFINISHED}


def failures_markdown(failures: dict[str, str]) -> list[str]:
    """A section listing each unfinished run with its reason (its results are missing from the tables)."""
    if not failures:
        return []
    rows = [f"| {name} | failed | {reason.replace('|', '/')} |" for name, reason in failures.items()]
    return ["## Failed runs", "",
            (f"{len(failures)} planned run(s) did not finish, so the tables and figures leave them out; "
             "rerun `dvc repro` (or `libra dispatch`) to retry them."), "",
            "| run | status | reason |", "|---|---|---|", *rows, ""]
