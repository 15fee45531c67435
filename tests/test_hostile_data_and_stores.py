"""Hostile input: broken or malicious COCO sets, and MLflow / Optuna stores that race, hang or refuse writes.

Every failure is a named error (``libra <stage>: error: ...`` naming the file, record or store, exit
code 2, no traceback), within a bounded time, and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from conftest import ROOT
from PIL import Image

from detection.config import ConfigError, apply_overrides, load_config
from detection.data import CocoDetectionDataset, DatasetError, validate_coco, write_synthetic_coco
from detection.engine.coco_eval import evaluate_coco
from detection.engine.splits import coco_subset
from pipeline.tracking.store import TrackingStoreError, open_store
from pipeline.mmdet_import import find_mmdet_config
from pipeline.tuning.mlflow_runs import PARENT_ATTR, StudyTracker
from stages.cli import main as libra_main

HANG = 600
"""Seconds after which a subprocess that imports MLflow counts as hung: far beyond how long a loaded machine needs.
No test times how fast something fails; each checks what it did (one request, nothing written)."""


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clean") / "synthetic"
    write_synthetic_coco(root, seed=0, num_train=8, num_val=4)
    return root


@pytest.fixture
def coco_set(clean_set: Path, tmp_path: Path) -> Path:
    """A private copy of the clean set, to damage."""
    return Path(shutil.copytree(clean_set, tmp_path / "coco"))


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow store for the in-process tests of this module (creating its tables takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _annotations(root: Path, split: str) -> Path:
    return root / "annotations" / f"instances_{split}.json"


def _edit(root: Path, split: str, change) -> dict[str, Any]:
    """Apply ``change(coco)`` to a split's annotation file; returns the changed content."""
    path = _annotations(root, split)
    coco = json.loads(path.read_text())
    change(coco)
    path.write_text(json.dumps(coco))
    return coco


