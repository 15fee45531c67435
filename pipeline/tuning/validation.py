"""Validation on fresh seeds: is the search's best really better than the default?

The search's best value is the maximum of many noisy estimates, biased upwards by construction. When a
study reaches its target, the top ``--validate-top`` trials and the default configuration are trained again
at ``--validate-seeds`` seeds the search never used, evaluated on the whole validation set, and each
trial's ΔAP against the default is read with the ablation report's statistics (``pipeline/report``):

* the paired two-level bootstrap over seeds and images (trial seed k paired with default seed k, one image
  resample shared by every run), with the report's settings (``params.yaml: report``);
* the same guards: a trial is *not testable* when one of its or the default's trainings failed, when the
  default did not learn (its AP over that of the same detector before training, at every seed, by more
  than ``report.learned_margin``), or with fewer than ``report.min_val_images`` validation images;
* the report's verdicts, in tuning's words: ``better`` (the interval excludes 0 above), ``worse``,
  ``equivalent`` (inside ±``report.rope``, where the rope is small against the default's AP), ``not
  resolved``; the Bonferroni-adjusted interval over the validated trials (picking one of k is k tests), the
  minimum detectable effect (MDE) and the standard error's seed and image parts.

A trial is adopted only when both its interval and its Bonferroni-adjusted one exclude 0 on the better side
(of several, the largest ΔAP); otherwise the default stands, with each trial's verdict as the reason.
The result is kept in the study's user attribute ``validation`` with what it depends on (the trials, seeds,
statistics settings and study fingerprint), so rerunning a finished study, or ``--report-only``, reuses it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from pydantic import BaseModel

from detection.engine.coco_eval import IOU_THRESHOLDS
from pipeline.plan.params import ReportConfig
from pipeline.report.bootstrap import APSamples, Statistic, ap_samples, coco_ap, paired_delta, resample_counts
from pipeline.report.claims import NOT_TESTABLE, Claim, ClaimResult, UntestableClaim, assess_claims
from pipeline.report.guards import BaselineLearning, image_count_reason
from pipeline.report.results import ap_points
from pipeline.report.tables import claim_metrics
from pipeline.tuning.plan import TuningPlan
from pipeline.tuning.space import Scalar
from pipeline.tuning.training import Compute, Trainer, timed, train_in

VALIDATION_ATTR = "validation"
"""The study's user attribute holding the last validation (:class:`Validation`)."""
STATISTICS: dict[str, Statistic] = {
    "AP": coco_ap,
    "AP50": lambda ap: ap[..., IOU_THRESHOLDS.index(0.50)],
    "AP75": lambda ap: ap[..., IOU_THRESHOLDS.index(0.75)],
}
"""The study metrics validation can compare: functions of the AP per IoU threshold (the per-image matching
the bootstrap resamples covers every object size together, so APs/APm/APl are not among them)."""
VERDICTS = {"reproduced": "better", "contradicted": "worse", "equivalent": "equivalent",
            "not resolved": "not resolved", NOT_TESTABLE: NOT_TESTABLE}
"""The report's verdict on 'the trial beats the default' -> tuning's word for it."""
DEFAULT = "default"


class Candidate(BaseModel):
    """A completed trial of the search, chosen for validation."""

    trial: int
    params: dict[str, Scalar]
    search_value: float
    """Its value in the search: mean paired difference to the default on the search's seeds (AP points)."""


class CandidateResult(Candidate):
    ap: dict[int, float | None]
    """COCO AP (AP points) on the whole validation set per validation seed (None: the training failed)."""
    verdict: str
    """From its interval (tuning's words, :data:`VERDICTS`)."""
    adjusted_verdict: str
    """From its Bonferroni-adjusted interval over the validated trials."""
    statistics: dict[str, Any]
    """The report's claim metrics but the verdicts: delta, ci_low/ci_high, adjusted_ci_low/high, se, se_seed,
    se_image, seed_sd, mde (AP points), seeds, images, and the reason where it is not testable or not
    'equivalent'."""

    @property
    def adopted(self) -> bool:
        return self.verdict == self.adjusted_verdict == "better"

    def measured(self, family: int) -> str:
        """ΔAP, its intervals and MDE in words (empty when not testable)."""
        s = self.statistics
        if "delta" not in s:
            return ""
        return (f"Δ {s['delta']:+.2f} AP, interval [{s['ci_low']:+.2f}, {s['ci_high']:+.2f}], Bonferroni over "
                f"{family} [{s['adjusted_ci_low']:+.2f}, {s['adjusted_ci_high']:+.2f}], MDE {s['mde']:.2f}")


