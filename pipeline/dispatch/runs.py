"""The planned runs with their keys, what each run directory needs (reuse, resume, train) and readying it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.plan.ablation import file_digest, plan_path
from detection.config import ConfigError
from detection.engine.completion import cut_short
from detection.io import write_text_atomic
from detection.ownership import DISPATCH, check_replaceable, mark, remove_owned, writer_of
from detection.run_dir import RunDir
from pipeline.plan.runplan import RunPlan, compute_run_key, read_plan_summary, read_run_plan

Action = Literal["reused", "resumed", "trained"]


@dataclass(frozen=True)
class PlannedRun:
    plan: RunPlan
    plan_file: Path
    key: str

    @property
    def name(self) -> str:
        return self.plan.name


def planned_runs(plan_dir: Path, data_digest: str, root: Path) -> list[PlannedRun]:
    """The runs of ``plan_dir/ablation.yaml`` in plan order, each with its key."""
    weights: dict[Path, str] = {}
    runs = []
    for entry in read_plan_summary(plan_dir).runs:
        plan_file = plan_path(entry.detector, entry.combination, entry.seed, plan_dir)
        plan = read_run_plan(plan_file)
        model = plan.config["model"]
        fix = ("pre-train it (`dvc repro pretrain`; for resnet50 put torchvision's ImageNet state_dict there) "
               "or point the config at the weights file")
        digest = _input_digest(plan_file, "model.backbone.weights", model["backbone"]["weights"], root, weights, fix)
        init = _input_digest(plan_file, "model.init_from", model.get("init_from"), root, weights,
                             "point it at a `libra train` checkpoint or a detector state_dict")
        runs.append(PlannedRun(plan, plan_file, compute_run_key(plan.config, data_digest, digest, init)))
    return runs


def _input_digest(plan_file: Path, field: str, source: str | None, root: Path, digests: dict[Path, str],
                  fix: str) -> str | None:
    """The digest of the file a run's ``field`` names (None if it names none), each file hashed once."""
    if source is None:
        return None
    path = Path(source) if Path(source).is_absolute() else root / source
    if not path.is_file():
        raise ConfigError(f"{plan_file}: {field}={source} does not exist; {fix}")
    return digests.setdefault(path, file_digest([path]))


def check_run_dirs(runs: list[PlannedRun], root: Path, force: bool = False) -> None:
    """Before any job starts: every run directory that is there must be one libra dispatch made, as it may
    discard it (:func:`prepare_run_dir`). One holding a run key (dispatch made it before it marked its
    directories) is marked as dispatch's; with ``force`` any is. Raises
    :class:`~detection.ownership.NotOwnedError` naming the first other one."""
    for run in runs:
        directory = root / run.plan.run_dir
        if (directory.is_dir() and writer_of(directory) != DISPATCH
                and (force or RunDir(directory).run_key.is_file())):
            mark(directory, DISPATCH)
        check_replaceable(directory, (DISPATCH,))


def decide(run: PlannedRun, root: Path) -> Action:
    """What ``run``'s directory needs (see :mod:`pipeline.dispatch`); an evaluation of a run that was stopped
    before the end of its schedule (``libra evaluate`` by hand) is not reused."""
    files = RunDir(root / run.plan.run_dir)
    if files.run_key.exists() and files.run_key.read_text().strip() == run.key:
        if files.metrics.exists() and cut_short(json.loads(files.metrics.read_text())) is None:
            return "reused"
        if files.checkpoint("last").exists():
            return "resumed"
    return "trained"


def prepare_run_dir(run: PlannedRun, root: Path) -> str | None:
    """Makes ``run``'s directory ready for its job; returns why an old directory was discarded, if one was."""
    directory = root / run.plan.run_dir
    key_file = RunDir(directory).run_key
    old_key = key_file.read_text().strip() if key_file.exists() else None
    discarded = None
    if directory.exists() and old_key != run.key:
        remove_owned(directory, (DISPATCH,))
        discarded = (f"its config, data or weights changed (key {old_key} -> {run.key})" if old_key
                     else f"no {key_file.name}: its start was interrupted")
    directory.mkdir(parents=True, exist_ok=True)
    mark(directory, DISPATCH)
    write_text_atomic(key_file, run.key + "\n")
    return discarded


def resumed_step(run: PlannedRun, root: Path) -> int:
    """The optimizer step ``run``'s last checkpoint was saved at."""
    from detection.engine.checkpoint import read_checkpoint

    return int(read_checkpoint(RunDir(root / run.plan.run_dir).checkpoint("last")).get("global_step", 0))
