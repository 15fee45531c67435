"""`libra tune`: study files, bad input, seeding, pruning, two workers on one study, kill and resume, and one
smoke study end to end with its validation (the selection and validation logic: test_tuning_validation.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from conftest import ROOT, tiny_weights_path
from optuna.trial import TrialState

from detection.config import ConfigError, load_config
from detection.run_dir import RunDir
from pipeline.report.bootstrap import coco_ap
from pipeline.report.per_image import average_precision
from pipeline.report.results import ap_points
from pipeline.tuning import StudyError, TuneOptions, load_study_spec, run_tuning
from pipeline.tuning.liveness import owner_alive, worker_identity
from pipeline.tuning.plan import TuningPlan
from pipeline.tuning.profiles import get_profile
from pipeline.tuning.runner import make_sampler
from pipeline.tuning.space import format_override
from pipeline.tuning.storage import StorageError, resolve_storage
from pipeline.tuning.training import LightningTrainer
from pipeline.tuning.validation import DEFAULT
from stages.cli import main as libra_main

STUDIES = ROOT / "configs" / "studies"
REPORT_FILES = {"summary.json", "trials.csv", "history.png", "importances.png", "contour.png", "intermediate.png",
                "validation.png"}
"""Every study's reports; best_overrides.yaml only when validation adopts a trial."""


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    """One MLflow store for the module (creating its tables takes seconds); studies use their own experiments."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _trial_runs(uri: str, study_name: str) -> list:
    client = _client(uri)
    experiment = client.get_experiment_by_name(f"tune-{study_name}")
    if experiment is None:
        return []
    return list(client.search_runs([experiment.experiment_id], "tags.`optuna.role` = 'trial'"))


def _write_study(directory: Path, name: str, **changes) -> Path:
    """A copy of a shipped study file with top-level fields replaced."""
    raw = yaml.safe_load((STUDIES / f"{name}.yaml").read_text())
    raw.update(changes)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _tune_argv(study: str, storage: str, out: Path, work: Path, data_root: Path, *extra: str) -> list[str]:
    return ["tune", "--study", study, "--profile", "smoke", "--storage", storage, "--out", str(out),
            "--work-dir", str(work), "--set", f"data.root={data_root}", "--set", f"model.backbone.weights={tiny_weights_path(data_root)}",
            "--set", "data.max_images=4", *extra]


def _env(mlflow_uri: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": mlflow_uri}
    env.pop("LIBRA_OPTUNA_STORAGE", None)
    return env


def _run(argv: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "stages.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"libra {' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


# ---- study files ----------------------------------------------------------------------------------

@pytest.mark.parametrize("study", ["balanced_l1", "sampler", "iou_balanced"])
def test_shipped_studies_build_valid_configs(study):
    spec = load_study_spec(study, STUDIES)
    profiles = {name: get_profile(name) for name in ("smoke", "tiny", "coco_1x")}
    for name in ("smoke", "tiny", "coco_1x"):
        plan = TuningPlan.create(study, spec, name, profiles[name])
        cfg = plan.validate()
        for text in spec.fixed:  # the component under study is on in every trial
            key, value = text.split("=")
            node = cfg.to_dict()
            for part in key.split("."):
                node = node[part]
            assert node == yaml.safe_load(value)
    detector = {"balanced_l1": "faster_rcnn", "sampler": "faster_rcnn", "iou_balanced": "retinanet"}[study]
    assert TuningPlan.create(study, spec, "coco_1x", profiles["coco_1x"]).validate().model.detector == detector


@pytest.mark.parametrize("params, message", [
    ({"alpha": {"key": "components.balanced_l1.alpha", "type": "float", "low": 1.0, "high": 0.1}}, "inverted range"),
    ({"alpha": {"key": "components.balanced_l1.alpha", "type": "float", "low": 0.5, "high": 0.5}}, "empty range"),
    ({"k": {"key": "components.iou_balanced_sampling.num_bins", "type": "int", "low": 8, "high": 1}}, "inverted range"),
    ({"t": {"key": "components.iou_balanced_sampling.floor_thr", "type": "categorical", "choices": []}},
     "empty choices"),
    ({"alpha": {"key": "components.balanced_l1.alpha", "type": "uniform", "low": 0.1, "high": 1.0}}, "type"),
    ({"alpha": {"key": "components.balanced_l1.alpha", "type": "float", "lo": 0.1, "high": 1.0}}, "low"),
    ({}, "no parameters"),
])
def test_bad_search_space_is_refused_with_the_file_named(tmp_path, params, message):
    path = _write_study(tmp_path, "balanced_l1", params=params, contour=None, baseline=None)
    with pytest.raises(StudyError) as err:
        load_study_spec("balanced_l1", tmp_path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_contour_baseline_and_config_keys_are_checked(tmp_path):
    _write_study(tmp_path, "balanced_l1", contour=["alpha", "beta"])
    with pytest.raises(StudyError, match="contour"):
        load_study_spec("balanced_l1", tmp_path)
    _write_study(tmp_path, "balanced_l1", baseline={"alpha": 5.0, "gamma": 1.5})
    with pytest.raises(StudyError, match="outside its search space"):
        load_study_spec("balanced_l1", tmp_path)
    _write_study(tmp_path, "balanced_l1", baseline=None, contour=None,
                 params={"alpha": {"key": "components.balanced_l1.alfa", "type": "float", "low": 0.1, "high": 1.0}})
    spec = load_study_spec("balanced_l1", tmp_path)
    with pytest.raises(ConfigError, match="alfa"):  # a key the config does not have: before any trial
        TuningPlan.create("balanced_l1", spec, "smoke", get_profile("smoke")).validate()
    _write_study(tmp_path, "balanced_l1", baseline=None, contour=None,  # floor_thr 1.0 is out of the config's range
                 params={"t": {"key": "components.iou_balanced_sampling.floor_thr", "type": "float", "low": 0.0,
                               "high": 1.0}})
    spec = load_study_spec("balanced_l1", tmp_path)
    with pytest.raises(ConfigError, match="floor_thr"):
        TuningPlan.create("balanced_l1", spec, "smoke", get_profile("smoke")).validate()


def test_overrides_round_trip_and_storage_urls(tmp_path):
    for key, value in [("a.b", 0.1 + 0.2), ("a.b", 3), ("a.b", True), ("a.b", "non_local"), ("a.b", -1.0)]:
        text = format_override(key, value)
        assert yaml.safe_load(text.split("=", 1)[1]) == value
    assert resolve_storage(None, 1, tmp_path).url == f"sqlite:///{tmp_path / 'optuna.db'}"
    assert resolve_storage(None, 2, tmp_path).kind == "journal"
    assert resolve_storage("sqlite:///x.db", 1, tmp_path).path == tmp_path / "x.db"
    assert resolve_storage("journal:j.log", 4, tmp_path).path == tmp_path / "j.log"
    assert resolve_storage("postgresql://u:secret@h/db", 1).display() == "postgresql://u:***@h/db"
    for bad in ("foo", "sqlite://", "journal:"):
        with pytest.raises(StorageError):
            resolve_storage(bad, 1, tmp_path)


def test_sampler_is_seeded_per_trial():
    spec = load_study_spec("sampler", STUDIES)

    def sampled(seed: int) -> list[dict]:
        study = optuna.create_study(direction="maximize")
        for _ in range(12):  # past n_startup_trials: TPE proper
            study.sampler = make_sampler(spec.sampler, seed, len(study.trials))
            study.optimize(lambda t: float(sum(map(float, spec.suggest(t).values()))), n_trials=1)
        return [t.params for t in study.trials]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    first = sampled(0)
    assert first == sampled(0)
    assert first != sampled(1)
    assert len({tuple(p.values()) for p in first}) == len(first)


def test_worker_liveness():
    me = worker_identity()
    assert owner_alive(me) is True
    assert owner_alive({**me, "host": "some-other-host"}) is None
    assert owner_alive({**me, "start": (me["start"] or 0) + 1}) is (me["start"] is None)  # pid reused
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    stat = Path(f"/proc/{child.pid}/stat")
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.05)  # exited, not reaped yet: a zombie is dead
    assert owner_alive({**me, "pid": child.pid, "start": None}) is False
    child.wait()
    assert owner_alive({**me, "pid": child.pid, "start": None}) is False


# ---- bad input: a clear error before any training, nothing left behind ------------------------------

@pytest.mark.parametrize("case", ["unknown_study", "inverted_range", "unreachable_storage", "bad_storage",
                                  "searched_override", "seed_override", "unknown_profile", "one_validation_seed"])
def test_bad_input_fails_early_and_leaves_nothing(case, tmp_path, monkeypatch, capsys, synthetic_root):
    mlflow_db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{mlflow_db}")
    monkeypatch.delenv("LIBRA_OPTUNA_STORAGE", raising=False)
    storage = tmp_path / "optuna.db"
    args = {"study": "balanced_l1", "storage": f"sqlite:///{storage}", "profile": "smoke", "extra": []}
    expected = {"unknown_study": "unknown study 'nope'", "inverted_range": "inverted range",
                "unreachable_storage": "postgresql://nohost:1/x", "bad_storage": "expected a SQLAlchemy URL",
                "searched_override": "is searched by study", "unknown_profile": "unknown profile 'huge'",
                "seed_override": "train.seed is set per training by the study",
                "one_validation_seed": "--validate-seeds must be at least 2"}[case]
    studies = STUDIES
    if case == "unknown_study":
        args["study"] = "nope"
    elif case == "inverted_range":
        studies = tmp_path / "studies"
        _write_study(studies, "balanced_l1", baseline=None, params={
            "alpha": {"key": "components.balanced_l1.alpha", "type": "float", "low": 1.0, "high": 0.1}})
    elif case == "unreachable_storage":
        args["storage"] = "postgresql://nohost:1/x"
    elif case == "bad_storage":
        args["storage"] = "nohost"
    elif case == "searched_override":
        args["extra"] = ["--set", "components.balanced_l1.alpha=0.3"]
    elif case == "seed_override":
        args["extra"] = ["--set", "train.seed=3"]
    elif case == "unknown_profile":
        args["profile"] = "huge"
    elif case == "one_validation_seed":
        args["extra"] = ["--validate-seeds", "1"]
    rc = libra_main(["tune", "--study", args["study"], "--profile", args["profile"], "--storage", args["storage"],
                     "--studies-dir", str(studies), "--out", str(tmp_path / "reports"), "--work-dir",
                     str(tmp_path / "runs"), "--set", f"data.root={synthetic_root}",
                     "--set", f"model.backbone.weights={tiny_weights_path(synthetic_root)}", *args["extra"]])
    err = capsys.readouterr().err
    assert rc == 2 and "libra tune: error:" in err and expected in err, err
    assert not storage.exists(), "no Optuna study created"
    assert not mlflow_db.exists(), "MLflow not touched: no run"
    assert not (tmp_path / "reports").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("option, value", [("--workers", "0"), ("--workers", "-2"), ("--workers", "two"),
                                           ("--trial-seeds", "0"), ("--validate-top", "-1"), ("--validate-seeds", "x")])
def test_bad_counts_are_usage_errors(option, value, capsys):
    try:
        rc = libra_main(["tune", "--study", "balanced_l1", option, value])
    except SystemExit as exit_info:  # refused by the parser
        rc = exit_info.code
    assert rc == 2 and option in capsys.readouterr().err


@pytest.mark.parametrize("case", ["begun_before_paired_seeds", "other_trial_seeds"])
def test_a_study_scored_otherwise_is_not_resumed(case, tmp_path, monkeypatch, capsys):
    """A study begun before trials were scored against the default (one training per trial, its val AP), or
    at other seeds, is refused with what to do; nothing is trained, MLflow is not touched."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    plan = TuningPlan.create("balanced_l1", load_study_spec("balanced_l1", STUDIES), "smoke", get_profile("smoke"))
    study = optuna.create_study(study_name="old", storage=storage, direction="maximize")
    study.set_user_attr("fingerprint", plan.fingerprint())
    study.set_user_attr("uid", "0123abcd")
    if case == "other_trial_seeds":
        study.set_user_attr("objective", {"value": "mean paired difference to the default", "metric": "val/AP",
                                          "seeds": [0, 1, 2]})
    else:
        study.set_user_attr("metric", "val/AP (AP points, 0-100)")
    rc = libra_main(["tune", "--study", "balanced_l1", "--profile", "smoke", "--storage", storage,
                     "--study-name", "old", "--report-only", "--out", str(tmp_path / "reports")])
    err = capsys.readouterr().err
    expected = {"begun_before_paired_seeds": "was begun before trials were scored against the default",
                "other_trial_seeds": "resume it with --trial-seeds 3"}[case]
    assert rc == 2 and expected in err and "--study-name" in err, err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "reports").exists()


