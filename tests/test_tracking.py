"""`libra track` logs what is on disk: the report on the parent run, each run's files, cost and system metrics
and the figures the report drew for it on its child run; unchanged runs are reused, changed ones replaced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from test_console import assert_quiet
from detection.config import read_yaml
from pipeline.plan.params import parse_params
from pipeline.plan.ablation import plan_ablation, write_plan
from detection.engine.curves import write_curves
from detection.run_dir import RunDir
from pipeline.report.report_dir import ReportDir
from pipeline.tracking.ablation import RUNS_VIEW, log_ablation, runs_view_state

COST = {"train_wall_s": 12.5, "train_steps": 4, "train_s_per_step": 3.1, "train_images_per_s": 5.0,
        "train_peak_rss_mb": 900.0, "train_peak_gpu_mem_mb": None, "eval_wall_s": 2.0, "eval_images_per_s": 4.0,
        "device": "cpu", "threads": 1}


def _write_run(run: Path, ap: float, system_rows: list[tuple[int, int, str, float]] | None) -> None:
    run.mkdir(parents=True, exist_ok=True)
    RunDir(run).run_key.write_text("-".join(run.parts[-3:]) + "\n")
    (run / "config.yaml").write_text("model: {}\n")
    (run / "metrics.json").write_text(json.dumps({"stats": {"AP": ap, "AP50": ap + 0.1}, "ap_per_iou": {"0.5": ap},
                                                  "num_images": 8, "num_detections": 3, "cost": COST}))
    (run / "detections.json").write_text("[]")
    (run / "metrics.csv").write_text("epoch,step,train/loss_epoch,val/AP\n0,3,1.5,\n0,3,,0.2\n")
    write_curves(RunDir(run))
    if system_rows is not None:
        (run / "system_metrics.csv").write_text("timestamp_ms,step,name,value\n" + "".join(
            f"{t},{s},{n},{v}\n" for t, s, n, v in system_rows))


@pytest.fixture
def ablation(tmp_path):
    """A smoke ablation's plan, run directories and report, written by hand (nothing trained)."""
    params = read_yaml(ROOT / "params.yaml")
    params["profile"] = "smoke"
    params["ablation"]["seeds"] = [0]
    params["ablation"]["faster_rcnn"]["table"] = ["baseline"]
    params["ablation"]["retinanet"]["table"] = ["baseline"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    typed = parse_params(params)
    plan = plan_ablation(typed, ROOT / "configs")
    write_plan(plan, tmp_path / "runs/plan")
    names = [run.name for run in plan.runs]
    for i, run in enumerate(plan.runs):
        rows = [(1_700_000_000_000 + 1000 * k, k, "system/cpu_utilization_percentage", 50.0 + k) for k in range(3)]
        _write_run(tmp_path / run.run_dir, 0.1 * (i + 1), rows if i == 0 else None)
    report = ReportDir(tmp_path / "reports")
    report.figures.mkdir(parents=True)
    report.markdown.write_text("# report\n")
    report.figure("ap_by_iou").write_bytes(b"png")
    report.metrics.write_text(json.dumps({"faster_rcnn": {"baseline": {"AP": 10.0}},
                                                     "claims": {"c1": {"delta": 1.0, "verdict": "reproduced",
                                                                        "verdict_code": 1, "adjusted_verdict": "not resolved",
                                                                        "adjusted_verdict_code": 0, "seeds": 3}}}))
    for name in names:
        report.run(name).mkdir(parents=True)
        (report.run(name) / "training_curves.png").write_bytes(name.encode())
    report.iou_distributions(names[0]).write_text(
        "curve,iou,value\neval/score_by_IoU,60,0.4\neval/score_by_IoU,70,0.8\n")
    log = lambda: log_ablation(tmp_path / "runs/plan", report.path, {"digest": "d" * 64}, typed, "ablation",  # noqa: E731
                               f"sqlite:///{tmp_path / 'mlflow.db'}", root=tmp_path)
    return tmp_path, plan, log


def test_track_logs_the_report_and_each_runs_files_cost_and_system_metrics(ablation):
    from mlflow import MlflowClient

    root, plan, log = ablation
    record = log()
    client = MlflowClient(record["tracking_uri"])
    first, second = (record["runs"][run.name]["run_id"] for run in plan.runs)
    child = client.get_run(first)
    assert {f"cost/{k}" for k, v in COST.items() if isinstance(v, float | int)} == {
        k for k in child.data.metrics if k.startswith("cost/")}, "numbers only: no null, no device string"
    assert child.data.metrics["cost/train_wall_s"] == 12.5 and child.data.metrics["eval/AP"] == pytest.approx(10.0)
    history = client.get_metric_history(first, "system/cpu_utilization_percentage")
    assert [(m.timestamp, m.step, m.value) for m in history] == [
        (1_700_000_000_000 + 1000 * k, k, 50.0 + k) for k in range(3)]
    assert not any(k.startswith("system/") for k in client.get_run(second).data.metrics), "absent file: skipped"
    artifacts = {a.path for a in client.list_artifacts(first)}
    assert {"config.yaml", "metrics.json", "detections.json", "metrics.csv", "system_metrics.csv", "figures"} <= artifacts
    assert "system_metrics.csv" not in {a.path for a in client.list_artifacts(second)}
    assert [a.path for a in client.list_artifacts(first, "figures")] == ["figures/training_curves.png"]
    assert child.info.run_name == plan.runs[0].name, "detector/combination/seed<k>: unique across detectors"
    assert [(m.step, m.value) for m in client.get_metric_history(first, "eval/AP_by_IoU")] == [(50, pytest.approx(10.0))]
    assert [(m.step, m.value) for m in client.get_metric_history(first, "eval/score_by_IoU")] == [(60, 0.4), (70, 0.8)]
    view = client.get_experiment(record["experiment_id"]).tags[f"mlflow.sharedViewState.{RUNS_VIEW}"]
    assert json.loads(view) == runs_view_state()
    parent = client.get_run(record["parent_run_id"])
    assert parent.data.tags["mlflow.note.content"].startswith("# report")
    assert parent.data.metrics["faster_rcnn/baseline/AP"] == 10.0 and parent.data.metrics["claims/c1/delta"] == 1.0
    assert parent.data.tags["libra.verdict.c1"] == "reproduced"
    assert parent.data.tags["libra.adjusted_verdict.c1"] == "not resolved"
    assert parent.data.metrics["claims/c1/adjusted_verdict_code"] == 0 and "claims/c1/verdict" not in parent.data.metrics
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} == {
        "report/ablation.md", "report/figures", "report/metrics.json"}, "the runs' figures are on the children"


