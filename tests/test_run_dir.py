"""One owner of a run directory and of a report directory: no module but detection/run_dir.py spells the name
of a run's file, and none but pipeline/report/report_dir.py the name of a report's own file."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pandas as pd

from conftest import ROOT
from detection.engine.curves import epoch_curves, read_curves, read_metrics_csv, write_curves, write_runs_curves
from detection.run_dir import RunDir
from pipeline.report.report_dir import ReportDir

CODE = ("detection", "pipeline", "stages", "benchmarks")
REPORT_METRICS_READERS = {"pipeline/report/report_dir.py", "stages/plan.py"}
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


REPORT_NAMES_SHARED = {"metrics.json", "curves.csv", "figures", "runs"}
"""Report file names that other files also have (a run's metrics.json, runs/curves.csv, the runs folder, MLflow's
figures folder), so spelling them elsewhere is not a second owner."""


def report_file_names() -> set[str]:
    report = ReportDir(Path("reports"))
    names = {getattr(report, name).name for name, member in inspect.getmembers(ReportDir) if isinstance(member, property)}
    return names | {report.iou_distributions("run").name}


def test_no_module_but_report_dir_spells_a_report_file_name():
    names = report_file_names()
    assert {"ablation.md", "ablation.html", "ablation.csv", "headline.json", "iou_distributions.csv",
            "mlflow.json"} <= names
    spelled = [f"{path.relative_to(ROOT).as_posix()}: {text!r}"
               for package in CODE for path in sorted((ROOT / package).rglob("*.py"))
               if path != ROOT / "pipeline/report/report_dir.py"
               for text in code_strings(path) if text.rstrip("/").rsplit("/", 1)[-1] in names - REPORT_NAMES_SHARED]
    assert not spelled, "\n".join(spelled)


def test_curves_are_parsed_once_and_read_back_exactly(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.training_log.write_text("epoch,step,lr,train/loss_step,train/loss_epoch,val/AP\n"
                                "0,1,0.1,0.30000000000000004,,\n0,1,,,0.1234567890123,\n0,1,,,,0.2\n"
                                "1,3,0.01,0.25,,\n1,3,,,0.2,\n")
    write_curves(run)
    parsed = epoch_curves(read_metrics_csv(run.training_log))
    pd.testing.assert_frame_equal(read_curves(run), parsed, check_exact=True)
    assert read_curves(run)["val/AP"].isna().tolist() == [False, True]

    run.training_log.unlink()  # the readers take the curves file, never the log
    write_runs_curves({"a/run": run, "missing": RunDir(tmp_path / "missing")}, tmp_path / "curves.csv")
    table = pd.read_csv(tmp_path / "curves.csv")
    assert table[["run", "epoch", "train_loss"]].to_dict("list") == {
        "run": ["a/run", "a/run"], "epoch": [1, 2], "train_loss": [0.123457, 0.2]}
    assert table["val_AP"].iloc[0] == 0.2 and table["val_AP"].isna().tolist() == [False, True]
