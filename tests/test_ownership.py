"""libra deletes or overwrites only what it wrote (its marker), one writer per run directory, and a filesystem
fault is a one-line message (issue 28; docs/reliability.md).

Read-only targets and full disks are simulated by a mocked write that raises the errno the kernel gives
(EROFS, ENOSPC, EBUSY for renaming a mount point): root (as CI runs) ignores permission bits and no
tmpfs can be mounted there.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, tiny_overrides
from detection.config import read_yaml
from pipeline.plan.params import parse_params
from pipeline.plan.ablation import plan_ablation, write_plan
from pipeline.dispatch import ExecutionSettings, dispatch, planned_runs, prepare_run_dir
from pipeline.dispatch.runs import check_run_dirs
from detection.ownership import (MARKER, TRAIN, NotOwnedError, RunLockedError, check_replaceable, mark,
                                remove_owned, replacing, run_lock, writer_of)
from detection.run_dir import RunDir
from stages.cli import main as libra_main


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _foreign(folder: Path) -> Path:
    """A folder of someone else's: a file, a subfolder."""
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "thesis.tex").write_text("years of work")
    (folder / "notes.txt").write_text("keep me")
    return folder


def _refused(capsys, rc: int, *named: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("libra "), err
    for name in named:
        assert name in err, err
    return err


# ---- the rule --------------------------------------------------------------------------------------------

def test_only_an_empty_folder_or_one_marked_by_the_writer_is_replaceable(tmp_path):
    check_replaceable(tmp_path / "new", ("libra plan",))
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", ("libra plan",))
    mine = _foreign(tmp_path / "mine")
    with pytest.raises(NotOwnedError, match=rf"{mine}: not empty and not written by `libra plan`.*--force"):
        check_replaceable(mine, ("libra plan",))
    mark(mine, "libra prepare")
    with pytest.raises(NotOwnedError, match="not written by `libra plan`"):
        check_replaceable(mine, ("libra plan",))  # another command's output is not the plan's either
    check_replaceable(mine, ("libra plan",), force=True)
    mark(mine, "libra plan")
    check_replaceable(mine, ("libra plan",))


def test_a_folder_or_a_part_of_one_is_deleted_only_under_the_writers_marker(tmp_path):
    """What tuning deletes: a trial's run directory left by a deleted study, each trial's checkpoints."""
    trial = RunDir(_foreign(tmp_path / "trial_00000"))
    (trial.checkpoints / "last.ckpt").parent.mkdir()
    (trial.checkpoints / "last.ckpt").write_bytes(b"weights")
    with pytest.raises(NotOwnedError, match=rf"{trial.path}: not empty and not written by `libra train`"):
        remove_owned(trial.checkpoints, (TRAIN,), owner=trial.path)
    with pytest.raises(NotOwnedError, match=rf"{trial.path}: not empty"):
        remove_owned(trial.path, (TRAIN,))
    assert (trial.checkpoints / "last.ckpt").exists() and (trial.path / "notes.txt").exists()

    mark(trial.path, TRAIN)
    remove_owned(trial.checkpoints, (TRAIN,), owner=trial.path)
    assert not trial.checkpoints.exists() and (trial.path / "notes.txt").exists()
    remove_owned(trial.checkpoints, (TRAIN,), owner=trial.path)  # nothing left to delete
    remove_owned(trial.path, (TRAIN,))
    assert list(tmp_path.iterdir()) == []


def test_a_failed_or_interrupted_replacement_leaves_the_old_folder_and_no_stray_one(tmp_path, monkeypatch):
    """The read-only mount point: renaming it fails with EBUSY (mocked); nothing is left beside it."""
    out = tmp_path / "ro"
    with replacing(out, "libra plan") as staging:
        (staging / "a.yaml").write_text("first")
    real_rename = Path.rename

    def rename(self, target):
        if self == out:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(self))
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="busy"):
        with replacing(out, "libra plan") as staging:
            (staging / "a.yaml").write_text("second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ro"]
    assert _files(out) == {MARKER: b"libra plan\n", "a.yaml": b"first"}


# ---- libra plan --out ------------------------------------------------------------------------------------