class Validation(BaseModel):
    depends_on: dict[str, Any]
    """What the result was computed from: reused only while these are the same."""
    seeds: list[int]
    images: int | None
    """Validation images every run was evaluated on (None: no run finished)."""
    confidence: float
    rope: float
    metric: str
    default_ap: dict[int, float | None]
    untrained_ap: dict[int, float]
    """The default's detector before training, per seed (the 'did it learn' guard)."""
    candidates: list[CandidateResult]
    adopted: int | None
    """The trial whose values are adopted (None: the default stands)."""
    decision: str
    compute: Compute


def validation_seeds(search_seeds: tuple[int, ...], count: int) -> tuple[int, ...]:
    """``count`` seeds the search never used: the ones after its largest."""
    start = max(search_seeds) + 1
    return tuple(range(start, start + count))


def top_trials(study: optuna.Study, count: int) -> list[Candidate]:
    """The ``count`` completed trials of highest value (ties: the earlier trial)."""
    complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                      key=lambda t: (-t.value, t.number))
    return [Candidate(trial=t.number, params=t.params, search_value=t.value) for t in complete[:count]]


def depends_on(plan: TuningPlan, candidates: list[Candidate], seeds: tuple[int, ...],
               settings: ReportConfig) -> dict[str, Any]:
    return {"fingerprint": plan.fingerprint(), "trials": [c.trial for c in candidates], "seeds": list(seeds),
            "report": settings.model_dump(mode="json")}


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def validate(plan: TuningPlan, candidates: list[Candidate], seeds: tuple[int, ...], settings: ReportConfig,
             trainer: Trainer, work_dir: Path, keep_checkpoints: bool = False) -> Validation:
    """Train the default and each candidate at each of ``seeds`` (in ``work_dir/validation/<name>/seed<k>``),
    evaluate them on the whole validation set and decide (see the module docstring)."""
    statistic = STATISTICS[plan.spec.metric]
    configs = {DEFAULT: plan.default_values,
               **{f"trial_{c.trial:05d}": {plan.spec.params[k].key: v for k, v in c.params.items()}
                  for c in candidates}}
    matches: dict[tuple[str, int], Any] = {}
    failures: dict[tuple[str, int], str] = {}
    compute = Compute()
    for seed in seeds:
        for name, values in configs.items():
            out = work_dir / "validation" / name / f"seed{seed}"
            cfg = plan.config(values, seed)
            finished = trainer.evaluated(cfg, out)
            if finished is not None:
                print(f"validation: {name}, seed {seed}: trained and evaluated in {out}, reused", flush=True)
                matches[(name, seed)] = finished.matches
                compute += Compute(trainings=1, reused=1)
                continue
            print(f"validation: {name}, seed {seed} -> {out}", flush=True)
            try:
                with timed() as spent:
                    matches[(name, seed)] = train_in(trainer, cfg, out, keep_checkpoints, evaluate=True).matches
            except Exception as exc:  # noqa: BLE001 - the guards make its comparisons not testable, with why
                failures[(name, seed)] = _one_line(exc)
                print(f"validation: {name}, seed {seed} failed: {failures[(name, seed)]}", flush=True)
            compute += spent
    untrained = {seed: trainer.untrained_ap(plan.config(plan.default_values, seed),
                                            work_dir / "validation" / DEFAULT / f"seed{seed}")
                 for seed in seeds if (DEFAULT, seed) in matches}
    images = {m.num_images for m in matches.values()}
    if len(images) > 1:
        raise RuntimeError(f"the validation runs were evaluated on different numbers of images {sorted(images)}")
    num_images = images.pop() if images else None
    samples: dict[tuple[str, int], APSamples] = {}
    if num_images is not None:
        counts = resample_counts(num_images, settings.bootstrap_resamples, settings.seed)
        samples = {key: ap_samples(m, counts) for key, m in matches.items()}

    def ap_of(name: str) -> dict[int, float | None]:
        return {seed: ap_points(float(coco_ap(samples[(name, seed)].full))) if (name, seed) in samples else None
                for seed in seeds}

    default_ap = ap_of(DEFAULT)
    learned_seeds = tuple(untrained)
    learning = BaselineLearning(plan.detector, learned_seeds, tuple(default_ap[s] for s in learned_seeds),
                                tuple(untrained[s] for s in learned_seeds))
    tested, untestable = [], {}
    for candidate, name in zip(candidates, list(configs)[1:]):
        claim = Claim(name, f"trial {candidate.trial} beats the default", plan.detector, f"trial {candidate.trial}",
                      DEFAULT, statistic, f"Δ{plan.spec.metric}", f"search {candidate.search_value:+.2f}")
        failed = [f"{side} at seed {seed} has no result ({failures[(side, seed)]})"
                  for seed in seeds for side in (name, DEFAULT) if (side, seed) in failures]
        reasons = ["; ".join(failed) if failed else None, learning.reason(settings.learned_margin),
                   image_count_reason(num_images, settings) if num_images is not None else None]
        reasons = [r for r in reasons if r]
        if reasons:
            untestable[name] = UntestableClaim(claim, "; ".join(reasons))
        else:
            tested.append((claim, paired_delta([samples[(name, s)] for s in seeds],
                                               [samples[(DEFAULT, s)] for s in seeds],
                                               settings.confidence, statistic, settings.seed)))
    assessed: dict[str, ClaimResult | UntestableClaim] = {
        c.claim.key: c for c in assess_claims(tested, {plan.detector: learning.mean_ap}, settings)}
    assessed |= untestable
    results = []
    for candidate, name in zip(candidates, list(configs)[1:]):
        c = assessed[name]
        results.append(CandidateResult(**candidate.model_dump(), ap=ap_of(name), verdict=VERDICTS[c.verdict],
                                       adjusted_verdict=VERDICTS[c.adjusted_verdict],
                                       statistics={k: v for k, v in claim_metrics(c).items() if "verdict" not in k}))
    adopted = max((r for r in results if r.adopted), key=lambda r: r.statistics["delta"], default=None)
    return Validation(depends_on=depends_on(plan, candidates, seeds, settings), seeds=list(seeds),
                      images=num_images, confidence=settings.confidence, rope=settings.rope,
                      metric=plan.spec.metric, default_ap=default_ap, untrained_ap=untrained, candidates=results,
                      adopted=adopted.trial if adopted else None, decision=decision(results, adopted, settings.rope),
                      compute=compute)


