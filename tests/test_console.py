"""A normal `libra` run prints what concerns the run, not third-party noise (tips, deprecations, INFO lines)."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT, libra
from detection.data import write_synthetic_coco

NOISE = ("💡", "Tip:", "litlogger", "litmodels", "deprecated", "DeprecationWarning", "FutureWarning",
         "will be deleted", "exists and is not empty", "INFO mlflow", "alembic", "GPU available", "TPU available")
"""Pieces of the lines that third-party libraries print unasked."""


def assert_quiet(proc) -> None:
    output = proc.stdout + proc.stderr
    found = [line for line in output.splitlines() if any(piece in line for piece in NOISE)]
    assert not found, f"third-party noise on the console: {found}"


def test_train_and_evaluate_print_no_third_party_noise(tmp_path):
    root = tmp_path / "data"
    write_synthetic_coco(root, seed=0, num_train=8, num_val=4, image_size=96)
    run = tmp_path / "run"
    sets = ["data.root=" + str(root), "model.backbone.weights=null", "train.epochs=1", "train.milestones=[]",
            "train.max_steps=1", "train.batch_size=4", "train.warmup_steps=1", "train.log_every_n_steps=1",
            "eval.batch_size=4"]
    trained = libra("train", "--config", "configs/retinanet_tiny.yaml", "--out", str(run),
                    *(a for s in sets for a in ("--set", s)))
    assert_quiet(trained)
    assert "step 1" in trained.stdout + trained.stderr, "the run's own progress is still printed"
    assert "training on cpu: 1 process x " in trained.stderr, "and the device it trains on"
    evaluated = libra("evaluate", "--run", str(run))
    assert_quiet(evaluated)
    assert '"bbox"' in evaluated.stdout


_WARN = """
import warnings
from stages.cli import quiet_third_party_output

quiet_third_party_output()
for module in ("lightning.pytorch.trainer", "detection.engine.train", "stages.train"):
    warnings.warn_explicit(f"old API of {module} is deprecated", DeprecationWarning, "f.py", 1, module=module)
warnings.warn_explicit("Experiment logs directory runs/x exists and is not empty.", UserWarning, "f.py", 2,
                       module="lightning.fabric.loggers.csv_logs")
warnings.warn_explicit("our own warning", UserWarning, "f.py", 3, module="detection.data.validate")
"""


def test_only_third_party_deprecations_and_lightning_notices_are_filtered():
    proc = subprocess.run([sys.executable, "-W", "default", "-c", _WARN], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=True)
    assert "lightning.pytorch.trainer is deprecated" not in proc.stderr and "exists and is not empty" not in proc.stderr
    assert "old API of detection.engine.train is deprecated" in proc.stderr
    assert "old API of stages.train is deprecated" in proc.stderr and "our own warning" in proc.stderr
