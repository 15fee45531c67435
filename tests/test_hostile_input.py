"""Hostile and unlucky input: files that would run code, torn or foreign files, kills and signals.

Each case either fails early with a named error (exit 2, the culprit named, no traceback, nothing
written or deleted) or keeps the run's data intact and resumable.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, libra, tiny_overrides
from detection.config import load_config, save_config
from detection.engine.checkpoint import CheckpointError, read_checkpoint
from pipeline.report.results import negative_iou_histogram

pytestmark = pytest.mark.trains

CONFIG = "configs/faster_rcnn_tiny.yaml"
EPOCHS, STEPS_PER_EPOCH = 2, 4  # 16 images of batch 4


class Payload:
    """Pickles as a call to ``os.system``: loading it unrestricted would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _sets(root: Path, **extra) -> list[str]:
    return [arg for s in tiny_overrides(root, **{"train.epochs": EPOCHS, **extra}) for arg in ("--set", s)]


def _train_cmd(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", CONFIG, "--out", str(out), *_sets(root), *extra]


def _assert_named_error(proc: subprocess.CompletedProcess, *named: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for name in named:
        assert name in proc.stderr, proc.stderr


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file's digest and modification time."""
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def _step_rows(run: Path) -> list[int]:
    return [int(r["step"]) for r in _rows(run) if r["train/loss_step"]]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if v.is_floating_point()}


def _assert_same_weights(a: Path, b: Path) -> None:
    one, two = _weights(a), _weights(b)
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-6


def _assert_every_step_once(run: Path) -> None:
    assert _step_rows(run) == list(range(EPOCHS * STEPS_PER_EPOCH))
    rows = _rows(run)
    assert sorted(int(r["epoch"]) for r in rows if r["val/AP"]) == list(range(EPOCHS)), "one validation per epoch"
    assert all(None not in r for r in rows), "every row has the header's columns"


def _start(root: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stages.cli", *_train_cmd(root, out)], cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _logged(run: Path, step: int) -> bool:
    try:
        return any(s >= step for s in _step_rows(run))
    except (OSError, KeyError, TypeError, ValueError):  # not written yet, or being written
        return False


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int) -> None:
    """Until ``run``'s metrics.csv has logged ``step`` (the process must still be running)."""
    deadline = time.time() + 300
    while not _logged(run, step):
        assert proc.poll() is None, f"run ended before step {step}: {proc.communicate()[1][-3000:]}"
        assert time.time() < deadline
        time.sleep(0.02)


@pytest.fixture(scope="module")
def full_run(synthetic_root, tmp_path_factory) -> Path:
    """An uninterrupted run of the full schedule, the reference for the interrupted ones."""
    run = tmp_path_factory.mktemp("full") / "run"
    libra(*_train_cmd(synthetic_root, run))
    return run


@pytest.fixture
def run_copy(full_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    return run


# ---- checkpoints: nothing in a file runs ---------------------------------------------------------

def test_pickle_payload_checkpoint_is_refused_and_never_runs(synthetic_root, run_copy, tmp_path):
    control, marker = tmp_path / "control", tmp_path / "PWNED"
    torch.save({"state_dict": {}, "x": Payload(control)}, tmp_path / "control.ckpt")
    torch.load(tmp_path / "control.ckpt", weights_only=False)
    assert control.exists(), "the payload is live: loading it unrestricted runs it"

    last = run_copy / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {}, "x": Payload(marker)}, last)
    before = _snapshot(run_copy)
    _assert_named_error(libra("evaluate", "--run", str(run_copy), check=False), str(last))
    _assert_named_error(libra(*_train_cmd(synthetic_root, run_copy, "--resume"), check=False), str(last))
    assert _snapshot(run_copy) == before, "nothing written"
    legacy = tmp_path / "legacy.ckpt"  # a plain pickle, not torch's zip format
    legacy.write_bytes(pickle.dumps({"state_dict": Payload(marker)}))
    for path in (last, legacy):
        with pytest.raises(CheckpointError, match=path.name):
            negative_iou_histogram(path)  # the report's read
    assert not marker.exists(), "nothing in the files ran"


