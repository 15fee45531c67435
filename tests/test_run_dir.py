"""One owner of a run directory: no module but detection/run_dir.py spells the name of a run's file."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from conftest import ROOT
from detection.run_dir import RunDir

CODE = ("detection", "pipeline", "stages", "benchmarks")
REPORT_METRICS_READERS = {"pipeline/report/build.py", "pipeline/tracking/ablation.py", "stages/plan.py"}
"""Modules that name a report directory's own ``metrics.json`` (``libra report --out``), not a run's."""


def run_file_names() -> set[str]:
    """The name of every file and folder a :class:`RunDir` knows."""
    run = RunDir(Path("run"))
    names = set()
    for name, member in inspect.getmembers(RunDir):
        if isinstance(member, property):
            names.add(getattr(run, name).name)
    names |= {run.checkpoint("last").name, run.checkpoint("best").name, run.dispatch_log().name}
    return names


def code_strings(path: Path) -> list[str]:
    """The string constants of ``path``'s code (f-string parts included), docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings]


def test_no_module_but_run_dir_spells_a_run_file_name():
    names = run_file_names()
    assert {"config.yaml", "last.ckpt", "metrics.csv", "metrics.json", "run_key", "dispatch.log"} <= names
    spelled = []
    for package in CODE:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "detection/run_dir.py":
                continue
            module = path.relative_to(ROOT).as_posix()
            for text in code_strings(path):
                last = text.rstrip("/").rsplit("/", 1)[-1]
                if last in names and not (last == "metrics.json" and module in REPORT_METRICS_READERS):
                    spelled.append(f"{module}: {text!r}")
    assert not spelled, "\n".join(spelled)