def decision(results: list[CandidateResult], adopted: CandidateResult | None, rope: float) -> str:
    """One sentence: which trial is adopted and on what evidence, or why the default stands."""
    family = len(results)
    if adopted is not None:
        return f"trial {adopted.trial} beats the default on fresh seeds ({adopted.measured(family)})"
    if not results:
        return "the default stands: no completed trial to validate"
    why = []
    for r in results:
        if r.verdict == NOT_TESTABLE:
            why.append(f"trial {r.trial} not testable ({r.statistics['reason']})")
        elif r.verdict == "better":
            why.append(f"trial {r.trial} better alone but {r.adjusted_verdict} after the Bonferroni adjustment "
                       f"({r.measured(family)})")
        else:
            meaning = {"worse": "below 0", "equivalent": f"inside ±{rope:g} AP (report.rope)",
                       "not resolved": f"contains 0 and reaches past ±{rope:g} AP: too few seeds to tell"}
            reason = r.statistics.get("reason")
            why.append(f"trial {r.trial} {r.verdict} ({r.measured(family)}; the interval {meaning[r.verdict]}"
                       + (f"; {reason}" if reason else "") + ")")
    return "the default stands: " + "; ".join(why)


def validated(study: optuna.Study, plan: TuningPlan, top: int, seeds: tuple[int, ...], settings: ReportConfig,
              run: Callable[[list[Candidate]], Validation] | None) -> Validation | None:
    """The study's validation of its top ``top`` trials on ``seeds``: the one kept in the study if it was
    computed from the same trials, seeds and settings, else ``run(candidates)``'s, which is then kept (None
    when it must be computed and ``run`` is None: ``--report-only`` trains nothing)."""
    candidates = top_trials(study, top)
    stored = study.user_attrs.get(VALIDATION_ATTR)
    if stored is not None and stored.get("depends_on") == depends_on(plan, candidates, seeds, settings):
        print(f"validation: reusing the study's validation of trials {[c.trial for c in candidates]} on seeds "
              f"{list(seeds)}", flush=True)
        return Validation.model_validate(stored)
    if run is None:
        return None
    result = run(candidates)
    study.set_user_attr(VALIDATION_ATTR, result.model_dump(mode="json"))
    return result