def test_corrupt_checkpoint_is_a_named_error(synthetic_root, run_copy, tmp_path):
    last = run_copy / "checkpoints" / "last.ckpt"
    for name, content in (("empty", b""), ("truncated", last.read_bytes()[:5000])):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=name):
            read_checkpoint(tmp_path / name)
    last.write_bytes(os.urandom(4096))
    before = _snapshot(run_copy)
    _assert_named_error(libra("evaluate", "--run", str(run_copy), check=False), str(last))
    _assert_named_error(libra(*_train_cmd(synthetic_root, run_copy, "--resume"), check=False), str(last))
    assert _snapshot(run_copy) == before


# ---- resume ---------------------------------------------------------------------------------------

def test_resume_of_a_complete_run_changes_nothing(synthetic_root, run_copy):
    before = _snapshot(run_copy)
    proc = libra(*_train_cmd(synthetic_root, run_copy, "--resume"))
    assert "already complete" in proc.stdout
    assert _snapshot(run_copy) == before


def test_resume_without_config_yaml_compares_with_the_checkpoint(synthetic_root, run_copy):
    (run_copy / "config.yaml").unlink()
    before = _snapshot(run_copy)
    proc = libra(*_train_cmd(synthetic_root, run_copy, "--resume", "--set", "train.lr=0.5"), check=False)
    _assert_named_error(proc, "last.ckpt", "train.lr")
    assert _snapshot(run_copy) == before
    assert "already complete" in libra(*_train_cmd(synthetic_root, run_copy, "--resume")).stdout
    assert load_config(run_copy / "config.yaml") == load_config(CONFIG, tiny_overrides(synthetic_root,
                                                                                       **{"train.epochs": EPOCHS}))


def test_sigkill_mid_epoch_then_resume_logs_every_step_once(synthetic_root, full_run, tmp_path):
    run = tmp_path / "killed"
    proc = _start(synthetic_root, run)
    _wait_for_step(proc, run, STEPS_PER_EPOCH + 2)  # rows logged after the epoch-1 checkpoint
    proc.kill()
    proc.communicate()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == STEPS_PER_EPOCH
    with (run / "metrics.csv").open("a") as file:
        file.write("1,0.002")  # a row torn by the kill
    libra(*_train_cmd(synthetic_root, run, "--resume"))
    _assert_every_step_once(run)
    _assert_same_weights(full_run, run)
    assert list(_rows(run)[0]) == list(_rows(full_run)[0]), "same columns"


