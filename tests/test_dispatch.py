"""`libra dispatch` without DVC: run keys and what each state of a run directory leads to, the local
executor's parallel runs against sequential ones, a failed run among others, SIGTERM to the
dispatcher, a preempted job that requeues and resumes, and the SLURM job script (a fake sbatch
records it)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import submitit
import torch
import yaml

from lightning.pytorch.callbacks import Callback

from conftest import ROOT, tiny_overrides
from pipeline.plan.ablation import Ablation, DetectorAblation, run_dir, write_plan
from detection.config import ConfigError, load_config
from pipeline.plan.params import ReportConfig
from pipeline.dispatch import (ExecutionSettings, RunJob, SlurmBackend, SlurmSettings, decide,
                               describe_exit, dispatch, execution_settings, make_backend, planned_runs, prepare_run_dir,
                               slurm_parameters)
from pipeline.dispatch.job import failed_step
from pipeline.plan.params import COMPONENTS, DETECTOR_COMPONENTS, parse_params
from pipeline.report.build import write_report
from pipeline.plan.runplan import EVALUATION_STARTED, RunPlan, compute_run_key
from pipeline.report.results import load_results
from detection.engine.completion import completion
from detection.engine.train import TrainingStopped, train
from detection.run_dir import RunDir
from stages.cli import main as libra_main

DIGEST = "digest-a"


def _plan(data: Path, detector: str, combination: str, seed: int, **sets: object) -> RunPlan:
    components = () if combination == "baseline" else tuple(combination.split("+"))
    enabled = {f"components.{COMPONENTS[c]}.enabled": "true" for c in components}
    config = load_config(ROOT / "configs" / f"{detector}_tiny.yaml", tiny_overrides(data, **enabled, **sets))
    return RunPlan(detector, combination, components, seed, run_dir(detector, combination, seed), config.to_dict())


def _write_ablation(root: Path, plans: list[RunPlan], digest: str = DIGEST) -> None:
    """``root/runs/plan`` for ``plans`` and a data manifest with ``digest``."""
    combinations: dict[str, list[str]] = {}
    for plan in plans:
        combinations.setdefault(plan.detector, [])
        if plan.combination not in combinations[plan.detector]:
            combinations[plan.detector].append(plan.combination)
    detectors = {d: DetectorAblation(d, DETECTOR_COMPONENTS[d], tuple(v)) for d, v in combinations.items()}
    seeds = tuple(sorted({p.seed for p in plans}))
    write_plan(Ablation("test", "table", seeds, detectors, tuple(plans)), root / "runs" / "plan")
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "manifest.json").write_text(json.dumps({"digest": digest}))


def _dispatch(root: Path, executor: str, said: list[str] | None = None):
    settings = ExecutionSettings(executor=executor, jobs=2, threads=1, job_dir=root / "jobs")
    return dispatch(root / "runs/plan", root / "data/manifest.json", settings, root / "runs/index.json",
                    root / "runs/curves.csv", root=root, say=(said if said is not None else []).append)


def test_run_key_follows_the_init_from_checkpoint(synthetic_root, tmp_path):
    init = tmp_path / "init.ckpt"
    init.write_bytes(b"first")  # only hashed here
    _write_ablation(tmp_path, [_plan(synthetic_root, "faster_rcnn", "baseline", 0, **{"model.init_from": str(init)})])
    [run] = planned_runs(tmp_path / "runs/plan", DIGEST, tmp_path)
    init.write_bytes(b"second")
    [retrained] = planned_runs(tmp_path / "runs/plan", DIGEST, tmp_path)
    assert run.key != retrained.key
    init.unlink()
    with pytest.raises(ConfigError, match=r"seed0.yaml: model.init_from=.*init.ckpt does not exist"):
        planned_runs(tmp_path / "runs/plan", DIGEST, tmp_path)


def test_run_key_and_what_each_run_directory_leads_to(synthetic_root, tiny_weights, tmp_path):
    weights = tmp_path / "weights.pt"
    shutil.copy(tiny_weights, weights)
    _write_ablation(tmp_path, [_plan(synthetic_root, "faster_rcnn", "baseline", 0,
                                     **{"model.backbone.weights": str(weights)})])
    [run] = planned_runs(tmp_path / "runs/plan", DIGEST, tmp_path)
    [again] = planned_runs(tmp_path / "runs/plan", DIGEST, tmp_path)
    [other_data] = planned_runs(tmp_path / "runs/plan", "digest-b", tmp_path)
    assert run.key == again.key != other_data.key
    weights.write_bytes(weights.read_bytes() + b"\0")
    [other_weights] = planned_runs(tmp_path / "runs/plan", DIGEST, tmp_path)
    assert other_weights.key not in (run.key, other_data.key)

    directory = tmp_path / run.plan.run_dir
    assert decide(run, tmp_path) == "trained" and prepare_run_dir(run, tmp_path) is None
    assert (directory / "run_key").read_text().strip() == run.key
    assert decide(run, tmp_path) == "trained", "no checkpoint yet: trains from step 0"
    (directory / "checkpoints").mkdir()
    (directory / "checkpoints" / "last.ckpt").write_bytes(b"state")
    assert decide(run, tmp_path) == "resumed"
    (directory / "metrics.json").write_text(json.dumps(completion(3, 4)))
    assert decide(run, tmp_path) == "resumed", "evaluated after a stop: not finished"
    (directory / "metrics.json").write_text(json.dumps(completion(4, 4)))
    assert decide(run, tmp_path) == "reused"

    assert decide(other_data, tmp_path) == "trained"
    reason = prepare_run_dir(other_data, tmp_path)
    assert reason and f"key {run.key} -> {other_data.key}" in reason
    assert sorted(p.name for p in directory.iterdir()) == [".libra", "run_key"], "the old run was deleted"
    assert not any(p.name.startswith(".") for p in directory.parent.iterdir())


class InterruptAfter(Callback):
    """SIGINT to this process after optimizer step ``step``: training stops there, as on Ctrl-C."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_a_stopped_run_evaluated_by_hand_says_so_and_is_never_taken_as_finished(synthetic_root, tmp_path, capsys):
    """Issue 28, case 16: `libra evaluate` of a stopped run marks its metrics `"complete": false` (steps
    trained and scheduled) and says so on the console; dispatch resumes the run, the report lists it as
    not finished. Once resumed to the end and evaluated, it is finished."""
    plan = _plan(synthetic_root, "faster_rcnn", "baseline", 0)
    _write_ablation(tmp_path, [plan])
    [run] = planned_runs(tmp_path / "runs/plan", DIGEST, tmp_path)
    prepare_run_dir(run, tmp_path)
    files, cfg = RunDir(tmp_path / plan.run_dir), plan.experiment_config()
    with pytest.raises(TrainingStopped):
        train(cfg, files.path, progress_bar=False, callbacks=[InterruptAfter(1)])
    capsys.readouterr()

    assert libra_main(["evaluate", "--run", str(files.path)]) == 0
    assert "is not finished, it trained 1 of its 4 scheduled steps" in capsys.readouterr().err
    metrics = json.loads(files.metrics.read_text())
    assert (metrics["complete"], metrics["steps_trained"], metrics["steps_scheduled"]) == (False, 1, 4)
    assert decide(run, tmp_path) == "resumed"
    _, results, unfinished = load_results(tmp_path / "runs/plan", {}, tmp_path)
    assert not results and unfinished == [(plan, "not finished: trained 1 of its 4 scheduled steps")]

    train(cfg, files.path, resume=True, progress_bar=False)
    assert libra_main(["evaluate", "--run", str(files.path)]) == 0
    assert "not finished" not in capsys.readouterr().err
    assert json.loads(files.metrics.read_text())["complete"] is True and decide(run, tmp_path) == "reused"


