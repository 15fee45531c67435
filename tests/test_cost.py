"""Cost of a run: train_cost.json, system_metrics.csv and metrics.json's cost after a tiny run; a
resumed run counts every step once; the report's cost columns; the mmdet model zoo's rows."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, libra, tiny_overrides
from detection.config import read_yaml
from pipeline.plan.params import parse_params
from pipeline.plan.ablation import plan_ablation
from detection.engine.coco_eval import IOU_KEYS
from detection.engine.cost import COST_KEYS, SYSTEM_METRICS_COLUMNS
from pipeline.report.reference import MODEL_ZOO, ModelZooRow, model_zoo_rows
from pipeline.report.results import RunResult
from pipeline.report.tables import ablation_table, detector_markdown


def _sets(root, **extra) -> list[str]:
    return [arg for s in tiny_overrides(root, **extra) for arg in ("--set", s)]


@pytest.mark.trains
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


@pytest.mark.trains
@pytest.mark.slow  # fast: the test above, and test_hostile_input's resumes that log every step once
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


def _result(plan, s_per_step: float | None, rss: float, gpu: float | None) -> RunResult:
    bbox = dict.fromkeys(("AP", "AP50", "AP75", "APs", "APm", "APl"), 0.3)
    cost = dict.fromkeys(COST_KEYS)
    cost.update(train_s_per_step=s_per_step, train_peak_rss_mb=rss, train_peak_gpu_mem_mb=gpu)
    metrics = {"bbox": bbox, "ap_per_iou": dict.fromkeys(IOU_KEYS, 0.3), "cost": cost}
    return RunResult(plan, metrics, [], pd.DataFrame(), None)


ZOO = [ModelZooRow("faster_rcnn", "IS+BFP+BL", "libra-faster-rcnn_r50_fpn_1x_coco",
                   ".mim/configs/libra_rcnn/metafile.yml", 38.3, 4710.4, 52.63, "V100, FP32, batch 1")]


def test_report_cost_columns_against_hand_computed_ratios():
    params = read_yaml(ROOT / "params.yaml")
    params["ablation"]["seeds"] = [0, 1, 2]
    ablation = plan_ablation(parse_params(params), ROOT / "configs")
    s_per_step = {("baseline", 0): 0.20, ("baseline", 1): 0.60, ("baseline", 2): 0.20,  # seed 1 slowed down
                  ("IS", 0): 0.25, ("IS", 1): 0.27, ("IS", 2): 0.26}
    results = [_result(r, s_per_step.get((r.combination, r.seed), 0.4), rss=1000.0 + r.seed, gpu=None)
               if r.detector == "faster_rcnn" else _result(r, None, rss=500.0, gpu=200.0 + 100 * r.seed)
               for r in ablation.runs]
    table = ablation_table(ablation.summary(), results, {}, {}, {}, ZOO)
    rows = table.set_index(["detector", "combination", "source"])
    assert rows.loc[("faster_rcnn", "baseline", "ours"), "train_time_ratio"] == pytest.approx(1.0)
    assert rows.loc[("faster_rcnn", "IS", "ours"), "train_time_ratio"] == pytest.approx(0.26 / 0.20)
    assert rows.loc[("faster_rcnn", "IS+BFP+BL", "ours"), "train_time_ratio"] == pytest.approx(0.4 / 0.20)
    assert rows.loc[("faster_rcnn", "IS", "ours"), "peak_mem_mb"] == pytest.approx(1001.0), "host RSS on CPU"
    assert rows.loc[("retinanet", "baseline", "ours"), "peak_mem_mb"] == pytest.approx(300.0), "GPU memory first"
    assert np.isnan(rows.loc[("retinanet", "baseline", "ours"), "train_time_ratio"]), "no s/step recorded"
    assert rows.loc[("faster_rcnn", "IS+BFP+BL", "paper"), "train_time_ratio"] == pytest.approx(1.06)
    zoo = rows.loc[("faster_rcnn", "IS+BFP+BL", "mmdet")]
    assert (zoo["AP"], zoo["peak_mem_mb"], zoo["infer_ms_per_image"]) == (38.3, 4710.4, 52.63)
    faster = table[table.detector == "faster_rcnn"]
    assert list(faster.source[faster.combination == "IS+BFP+BL"]) == ["ours", "paper", "mmdet"]

    lines = "\n".join(detector_markdown(table, "faster_rcnn", 0.95, ZOO))
    assert "| train time × | peak mem (MB) |" in lines
    assert "| 1.30 | 1001 |" in lines and "| paper |" in lines and "| 1.06 |  |" in lines
    assert "| mmdet | 38.3 |" in lines and "| 4710 |" in lines
    assert "libra-faster-rcnn_r50_fpn_1x_coco (mmdet/.mim/configs/libra_rcnn/metafile.yml, mmdet 3.3.0 model zoo)" in lines
    missing = "\n".join(detector_markdown(table, "faster_rcnn", 0.95, None))
    assert "mmdet is not installed" in missing


def test_model_zoo_rows_from_installed_metafiles():
    rows = model_zoo_rows()
    if rows is None:
        pytest.skip("mmdet is not installed")
    assert {(r.detector, r.combination) for r in rows} == {(d, v) for d, vs in MODEL_ZOO.items() for v in vs}
    by_name = {r.config: r for r in rows}
    libra_frcnn = by_name["libra-faster-rcnn_r50_fpn_1x_coco"]
    assert (libra_frcnn.AP, libra_frcnn.train_mem_mb, libra_frcnn.infer_ms_per_image) == (38.3, 4.6 * 1024, 52.63)
    assert libra_frcnn.infer_hardware == "V100, FP32, batch 1"
    assert by_name["retinanet_r50_fpn_1x_coco"].AP == 36.5 and by_name["faster-rcnn_r50_fpn_1x_coco"].AP == 37.4


def test_model_zoo_rows_without_mmdet(tmp_path, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert model_zoo_rows() is None
    with pytest.raises(FileNotFoundError, match="faster_rcnn/metafile.yml: no mmdet model-zoo metafile"):
        model_zoo_rows(tmp_path)
    (tmp_path / "faster_rcnn").mkdir()
    (tmp_path / "faster_rcnn" / "metafile.yml").write_text("Models: []\n")
    with pytest.raises(KeyError, match="faster_rcnn/metafile.yml: no model named 'faster-rcnn_r50_fpn_1x_coco'"):
        model_zoo_rows(tmp_path)


def test_gpu_benchmark_without_cuda_says_skipped():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "benchmarks/gpu.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("skipped: no CUDA device")
    assert json.loads(lines[-1]) == {"skipped": "no CUDA device"}
    usage = subprocess.run([sys.executable, "benchmarks/gpu.py", "--precisions", "fp8"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and "--precisions: unknown ['fp8']" in usage.stderr
