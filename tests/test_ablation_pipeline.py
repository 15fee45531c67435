"""End to end: `dvc repro` of the ablation (smoke profile) in a fresh copy of the repository.

Checks every output and its schema, that only the design's runs exist (no stage, no directory for
the others), per-run metrics and curves through `dvc metrics show` / `dvc plots show`, the MLflow
store (parent run, child runs with metrics and artifacts), that a second `dvc repro` has nothing to
do, that re-logging reuses the runs, that changing one knob or one file of code retrains only the
runs it changes, and that a run killed during `dvc repro` fails only itself and resumes from its
checkpoint next time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import ROOT, checkpoint_complete

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
# Smoke ablation: per detector the baseline and one combination, one seed; the local executor (2 runs at
# once) with one thread per run, so that runs compare exactly with runs trained elsewhere.
SMOKE = {
    "profile": "smoke",
    "execution.executor": "local",
    "ablation.seeds": [0],
    "ablation.faster_rcnn.table": ["baseline", "IS+BFP+BL"],
    "ablation.retinanet.table": ["baseline", "IoU-cls+IoU-loc"],
    "report.bootstrap_resamples": 200,
    "execution.threads": 1,
}
TRAINED = [("faster_rcnn", "baseline"), ("faster_rcnn", "IS+BFP+BL"), ("retinanet", "baseline"),
           ("retinanet", "IoU-cls+IoU-loc")]
RUNS = [f"{detector}/{combination}/seed0" for detector, combination in TRAINED]
UNSELECTED = [("faster_rcnn", "BFP"), ("retinanet", "BFP+BL")]
STAGES = ["prepare", "pretrain", "plan", "runs", "report", "track"]


def _set(tree: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for part in path:
        tree = tree.setdefault(part, {})
    tree[last] = value


def _edit_params(repo: Path, **values) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in values.items():
        _set(params, key, value)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _index(repo: Path) -> dict:
    return json.loads((repo / "runs/index.json").read_text())["runs"]


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
    _edit_params(repo, **SMOKE)

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
    repo, env, proc = smoke_repo
    assert (repo / "data/synthetic/annotations/instances_val.json").exists()
    manifest = json.loads((repo / "data/manifest.json").read_text())
    assert manifest["source"] == "synthetic" and manifest["splits"]["val"]["images"] == 8 and len(manifest["digest"]) == 64

    for detector, combination in TRAINED:
        run = repo / "runs" / detector / combination / "seed0"
        assert (run / "checkpoints/last.ckpt").exists(), run
        metrics = json.loads((run / "metrics.json").read_text())
        assert set(metrics["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert isinstance(json.loads((run / "detections.json").read_text()), list)
        curves = pd.read_csv(run / "epoch_curves.csv")
        assert {"epoch", "step", "train/loss", "val/AP"} <= set(curves.columns) and len(curves) >= 1
    for detector, combination in UNSELECTED:  # runs outside the design cost nothing: no stage, no directory
        assert not (repo / "runs" / detector / combination).exists()
    listed = _run([str(VENV_BIN / "dvc"), "stage", "list", "--name-only", "dvc.yaml"], repo, env)
    assert listed.stdout.split() == STAGES
    assert "4 planned runs: 0 reused, 0 to resume, 4 to train; executor local (2 at once" in proc.stdout

    index = _index(repo)
    assert list(index) == RUNS and {entry["status"] for entry in index.values()} == {"trained"}
    for name, entry in index.items():
        assert set(entry["metrics"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert (repo / "runs" / name / "run_key").read_text().strip() == entry["key"]
    curves = pd.read_csv(repo / "runs/curves.csv")
    assert list(curves.columns) == ["run", "epoch", "train_loss", "val_AP"] and list(curves.run.unique()) == RUNS

    table = pd.read_csv(repo / "reports/ablation.csv")
    from pipeline.report.tables import COLUMNS

    assert list(table.columns) == list(COLUMNS)
    ours = table[table.source == "ours"]
    assert sorted(zip(ours.detector, ours.combination)) == sorted(TRAINED)
    assert (ours.seeds == 1).all() and ours["AP"].between(0, 100).all()
    combinations = ours[ours.combination != "baseline"]
    assert combinations["dAP"].notna().all()
    assert (combinations["dAP_ci_low"] <= combinations["dAP_ci_high"]).all()
    paper = table[table.source == "paper"]
    assert set(paper.combination) >= {"baseline", "IS+BFP+BL", "IoU-cls+IoU-loc"}
    assert paper.set_index(["detector", "combination"]).loc[("faster_rcnn", "IS+BFP+BL"), "AP"] == pytest.approx(38.5)

    summary = json.loads((repo / "reports/metrics.json").read_text())
    assert set(summary) == {"faster_rcnn", "retinanet", "claims"} and "dAP" in summary["faster_rcnn"]["IS+BFP+BL"]
    assert {c["verdict"] for c in summary["claims"].values()} <= {"reproduced", "not resolved", "contradicted"}
    markdown = (repo / "reports/ablation.md").read_text()
    assert "## Faster R-CNN" in markdown and "## RetinaNet" in markdown and "95% CI" in markdown
    assert "**One seed**: every interval is over the validation images only" in markdown
    figures = {p.name for p in (repo / "reports/figures").glob("*.png")}
    assert figures == {"negative_iou_faster_rcnn.png", "score_vs_iou_faster_rcnn.png", "score_vs_iou_retinanet.png",
                       "ap_by_iou.png", "balanced_l1.png", "training_curves_faster_rcnn.png",
                       "training_curves_retinanet.png"}
    for name in figures:
        assert f"figures/{name}" in markdown
    assert summary["claims"] == {}, "the smoke design holds no pair of combinations a claim compares"


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
    tagged = [(c.data.tags["libra.detector"], c.data.tags["libra.combination"]) for c in children]
    assert sorted(tagged) == sorted(TRAINED)
    for child in children:
        tags = child.data.tags
        assert tags["mlflow.parentRunId"] == record["parent_run_id"] and child.info.status == "FINISHED"
        assert len(tags["mlflow.source.git.commit"]) == 40 and len(tags["libra.dataset_digest"]) == 64
        assert child.data.params["train.seed"] == "0" and "components.bfp.enabled" in child.data.params
        assert {"eval/AP", "eval/AP50", "eval/AP_iou0.75", "val/AP", "train/loss"} <= set(child.data.metrics)
        assert len(client.get_metric_history(child.info.run_id, "train/loss")) >= 1
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"config.yaml", "metrics.json", "detections.json", "metrics.csv", "figures"} <= artifacts
        figures = {a.path for a in client.list_artifacts(child.info.run_id, "figures")}
        assert {"figures/training_curves.png", "figures/score_vs_iou.png"} <= figures
        run_name = f"{tags['libra.detector']}/{tags['libra.combination']}/seed{tags['libra.seed']}"
        assert child.info.run_name == run_name
        assert figures == {f"figures/{p.name}" for p in (repo / "reports/runs" / run_name).glob("*.png")}
        cost = json.loads((repo / tags["libra.run_dir"] / "metrics.json").read_text()).get("cost", {})
        assert {f"cost/{k}" for k, v in cost.items() if isinstance(v, int | float) and not isinstance(v, bool)} <= set(
            child.data.metrics)
    parent = parents[0]
    assert parent.data.params["ablation.design"] == "table" and "faster_rcnn/IS_BFP_BL/dAP" in parent.data.metrics
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/ablation.md", "report/ablation.csv", "report/figures"} <= report
    assert "report/runs" not in report, "each run's figures are on its child run"


def test_metrics_and_plots_show_every_run(smoke_repo):
    repo, env, _ = smoke_repo
    dvc = str(VENV_BIN / "dvc")
    metrics = json.loads(_run([dvc, "metrics", "show", "--json"], repo, env).stdout)
    headline = metrics[""]["data"]["reports/headline.json"]["data"]
    for name, entry in _index(repo).items():  # one seed: a combination's AP is its run's, in AP points
        detector, combination, _ = name.split("/")
        assert headline[detector][combination]["AP"] == pytest.approx(100 * entry["metrics"]["AP"], abs=1e-3)
    assert set(metrics[""]["data"]) == {"reports/headline.json"}, "the DVC metrics are the headline alone"
    plots = json.loads(_run([dvc, "plots", "show", "--json", "training loss", "validation AP"], repo, env).stdout)
    for name, field in (("training loss", "train_loss"), ("validation AP", "val_AP")):
        [plot] = plots["data"][name]
        rows = plot["content"]["data"]["values"]
        assert {row["run"] for row in rows} == set(RUNS) and all(field in row for row in rows)
        assert plot["content"]["encoding"]["color"]["field"] == "run"


def test_second_repro_has_nothing_to_do_and_relogging_reuses_runs(smoke_repo):
    repo, env, _ = smoke_repo
    dvc = str(VENV_BIN / "dvc")
    again = _run([dvc, "repro"], repo, env)
    assert "Running stage" not in again.stdout, again.stdout
    # dvc.yaml: the ablation pipeline (another dvc.yaml, e.g. configs/studies/, is not part of the default repro)
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
    _edit_params(repo, **{"retinanet.iou_balanced_cls.eta": 1.0})
    proc = _run([str(VENV_BIN / "dvc"), "repro"], repo, env)
    ran = set(re.findall(r"Running stage '([^']+)'", proc.stdout))
    assert ran == {"plan", "runs", "report", "track"}, proc.stdout
    assert {name: entry["status"] for name, entry in _index(repo).items()} == {
        name: "trained" if name == "retinanet/IoU-cls+IoU-loc/seed0" else "reused" for name in RUNS}
    config = yaml.safe_load((repo / "runs/retinanet/IoU-cls+IoU-loc/seed0/config.yaml").read_text())
    assert config["components"]["iou_balanced_cls"]["eta"] == 1.0

    from mlflow import MlflowClient

    after = json.loads((repo / "reports/mlflow.json").read_text())
    assert after["parent_created"] and after["parent_run_id"] != before["parent_run_id"]
    client = MlflowClient(after["tracking_uri"])
    assert client.get_run(before["parent_run_id"]).info.lifecycle_stage == "active"
    changed = client.get_run(after["runs"]["retinanet/IoU-cls+IoU-loc/seed0"]["run_id"])
    assert changed.data.params["components.iou_balanced_cls.eta"] == "1.0"


def test_code_edits_retrain_exactly_the_runs_that_execute_them(smoke_repo):
    """Real edits of the copy's files, then `dvc repro`: a component's file retrains only the runs that
    enable it; dispatch code reruns the runs stage but reuses every run; report code leaves the runs
    stage alone; shared training code retrains every run."""
    repo, env, _ = smoke_repo
    dvc = str(VENV_BIN / "dvc")

    def edit_and_repro(path: str) -> set[str]:
        (repo / path).write_text((repo / path).read_text() + "\nEDITED_BY_TEST = 1\n")
        return set(re.findall(r"Running stage '([^']+)'", _run([dvc, "repro"], repo, env).stdout))

    def statuses() -> dict[str, str]:
        return {name: entry["status"] for name, entry in _index(repo).items()}

    assert "runs" in edit_and_repro("detection/components/iou_balanced.py")
    assert statuses() == {name: "trained" if name == "retinanet/IoU-cls+IoU-loc/seed0" else "reused" for name in RUNS}
    assert "runs" in edit_and_repro("pipeline/dispatch/scheduler.py")
    assert set(statuses().values()) == {"reused"}
    ran = edit_and_repro("pipeline/report/tables.py")
    assert "report" in ran and "runs" not in ran, ran
    assert "runs" in edit_and_repro("detection/engine/evaluate.py")
    assert set(statuses().values()) == {"trained"}


def _run_process(repo: Path, run: str) -> int | None:
    """The pid of the `libra run` process (train, then evaluate) that `libra dispatch` started for ``run`` in
    ``repo``, if one runs."""
    wanted = [b"stages.cli", b"run", b"--plan", f"runs/plan/{run}.yaml".encode()]
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            cwd = Path(os.readlink(proc / "cwd"))
        except OSError:
            continue
        if cwd == repo.resolve() and all(arg in args for arg in wanted):
            return int(proc.name)
    return None


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if v.is_floating_point()}


def test_killed_run_resumes_from_its_checkpoint_and_a_changed_one_starts_afresh(smoke_repo, tmp_path):
    """Three epochs per run; `dvc repro` with two training processes SIGKILLed after their first
    checkpoint: the other runs finish, the stage fails (the runs stage stays out of date) and
    `libra report` lists the killed runs as failed. Then one killed run's config changes: the next
    `dvc repro` resumes the other one, which ends with the weights of an uninterrupted run, trains the
    changed one from step 0 and reuses the rest."""
    repo, env, _ = smoke_repo
    dvc = str(VENV_BIN / "dvc")
    resumed, changed = "retinanet/IoU-cls+IoU-loc/seed0", "faster_rcnn/IS+BFP+BL/seed0"
    old_keys = {name: entry["key"] for name, entry in _index(repo).items()}
    _edit_params(repo, **{"profiles.smoke.set.train.epochs": 3})
    log = tmp_path / "repro.log"
    with log.open("w") as out:
        proc = subprocess.Popen([dvc, "repro"], cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT)
    killed: dict[str, int] = {}
    deadline = time.time() + 600
    while len(killed) < 2:
        assert proc.poll() is None and time.time() < deadline, f"both runs should be killed mid-run:\n{log.read_text()}"
        for name in {resumed, changed} - set(killed):
            key_file, last = repo / "runs" / name / "run_key", repo / "runs" / name / "checkpoints" / "last.ckpt"
            started = key_file.exists() and key_file.read_text().strip() != old_keys[name]
            pid = _run_process(repo, name) if started and checkpoint_complete(last) else None
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed[name] = pid
        time.sleep(0.05)
    assert proc.wait(timeout=900) != 0, log.read_text()
    steps = {name: torch.load(repo / "runs" / name / "checkpoints/last.ckpt", map_location="cpu",
                              weights_only=False)["global_step"] for name in killed}
    assert all(0 < step < 3 * 4 for step in steps.values()), steps
    index = _index(repo)
    for name in RUNS:
        if name in killed:
            assert index[name]["status"] == "failed" and "train killed by SIGKILL" in index[name]["reason"]
        else:
            assert index[name]["status"] == "trained", index[name]
    assert "runs" in json.loads(_run([dvc, "status", "--json", "dvc.yaml"], repo, env).stdout)
    _run([sys.executable, "-m", "stages.cli", "report", "--out", str(tmp_path / "partial")], repo, env)
    partial = (tmp_path / "partial/ablation.md").read_text()
    assert all(f"| {name} | failed | train killed by SIGKILL" in partial for name in killed)

    _edit_params(repo, **{"faster_rcnn.balanced_l1.alpha": 0.3})
    proc = _run([dvc, "repro"], repo, env)
    index = _index(repo)
    assert index[resumed]["status"] == "resumed" and index[resumed]["from_step"] == steps[resumed]
    assert index[changed]["status"] == "trained"
    assert {index[name]["status"] for name in RUNS if name not in killed} == {"reused"}
    assert "Restored all states" in (repo / "runs" / resumed / "dispatch.log").read_text()
    assert "Restored all states" not in (repo / "runs" / changed / "dispatch.log").read_text()
    config = yaml.safe_load((repo / "runs" / changed / "config.yaml").read_text())
    assert config["components"]["balanced_l1"]["alpha"] == 0.3

    reference = tmp_path / "uninterrupted"
    _run([sys.executable, "-m", "stages.cli", "train", "--plan", f"runs/plan/{resumed}.yaml", "--out", str(reference)],
         repo, {**env, "OMP_NUM_THREADS": "1"})
    got, want = _weights(repo / "runs" / resumed / "checkpoints/last.ckpt"), _weights(reference / "checkpoints/last.ckpt")
    assert got.keys() == want.keys()
    assert max((got[k] - want[k]).abs().max().item() for k in got) < 1e-5
