"""Tuning's selection and validation on a synthetic objective with known noise: no training.

:class:`SyntheticTrainer` stands in for Lightning. A training's AP (points) is ``true_ap(alpha)`` of the Balanced
L1 study's knob plus noise drawn from the training's seed and knobs (sd ``noise_sd``), and its evaluation is
a real COCO evaluation of synthetic detections: image i holds one object, detected with IoU ``u_i + shift``,
where ``u_i`` depends on the seed alone (the same images are hard for every configuration at a seed, as with
paired seeds) and ``shift`` sets the AP (COCO AP = 27.5 + 100 * shift for shifts in [-0.05, 0.5]). So the
true difference of a trial to the default is known, and the verdicts can be checked against it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from conftest import ROOT

from detection.config import ExperimentConfig, load_config
from detection.data import write_synthetic_coco
from detection.ownership import NotOwnedError, marker_path
from pipeline.plan.params import ReportConfig
from pipeline.report.per_image import match_images
from pipeline.tuning import TuneOptions, run_tuning
from pipeline.tuning.plan import TuningPlan
from pipeline.tuning.profiles import get_profile
from pipeline.tuning.space import load_study_spec
from pipeline.tuning.training import TrainedRun
from pipeline.tuning.validation import Candidate, top_trials, validate

STUDIES = ROOT / "configs" / "studies"
DEFAULT_ALPHA = 0.5  # detection/config.py's Balanced L1 alpha: the default configuration of the study
SETTINGS = ReportConfig()  # the report's statistics, as params.yaml leaves them


class SyntheticTrainer:
    def __init__(self, true_ap: Callable[[float], float], noise_sd: float, images: int = 400,
                 untrained_ap: float = 0.0, fail: Callable[[ExperimentConfig], bool] = lambda cfg: False):
        self.true_ap, self.noise_sd, self.images = true_ap, noise_sd, images
        self.untrained, self.fail = untrained_ap, fail
        self.trainings: list[tuple[float, int]] = []

    def ap(self, cfg: ExperimentConfig) -> float:
        knobs = cfg.components.balanced_l1
        rng = np.random.default_rng([cfg.train.seed, round(knobs.alpha * 1e6), round(knobs.gamma * 1e6)])
        return self.true_ap(knobs.alpha) + self.noise_sd * float(rng.standard_normal())

    def train(self, cfg: ExperimentConfig, out: Path, on_epoch=None, evaluate: bool = False) -> TrainedRun:
        self.trainings.append((cfg.components.balanced_l1.alpha, cfg.train.seed))
        if self.fail(cfg):
            raise RuntimeError("loss is NaN")
        ap = self.ap(cfg)
        validations = {}
        for epoch in range(cfg.train.epochs):
            validations[epoch] = {"val/AP": ap}
            if on_epoch is not None:
                on_epoch(epoch, validations[epoch])
        if evaluate:  # what LightningTrainer leaves behind: the run's config, evaluated
            (out / "evaluated.json").parent.mkdir(parents=True, exist_ok=True)
            (out / "evaluated.json").write_text(json.dumps(cfg.to_dict()))
        return TrainedRun(validations, self.matches(ap, cfg.train.seed) if evaluate else None)

    def evaluated(self, cfg: ExperimentConfig, out: Path) -> TrainedRun | None:
        done = out / "evaluated.json"
        if not done.exists() or json.loads(done.read_text()) != json.loads(json.dumps(cfg.to_dict())):
            return None
        return TrainedRun({}, self.matches(self.ap(cfg), cfg.train.seed))

    def matches(self, ap: float, seed: int):
        hardness = np.random.default_rng([seed, 7]).random(self.images)
        iou = np.clip(hardness + ap / 100 - 0.275, 0.01, 1.0)
        gt = {"images": [{"id": i, "width": 128, "height": 128} for i in range(self.images)],
              "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, 100, 100], "area": 10000.0,
                               "iscrowd": 0} for i in range(self.images)],
              "categories": [{"id": 1, "name": "object"}]}
        detections = [{"image_id": i, "category_id": 1, "bbox": [0.0, 0.0, 100 * float(v), 100.0], "score": float(v)}
                      for i, v in enumerate(iou)]
        return match_images(gt, detections)

    def untrained_ap(self, cfg: ExperimentConfig, out: Path) -> float:
        return self.untrained


def linear(gain_at_01: float) -> Callable[[float], float]:
    """True AP 50 at the default alpha 0.5, ``gain_at_01`` more at alpha 0.1, linear in alpha."""
    return lambda alpha: 50.0 + gain_at_01 * (DEFAULT_ALPHA - alpha) / 0.4


@pytest.fixture(scope="module")
def plan() -> TuningPlan:
    return TuningPlan.create("balanced_l1", load_study_spec("balanced_l1", STUDIES), "smoke", get_profile("smoke"))


def candidate(alpha: float, search_value: float = 1.0, trial: int = 1) -> Candidate:
    return Candidate(trial=trial, params={"alpha": alpha, "gamma": 1.5}, search_value=search_value)


# ---- verdicts against the known truth ------------------------------------------------------------------

@pytest.mark.parametrize("case, true_ap, noise_sd, alpha, verdict", [
    ("truly better, by more than the MDE", linear(8.0), 0.5, 0.1, "better"),
    ("truly worse", linear(8.0), 0.5, 0.9, "worse"),
    ("no effect, little noise", linear(0.0), 0.05, 0.1, "equivalent"),
    ("an effect below the MDE, in much noise", linear(0.5), 4.0, 0.1, "not resolved"),
])
def test_verdict_follows_the_truth(case, true_ap, noise_sd, alpha, verdict, plan, tmp_path):
    trainer = SyntheticTrainer(true_ap, noise_sd)
    result = validate(plan, [candidate(alpha)], (2, 3, 4), SETTINGS, trainer, tmp_path)
    [c] = result.candidates
    assert c.verdict == verdict, (case, c.statistics)
    assert (result.adopted == 1) is (verdict == "better")
    assert result.decision.startswith("trial 1 beats" if verdict == "better" else "the default stands")
    s = c.statistics
    truth = true_ap(alpha) - true_ap(DEFAULT_ALPHA)
    assert s["ci_low"] <= s["delta"] <= s["ci_high"] and s["seeds"] == 3 and s["images"] == 400
    if verdict == "better":
        assert truth > s["mde"] and s["ci_low"] > 0
    if verdict == "not resolved":
        assert 0 < truth < s["mde"]
    assert sorted(trainer.trainings) == sorted((a, seed) for a in (alpha, DEFAULT_ALPHA) for seed in (2, 3, 4))
    assert result.compute.trainings == 6
    assert set(result.default_ap) == {2, 3, 4} and all(40 < ap < 60 for ap in result.default_ap.values())


def test_of_several_better_trials_the_largest_is_adopted_after_bonferroni(plan, tmp_path):
    trainer = SyntheticTrainer(linear(8.0), 0.5)
    result = validate(plan, [candidate(0.3, 3.0, trial=4), candidate(0.1, 2.0, trial=9)], (2, 3, 4), SETTINGS,
                      trainer, tmp_path)
    assert [c.trial for c in result.candidates] == [4, 9]
    assert all(c.verdict == c.adjusted_verdict == "better" for c in result.candidates)
    assert result.adopted == 9
    widths = [(c.statistics["adjusted_ci_high"] - c.statistics["adjusted_ci_low"],
               c.statistics["ci_high"] - c.statistics["ci_low"]) for c in result.candidates]
    assert all(adjusted > plain for adjusted, plain in widths), "the family interval is the wider"


@pytest.mark.parametrize("guard, trainer, reason", [
    ("a failed training", SyntheticTrainer(linear(8.0), 0.5, fail=lambda cfg: cfg.train.seed == 3
                                           and cfg.components.balanced_l1.alpha == 0.1),
     "trial_00001 at seed 3 has no result (loss is NaN)"),
    ("a default that did not learn", SyntheticTrainer(linear(8.0), 0.5, untrained_ap=48.0), "did not learn"),
    ("too few validation images", SyntheticTrainer(linear(8.0), 0.5, images=20), "fewer than the 30"),
])
def test_guards_make_a_trial_not_testable(guard, trainer, reason, plan, tmp_path):
    result = validate(plan, [candidate(0.1)], (2, 3, 4), SETTINGS, trainer, tmp_path)
    [c] = result.candidates
    assert c.verdict == "not testable" and reason in c.statistics["reason"], guard
    assert result.adopted is None and "trial 1 not testable" in result.decision


def test_an_interrupted_validation_trains_only_what_it_had_not_finished(plan, tmp_path):
    def interrupt(cfg: ExperimentConfig) -> bool:
        if cfg.train.seed == 4 and cfg.components.balanced_l1.alpha == 0.1:
            raise KeyboardInterrupt
        return False

    with pytest.raises(KeyboardInterrupt):
        validate(plan, [candidate(0.1)], (2, 3, 4), SETTINGS, SyntheticTrainer(linear(8.0), 0.5, fail=interrupt),
                 tmp_path / "interrupted")
    resumed = SyntheticTrainer(linear(8.0), 0.5)
    result = validate(plan, [candidate(0.1)], (2, 3, 4), SETTINGS, resumed, tmp_path / "interrupted")
    assert resumed.trainings == [(0.1, 4)], "the default at 3 seeds and the trial at 2 were finished"
    assert (result.compute.trainings, result.compute.reused) == (6, 5)
    whole = validate(plan, [candidate(0.1)], (2, 3, 4), SETTINGS, SyntheticTrainer(linear(8.0), 0.5),
                     tmp_path / "whole")
    assert result.candidates == whole.candidates and result.default_ap == whole.default_ap


def test_top_trials_are_the_completed_ones_of_highest_value():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    values = [0.5, 2.0, None, 2.0, -1.0, 1.5]
    for value in values:
        trial = study.ask({"alpha": optuna.distributions.FloatDistribution(0.1, 1.0)})
        if value is None:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, value)
    assert [c.trial for c in top_trials(study, 3)] == [1, 3, 5]
    assert [c.search_value for c in top_trials(study, 10)] == [2.0, 2.0, 1.5, 0.5, -1.0]


# ---- the whole command with the synthetic trainer -------------------------------------------------------

@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """A built-in set for the data checks of `libra tune` (the synthetic trainer reads no image)."""
    root = tmp_path_factory.mktemp("data") / "synthetic"
    write_synthetic_coco(root, seed=0, num_train=8, num_val=8, image_size=64)
    return root


def _tune(tmp_path: Path, data_root: Path, trainer: SyntheticTrainer, **options) -> dict:
    return run_tuning(TuneOptions(**{
        "study": "balanced_l1", "profile": "smoke", "n_trials": 6, "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
        "overrides": [f"data.root={data_root}"], "out": tmp_path / "reports", "work_dir": tmp_path / "runs",
        "validate_top": 2, **options}), trainer=trainer)


def test_study_adopts_a_truly_better_value_and_refuses_otherwise(tmp_path, monkeypatch, data_root):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out, best_file = tmp_path / "reports", tmp_path / "reports" / "best_overrides.yaml"
    trainer = SyntheticTrainer(lambda alpha: 50.0 + 20.0 * (alpha - DEFAULT_ALPHA), 0.5)  # larger alpha: better
    summary = _tune(tmp_path, data_root, trainer, study_name="better")

    assert summary["objective"]["seeds"] == [0, 1] and set(summary["objective"]["default"]) == {0, 1}
    study = optuna.load_study(study_name="better", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for t in complete:  # each trial's value: the mean over its seeds of its AP minus the default's
        seeds = t.user_attrs["seeds"]
        assert set(seeds) == {"0", "1"}
        assert t.value == pytest.approx(np.mean([s["value"] - s["default"] for s in seeds.values()]))
    validation = summary["validation"]
    assert validation["seeds"] == [2, 3, 4] and [c["trial"] for c in validation["candidates"]] == \
        [c.number for c in sorted(complete, key=lambda t: (-t.value, t.number))[:2]]
    adopted = summary["decision"]["adopted_trial"]
    assert adopted == validation["adopted"] is not None
    [adopted_row] = [c for c in validation["candidates"] if c["trial"] == adopted]
    assert adopted_row["verdict"] == "better" and adopted_row["statistics"]["ci_low"] > 0
    written = yaml.safe_load(best_file.read_text())
    assert written == summary["decision"]["best_overrides"]
    cfg = load_config(ROOT / "configs" / "faster_rcnn_tiny.yaml", written)  # usable as --set overrides
    assert cfg.components.balanced_l1.enabled and cfg.components.balanced_l1.alpha == adopted_row["params"]["alpha"]
    assert written[0] == "components.balanced_l1.enabled=true" and f"alpha={adopted_row['params']['alpha']!r}" in \
        written[1]
    assert marker_path(best_file).read_text().strip() == "libra tune"
    trials_ran = sum(len(t.user_attrs.get("seeds", {})) for t in study.trials)
    assert summary["compute"]["search"]["trainings"] == trials_ran
    assert summary["compute"]["defaults"]["trainings"] == 2 and summary["compute"]["validation"]["trainings"] == 9
    assert summary["compute"]["total"]["trainings"] == trials_ran + 11
    assert len(trainer.trainings) == trials_ran + 11, "the default trained once per seed, never as a trial"
    assert (out / "validation.png").stat().st_size > 0 and "validation" not in summary["placeholder_figures"]

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.data.tags["validation.adopted_trial"] == str(adopted)
    assert parent.data.metrics[f"validation/trial_{adopted}/delta"] == pytest.approx(adopted_row["statistics"]["delta"])
    child = client.get_run(complete[0].user_attrs["mlflow_run_id"])
    assert child.data.params["trial.seeds"] == "0 1"
    seed1 = complete[0].user_attrs["seeds"]["1"]
    assert child.data.metrics["seed1/final/difference"] == pytest.approx(seed1["difference"])

    rerun = _tune(tmp_path, data_root, trainer, study_name="better")  # finished: the validation is reused
    assert rerun["validation"] == validation and len(trainer.trainings) == trials_ran + 11

    flat = SyntheticTrainer(linear(0.0), 0.5)  # nothing beats the default: the file above is now stale
    summary = _tune(tmp_path, data_root, flat, study_name="flat")
    assert summary["decision"]["adopted_trial"] is None and summary["decision"]["best_overrides"] is None
    assert summary["decision"]["why"].startswith("the default stands: trial ")
    assert not best_file.exists() and not marker_path(best_file).exists()
    assert json.loads((out / "summary.json").read_text())["decision"] == summary["decision"]

    skipped = _tune(tmp_path, data_root, flat, study_name="flat", validate_top=0)
    assert skipped["validation"] is None and "--validate-top 0" in skipped["decision"]["why"]
    assert "validation" in skipped["placeholder_figures"]


def test_a_best_overrides_libra_did_not_write_is_refused_before_anything(tmp_path, monkeypatch, data_root):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mine = tmp_path / "reports" / "best_overrides.yaml"
    mine.parent.mkdir()
    mine.write_text("- components.balanced_l1.alpha=0.2\n")
    trainer = SyntheticTrainer(linear(0.0), 0.5)
    with pytest.raises(NotOwnedError, match="--force"):
        _tune(tmp_path, data_root, trainer, study_name="mine")
    assert mine.exists() and not trainer.trainings and not (tmp_path / "optuna.db").exists()
    summary = _tune(tmp_path, data_root, trainer, study_name="mine", n_trials=2, validate_top=0, force=True)
    assert summary["decision"]["best_overrides"] is None and not mine.exists()
