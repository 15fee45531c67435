"""Run a study: check everything, open or create it, run its trials in one or more workers, report.

Semantics of ``n_trials``: the study's *target total of finished trials* (COMPLETE + PRUNED), not a
count per invocation. A worker starts a new trial only while finished + running trials are below
the target, so a study interrupted at 7 of 20 and restarted runs 13 more, and a finished study
restarted only rewrites its reports. FAIL trials (a crash, a NaN loss, a killed worker) do not count:
they are replaced. A worker stops after ``max_failures`` failed trials in a row (a systematic error).

Order of work, so that bad input leaves nothing behind: validate the study file, profile and trial
configs (every corner of the search space) and the data set, resolve and open the storage, reach
MLflow (within a bounded time, see ``pipeline.tracking.store.open_store``); only then is the study created
(``load_if_exists``: a restart resumes it) and the parent MLflow run opened. ``--report-only`` on a
study that does not exist creates neither a storage file nor an MLflow store. Trials whose worker
process died on this host are marked FAIL before new trials start (``liveness.py``).

Before its first trial a worker makes sure the default configuration is trained at every seed of the
search (``objective.default_runs``, under the study's lock, so once per study). When the study has reached
its target, this process validates the top trials on fresh seeds (``validation.py``; one training after
another, after the workers of ``--workers N`` have ended) and writes the reports.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from detection.config import ExperimentConfig
from detection.ownership import check_replaceable
from pipeline.plan.params import ReportConfig
from pipeline.tracking.store import dvc_experiment_tags, git_state, project_root
from pipeline.dispatch.processes import cores, start_process
from pipeline.tuning.liveness import fail_dead_trials
from pipeline.tuning.mlflow_runs import StudyTracker
from pipeline.tuning.objective import OBJECTIVE_ATTR, PairedObjective, default_runs, search_compute
from pipeline.tuning.outputs import BEST_OVERRIDES, TUNE, write_reports
from pipeline.tuning.plan import TuningPlan
from pipeline.tuning.profiles import DEFAULT_PROFILE, get_profile
from pipeline.tuning.space import SamplerSpec, StudyError, load_study_spec
from pipeline.tuning.storage import StorageTarget, default_storage, resolve_storage, study_exists
from pipeline.tuning.training import Compute, LightningTrainer, Trainer
from pipeline.tuning.validation import STATISTICS, Validation, validate, validated, validation_seeds

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class TuningError(RuntimeError):
    """The study could not reach its target (failed trials, dead workers)."""


@dataclass
class TuneOptions:
    study: str
    profile: str = DEFAULT_PROFILE
    n_trials: int | None = None
    storage: str | None = None
    workers: int = 1
    study_name: str | None = None
    overrides: list[str] = field(default_factory=list)
    out: Path | None = None
    work_dir: Path = Path("runs/tuning")
    studies_dir: Path = Path("configs/studies")
    seed: int | None = None
    keep_checkpoints: bool = False
    max_failures: int = 3
    report_only: bool = False
    connect_timeout: float = 10.0
    trial_seeds: int = 2
    """Paired seeds each trial (and the default) trains at: 0, 1, ..."""
    validate_top: int = 3
    """Top trials retrained on fresh seeds when the study ends (0: no validation)."""
    validate_seeds: int = 3
    """Fresh seeds of that validation: the ones after the search's."""
    force: bool = False
    """Replace or delete a best_overrides.yaml in ``out`` that libra tune did not write."""
    worker_process: bool = False
    """Internal: this process is one of the workers started by ``--workers N``."""


@dataclass
class Prepared:
    plan: TuningPlan
    target: StorageTarget
    study_name: str
    n_trials: int
    seed: int
    tracker: StudyTracker
    base_cfg: ExperimentConfig
    objective: PairedObjective
    validation_seeds: tuple[int, ...]
    report_settings: ReportConfig
    """The ablation report's settings (params.yaml ``report``), which the validation applies."""
    out: Path


def trial_tags(plan: TuningPlan) -> dict[str, str]:
    return {"libra.stage": "tune", "libra.study": plan.study, "libra.profile": plan.profile_name, **dvc_experiment_tags()}