def _prepare(root: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """``libra prepare`` validating ``root`` as a COCO set, in this process: (exit code, stderr)."""
    rc = libra_main(["prepare", "--config", str(ROOT / "configs" / "faster_rcnn_tiny.yaml"),
                     "--set", "data.source=coco", "--set", f"data.root={root}"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def _png_header(width: int, height: int) -> bytes:
    """A PNG file that declares ``width`` x ``height`` RGB pixels and holds almost none."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ---- images -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "not_an_image", "empty"])
def test_a_broken_image_file_is_named_by_validation_and_by_the_dataset(damage, coco_set, capsys):
    image = coco_set / "images" / "val" / "000003.png"
    data = image.read_bytes()
    image.write_bytes({"truncated": data[: len(data) // 2], "not_an_image": b"<html>not found</html>",
                       "empty": b""}[damage])
    rc, err = _prepare(coco_set, capsys)
    assert rc == 2
    assert f"libra prepare: error: {_annotations(coco_set, 'val')}: image id 3: cannot decode image file {image}" in err

    split = validate_coco(_annotations(coco_set, "train"), coco_set / "images" / "train")
    dataset = CocoDetectionDataset(split)
    (coco_set / "images" / "train" / "000002.png").write_bytes(data[:100])  # broken after validation
    assert dataset[0][0].shape == (3, 128, 128), "an intact image still reads"
    with pytest.raises(DatasetError, match=r"instances_train\.json: image id 2: cannot decode image file .*000002"):
        dataset[1]


def test_a_decompression_bomb_is_refused_before_decoding(coco_set, capsys):
    (coco_set / "images" / "val" / "000002.png").write_bytes(_png_header(20000, 20000))
    _edit(coco_set, "val", lambda coco: coco["images"][1].update(width=20000, height=20000))
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        rc, err = _prepare(coco_set, capsys)
    assert rc == 2
    assert f"{_annotations(coco_set, 'val')}: image id 2: image file" in err
    assert "declares 20000x20000 = 400000000 pixels, over the limit of 89478485" in err
    assert Image.MAX_IMAGE_PIXELS == 89478485, "Pillow's own limit is restored"


def test_the_pixel_limit_is_an_argument(clean_set):
    annotations, images = _annotations(clean_set, "train"), clean_set / "images" / "train"
    assert validate_coco(annotations, images, max_image_pixels=128 * 128).max_image_pixels == 128 * 128
    with pytest.raises(DatasetError, match=r"image id 1: .* declares 128x128 = 16384 pixels, over the limit of 16383"):
        validate_coco(annotations, images, max_image_pixels=128 * 128 - 1)
    with pytest.raises(DatasetError, match="max_image_pixels must be >= 1, got 0"):
        validate_coco(annotations, images, max_image_pixels=0)


@pytest.mark.parametrize("file_name", ["../../../outside.png", "sub/../../000001.png", "/etc/hostname"])
def test_a_file_name_outside_the_image_directory_is_refused(file_name, coco_set, capsys):
    shutil.copy(coco_set / "images" / "train" / "000001.png", coco_set.parent / "outside.png")  # refused though there
    _edit(coco_set, "train", lambda coco: coco["images"][4].update(file_name=file_name))
    rc, err = _prepare(coco_set, capsys)
    assert rc == 2
    assert (f"{_annotations(coco_set, 'train')}: image id 5: 'file_name' {file_name!r} must be a path inside the "
            "image directory") in err


# ---- annotations ------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("iscrowd", 2), ("iscrowd", -1), ("iscrowd", True), ("area", -4.0),
                                          ("area", "12")])
def test_bad_iscrowd_or_area_is_refused(field, value, coco_set, capsys):
    coco = _edit(coco_set, "train", lambda coco: coco["annotations"][1].update({field: value}))
    ann = coco["annotations"][1]
    rc, err = _prepare(coco_set, capsys)
    assert rc == 2
    where = f"{_annotations(coco_set, 'train')}: annotation id {ann['id']} (image_id {ann['image_id']})"
    assert f"{where}: '{field}'" in err


def test_missing_area_and_iscrowd_are_filled_as_coco_does_and_said_once(coco_set, capsys):
    def strip(coco: dict[str, Any]) -> None:
        for ann in coco["annotations"]:
            del ann["area"]
        for ann in coco["annotations"][:3]:
            del ann["iscrowd"]

    coco = _edit(coco_set, "train", strip)
    rc, err = _prepare(coco_set, capsys)
    assert rc == 0
    n = len(coco["annotations"])
    line = (f"warning: {_annotations(coco_set, 'train')}: of {n} annotations, {n} without 'area' (using bbox w*h) "
            "and 3 without 'iscrowd' (using 0), as COCO does")
    assert err.count(line) == 1, err
    assert "instances_val.json" not in err

    rc, err = _prepare(coco_set, capsys)  # the same file again in this process: said once
    assert rc == 0 and "without 'area'" not in err


def test_a_split_without_annotations_is_warned_about(coco_set, capsys):
    _edit(coco_set, "val", lambda coco: coco.update(annotations=[]))
    rc, err = _prepare(coco_set, capsys)
    assert rc == 0
    assert f"warning: {_annotations(coco_set, 'val')}: no annotations in the 4 selected images" in err


def _eval_set(root: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Ground truth with small, medium and large boxes (COCO area ranges) and jittered detections of them."""
    rng = np.random.default_rng(0)
    root.mkdir()
    images, annotations, detections = [], [], []
    for image_id in range(1, 7):
        Image.new("RGB", (320, 240)).save(root / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 320, "height": 240})
        for side in (12, 24, 48, 64, 110, 150):  # areas 144 ... 22500: every COCO range
            ann_id = len(annotations) + 1
            x, y = float(rng.uniform(0, 320 - side)), float(rng.uniform(0, 240 - side))
            category = 1 + ann_id % 2
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": category,
                                "bbox": [x, y, side, side], "area": side * side, "iscrowd": 0})
            dx, dy, dw, dh = rng.normal(0, side * 0.1, 4)
            detections.append({"image_id": image_id, "category_id": category, "score": float(rng.uniform(0.3, 1)),
                               "bbox": [x + dx, y + dy, side + dw, side + dh]})
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    return {"images": images, "annotations": annotations, "categories": categories}, detections


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
def test_metrics_without_area_and_iscrowd_equal_those_with_them(backend, tmp_path):
    gt, detections = _eval_set(tmp_path / "images")
    bare = copy.deepcopy(gt)
    for ann in bare["annotations"]:
        del ann["area"], ann["iscrowd"]
    metrics = {}
    for name, content in (("full", gt), ("bare", bare)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(content))
        split = validate_coco(path, tmp_path / "images")
        metrics[name] = evaluate_coco(coco_subset(split), detections, backend)
    assert metrics["bare"] == metrics["full"]
    assert all(metrics["full"]["bbox"][k] > 0.1 for k in ("APs", "APm", "APl")), "every area range is exercised"


