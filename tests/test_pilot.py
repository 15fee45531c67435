"""benchmarks/pilot.py end to end on the smoke profile: 2 candidates x 2 paired seeds x 1 detector."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_weights_path

pytestmark = pytest.mark.trains

CANDIDATES = """
candidates:
  profile: {about: the profile as it is}
  ema:
    set: {train: {ema_decay: 0.5}}
"""


def _pilot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/pilot.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_pilot_reports_every_candidate_on_the_smoke_profile(synthetic_root, tmp_path):
    candidates, out = tmp_path / "candidates.yaml", tmp_path / "out" / "pilot.md"
    candidates.write_text(CANDIDATES)
    args = ["--candidates", str(candidates), "--profile", "smoke", "--detectors", "faster_rcnn", "--seeds", "2",
            "--set", f"model.backbone.weights={tiny_weights_path(synthetic_root)}", "--set", "model.score_thresh=0.0",
            "--set", "train.max_steps=2",
            "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    proc = _pilot(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    progress = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(progress) == 2 * 2 * 2 and progress[-1].startswith("[8/8] ema faster_rcnn IS+BFP+BL seed 1")
    assert "epoch" not in proc.stdout, "training's own lines go to each run's pilot.log"

    report = json.loads(out.with_suffix(".json").read_text())
    assert report["profile"] == "smoke" and report["seeds"] == [0, 1] and report["ablation_seeds"] == 3
    rows = report["rows"]
    assert [(r["candidate"], r["detector"], r["variant"]) for r in rows] == [
        ("profile", "faster_rcnn", "IS+BFP+BL"), ("ema", "faster_rcnn", "IS+BFP+BL")]
    for row in rows:
        assert all(0 <= ap <= 100 for ap in row["baseline_ap"] + row["variant_ap"] + row["untrained_ap"])
        assert row["sd_ap"] >= 0 and row["sd_diff"] >= 0
        assert (row["mde"] is not None and math.isfinite(row["mde"])) or row["mde_note"].startswith("not estimable")
        assert row["steps"] > 0 and row["images_per_step"] > 0 and row["train_wall_s"] > 0
        assert isinstance(row["learned"], bool)
        low, high = row["sd_diff_interval"]
        assert low <= row["sd_diff"] <= high
    assert rows[0]["spread_p"] is None and 0 <= rows[1]["spread_p"] <= 1, "ema's spread tested against the profile's"
    table = out.read_text()
    assert table in proc.stdout and table.count("| faster_rcnn |") == 2

    again = _pilot(*args[:-2], "--out", str(candidates))
    assert again.returncode != 0 and "--force" in again.stderr, "a file the tool did not write is not replaced"
    assert (tmp_path / "work" / "ema" / "faster_rcnn" / "baseline" / "seed0" / "metrics.json").exists()


def load_pilot():
    spec = importlib.util.spec_from_file_location("pilot", ROOT / "benchmarks/pilot.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_spread_statistics_match_their_closed_forms_at_three_seeds():
    """With 3 seeds (2 degrees of freedom) χ²(2) is exponential with mean 2, ppf(q) = -2 ln(1 - q), and F(2, 2) has
    the CDF x / (1 + x)."""
    pilot = load_pilot()
    low, high = pilot.sd_interval(2.0, 3, 0.95)
    assert (low, high) == pytest.approx((2.0 / math.sqrt(-math.log(0.025)), 2.0 / math.sqrt(-math.log(0.975))))
    row = lambda sd: pilot.Row("c", "faster_rcnn", "IS", [0, 1, 2], [], [], [], 1, 1, 1.0, sd_diff=sd)
    for ratio in (0.25, 1.0, 6.0):
        expected = min(1.0, 2 * min(ratio / (1 + ratio), 1 / (1 + ratio)))
        assert pilot.spread_p(row(math.sqrt(ratio)), row(1.0)) == pytest.approx(expected)
    rows = [row(1.0), row(3.0)]
    rows[0].candidate = "profile"
    pilot.compare_spreads(rows, "profile")
    assert rows[0].spread_p is None and rows[1].spread_p == pytest.approx(2 / 10)