def make_sampler(spec: SamplerSpec, seed: int, offset: int) -> optuna.samplers.TPESampler:
    """Optuna 5's default TPE (multivariate, constant liar), seeded per trial from ``(seed, offset)``
    (offset: the number of trials already in the study), so a study replays the same way."""
    mixed = int(np.random.SeedSequence([seed, offset]).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=mixed, n_startup_trials=spec.n_startup_trials)


def prepare(opts: TuneOptions) -> Prepared:
    """Every check that needs no storage and no MLflow run; raises ValueError subclasses."""
    if opts.workers < 1:
        raise StudyError(f"--workers must be at least 1, got {opts.workers}")
    if opts.n_trials is not None and opts.n_trials < 1:
        raise StudyError(f"--n-trials must be at least 1, got {opts.n_trials}")
    if opts.max_failures < 1:
        raise StudyError(f"--max-failures must be at least 1, got {opts.max_failures}")
    if opts.trial_seeds < 1:
        raise StudyError(f"--trial-seeds must be at least 1, got {opts.trial_seeds}")
    if opts.validate_top < 0:
        raise StudyError(f"--validate-top must be 0 (no validation) or more, got {opts.validate_top}")
    if opts.validate_top and opts.validate_seeds < 2:
        raise StudyError(f"--validate-seeds must be at least 2, got {opts.validate_seeds}: with one seed an interval "
                         "leaves out the training noise between seeds")
    spec = load_study_spec(opts.study, opts.studies_dir)
    if opts.validate_top and spec.metric not in STATISTICS:
        raise StudyError(f"study {opts.study!r} maximises {spec.metric}, which validation cannot compare (it compares "
                         f"{', '.join(STATISTICS)}); pass --validate-top 0")
    out = (opts.out or Path("reports/tuning") / opts.study).resolve()
    if not opts.worker_process:
        check_replaceable(out / BEST_OVERRIDES, (TUNE,), opts.force)
    profile = get_profile(opts.profile)
    plan = TuningPlan.create(opts.study, spec, opts.profile, profile, opts.overrides)
    base_cfg = plan.validate()
    target = resolve_storage(opts.storage, opts.workers)
    study_name = opts.study_name or f"{opts.study}-{opts.profile}"
    if not opts.storage and not os.environ.get("LIBRA_OPTUNA_STORAGE") and not opts.worker_process:
        other = default_storage(1 if opts.workers > 1 else 2, project_root())
        if not study_exists(target, study_name) and study_exists(other, study_name):
            raise StudyError(f"study {study_name} lives in {other.url}, not in the default storage for "
                             f"--workers {opts.workers} ({target.url}); pass --storage {other.url}")
    search_seeds = tuple(range(opts.trial_seeds))
    return Prepared(plan, target, study_name, opts.n_trials or spec.n_trials,
                    spec.sampler.seed if opts.seed is None else opts.seed,
                    StudyTracker(f"tune-{study_name}"), base_cfg, PairedObjective(plan.metric, search_seeds),
                    validation_seeds(search_seeds, opts.validate_seeds), profile.params.report, out)


def check_data(cfg: ExperimentConfig) -> None:
    from detection.engine.datamodule import load_splits

    load_splits(cfg.data)