# ---- MLflow and Optuna stores: concurrent creators ------------------------------------------------------

_RACER = """
import sys, time
from pathlib import Path

import optuna

from pipeline.tracking.ablation import AblationTracker
from pipeline.tuning.mlflow_runs import StudyTracker
from pipeline.tuning.storage import resolve_storage

sync, uri, storage, index = sys.argv[1:]
(Path(sync) / f"ready-{index}").touch()
while not (Path(sync) / "go").exists():
    time.sleep(0.005)
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(study_name="race", storage=resolve_storage(storage, 1).open(), direction="maximize",
                            load_if_exists=True)
print(StudyTracker("tune-race", uri).parent_run(study, {}, {"n_trials": 4}))
print(AblationTracker("ablation", uri).parent("key", "ablation race", {"p": "1"}, {})[0])
"""


def test_writers_starting_together_on_a_fresh_store_create_one_experiment_and_one_parent_each(tmp_path):
    """4 processes, released at once, each get-or-create a study's parent run (`libra tune`) and an ablation's
    (`libra track`) in an MLflow store that does not exist yet, the study in an Optuna SQLite file that does not
    exist yet."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(tmp_path), uri, f"sqlite:///{tmp_path / 'optuna.db'}",
                               str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(4)]
    deadline = time.monotonic() + HANG  # waits for the files the writers touch; the bound only stops a hang
    while len(list(tmp_path.glob("ready-*"))) < 4:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a writer did not start"
        time.sleep(0.01)
    (tmp_path / "go").touch()
    results = [p.communicate(timeout=HANG) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
    parents = {tuple(out.split()) for out, _ in results}
    assert len(parents) == 1, f"every writer got the same two parent runs: {parents}"

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "ablation", "tune-race"]
    for name, parent in zip(("tune-race", "ablation"), parents.pop(), strict=True):
        runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        assert [r.info.run_id for r in runs] == [parent], f"exactly one parent run in {name}"


def test_a_study_whose_parent_attribute_was_lost_finds_its_parent_by_tag(tmp_path, mlflow_uri):
    study = optuna.create_study(study_name="lost", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    study.set_user_attr("uid", "u1")
    tracker = StudyTracker("tune-lost", mlflow_uri)
    parent = tracker.parent_run(study, {}, {})
    study.set_user_attr(PARENT_ATTR, "0" * 32)  # a run this store does not have
    assert tracker.parent_run(study, {}, {}) == parent and study.user_attrs[PARENT_ATTR] == parent
    tracker.client.delete_run(parent)
    assert tracker.parent_run(study, {}, {}) != parent, "a deleted parent is replaced"


# ---- stores that do not answer, cannot be written, or do not exist -----------------------------------------

def _libra(*args: str, uri: str, timeout: float = HANG) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": uri}
    for name in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "LIBRA_OPTUNA_STORAGE"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "stages.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("uri, named", [
    ("http://127.0.0.1:1", "cannot reach the MLflow store http://127.0.0.1:1"),
    ("sqlite:////proc/libra/mlflow.db", "MLflow store sqlite:////proc/libra/mlflow.db: directory /proc/libra does not "
                                        "exist"),
    ("sqlite:////proc/mlflow.db", "MLflow store sqlite:////proc/mlflow.db: cannot write /proc/mlflow.db"),
])
def test_track_fails_fast_on_a_store_it_cannot_use(uri, named, tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"digest": "0" * 64}))
    proc = _libra("track", "--manifest", str(manifest), "--plan", str(tmp_path / "plan"), "--report",
                  str(tmp_path / "reports"), "--out", str(tmp_path / "mlflow.json"), uri=uri)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"libra track: error: {named}" in proc.stderr
    assert list(tmp_path.iterdir()) == [manifest]


def test_a_server_that_does_not_answer_times_out(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, never replies
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(TrackingStoreError, match=f"cannot reach the MLflow store {uri}: .*timed out"):
            open_store(uri)
        silent.setblocking(False)
        connections = []
        with contextlib.suppress(BlockingIOError):
            while True:
                connections.append(silent.accept()[0])
        for connection in connections:
            connection.close()
    assert len(connections) == 1, "one request that times out, not retried (what a wall-clock limit would time)"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ, "the probe's settings are not left behind"


def test_tune_fails_fast_on_an_mlflow_server_that_is_not_there(tmp_path, monkeypatch, capsys, clean_set):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    monkeypatch.delenv("LIBRA_OPTUNA_STORAGE", raising=False)
    rc = libra_main(["tune", "--study", "balanced_l1", "--profile", "smoke", "--storage",
                     f"sqlite:///{tmp_path / 'optuna.db'}", "--out", str(tmp_path / "reports"), "--work-dir",
                     str(tmp_path / "runs"), "--set", f"data.root={clean_set}", "--set", "data.max_images=4"])
    err = capsys.readouterr().err
    assert rc == 2 and "libra tune: error: cannot reach the MLflow store http://127.0.0.1:1" in err, err
    study_names = [s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'optuna.db'}")]
    assert study_names == [], "no study created"
    assert not (tmp_path / "reports").exists() and not (tmp_path / "runs").exists()


def test_a_database_store_is_probed_with_a_timeout_and_its_password_hidden():
    with pytest.raises(TrackingStoreError) as error:
        open_store("postgresql://user:secret@127.0.0.1:1/mlflow")
    assert "postgresql://user:***@127.0.0.1:1/mlflow" in str(error.value) and "secret" not in str(error.value)


@pytest.mark.skipif(importlib.util.find_spec("psycopg") is None, reason="the PostgreSQL driver is an optional extra")
def test_an_unreachable_optuna_database_fails_fast(tmp_path, clean_set):
    proc = _libra("tune", "--study", "balanced_l1", "--profile", "smoke", "--storage", "postgresql://u:p@127.0.0.1:1/x",
                  "--connect-timeout", "5", "--set", f"data.root={clean_set}", "--out", str(tmp_path / "out"),
                  uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "postgresql://u:***@127.0.0.1:1/x" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_store_is_refused(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    open_store(f"sqlite:///{store / 'mlflow.db'}")
    store.chmod(0o500)
    (store / "mlflow.db").chmod(0o400)
    try:
        with pytest.raises(TrackingStoreError, match="cannot write"):
            open_store(f"sqlite:///{store / 'mlflow.db'}")
    finally:
        store.chmod(0o700)


def test_report_only_on_an_unknown_study_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("LIBRA_OPTUNA_STORAGE", raising=False)
    storage = tmp_path / "optuna.db"
    argv = ["tune", "--study", "balanced_l1", "--profile", "smoke", "--study-name", "nope", "--report-only",
            "--out", str(tmp_path / "reports"), "--work-dir", str(tmp_path / "runs")]
    for url in (f"sqlite:///{storage}", f"journal:{tmp_path / 'optuna.journal'}"):
        assert libra_main([*argv, "--storage", url]) == 2
        err = capsys.readouterr().err
        assert "libra tune: error: study nope does not exist in" in err and "Traceback" not in err
        assert sorted(p.name for p in tmp_path.iterdir()) == [], "no storage file, no MLflow store, no reports"

    optuna.create_study(study_name="other", storage=f"sqlite:///{storage}")  # a storage without that study
    assert libra_main([*argv, "--storage", f"sqlite:///{storage}"]) == 2
    assert "study nope does not exist" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "reports").exists()


def test_a_store_in_a_missing_directory_is_refused_without_creating_it(tmp_path, monkeypatch, capsys, clean_set):
    missing = tmp_path / "nonexistent" / "dir"
    with pytest.raises(TrackingStoreError, match=f"directory {missing} does not exist"):
        open_store(f"sqlite:///{missing / 'mlflow.db'}")
    assert not (tmp_path / "nonexistent").exists()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("LIBRA_OPTUNA_STORAGE", raising=False)
    rc = libra_main(["tune", "--study", "balanced_l1", "--profile", "smoke", "--storage",
                     f"sqlite:///{missing / 'x.db'}", "--out", str(tmp_path / "reports"), "--work-dir",
                     str(tmp_path / "runs"), "--set", f"data.root={clean_set}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"directory {missing} does not exist" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---- an mmdet config is read, never run ---------------------------------------------------------------------

@pytest.mark.parametrize("line, named", [
    ("model = __import__('os').system('touch {marker}')", ":2: __import__('os').system"),
    ("import os", ":2: the statement `import os`"),
    ("model = [dict(type=t) for t in ('A', 'B') if t]", ":2: [dict(type=t) for t in"),
    ("model = open('{marker}', 'w')", ":2: open("),
], ids=["call", "import", "comprehension", "open"])
def test_an_mmdet_config_that_is_not_plain_data_is_refused_naming_the_line_and_never_runs(tmp_path, capsys, line,
                                                                                          named):
    marker = tmp_path / "PWNED"
    config = tmp_path / "my_config.py"
    base = find_mmdet_config("faster-rcnn_r50_fpn_1x_coco")
    config.write_text(f"_base_ = '{base}'\n{line.format(marker=marker)}\n")
    rc = libra_main(["import-mmdet", str(config), "--out", str(tmp_path / "out.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{config}{named}" in err and "not plain data" in err, err
    assert "Traceback" not in err and not marker.exists() and not (tmp_path / "out.yaml").exists()


# ---- config values and YAML files -------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["train.lr", "train.weight_decay", "components.balanced_l1.alpha",
                                   "components.balanced_l1.gamma", "components.balanced_l1.beta", "train.lr_gamma"])
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_a_non_finite_float_is_refused_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"{re.escape(field)}: Input should be a finite number"):
        load_config(ROOT / "configs" / "faster_rcnn_tiny.yaml", [f"{field}={value}"])


def test_a_key_twice_in_a_yaml_file_is_refused_naming_file_key_and_line(tmp_path, capsys):
    config = tmp_path / "twice.yaml"
    config.write_text("train:\n  optimizer: adamw\n  lr: 0.001\ntrain:\n  optimizer: sgd\n")
    with pytest.raises(ConfigError, match=rf"{config}: line 4: key 'train' appears twice .*first at line 1"):
        load_config(config)
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text() + "\nprofile: tiny\n")
    rc = libra_main(["plan", "--params", str(params), "--out", str(tmp_path / "plan")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{params}: line" in err and "key 'profile' appears twice" in err, err
    with pytest.raises(ConfigError, match=r"override .*: line 1: key 'a' appears twice"):
        apply_overrides({}, ["train.x={a: 1, a: 2}"])


def test_a_params_file_is_named_when_it_is_invalid_or_not_utf8(tmp_path, capsys):
    params = tmp_path / "my_params.yaml"
    params.write_text((ROOT / "params.yaml").read_text().replace("design: table", "design: tabel", 1))
    assert "design: tabel" in params.read_text()
    assert libra_main(["plan", "--params", str(params), "--out", str(tmp_path / "plan")]) == 2
    err = capsys.readouterr().err
    assert str(params) in err and "design" in err, err
    params.write_bytes(b"profile: tiny\n# caf\xe9\n")
    assert libra_main(["plan", "--params", str(params), "--out", str(tmp_path / "plan")]) == 2
    err = capsys.readouterr().err
    assert f"{params}: not UTF-8 text" in err and "Traceback" not in err, err
    assert not (tmp_path / "plan").exists()


def test_a_16_bit_grayscale_image_is_scaled_to_8_bits_and_a_float_one_refused(coco_set, capsys):
    image = coco_set / "images" / "train" / "000001.png"
    gray = np.asarray(Image.open(image).convert("L"))
    Image.fromarray(gray.astype(np.uint16) * 257).save(image)  # mode I;16, values up to 65535
    assert Image.open(image).mode == "I;16"
    split = validate_coco(_annotations(coco_set, "train"), coco_set / "images" / "train")
    pixels = CocoDetectionDataset(split)[0][0]
    assert pixels.shape == (3, 128, 128)
    assert np.array_equal((pixels[0] * 255).round().byte().numpy(), gray), "the gray levels, not white"

    Image.fromarray(gray.astype(np.float32)).save(coco_set / "images" / "val" / "000002.png", format="TIFF")
    rc, err = _prepare(coco_set, capsys)
    assert rc == 2 and "image id 2: image file" in err and "'F' pixels (32-bit) with no defined scale" in err, err
