"""The code digest in a run's key: which edits retrain which runs, and that its file lists are complete."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import ROOT, tiny_overrides
from detection.config import load_config
from detection.engine.train import train
from pipeline.plan.code_digest import COMPONENT_CODE, PACKAGE_ROOT, code_digest, code_files
from pipeline.plan.runplan import RunPlan, write_run_plan

RUNS = {  # a config per kind of run: the baseline and each component alone
    "baseline": {},
    **{section: {"components": {section: {"enabled": True}}} for section in COMPONENT_CODE},
}


def _digests(root: Path) -> dict[str, str]:
    return {name: code_digest(config, root) for name, config in RUNS.items()}


@pytest.fixture
def package(tmp_path) -> Path:
    """A copy of ``detection/`` to edit."""
    copy = tmp_path / "detection"
    shutil.copytree(PACKAGE_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def _changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {name for name in before if before[name] != after[name]}


@pytest.mark.parametrize("section", sorted(COMPONENT_CODE))
def test_a_component_edit_changes_only_the_keys_of_runs_that_enable_it(package, section):
    before = _digests(package)
    _append(package / COMPONENT_CODE[section], "\nEDITED = 1\n")
    same_file = {s for s, f in COMPONENT_CODE.items() if f == COMPONENT_CODE[section]}
    assert _changed(before, _digests(package)) == same_file


@pytest.mark.parametrize("shared", ["engine/train.py", "models/retinanet.py", "data/dataset.py", "config.py"])
def test_a_shared_training_code_edit_changes_every_key(package, shared):
    before = _digests(package)
    _append(package / shared, "\nEDITED = 1\n")
    assert _changed(before, _digests(package)) == set(RUNS)


def test_the_digest_hashes_the_run_package_alone():
    """Planning, dispatch, report, tracking and tuning live in ``pipeline/``, outside the hashed package, so
    editing them retrains nothing; every file of ``detection/`` is hashed for a run with every component."""
    everything = {"components": {section: {"enabled": True} for section in COMPONENT_CODE}}
    assert PACKAGE_ROOT == ROOT / "detection"
    assert code_files(everything) == sorted(p for p in PACKAGE_ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def test_docstring_comment_and_layout_edits_change_no_key(package):
    before = _digests(package)
    path = package / "components" / "bfp.py"
    source = path.read_text()
    edited = source.replace('"""', '"""Edited. ', 1) + "\n\n# a comment\n"
    assert edited != source
    path.write_text(edited)
    _append(package / "engine" / "train.py", "\n\n\n# another comment\n")
    assert _changed(before, _digests(package)) == set()


def test_component_files_exist_and_are_not_shared_training_code():
    shared = set(code_files({}))
    for section, name in COMPONENT_CODE.items():
        assert (PACKAGE_ROOT / name).is_file(), section
        assert PACKAGE_ROOT / name not in shared, f"a baseline hashes {name}"


def test_an_unknown_enabled_component_is_an_error():
    with pytest.raises(KeyError, match="no_such_component"):
        code_digest({"components": {"no_such_component": {"enabled": True}}})


_IMPORTED = """
import json, runpy, sys
out, argv = sys.argv[1], sys.argv[2:]
sys.argv = ["libra", *argv]
try:
    runpy.run_module("stages.cli", run_name="__main__")
except SystemExit as exc:
    assert not exc.code, exc.code
finally:
    json.dump(sorted(m.__file__ for n, m in sys.modules.items()
                     if n.split(".")[0] in ("detection", "pipeline") and m.__file__),
              open(out, "w"))
"""


def test_every_module_a_run_imports_is_in_its_digest(synthetic_root, tmp_path):
    """``libra run`` (what dispatch executes per run) trains and evaluates a RetinaNet with every component
    on (Faster R-CNN's model module, imported anyway, imports the samplers); every module it imports must be
    hashed into the key, or be one of the ``pipeline`` modules that only read the plan."""
    sets = ["components.bfp.enabled=true", "components.balanced_l1.enabled=true",
            "components.iou_balanced_cls.enabled=true", "components.iou_balanced_loc.enabled=true",
            *tiny_overrides(synthetic_root, **{"train.max_steps": 2})]
    config = load_config(ROOT / "configs/retinanet_tiny.yaml", sets).model_dump(mode="json")
    plan = tmp_path / "seed0.yaml"
    write_run_plan(RunPlan("retinanet", "all", tuple(COMPONENT_CODE), 0, tmp_path / "run", config), plan)
    hashed = {p.resolve() for p in code_files({"components": {s: {"enabled": True} for s in COMPONENT_CODE}})}
    plan_readers = {ROOT / "pipeline" / name for name in ("__init__.py", "plan/__init__.py", "plan/code_digest.py",
                                                          "plan/runplan.py")}
    listing = tmp_path / "modules.json"
    subprocess.run([sys.executable, "-c", _IMPORTED, str(listing), "run", "--plan", str(plan), "--out",
                    str(tmp_path / "run"), "--device", "cpu"], cwd=ROOT, check=True, capture_output=True, text=True)
    imported = {Path(f).resolve() for f in json.loads(listing.read_text())}
    assert PACKAGE_ROOT / "engine" / "evaluate.py" in imported
    assert imported - hashed - plan_readers == set(), "libra run imports code the run key ignores"
    assert (tmp_path / "run" / "metrics.json").is_file()


class _CalledFiles:
    """The source files of every Python function called while active, in every thread."""

    def __init__(self) -> None:
        self.files: set[str] = set()

    def _profile(self, frame, event, arg):
        if event == "call":
            self.files.add(frame.f_code.co_filename)

    def __enter__(self) -> "_CalledFiles":
        threading.setprofile(self._profile)
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(None)
        threading.setprofile(None)


@pytest.mark.parametrize("detector", ["faster_rcnn", "retinanet"])
def test_a_baseline_run_executes_no_component_code(detector, synthetic_root, tmp_path):
    cfg = load_config(ROOT / f"configs/{detector}_tiny.yaml",
                      tiny_overrides(synthetic_root, **{"train.max_steps": 2, "data.max_images": 8}))
    with _CalledFiles() as called:
        train(cfg, tmp_path / "run", progress_bar=False)
    components = {str((PACKAGE_ROOT / name).resolve()) for name in COMPONENT_CODE.values()}
    assert {str(Path(f).resolve()) for f in called.files if f.endswith(".py")} & components == set()
    assert str((PACKAGE_ROOT / "engine" / "train.py").resolve()) in {str(Path(f).resolve()) for f in called.files}