def open_study(p: Prepared, storage: optuna.storages.BaseStorage, create: bool) -> optuna.Study:
    """Load the study, or create it (recording what it optimises); refuse a changed search space."""
    kwargs: dict[str, Any] = {"sampler": make_sampler(p.plan.spec.sampler, p.seed, 0),
                              "pruner": p.plan.spec.pruner.build()}
    try:
        study = optuna.load_study(study_name=p.study_name, storage=storage, **kwargs)
    except KeyError:
        if not create:
            raise StudyError(f"study {p.study_name} does not exist in {p.target.display()}") from None
        study = optuna.create_study(study_name=p.study_name, storage=storage, direction="maximize",
                                    load_if_exists=True, **kwargs)
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise StudyError(f"study {p.study_name} in {p.target.display()} minimises; tuning maximises val AP")
    attrs = study.user_attrs
    fingerprint = p.plan.fingerprint()
    objective = p.objective.as_attr()
    if "fingerprint" not in attrs:
        study.set_user_attr("fingerprint", fingerprint)
        study.set_user_attr("uid", uuid.uuid4().hex[:8])
        study.set_user_attr("study", p.plan.study)
        study.set_user_attr("profile", p.plan.profile_name)
        study.set_user_attr("base_config", str(p.plan.base_config))
        study.set_user_attr(OBJECTIVE_ATTR, objective)
        study.set_metric_names([p.plan.objective_name])
        study.set_user_attr("search_space", p.plan.spec.model_dump(mode="json")["params"])
    elif attrs["fingerprint"] != fingerprint:
        raise StudyError(
            f"study {p.study_name} in {p.target.display()} was created with another search space, profile or "
            f"base config (study {attrs.get('study')}, profile {attrs.get('profile')}); resume it with the same "
            "study file and profile, or start a new one with --study-name")
    elif OBJECTIVE_ATTR not in attrs:
        raise StudyError(
            f"study {p.study_name} in {p.target.display()} was begun before trials were scored against the default "
            "configuration: each of its values is one training's val AP at one seed, not a mean paired difference, "
            "and one study cannot mix the two; start a new one with --study-name (the old study stays in the storage)")
    elif attrs[OBJECTIVE_ATTR] != objective:
        seeds = attrs[OBJECTIVE_ATTR].get("seeds", [])
        raise StudyError(
            f"study {p.study_name} in {p.target.display()} scores trials at seeds {seeds}, not "
            f"{list(p.objective.seeds)}; resume it with --trial-seeds {len(seeds)}, or start a new one with "
            "--study-name")
    return study


def counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    return {"finished": sum(t.state in FINISHED for t in trials),
            "running": sum(t.state == TrialState.RUNNING for t in trials),
            "failed": sum(t.state == TrialState.FAIL for t in trials), "total": len(trials)}


def study_work_dir(opts: TuneOptions, p: Prepared, study: optuna.Study) -> Path:
    return opts.work_dir.resolve() / f"{p.study_name}-{study.user_attrs['uid']}"


def work(p: Prepared, study: optuna.Study, parent_run_id: str, opts: TuneOptions, trainer: Trainer) -> None:
    """Train the default at the search's seeds if not yet done, then run trials until finished + running
    trials reach the target."""
    from pipeline.tuning.objective import TrialObjective

    lock = p.target.lock()
    work_dir = study_work_dir(opts, p, study)
    salt = 0 if p.target.local else (os.getpid() % 9973) * 100_003
    failures = 0
    with lock:
        defaults = default_runs(study, p.plan, p.objective, trainer, work_dir, opts.keep_checkpoints,
                                lambda epoch, metrics: p.tracker.log_epoch(parent_run_id, epoch, metrics))

    def on_failed(trial, reason: str) -> None:
        p.tracker.fail_orphan(p.study_name, trial, reason)

    while True:
        lock.acquire()
        try:
            fail_dead_trials(study, on_failed)
            now = counts(study)
            if now["finished"] + now["running"] >= p.n_trials:
                return
            study.sampler = make_sampler(p.plan.spec.sampler, p.seed, now["total"] + salt)
            objective = TrialObjective(p.plan, p.objective, defaults, trainer, p.tracker, parent_run_id, p.study_name,
                                       work_dir, opts.keep_checkpoints, on_started=lock.release,
                                       run_tags=trial_tags(p.plan))
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
        finally:
            lock.release()
        states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
        failed = states.get(objective.trial_number, TrialState.FAIL) == TrialState.FAIL
        failures = failures + 1 if failed else 0
        if failures >= opts.max_failures:
            raise TuningError(f"{failures} trials failed in a row (last: trial {objective.trial_number}: "
                              f"{objective.error}); fix the cause and rerun the same command to resume")


def _worker_argv(opts: TuneOptions, p: Prepared) -> list[str]:
    argv = [sys.executable, "-m", "stages.cli", "tune", "--study", opts.study, "--profile", opts.profile,
            "--n-trials", str(p.n_trials), "--storage", p.target.url, "--study-name", p.study_name,
            "--workers", "1", "--work-dir", str(opts.work_dir.resolve()),
            "--studies-dir", str(opts.studies_dir.resolve()), "--max-failures", str(opts.max_failures),
            "--seed", str(p.seed), "--trial-seeds", str(opts.trial_seeds), "--worker-process"]
    for text in opts.overrides:
        argv += ["--set", text]
    if opts.keep_checkpoints:
        argv.append("--keep-checkpoints")
    return argv


