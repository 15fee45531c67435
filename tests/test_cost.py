"""Cost of a run: train_cost.json, system_metrics.csv and metrics.json's cost after a tiny run; a
resumed run counts every step once."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, libra, tiny_overrides
from pipeline.engine.cost import COST_KEYS, SYSTEM_METRICS_COLUMNS

pytestmark = pytest.mark.slow


def _sets(root, **extra) -> list[str]:
    return [arg for s in tiny_overrides(root, **extra) for arg in ("--set", s)]


def test_cost_recorded_after_training_and_evaluation(synthetic_root, tmp_path):
    run = tmp_path / "run"
    libra("train", "--config", "configs/retinanet_tiny.yaml", "--out", str(run), *_sets(synthetic_root))
    libra("evaluate", "--run", str(run))
    cost = json.loads((run / "metrics.json").read_text())["cost"]
    assert list(cost) == list(COST_KEYS)
    steps = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert cost["train_steps"] == steps == 4, "16 images, 4 per batch, 1 epoch"
    assert 0 < cost["train_s_per_step"] * steps <= cost["train_wall_s"]
    assert cost["train_images_per_s"] == pytest.approx(4 / cost["train_s_per_step"], rel=1e-3)
    assert 50 < cost["train_peak_rss_mb"] < 100_000
    assert cost["train_peak_gpu_mem_mb"] is None and cost["device"] == "cpu" and cost["threads"] >= 1
    assert cost["eval_wall_s"] > 0 and cost["eval_images_per_s"] == pytest.approx(16 / cost["eval_wall_s"], rel=1e-2)

    with (run / "system_metrics.csv").open(newline="") as file:
        reader = csv.DictReader(file)
        rows = list(reader)
    assert tuple(reader.fieldnames) == SYSTEM_METRICS_COLUMNS
    names = {r["name"] for r in rows}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= names
    assert all(int(r["step"]) <= steps and int(r["timestamp_ms"]) > 1.7e12 for r in rows)
    assert all(float(r["value"]) >= 0 for r in rows)


def test_resumed_run_counts_every_step_once(synthetic_root, tmp_path):
    run = tmp_path / "run"
    sets = _sets(synthetic_root, **{"train.epochs": 3, "data.max_images": 12})
    command = ["train", "--config", "configs/faster_rcnn_tiny.yaml", "--out", str(run), *sets]
    proc = subprocess.Popen([sys.executable, "-m", "stages.cli", *command], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 128 + signal.SIGTERM, "stopped by the signal before the end"
    stopped = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    first = json.loads((run / "train_cost.json").read_text())
    saved = stopped["callbacks"]["TrainingCost"]
    assert saved["steps"] == stopped["global_step"] == first["train_steps"] < 9

    libra(*command, "--resume")
    final = json.loads((run / "train_cost.json").read_text())
    assert final["train_steps"] == 9, "3 epochs of 3 steps, each counted once"
    assert final["train_wall_s"] > first["train_wall_s"]
    assert final["train_peak_rss_mb"] >= first["train_peak_rss_mb"]
