"""End to end: `dvc repro` of the ablation (smoke profile) in a fresh copy of the repository.

Checks every output and its schema, the MLflow store (parent run, child runs with metrics and
artifacts), that a second `dvc repro` has nothing to do, and that re-logging reuses the runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
# Smoke matrix: per detector the baseline, one trained variant and one combination outside the
# design (a skipped stage); one seed.
SMOKE = {
    "profile": "smoke",
    "ablation.seeds": [0],
    "ablation.faster_rcnn.combos": ["baseline", "BFP", "IS+BFP+BL"],
    "ablation.faster_rcnn.table": ["baseline", "IS+BFP+BL"],
    "ablation.retinanet.combos": ["baseline", "BFP+BL", "IoU-cls+IoU-loc"],
    "ablation.retinanet.table": ["baseline", "IoU-cls+IoU-loc"],
    "report.bootstrap_resamples": 200,
}
TRAINED = [("faster_rcnn", "baseline"), ("faster_rcnn", "IS+BFP+BL"), ("retinanet", "baseline"),
           ("retinanet", "IoU-cls+IoU-loc")]
SKIPPED = [("faster_rcnn", "BFP"), ("retinanet", "BFP+BL")]


def _set(tree: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for part in path:
        tree = tree[part]
    tree[last] = value


def _run(cmd: list[str], repo: Path, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def smoke_repo(tmp_path_factory) -> tuple[Path, dict, subprocess.CompletedProcess]:
    """A fresh clone-like copy (the files git tracks or would track) with the smoke params, reproduced once."""
    repo = tmp_path_factory.mktemp("ablation") / "repo"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in SMOKE.items():
        _set(params, key, value)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(repo), PYTHONUNBUFFERED="1",
               DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "-m", "fresh clone"], repo, env)
    proc = _run([str(VENV_BIN / "dvc"), "repro"], repo, env)
    return repo, env, proc


def test_repro_writes_every_output_with_its_schema(smoke_repo):
    repo, _, proc = smoke_repo
    assert (repo / "data/synthetic/annotations/instances_val.json").exists()
    manifest = json.loads((repo / "data/manifest.json").read_text())
    assert manifest["source"] == "synthetic" and manifest["splits"]["val"]["images"] == 8 and len(manifest["digest"]) == 64

    for detector, combo in TRAINED:
        run = repo / "runs" / detector / combo / "seed0"
        assert (run / "checkpoints/last.ckpt").exists(), run
        metrics = json.loads((run / "metrics.json").read_text())
        assert set(metrics["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert isinstance(json.loads((run / "detections.json").read_text()), list)
        for name, column in (("train_loss", "train_loss"), ("val_AP", "val_AP")):
            curve = pd.read_csv(run / "curves" / f"{name}.csv")
            assert list(curve.columns) == ["epoch", column] and len(curve) >= 1
    for detector, combo in SKIPPED:
        run = repo / "runs" / detector / combo / "seed0"
        assert (run / "checkpoints/SKIPPED").exists() and not (run / "checkpoints/last.ckpt").exists()
        assert json.loads((run / "metrics.json").read_text())["skipped"] is True
    assert "not in the ablation design, skipped" in proc.stdout

    table = pd.read_csv(repo / "reports/ablation.csv")
    from pipeline.report.tables import COLUMNS

    assert list(table.columns) == list(COLUMNS)
    ours = table[table.source == "ours"]
    assert sorted(zip(ours.detector, ours.variant)) == sorted(TRAINED)
    assert (ours.seeds == 1).all() and ours["AP"].between(0, 100).all()
    variants = ours[ours.variant != "baseline"]
    assert variants["dAP"].notna().all()
    assert (variants["dAP_ci_low"] <= variants["dAP_ci_high"]).all()
    paper = table[table.source == "paper"]
    assert set(paper.variant) >= {"baseline", "IS+BFP+BL", "IoU-cls+IoU-loc"}
    assert paper.set_index(["detector", "variant"]).loc[("faster_rcnn", "IS+BFP+BL"), "AP"] == pytest.approx(38.5)

    summary = json.loads((repo / "reports/metrics.json").read_text())
    assert set(summary) == {"faster_rcnn", "retinanet", "claims"} and "dAP" in summary["faster_rcnn"]["IS+BFP+BL"]
    assert {c["verdict"] for c in summary["claims"].values()} <= {"reproduced", "not resolved", "contradicted"}
    assert len(summary["claims"]) == 9
    markdown = (repo / "reports/ablation.md").read_text()
    assert "## Faster R-CNN" in markdown and "## RetinaNet" in markdown and "95% CI" in markdown
    figures = {p.name for p in (repo / "reports/figures").glob("*.png")}
    assert figures == {"negative_iou_faster_rcnn.png", "score_vs_iou_faster_rcnn.png", "score_vs_iou_retinanet.png",
                       "ap_by_iou.png", "balanced_l1.png", "training_curves_faster_rcnn.png",
                       "training_curves_retinanet.png"}
    for name in figures:
        assert f"figures/{name}" in markdown


def test_mlflow_holds_parent_and_child_runs(smoke_repo):
    repo, _, _ = smoke_repo
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    record = json.loads((repo / "reports/mlflow.json").read_text())
    assert record["tracking_uri"] == f"sqlite:///{repo.resolve() / 'mlflow.db'}"
    client = MlflowClient(record["tracking_uri"])
    experiment = client.get_experiment_by_name("libra-ablation")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ACTIVE_ONLY)
    parents = [r for r in runs if r.data.tags.get("libra.role") == "ablation"]
    children = [r for r in runs if r.data.tags.get("libra.role") == "run"]
    assert len(parents) == 1 and parents[0].info.run_id == record["parent_run_id"]
    assert sorted((c.data.tags["libra.detector"], c.data.tags["libra.combo"]) for c in children) == sorted(TRAINED)
    for child in children:
        tags = child.data.tags
        assert tags["mlflow.parentRunId"] == record["parent_run_id"] and child.info.status == "FINISHED"
        assert len(tags["mlflow.source.git.commit"]) == 40 and len(tags["libra.dataset_digest"]) == 64
        assert child.data.params["train.seed"] == "0" and "components.bfp.enabled" in child.data.params
        assert {"eval/AP", "eval/AP50", "eval/AP_iou0.75", "val/AP", "train/loss"} <= set(child.data.metrics)
        assert len(client.get_metric_history(child.info.run_id, "train/loss")) >= 1
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"config.yaml", "metrics.json", "detections.json", "metrics.csv", "figures"} <= artifacts
        assert {"figures/training_curves.png", "figures/score_vs_iou.png"} <= {
            a.path for a in client.list_artifacts(child.info.run_id, "figures")}
    parent = parents[0]
    assert parent.data.params["ablation.design"] == "table" and "faster_rcnn/IS_BFP_BL/dAP" in parent.data.metrics
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/ablation.md", "report/ablation.csv", "report/figures"} <= report


def test_second_repro_has_nothing_to_do_and_relogging_reuses_runs(smoke_repo):
    repo, env, _ = smoke_repo
    dvc = str(VENV_BIN / "dvc")
    again = _run([dvc, "repro"], repo, env)
    assert "Running stage" not in again.stdout, again.stdout
    # dvc.yaml: the ablation pipeline (another dvc.yaml, e.g. tuning/, is not part of the default repro)
    assert json.loads(_run([dvc, "status", "--json", "dvc.yaml"], repo, env).stdout) == {}

    before = json.loads((repo / "reports/mlflow.json").read_text())
    _run([dvc, "repro", "--force", "--single-item", "track"], repo, env)
    after = json.loads((repo / "reports/mlflow.json").read_text())
    assert after["parent_run_id"] == before["parent_run_id"] and not after["parent_created"]
    assert {r["action"] for r in after["runs"].values()} == {"reused"}
    assert {k: r["run_id"] for k, r in after["runs"].items()} == {k: r["run_id"] for k, r in before["runs"].items()}


def test_changing_one_knob_reruns_only_the_runs_it_affects(smoke_repo):
    """A RetinaNet IoU-cls knob: only the RetinaNet runs with IoU-cls retrain; the report follows;
    the changed ablation gets its own MLflow parent run and the previous one is kept."""
    repo, env, _ = smoke_repo
    before = json.loads((repo / "reports/mlflow.json").read_text())
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["retinanet"]["iou_balanced_cls"]["eta"] = 1.0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = _run([str(VENV_BIN / "dvc"), "repro"], repo, env)
    ran = set(re.findall(r"Running stage '([^']+)'", proc.stdout))
    assert ran == {"plan", "train_retinanet@IoU-cls+IoU-loc-0", "evaluate_retinanet@IoU-cls+IoU-loc-0", "report",
                   "track"}, proc.stdout
    config = yaml.safe_load((repo / "runs/retinanet/IoU-cls+IoU-loc/seed0/config.yaml").read_text())
    assert config["components"]["iou_balanced_cls"]["eta"] == 1.0

    from mlflow import MlflowClient

    after = json.loads((repo / "reports/mlflow.json").read_text())
    assert after["parent_created"] and after["parent_run_id"] != before["parent_run_id"]
    client = MlflowClient(after["tracking_uri"])
    assert client.get_run(before["parent_run_id"]).info.lifecycle_stage == "active"
    changed = client.get_run(after["runs"]["retinanet/IoU-cls+IoU-loc/seed0"]["run_id"])
    assert changed.data.params["components.iou_balanced_cls.eta"] == "1.0"