def spawn_workers(opts: TuneOptions, p: Prepared) -> list[int]:
    """Start ``opts.workers`` worker processes on this host and wait; returns their exit codes."""
    trainer = p.base_cfg.trainer
    threads = None
    if trainer.accelerator == "cpu":
        threads = max(1, cores() // opts.workers)
        print(f"{opts.workers} CPU workers: {threads} torch thread(s) each", flush=True)
    gpus = 0
    if trainer.accelerator in ("gpu", "cuda", "auto") and "CUDA_VISIBLE_DEVICES" not in os.environ:
        import torch

        gpus = torch.cuda.device_count()
    procs = []
    for index in range(opts.workers):
        env = {"LIBRA_TUNE_WORKER": str(index)}
        if gpus > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
        procs.append(start_process(_worker_argv(opts, p), threads=threads, env=env))
    try:
        return [proc.wait() for proc in procs]
    except KeyboardInterrupt:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise


def run_tuning(opts: TuneOptions, trainer: Trainer | None = None) -> dict[str, Any]:
    """``libra tune``: returns the study summary (also written to ``<out>/summary.json``). ``trainer``: what
    trains the trials, the default and the validation runs (default: :class:`LightningTrainer`)."""
    trainer = trainer or LightningTrainer()
    p = prepare(opts)
    if not opts.worker_process and not opts.report_only:
        check_data(p.base_cfg)
    create = not (opts.worker_process or opts.report_only)
    if not create and p.target.path is not None and not p.target.path.exists():  # opening would create it
        raise StudyError(f"study {p.study_name} does not exist in {p.target.display()} (no such file)")
    storage = p.target.open(opts.connect_timeout,
                            on_stale=lambda study, trial: p.tracker.fail_orphan(p.study_name, trial, "heartbeat lost"))
    optuna.logging.set_verbosity(optuna.logging.INFO)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if create:
            p.tracker.check()  # MLflow reached before the study is created
            study = open_study(p, storage, create=True)
        else:
            study = open_study(p, storage, create=False)  # an unknown study is refused before MLflow is touched
            p.tracker.check()
    commit, dirty = git_state()
    parent_tags = {**trial_tags(p.plan), "optuna.storage": p.target.display(), "libra.git_commit": commit,
                   "libra.git_dirty": str(dirty).lower()}
    parent_params = {"study": p.plan.study, "profile": p.plan.profile_name, "base_config": str(p.plan.base_config),
                     "n_trials": p.n_trials, "seed": p.seed, "metric": p.plan.objective_name,
                     "trial_seeds": " ".join(map(str, p.objective.seeds)),
                     "fixed": " ".join(p.plan.spec.fixed), "overrides": " ".join(p.plan.overrides),
                     **{f"space.{name}": str(param.model_dump(exclude={"key"}))
                        for name, param in p.plan.spec.params.items()}}
    if opts.worker_process:
        parent_run_id = study.user_attrs.get("mlflow_parent_run_id") or p.tracker.parent_run(
            study, parent_tags, parent_params)
        work(p, study, parent_run_id, opts, trainer)
        return counts(study)

    parent_run_id = p.tracker.parent_run(study, parent_tags, parent_params)
    print(f"study {p.study_name} ({p.target.display()}): target {p.n_trials} finished trials, "
          f"now {counts(study)}; each trial trains at seeds {list(p.objective.seeds)} against the default; "
          f"MLflow {p.tracker.uri} experiment {p.tracker.experiment_name}", flush=True)
    error: BaseException | None = None
    codes: list[int] = []
    validation: Validation | None = None
    try:
        if opts.report_only:
            pass
        elif opts.workers == 1:
            work(p, study, parent_run_id, opts, trainer)
        else:
            with p.target.lock():
                fail_dead_trials(study, lambda t, r: p.tracker.fail_orphan(p.study_name, t, r))
            codes = spawn_workers(opts, p)
        if opts.validate_top and reached(p, counts(study)):
            with p.target.lock():
                validation = validated(study, p.plan, opts.validate_top, p.validation_seeds, p.report_settings,
                                       None if opts.report_only else lambda candidates: validate(
                                           p.plan, candidates, p.validation_seeds, p.report_settings, trainer,
                                           study_work_dir(opts, p, study), opts.keep_checkpoints))
    except BaseException as exc:  # report what exists, then re-raise
        error = exc
    now = counts(study)
    done = reached(p, now)
    decision = validation.decision if validation is not None else default_stands(opts, p, now, error)
    search, defaults = search_compute(study)
    compute = {"search": search, "defaults": defaults,
               "validation": validation.compute if validation is not None else Compute()}
    summary, files = write_reports(study, p.plan, p.objective, p.out, p.n_trials, p.target.display(), validation,
                                   decision, compute, opts.force)
    p.tracker.log_study_outputs(parent_run_id, summary, files)
    if done or error is not None:
        p.tracker.finish_parent(parent_run_id, done)
    summary["worker_exit_codes"] = codes
    print_outcome(p, now, summary, validation)
    if error is not None:
        raise error
    bad = [f"worker {i} exited with {code}" for i, code in enumerate(codes) if code != 0]
    if bad:
        print(f"warning: {', '.join(bad)}", file=sys.stderr, flush=True)
    if now["finished"] < p.n_trials and now["running"] == 0 and not opts.report_only:
        raise TuningError(f"study {p.study_name} has {now['finished']} of {p.n_trials} finished trials "
                          f"({'; '.join(bad) or 'workers stopped'}); rerun the same command to resume")
    return summary


def reached(p: Prepared, now: dict[str, int]) -> bool:
    """Whether the study, with ``now``'s counts, has reached its target and runs no trial."""
    return now["finished"] >= p.n_trials and now["running"] == 0


def default_stands(opts: TuneOptions, p: Prepared, now: dict[str, int], error: BaseException | None) -> str:
    """Why the default stands when nothing was validated."""
    if not opts.validate_top:
        return ("the default stands: validation skipped (--validate-top 0), so the search's best is not checked on "
                "fresh seeds")
    if error is not None:
        return f"the default stands: libra tune stopped before validating ({type(error).__name__}: {error})"
    if not reached(p, now):
        return (f"the default stands: the study has {now['finished']} of {p.n_trials} finished trials "
                f"({now['running']} running); its top trials are validated once it reaches its target")
    return (f"the default stands: --report-only trains nothing, and the study holds no validation of its top "
            f"{opts.validate_top} trials on seeds {list(p.validation_seeds)} with these statistics settings; rerun "
            "without --report-only")


def print_outcome(p: Prepared, now: dict[str, int], summary: dict[str, Any], validation: Validation | None) -> None:
    """The study's result on the console: the search's best, each validated trial, the decision, the compute."""
    best = "" if summary["best_value"] is None else (
        f"; the search's best: trial {summary['best_trial']}, {summary['best_value']:+.2f} AP over the default at "
        f"seeds {list(p.objective.seeds)} (the maximum of noisy estimates: biased upwards)")
    print(f"study {p.study_name}: {now['finished']}/{p.n_trials} finished ({summary['counts']['pruned']} pruned), "
          f"{now['failed']} failed, {now['running']} running{best}; reports in {p.out}", flush=True)
    if validation is not None:
        print(f"validation on fresh seeds {validation.seeds}, {validation.images} validation images, "
              f"{round(100 * validation.confidence)}% two-level bootstrap (seeds and images); the default's AP "
              f"per seed: {', '.join('-' if ap is None else f'{ap:.1f}' for ap in validation.default_ap.values())}",
              flush=True)
        for c in validation.candidates:
            measured = c.measured(len(validation.candidates))
            reason = c.statistics.get("reason")
            print(f"  trial {c.trial} ({', '.join(f'{k}={v}' for k, v in c.params.items())}; search "
                  f"{c.search_value:+.2f}): {measured + ': ' if measured else ''}{c.verdict}"
                  + (f" ({reason})" if reason else ""), flush=True)
    decision = summary["decision"]
    adopted = f"; wrote {p.out / BEST_OVERRIDES}" if decision["best_overrides"] is not None else (
        f"; {BEST_OVERRIDES} not written")
    print(f"{decision['why']}{adopted}", flush=True)
    print("compute: " + "; ".join(f"{part} {Compute.model_validate(spent).text()}"
                                  for part, spent in summary["compute"].items()), flush=True)