def test_plan_refuses_a_folder_it_did_not_write_and_its_sibling_tmp(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    clone, sibling = _foreign(tmp_path / "clone"), _foreign(tmp_path / "clone.tmp")
    before = _files(tmp_path)
    _refused(capsys, libra_main(["plan", "--out", str(clone)]), str(clone), "--force")
    assert _files(tmp_path) == before, "nothing deleted, nothing written"

    assert libra_main(["plan", "--out", str(tmp_path / "plan")]) == 0
    assert writer_of(tmp_path / "plan") == "libra plan"
    assert libra_main(["plan", "--out", str(tmp_path / "plan")]) == 0, "its own plan is replaced"
    assert libra_main(["plan", "--out", str(clone), "--force"]) == 0
    assert not (clone / "notes.txt").exists() and (clone / "ablation.yaml").exists()
    assert _files(sibling) == {k.removeprefix("clone.tmp/"): v for k, v in before.items()
                               if k.startswith("clone.tmp/")}, "a sibling named like a staging folder is kept"


def test_a_plan_written_before_markers_needs_force_by_hand_and_dvc_deletes_it_itself(tmp_path):
    """DVC removes a stage's outputs before it reruns the stage, so `dvc repro` never meets an old plan."""
    ablation = plan_ablation(parse_params(read_yaml(ROOT / "params.yaml")), ROOT / "configs")
    write_plan(ablation, tmp_path / "plan")
    (tmp_path / "plan" / MARKER).unlink()
    with pytest.raises(NotOwnedError, match="--force"):
        write_plan(ablation, tmp_path / "plan")
    write_plan(ablation, tmp_path / "plan", force=True)


# ---- libra dispatch's run directories ----------------------------------------------------------------------

@pytest.fixture
def planned(tmp_path):
    """The default plan under ``tmp_path`` (runs/plan, data/manifest.json, weights); returns (root, first run's
    directory)."""
    ablation = plan_ablation(parse_params(read_yaml(ROOT / "params.yaml")), ROOT / "configs")
    write_plan(ablation, tmp_path / "runs/plan")
    (tmp_path / "data").mkdir()
    (tmp_path / "data/manifest.json").write_text('{"digest": "d"}')
    first = ablation.runs[0]
    weights = tmp_path / first.config["model"]["backbone"]["weights"]
    weights.parent.mkdir(parents=True, exist_ok=True)
    weights.write_bytes(b"w")
    return tmp_path, tmp_path / first.run_dir


def _dispatch(root: Path, force: bool = False):
    return dispatch(root / "runs/plan", root / "data/manifest.json", ExecutionSettings(executor="inline"),
                    root / "runs/index.json", root / "runs/curves.csv", root=root, say=lambda _: None, force=force)


@pytest.mark.parametrize("writer", [None, "libra train"], ids=["foreign", "trained-by-hand"])
def test_dispatch_refuses_a_run_directory_it_did_not_make_before_running_anything(planned, writer):
    root, run_dir = planned
    _foreign(run_dir)
    if writer:
        mark(run_dir, writer)
    before = _files(root)
    with pytest.raises(NotOwnedError, match=rf"{run_dir}: not empty and not written by `libra dispatch`.*--force"):
        _dispatch(root)
    assert _files(root) == before


def test_dispatch_discards_its_own_run_directories_old_ones_included_and_any_with_force(planned):
    root, run_dir = planned
    run = planned_runs(root / "runs/plan", "d", root)[0]
    for setup in ("legacy", "force"):
        _foreign(run_dir)
        if setup == "legacy":  # made by libra dispatch before it marked its directories: a run_key, no marker
            (run_dir / "run_key").write_text("an older key\n")
        check_run_dirs([run], root, force=setup == "force")
        assert prepare_run_dir(run, root)
        assert sorted(p.name for p in run_dir.iterdir()) == [MARKER, "run_key"]
        assert not any(p.name.startswith(".") for p in run_dir.parent.iterdir())
        for p in run_dir.iterdir():
            p.unlink()


# ---- libra prepare --out -------------------------------------------------------------------------------------

def test_prepare_marks_its_set_and_replaces_an_unmarked_one_only_with_force(tmp_path, capsys):
    out = tmp_path / "synthetic"
    args = ["prepare", "--out", str(out), "--num-train", "2", "--num-val", "2"]
    assert libra_main(args) == 0 and writer_of(out) == "libra prepare"
    (out / MARKER).unlink()  # a set written before markers, or someone's set laid out the same way
    before = _files(tmp_path)
    _refused(capsys, libra_main(args), str(out), "not empty", "--force")
    assert _files(tmp_path) == before
    assert libra_main([*args, "--force"]) == 0 and writer_of(out) == "libra prepare"


@pytest.mark.parametrize("fault", [errno.EROFS, errno.ENOSPC])
def test_prepare_on_a_read_only_or_full_disk_is_a_message_and_leaves_nothing(tmp_path, capsys, monkeypatch, fault):
    """The image write fails as on a read-only file system or a full disk (mocked)."""
    from PIL import Image

    def save(self, path, *args, **kwargs):
        raise OSError(fault, os.strerror(fault), str(path))

    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "synthetic"
    _refused(capsys, libra_main(["prepare", "--out", str(out), "--num-train", "2", "--num-val", "2"]),
             os.strerror(fault), "000001.png")
    assert list(tmp_path.iterdir()) == [], "no staging folder left"


def test_out_through_a_file_is_a_message(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    _refused(capsys, libra_main(["prepare", "--out", str(tmp_path / "file" / "set"), "--num-train", "2",
                                 "--num-val", "2"]), str(tmp_path / "file"), "Not a directory")


def test_sigterm_during_prepare_leaves_no_staging_folder(tmp_path):
    out = tmp_path / "synthetic"
    proc = subprocess.Popen([sys.executable, "-m", "stages.cli", "prepare", "--out", str(out), "--num-train", "5000",
                             "--num-val", "2"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    staging = None
    while staging is None:  # until it writes images
        assert proc.poll() is None, proc.communicate()[1]
        staging = next((p for p in tmp_path.glob(".synthetic.*.tmp") if (p / "images" / "train").is_dir()), None)
    proc.terminate()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


# ---- the run directory's one writer ------------------------------------------------------------------------

def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    with run_lock(run):
        script = ("import sys; from detection.ownership import run_lock\n"
                  f"with run_lock({str(run)!r}): sys.exit('took it')")
        proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert "RunLockedError" in proc.stderr and f"pid {os.getpid()} on host" in proc.stderr, proc.stderr
        with pytest.raises(RunLockedError, match=rf"{run}: another libra process writes .*pid {os.getpid()}"):
            with run_lock(run):
                pass
    assert not run.exists(), "the lock and the folder it made are gone; nothing was written"
    with run_lock(run):
        pass


def _train(root: Path, out: Path, prelude: str = "") -> subprocess.CompletedProcess:
    """`libra train` of a tiny config into ``out`` in a fresh process (Lightning binds its log handler to the
    stderr it finds at import), after running ``prelude`` there."""
    argv = ["train", "--config", str(ROOT / "configs" / "faster_rcnn_tiny.yaml"), "--out", str(out),
            *[a for s in tiny_overrides(root) for a in ("--set", s)]]
    script = f"import sys\n{prelude}\nfrom stages.cli import main\nsys.exit(main({argv!r}))"
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _named(proc: subprocess.CompletedProcess, *named: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("libra "), proc.stderr
    for name in named:
        assert name in proc.stderr, proc.stderr


def test_train_refuses_a_foreign_folder_and_a_second_writer(synthetic_root, tmp_path):
    mine = _foreign(tmp_path / "mine")
    (mine / "metrics.csv").write_text("step,my_metric\n0,1\n")
    before = _files(mine)
    _named(_train(synthetic_root, mine), str(mine), "--force")
    assert _files(mine) == before
    run = tmp_path / "run"
    with run_lock(run):
        _named(_train(synthetic_root, run), "another libra process writes", f"pid {os.getpid()}")
    assert not run.exists()


# ---- libra pretrain --out ----------------------------------------------------------------------------------

def test_pretrain_refuses_a_folder_and_a_file_it_did_not_write(tmp_path, capsys, monkeypatch):
    """The pre-training itself is replaced by a stand-in that writes the file: what is tested is the stage."""
    import detection.engine.pretrain

    def pretrain(cfg, out):
        Path(out).write_bytes(b"weights")
        return {"val_accuracy": 1.0, "chance_accuracy": 0.1, "seconds_generate": 0, "seconds_train": 0}

    monkeypatch.setattr(detection.engine.pretrain, "pretrain", pretrain)
    _refused(capsys, libra_main(["pretrain", "--out", str(tmp_path)]), f"{tmp_path}: is a directory")
    out = tmp_path / "backbone.pt"
    out.write_bytes(b"someone's weights")
    _refused(capsys, libra_main(["pretrain", "--out", str(out)]), str(out), "an existing file", "--force")
    assert out.read_bytes() == b"someone's weights"
    assert libra_main(["pretrain", "--out", str(out), "--force"]) == 0 and writer_of(out) == "libra pretrain"
    assert libra_main(["pretrain", "--out", str(out)]) == 0, "its own file is replaced"


def test_a_fresh_run_replaces_the_config_yaml_of_a_failed_start(tmp_path):
    from detection.config import load_config, save_config
    from detection.engine.train import _write_config

    config = ROOT / "configs" / "faster_rcnn_tiny.yaml"
    stale, fresh = load_config(config, ["train.lr=0.5"]), load_config(config)
    save_config(stale, tmp_path / "config.yaml")
    _write_config(fresh, tmp_path, resume=True)
    assert load_config(tmp_path / "config.yaml") == stale, "a resumed run keeps the config it was checked against"
    _write_config(fresh, tmp_path, resume=False)
    assert load_config(tmp_path / "config.yaml") == fresh


@pytest.mark.parametrize("fault", [errno.EROFS, errno.ENOSPC])
def test_train_on_a_read_only_or_full_disk_is_a_message(synthetic_root, tmp_path, fault):
    """The first write of the run (config.yaml) fails as on a read-only file system or a full disk (mocked)."""
    prelude = ("import os, detection.engine.train as train\n"
               "def save_config(cfg, path):\n"
               f"    raise OSError({fault}, os.strerror({fault}), str(path))\n"
               "train.save_config = save_config")
    run = tmp_path / "run"
    _named(_train(synthetic_root, run, prelude), os.strerror(fault), "config.yaml")
    assert not (run / ".libra.lock").exists()