def test_relogging_reuses_unchanged_runs_and_replaces_a_changed_one(ablation):
    from mlflow import MlflowClient

    root, plan, log = ablation
    before = log()
    again = log()
    assert again["parent_run_id"] == before["parent_run_id"] and not again["parent_created"]
    assert {r["action"] for r in again["runs"].values()} == {"reused"}
    assert again["runs"] == {name: {**r, "action": "reused"} for name, r in before["runs"].items()}

    changed = plan.runs[1]
    _write_run(root / changed.run_dir, 0.9, [(1_700_000_000_000, 0, "system/cpu_utilization_percentage", 1.0)])
    after = log()
    assert after["runs"][changed.name]["action"] == "replaced"
    assert after["runs"][plan.runs[0].name] == again["runs"][plan.runs[0].name]
    client = MlflowClient(after["tracking_uri"])
    assert client.get_run(before["runs"][changed.name]["run_id"]).info.lifecycle_stage == "deleted"
    assert client.get_run(after["runs"][changed.name]["run_id"]).data.metrics["eval/AP"] == pytest.approx(90.0)


def test_a_malformed_system_metrics_file_is_named(ablation):
    root, plan, log = ablation
    (root / plan.runs[0].run_dir / "system_metrics.csv").write_text("time,what\n1,2\n")
    with pytest.raises(ValueError, match="system_metrics.csv: not a system metrics file"):
        log()


def test_libra_track_on_a_new_store_prints_its_summary_and_no_third_party_noise(ablation):
    root, plan, _ = ablation
    (root / "manifest.json").write_text(json.dumps({"digest": "d" * 64}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'cli.db'}"}
    proc = subprocess.run([sys.executable, "-m", "stages.cli", "track", "--manifest", "manifest.json"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert_quiet(proc)
    assert f"child runs: {len(plan.runs)} created" in proc.stdout


def test_a_relative_store_under_a_dvc_temporary_copy_logs_into_the_project(ablation, tmp_path_factory):
    """`dvc queue start` runs the stage in a temporary copy with DVC_ROOT naming the project: a relative
    sqlite URI names the project's database, not the copy's, and every run carries the DVC experiment."""
    from mlflow import MlflowClient

    copy, plan, _ = ablation
    project = tmp_path_factory.mktemp("project")
    (copy / "manifest.json").write_text(json.dumps({"digest": "d" * 64}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db",
           "DVC_ROOT": str(project), "DVC_EXP_NAME": "exp-alpha"}
    proc = subprocess.run([sys.executable, "-m", "stages.cli", "track", "--manifest", "manifest.json"], cwd=copy,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((copy / "reports/mlflow.json").read_text())
    assert record["tracking_uri"] == f"sqlite:///{project.resolve() / 'mlflow.db'}"
    assert not (copy / "mlflow.db").exists() and (project / "mlruns").is_dir()
    client = MlflowClient(record["tracking_uri"])
    run_ids = [record["parent_run_id"], *(r["run_id"] for r in record["runs"].values())]
    assert {client.get_run(i).data.tags["libra.dvc_experiment"] for i in run_ids} == {"exp-alpha"}