# ---- trials ---------------------------------------------------------------------------------------

def test_pruned_trial_ends_pruned_and_small_study_reports(tmp_path, monkeypatch, mlflow_uri, synthetic_root):
    """A pruner that always prunes: the Lightning callback's TrialPruned ends the trial PRUNED."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    studies = tmp_path / "studies"
    _write_study(studies, "balanced_l1", pruner={"type": "threshold", "lower": 101.0, "n_warmup_steps": 0})
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    out = tmp_path / "reports"
    overrides = [f"data.root={synthetic_root}", f"model.backbone.weights={tiny_weights_path(synthetic_root)}",
                 "data.max_images=4"]
    summary = run_tuning(TuneOptions(study="balanced_l1", profile="smoke", n_trials=1, storage=storage,
                                     study_name="pruned", overrides=overrides, out=out, work_dir=tmp_path / "runs",
                                     studies_dir=studies, trial_seeds=1, validate_top=0))
    study = optuna.load_study(study_name="pruned", storage=storage)
    [trial] = study.trials
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [0]
    assert summary["counts"]["pruned"] == 1 and summary["best_value"] is None

    [run] = _trial_runs(mlflow_uri, "pruned")
    assert run.info.status == "KILLED" and run.data.tags["optuna.state"] == "PRUNED"
    history = _client(mlflow_uri).get_metric_history(run.info.run_id, "seed0/val/AP")
    assert [m.step for m in history] == [0]
    # one AP unit: the trial's values, its MLflow run and the study's metric name in AP points (the run file: 0-1);
    # the value reported is the trial's AP minus the default's at the same seed and epoch
    assert study.metric_names == ["val/AP minus the default's, mean over paired seeds (AP points, 0-100)"]
    logged = pd.read_csv(next((tmp_path / "runs").glob("*/trial_00000/seed0/metrics.csv")))["val/AP"].dropna().iloc[-1]
    default = pd.read_csv(next((tmp_path / "runs").glob("*/default/seed0/metrics.csv")))["val/AP"].dropna().iloc[-1]
    assert history[0].value == pytest.approx(100 * logged)
    assert trial.intermediate_values[0] == pytest.approx(100 * (logged - default))
    assert summary["objective"]["default"] == {0: pytest.approx(100 * default)}
    assert trial.user_attrs["seeds"]["0"]["compute"]["trainings"] == 1, "a pruned training's cost is kept"

    assert {p.name for p in out.iterdir()} == REPORT_FILES  # every file, placeholders where not computable
    assert set(summary["placeholder_figures"]) == {"history", "importances", "contour", "validation"}
    assert summary["decision"]["adopted_trial"] is None and "--validate-top 0" in summary["decision"]["why"]
    assert not list((tmp_path / "runs").glob("*/*/seed*/checkpoints")), "checkpoints removed"


def test_two_workers_record_each_trial_once(tmp_path, mlflow_uri, synthetic_root):
    storage = f"journal:{tmp_path / 'optuna.journal'}"
    out = tmp_path / "reports"
    _run(_tune_argv("balanced_l1", storage, out, tmp_path / "runs", synthetic_root, "--workers", "2",
                    "--n-trials", "4", "--study-name", "two-workers", "--trial-seeds", "1", "--validate-top", "0"),
         _env(mlflow_uri))

    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="two-workers",
                              storage=JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal"))))
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(4)), "trial numbers unique, the target total reached"
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert [p.parent.name for p in (tmp_path / "runs").glob("*/default/seed*")] == ["default"], \
        "the default trained once, by one worker, and not as a trial"
    workers = {(t.user_attrs["worker"]["host"], t.user_attrs["worker"]["pid"]) for t in study.trials}
    assert 1 <= len(workers) <= 2

    runs = _trial_runs(mlflow_uri, "two-workers")
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in runs) == numbers, "one MLflow run per trial"
    assert {r.info.run_id for r in runs} == {t.user_attrs["mlflow_run_id"] for t in study.trials}
    parent = study.user_attrs["mlflow_parent_run_id"]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert _client(mlflow_uri).get_run(parent).info.status == "FINISHED"

    assert {p.name for p in out.iterdir()} == REPORT_FILES, "nothing validated: no best_overrides.yaml"
    logged = {a.path for a in _client(mlflow_uri).list_artifacts(parent, "tuning")}
    assert {f"tuning/{name}" for name in REPORT_FILES} == logged


@pytest.mark.slow  # fast: test_worker_liveness (a dead owner), test_two_workers_record_each_trial_once
def test_killed_worker_trial_fails_and_study_resumes(tmp_path, monkeypatch, capsys, mlflow_uri, synthetic_root):
    db = tmp_path / "optuna.db"
    storage = f"sqlite:///{db}"
    argv = _tune_argv("balanced_l1", storage, tmp_path / "reports", tmp_path / "runs", synthetic_root,
                      "--n-trials", "3", "--study-name", "killed", "--set", "train.epochs=3", "--trial-seeds", "1",
                      "--validate-top", "0")
    proc = subprocess.Popen([sys.executable, "-m", "stages.cli", *argv], cwd=ROOT, env=_env(mlflow_uri),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rdb, client, killed = optuna.storages.RDBStorage(storage), _client(mlflow_uri), None
    deadline = time.time() + 300
    while killed is None:  # kill it while a trial trains, after trial 0 completed
        assert proc.poll() is None and time.time() < deadline, "the worker ended before it could be killed mid-trial"
        try:
            trials = optuna.load_study(study_name="killed", storage=rdb).trials
        except KeyError:
            trials = []
        running = [t for t in trials if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs]
        if trials and trials[0].state == TrialState.COMPLETE and running \
                and client.get_run(running[0].user_attrs["mlflow_run_id"]).info.status == "RUNNING":
            proc.send_signal(signal.SIGKILL)
            killed = running[0].number
        time.sleep(0.1)
    proc.wait()
    before = optuna.load_study(study_name="killed", storage=storage).trials
    assert before[killed].state == TrialState.RUNNING, "nothing marks it FAIL by itself"

    _run(argv, _env(mlflow_uri))
    after = optuna.load_study(study_name="killed", storage=storage).trials
    for old, new in zip(before[:killed], after[:killed], strict=True):  # completed trials intact
        assert new.state == old.state == TrialState.COMPLETE
        assert (new.value, new.params, new.datetime_complete) == (old.value, old.params, old.datetime_complete)
    assert after[killed].state == TrialState.FAIL and "died" in after[killed].user_attrs["fail_reason"]
    assert [t.state for t in after if t.number != killed] == [TrialState.COMPLETE] * 3, "the target is reached"
    assert len(after) == 4

    runs = {int(r.data.tags["optuna.trial_number"]): r for r in _trial_runs(mlflow_uri, "killed")}
    assert sorted(runs) == [0, 1, 2, 3], "one MLflow run per trial"
    assert runs[killed].info.status == "FAILED" and runs[killed].data.tags["optuna.state"] == "FAIL"
    assert all(runs[n].info.status == "FINISHED" for n in runs if n != killed)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)  # a finished study: no new trial, reports rewritten
    assert libra_main(argv) == 0
    assert len(optuna.load_study(study_name="killed", storage=storage).trials) == 4
    assert '"finished": 3' in capsys.readouterr().out


def test_smoke_study_end_to_end_with_validation(tmp_path, mlflow_uri, synthetic_root):
    """2 trials at 2 paired seeds, the default at both, then the best trial and the default at 2 fresh seeds:
    summary.json's schema and ranges. The smoke set's 4 validation images are fewer than the report's 30, so
    the verdict must be 'not testable' and the default stands."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    out = tmp_path / "reports"
    proc = _run(_tune_argv("balanced_l1", storage, out, tmp_path / "runs", synthetic_root, "--n-trials", "2",
                           "--study-name", "smoke-validated", "--trial-seeds", "2", "--validate-top", "1",
                           "--validate-seeds", "2"), _env(mlflow_uri))
    summary = json.loads((out / "summary.json").read_text())
    assert {p.name for p in out.iterdir()} == REPORT_FILES
    assert summary["objective"]["seeds"] == [0, 1] and set(summary["objective"]["default"]) == {"0", "1"}
    assert all(0 <= ap <= 100 for ap in summary["objective"]["default"].values())
    assert summary["counts"]["finished"] == 2 and -100 <= summary["best_value"] <= 100
    assert set(summary["best_seeds"]) == {"0", "1"}
    validation = summary["validation"]
    assert validation["seeds"] == [2, 3] and validation["images"] == 4
    assert set(validation["default_ap"]) == set(validation["untrained_ap"]) == {"2", "3"}
    assert all(0 <= ap <= 100 for ap in [*validation["default_ap"].values(), *validation["untrained_ap"].values()])
    [validated] = validation["candidates"]
    assert validated["trial"] == summary["best_trial"] and validated["search_value"] == summary["best_value"]
    assert validated["verdict"] == "not testable" and "fewer than the 30" in validated["statistics"]["reason"]
    assert summary["decision"] == {"adopted_trial": None, "best_overrides": None, "why": validation["decision"]}
    assert validation["decision"].startswith("the default stands: trial")
    compute = summary["compute"]
    assert compute["defaults"]["trainings"] == 2 and compute["validation"]["trainings"] == 4
    assert 2 <= compute["search"]["trainings"] <= 4  # a pruned trial stops after its first seed
    assert compute["total"]["trainings"] == sum(compute[p]["trainings"] for p in ("search", "defaults", "validation"))
    assert all(0 < compute[p]["wall_s"] < 600 and compute[p]["cpu_s"] > 0 for p in ("search", "defaults", "validation"))
    assert "the default stands" in proc.stdout and "compute: search" in proc.stdout
    parent = _client(mlflow_uri).search_runs(
        [_client(mlflow_uri).get_experiment_by_name("tune-smoke-validated").experiment_id],
        "tags.`optuna.role` = 'study'")[0]
    assert parent.data.tags["validation.adopted_trial"] == "None"
    assert parent.data.metrics["compute/validation/trainings"] == 4
    assert "tuning/validation.png" in {a.path for a in _client(mlflow_uri).list_artifacts(parent.info.run_id, "tuning")}

    [default_run] = (tmp_path / "runs").glob(f"smoke-validated-*/validation/{DEFAULT}/seed2")
    cfg = load_config(RunDir(default_run).config)
    finished = LightningTrainer().evaluated(cfg, default_run)
    assert finished is not None and finished.matches.num_images == 4, "a finished validation run is not retrained"
    ap = ap_points(float(coco_ap(average_precision(finished.matches)[0])))
    assert ap == pytest.approx(validation["default_ap"]["2"]), "and gives back the matches it was scored by"
    other_seed = load_config(RunDir(default_run).config, ["train.seed=3"])
    assert LightningTrainer().evaluated(other_seed, default_run) is None, "another config is trained"
