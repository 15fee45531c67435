"""DVC compares experiments from files every revision holds: two `dvc exp run`s on Balanced L1's alpha in a
one-stage repository that declares the report stage's metrics and the plots as the project's dvc.yaml does
(same paths, same .gitignore, same plot template) and writes them with the report's own functions.

`dvc exp show --json` holds the headline metrics of both experiments; `dvc metrics diff`, `dvc exp diff` and
`dvc plots diff` between the workspace and an experiment carry values. The smoke ablation's full run of the
same commands is in docs/pipeline.md (Comparing experiments).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

DVC = Path(sys.executable).parent / "dvc"
# A stand-in for `libra report`: AP of the combination with Balanced L1 moves with alpha.
REPORT_SCRIPT = """
import sys
from pathlib import Path

import pandas as pd
import yaml

from detection.io import write_text_atomic
from pipeline.report.tables import headline_metrics

alpha = yaml.safe_load(Path("params.yaml").read_text())["alpha"]
summary = {"faster_rcnn": {"baseline": {"AP": 20.0, "AP50": 40.0},
                           "IS+BFP+BL": {"AP": 20.0 + alpha, "dAP": alpha, "dAP_ci_low": 0.0}},
           "claims": {"frcnn_BL_gt_IS_BFP": {"delta": alpha, "verdict": "reproduced", "verdict_code": 1}}}
Path("reports").mkdir(exist_ok=True)
write_text_atomic(Path("reports/headline.json"), pd.Series(headline_metrics(summary)).to_json())
curves = pd.DataFrame({"run": "faster_rcnn/IS+BFP+BL/seed0", "epoch": [0, 1], "train_loss": [1.0, 0.5],
                       "val_AP": [10.0, 10.0 + alpha]})
write_text_atomic(Path("reports/curves.csv"), curves.to_csv(index=False))
"""


def _dvc(repo: Path, env: dict, *args: str) -> str:
    proc = subprocess.run([str(DVC), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    assert "WARNING" not in proc.stderr, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def two_experiments(tmp_path_factory) -> tuple[Path, dict]:
    repo = tmp_path_factory.mktemp("dvc_experiments")
    project = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    report = project["stages"]["report"]
    stage = {"cmd": f"{sys.executable} report.py", "params": ["alpha"], "deps": ["report.py"],
             "outs": [out for out in report["outs"] if "reports/curves.csv" in out], "metrics": report["metrics"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"report": stage}, "plots": project["plots"]}))
    (repo / "params.yaml").write_text("alpha: 0.5\n")
    (repo / "report.py").write_text(REPORT_SCRIPT)
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    env.update(PYTHONPATH=str(ROOT), DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="t@example.com",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="t@example.com")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    _dvc(repo, env, "init", "-q")
    (repo / ".dvc/plots").mkdir()
    shutil.copy(ROOT / ".dvc/plots/runs.json", repo / ".dvc/plots/runs.json")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "baseline"], cwd=repo, env=env, check=True)
    for name, alpha in (("alpha07", 0.7), ("alpha03", 0.3)):  # the workspace ends with alpha03's results
        _dvc(repo, env, "exp", "run", "-q", "-S", f"alpha={alpha}", "-n", name)
    return repo, env


def test_exp_show_holds_each_experiments_headline_metrics(two_experiments):
    repo, env = two_experiments
    shown = json.loads(_dvc(repo, env, "exp", "show", "--json"))
    experiments = {e["name"]: e["revs"][0]["data"] for row in shown for e in row.get("experiments") or []}
    assert set(experiments) == {"alpha03", "alpha07"}
    for name, alpha in (("alpha03", 0.3), ("alpha07", 0.7)):
        assert experiments[name]["params"]["params.yaml"]["data"] == {"alpha": alpha}
        assert experiments[name]["metrics"]["reports/headline.json"]["data"] == {
            "faster_rcnn": {"baseline": {"AP": 20.0}, "IS+BFP+BL": {"AP": 20.0 + alpha, "dAP": alpha}}}


def test_metrics_exp_and_plots_diff_between_the_workspace_and_an_experiment_carry_values(two_experiments):
    repo, env = two_experiments
    metrics = json.loads(_dvc(repo, env, "metrics", "diff", "alpha07", "--json"))["reports/headline.json"]
    assert metrics["faster_rcnn.IS+BFP+BL.AP"] == {"old": 20.7, "new": 20.3, "diff": pytest.approx(-0.4)}
    assert metrics["faster_rcnn.IS+BFP+BL.dAP"] == {"old": 0.7, "new": 0.3, "diff": pytest.approx(-0.4)}

    changed = json.loads(_dvc(repo, env, "exp", "diff", "alpha07", "--json"))
    assert changed["params"]["params.yaml"]["alpha"] == {"old": 0.7, "new": 0.3, "diff": pytest.approx(-0.4)}
    assert changed["metrics"]["reports/headline.json"]["faster_rcnn.IS+BFP+BL.AP"]["new"] == 20.3

    plots = json.loads(_dvc(repo, env, "plots", "diff", "alpha07", "--json"))["data"]
    [validation] = plots["validation AP"]
    assert validation["revisions"] == ["workspace", "alpha07"]
    last_epoch = {row["rev"]: row["val_AP"] for row in validation["content"]["data"]["values"] if row["epoch"] == "1"}
    assert last_epoch == {"workspace": "10.3", "alpha07": "10.7"}