def test_execution_settings_and_exit_descriptions(synthetic_root, tmp_path):
    written = ExecutionSettings.model_validate({"jobs": 4, "slurm": {"partition": "a", "time_min": 60}})
    settings = execution_settings(written, {"jobs": None, "slurm": {"partition": "b", "time_min": None}})
    assert (settings.jobs, settings.slurm.partition, settings.slurm.time_min) == (4, "b", 60)
    with pytest.raises(ConfigError, match=r"execution .*jobs: Input should be greater than or equal to 1"):
        execution_settings(ExecutionSettings(), {"jobs": 0})
    with pytest.raises(ConfigError, match=r"slurm.partiton: Extra inputs are not permitted"):
        execution_settings(ExecutionSettings(), {"slurm": {"partiton": "gpu"}})

    _write_ablation(tmp_path, [_plan(synthetic_root, "faster_rcnn", "baseline", 0)])
    runs = planned_runs(tmp_path / "runs/plan", DIGEST, tmp_path)
    backend, threads = make_backend(ExecutionSettings(executor="local", jobs=2, job_dir=tmp_path / "jobs"), runs)
    cores = sorted(os.sched_getaffinity(0))
    assert threads == max(1, len(cores) // 2), "each of the jobs gets its share of the cores"
    if len(cores) >= 2:  # and cores of its own
        assert backend.threads == threads and "each kept to" in backend.description

    assert describe_exit("train", 143, "") == ("stopped", "train stopped by SIGTERM; continues from its last "
                                                          "checkpoint", signal.SIGTERM)
    status, reason, _ = describe_exit("train", -signal.SIGKILL, "")
    assert status == "failed" and "killed by SIGKILL" in reason
    status, reason, _ = describe_exit("evaluate", 1, "noise\nlibra run: error: no such checkpoint\nbye\n")
    assert (status, reason) == ("failed", "evaluate exited with 1: libra run: error: no such checkpoint")
    training = "epoch 1/1 step 4 loss 1.0\nlibra run: error: non-finite training loss\n"
    assert failed_step(training) == "train"
    assert failed_step(f"{training}{EVALUATION_STARTED} runs/x on cpu\nTraceback\n") == "evaluate"


def test_execution_defaults_live_in_the_settings_model_and_params_are_typed_by_it():
    assert ExecutionSettings().executor == "local"
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert parse_params(params).execution == ExecutionSettings.model_validate(params["execution"])
    with pytest.raises(ConfigError, match=r"execution.executor"):
        parse_params({**params, "execution": {"executor": "cluster"}})


COST_KEYS = {"cost", "train_time_ratio", "peak_mem_mb", "infer_ms_per_image"}
"""What a run costs depends on how it was executed; everything else in a report must not."""


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _without_cost(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _without_cost(v) for k, v in tree.items() if k not in COST_KEYS}
    if isinstance(tree, list):
        return [_without_cost(v) for v in tree]
    return tree


@pytest.mark.slow  # fast: the SIGTERM test below runs two local jobs at once
def test_local_executor_runs_two_at_once_and_reports_as_one_after_another(synthetic_root, tmp_path):
    """2 runs x 1 thread through submitit's LocalExecutor: the same report as inline, one after another."""
    plans = [_plan(synthetic_root, "faster_rcnn", "baseline", 0), _plan(synthetic_root, "faster_rcnn", "IS", 0)]
    reports = {}
    for executor in ("local", "inline"):
        root = tmp_path / executor
        _write_ablation(root, plans)
        said: list[str] = []
        outcome = _dispatch(root, executor, said)
        assert outcome.exit_code == 0 and {s.status for s in outcome.statuses.values()} == {"trained"}, said
        if executor == "local":
            started = [i for i, line in enumerate(said) if line.startswith("[")]
            finished = [i for i, line in enumerate(said) if "finished in" in line]
            assert len(started) == 2 and max(started) < min(finished), f"not both running at once: {said}"
        write_report(root / "runs/plan", root / "reports", ReportConfig(bootstrap_resamples=50), root=root,
                     index=root / "runs/index.json")
        index = json.loads((root / "runs/index.json").read_text())["runs"]
        reports[executor] = (_without_cost(_read_csv(root / "reports/ablation.csv")),
                             _without_cost(json.loads((root / "reports/metrics.json").read_text())),
                             _without_cost({name: entry["metrics"] for name, entry in index.items()}))
        curves = (root / "runs/curves.csv").read_text().splitlines()
        assert curves[0] == "run,epoch,train_loss,val_AP" and len(curves) == 3
    assert reports["local"] == reports["inline"]

    said = []
    outcome = _dispatch(tmp_path / "local", "local", said)
    assert {s.status for s in outcome.statuses.values()} == {"reused"} and "nothing to run" in said[0]


def test_a_failed_run_does_not_stop_the_others_and_alone_is_retried(synthetic_root, tmp_path):
    nan = {"train.epochs": 2, "train.optimizer": "sgd", "train.milestones": "[1]", "train.lr_gamma": 1e12}
    plans = [_plan(synthetic_root, "faster_rcnn", "baseline", 0), _plan(synthetic_root, "faster_rcnn", "baseline", 1, **nan)]
    _write_ablation(tmp_path, plans)
    outcome = _dispatch(tmp_path, "local")
    good, bad = "faster_rcnn/baseline/seed0", "faster_rcnn/baseline/seed1"
    assert outcome.exit_code == 1 and outcome.unfinished == [bad]
    assert outcome.statuses[good].status == "trained"
    assert outcome.statuses[bad].status == "failed"
    assert "train exited with 1: libra run: error: non-finite training loss at epoch 1" in outcome.statuses[bad].reason
    index = json.loads((tmp_path / "runs/index.json").read_text())["runs"]
    assert "metrics" in index[good] and "metrics" not in index[bad] and index[bad]["status"] == "failed"
    cost = json.loads((tmp_path / "runs/faster_rcnn/baseline/seed0/metrics.json").read_text())["cost"]
    assert cost["threads"] == 1, "the executor's threads (execution.threads), which no run config overrides"

    write_report(tmp_path / "runs/plan", tmp_path / "reports", ReportConfig(bootstrap_resamples=50), root=tmp_path,
                 index=tmp_path / "runs/index.json")
    markdown = (tmp_path / "reports/ablation.md").read_text()
    assert "## Failed runs" in markdown
    assert f"| {bad} | failed | train exited with 1: libra run: error: non-finite training loss" in markdown

    said: list[str] = []
    again = _dispatch(tmp_path, "local", said)
    assert again.statuses[good].status == "reused" and again.statuses[bad].status == "failed"
    assert [line for line in said if line.startswith("[")] == [
        f"[1/1] {bad}: resuming from step 4 (log: runs/faster_rcnn/baseline/seed1/dispatch.log)"]


def test_sigterm_to_the_dispatcher_stops_every_job_resumably(synthetic_root, tmp_path):
    """`libra dispatch` gets SIGTERM while two local jobs train: both save a checkpoint, the dispatcher
    exits 143 with the runs recorded as stopped, and the next dispatch resumes both."""
    plans = [_plan(synthetic_root, "faster_rcnn", "baseline", seed, **{"train.epochs": 6}) for seed in (0, 1)]
    _write_ablation(tmp_path, plans)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["execution"] = {"executor": "local", "jobs": 2, "threads": 1, "job_dir": "jobs"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.Popen([sys.executable, "-m", "stages.cli", "dispatch"], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lasts = [tmp_path / plan.run_dir / "checkpoints" / "last.ckpt" for plan in plans]
    deadline = time.time() + 300
    while not all(last.exists() for last in lasts):
        assert proc.poll() is None and time.time() < deadline, "the runs ended before their first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, output
    index = json.loads((tmp_path / "runs/index.json").read_text())["runs"]
    assert {entry["status"] for entry in index.values()} == {"stopped"}, index
    assert all(entry["reason"].startswith("train stopped by SIGTERM") for entry in index.values())
    steps = [torch.load(last, map_location="cpu", weights_only=False)["global_step"] for last in lasts]
    assert all(4 <= step < 6 * 4 for step in steps), steps

    again = _dispatch(tmp_path, "local")
    assert again.exit_code == 0
    assert [(s.status, s.from_step) for s in again.statuses.values()] == [("resumed", step) for step in steps]


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def test_preempted_job_saves_a_checkpoint_requeues_and_resumes(synthetic_root, tmp_path):
    """submitit's preemption signal (USR2) to a running local job: the job stops training (checkpoint),
    submitit requeues it and it continues with --resume to the full schedule."""
    _write_ablation(tmp_path, [_plan(synthetic_root, "faster_rcnn", "baseline", 0, **{"train.epochs": 6})])
    [run] = planned_runs(tmp_path / "runs/plan", DIGEST, tmp_path)
    prepare_run_dir(run, tmp_path)
    executor = submitit.LocalExecutor(tmp_path / "jobs")
    executor.update_parameters(timeout_min=60)
    job = executor.submit(RunJob(run.name, run.plan_file, run.plan.run_dir, tmp_path, threads=1))
    last = tmp_path / run.plan.run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists():
        assert job.state == "RUNNING" and time.time() < deadline, "the job ended before its first checkpoint"
        time.sleep(0.05)
    [task] = _children(int(job.job_id))
    os.kill(task, getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}"))

    result = job.result()
    assert result.status == "finished", result
    log = (tmp_path / run.plan.run_dir / "dispatch.log").read_text()
    assert log.count(" run --plan ") == 2 and "stopped by SIGTERM; saved" in log and "Restored all states" in log
    assert "preempted" in job.stdout() and "Requeued job" in job.stdout()
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 6 * 4
    assert (tmp_path / run.plan.run_dir / "metrics.json").exists()


def _fake_slurm(bin_dir: Path, record: Path) -> None:
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" "{record}"\necho "Submitted batch job 123"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)


def test_slurm_job_script_asks_for_the_runs_resources(synthetic_root, tmp_path, monkeypatch):
    record = tmp_path / "script.sh"
    _fake_slurm(tmp_path / "bin", record)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    gpu = {"trainer.accelerator": "gpu", "trainer.devices": 4, "trainer.num_nodes": 2, "trainer.strategy": "ddp"}
    _write_ablation(tmp_path, [_plan(synthetic_root, "faster_rcnn", "IS", 0, **gpu)])
    [run] = planned_runs(tmp_path / "runs/plan", DIGEST, tmp_path)
    slurm = SlurmSettings(partition="gpu", cpus_per_task=8, mem_gb=64, time_min=240,
                          extra={"account": "proj", "exclusive": True})
    settings = ExecutionSettings(executor="slurm", job_dir=tmp_path / "jobs", slurm=slurm)
    job = RunJob(run.name, run.plan_file, run.plan.run_dir, tmp_path, threads=None)

    handle = SlurmBackend(settings).start(run, job)
    script = record.read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --time=240", "#SBATCH --requeue", "#SBATCH --signal=USR2@90",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB", "#SBATCH --account=proj", "#SBATCH --exclusive",
                 "#SBATCH --job-name=libra:faster_rcnn/IS/seed0", "export OMP_NUM_THREADS=8"):
        assert line in script.splitlines(), f"{line!r} not in\n{script}"
    command = f"-m stages.cli run --plan {run.plan_file} --out {run.plan.run_dir} --resume --device auto"
    assert command in script and "srun --unbuffered" in script and "-m submitit.core._submit" in script
    submitted = submitit.helpers.DelayedSubmission.load(handle.job.paths.submitted_pickle).function
    assert submitted.command() == [sys.executable, *command.split()]
    assert handle.job.job_id == "123"

    wrong = ExecutionSettings(executor="slurm", slurm=SlurmSettings(gpus_per_node=8))
    with pytest.raises(ConfigError, match=r"execution.slurm.gpus_per_node=8, but the run's trainer.devices asks for 4"):
        slurm_parameters(run, wrong, job)