# fast: the SIGKILL test above resumes mid-epoch to the same weights; SIGTERM's checkpoint, exit 143 and resume:
# test_dispatch's SIGTERM test and the dvc test below
@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_resumable_checkpoint_and_exits_nonzero(synthetic_root, full_run, tmp_path, signum, code):
    run = tmp_path / "stopped"
    proc = _start(synthetic_root, run)
    _wait_for_step(proc, run, STEPS_PER_EPOCH + 1)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "--resume" in err
    stopped = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert STEPS_PER_EPOCH < stopped["global_step"] < EPOCHS * STEPS_PER_EPOCH, "saved mid-epoch, where it stopped"

    libra(*_train_cmd(synthetic_root, run, "--resume"))
    _assert_every_step_once(run)
    _assert_same_weights(full_run, run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def test_dvc_does_not_record_a_stage_stopped_by_sigterm(synthetic_root, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    save_config(load_config(CONFIG, tiny_overrides(synthetic_root, **{"train.epochs": EPOCHS})), project / "cfg.yaml")
    # `exec` keeps the shell's pid, which the stage writes down for this test to signal
    stage = {"cmd": "echo $$ > libra.pid && exec libra train --config cfg.yaml --out run",
             "deps": ["cfg.yaml"], "outs": ["run"]}
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}))
    venv = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    env.update(PATH=f"{venv}{os.pathsep}{env['PATH']}", DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    dvc = str(venv / "dvc")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=project, env=env, check=True)
    repro = subprocess.Popen([dvc, "repro"], cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    _wait_for_step(repro, project / "run", 1)
    os.kill(int((project / "libra.pid").read_text()), signal.SIGTERM)
    out, _ = repro.communicate(timeout=300)
    assert repro.returncode != 0, out
    assert (project / "run" / "checkpoints" / "last.ckpt").exists()
    lock = project / "dvc.lock"
    assert not lock.exists() or "train" not in (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    status = subprocess.run([dvc, "status", "--json"], cwd=project, env=env, capture_output=True, text=True, check=True)
    assert "train" in json.loads(status.stdout), status.stdout


# ---- libra prepare never deletes what it did not write ------------------------------------------

def _prepare(out: str, *extra: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.cli", "prepare", "--out", out, "--num-train", "2",
                           "--num-val", "2", *extra], cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)


def test_prepare_refuses_a_folder_it_did_not_write(tmp_path):
    mine = tmp_path / "mine"
    (mine / "images").mkdir(parents=True)
    (mine / "images" / "holiday.png").write_bytes(b"not ours")
    (mine / "notes.txt").write_text("keep me")
    before = _snapshot(tmp_path)
    _assert_named_error(_prepare(str(mine)), str(mine), "not empty")
    _assert_named_error(_prepare(str(mine / "notes.txt")), "not a directory")
    for out in (".", ".."):
        _assert_named_error(_prepare(out, cwd=mine), f"{out}: is the working directory")
    assert _snapshot(tmp_path) == before, "nothing deleted, no stray folder"


def test_prepare_replaces_its_own_set_and_an_empty_folder(tmp_path):
    out = tmp_path / "synthetic"
    out.mkdir()
    assert _prepare(str(out), "--seed", "1").returncode == 0
    first = _snapshot(out)
    (out / "NOT_USED.txt").write_text("what `libra prepare --params` writes for another data source")
    assert _prepare(str(out), "--seed", "2").returncode == 0
    assert _snapshot(out).keys() == first.keys() and _snapshot(out) != first
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic"]


@pytest.mark.parametrize("option, value", [("--image-size", "0"), ("--num-train", "0"), ("--seed", "-1")])
def test_prepare_options_out_of_range_are_usage_errors(tmp_path, option, value):
    _assert_named_error(_prepare(str(tmp_path / "set"), option, value), option)
    assert not (tmp_path / "set").exists()


# ---- config and model errors come before anything is written ------------------------------------

@pytest.mark.parametrize("sets, named", [
    (["train.lr=[1,"], "train.lr"),
    (["train.lr=!!python/object/apply:os.system ['touch {tmp}/PWNED']"], "train.lr"),
    (["trainer.devices=0"], "trainer.devices"),
    (["train.epochs=true"], "train.epochs"),
    (["model.score_thresh=2"], "model.score_thresh"),
    (["train.milestones=[3, 2]"], "train.milestones"),
    (["trainer.accelerator=mps"], "trainer"),
    (["model.anchor_sizes=[8, 16, 32]"], "model.anchor_sizes"),
    (["components.bfp.enabled=true", "components.bfp.refine_level=7"], "components.bfp.refine_level"),
], ids=["malformed-yaml", "yaml-tag", "devices-0", "bool-epochs", "score-thresh", "milestones", "accelerator",
        "anchor-levels", "bfp-level"])
def test_bad_config_fails_before_the_run_dir_is_written(synthetic_root, tmp_path, sets, named):
    run = tmp_path / "run"
    extra = [arg for s in sets for arg in ("--set", s.format(tmp=tmp_path))]
    _assert_named_error(libra(*_train_cmd(synthetic_root, run, *extra), check=False), named)
    assert not run.exists()
    assert not (tmp_path / "PWNED").exists()


def test_backbone_weights_that_are_not_a_state_dict(synthetic_root, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "PWNED"
    weights = {"list.pt": [torch.zeros(3)], "payload.pt": {"w": Payload(marker)}}
    for name, content in weights.items():
        torch.save(content, tmp_path / name)
        sets = ["--set", "model.backbone.name=resnet50", "--set", f"model.backbone.weights={tmp_path / name}"]
        _assert_named_error(libra(*_train_cmd(synthetic_root, run, *sets), check=False),
                            "model.backbone.weights", name)
        assert not run.exists() and not marker.exists()
