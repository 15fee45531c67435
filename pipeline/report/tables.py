"""The ablation table: one row per (detector, combination) of ours, the paper's row beside it, in percent."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from detection.engine.coco_eval import BOX_METRICS, IOU_KEYS
from pipeline.plan.params import COMPONENTS, DETECTOR_COMPONENTS
from pipeline.report.bootstrap import PairedDelta
from pipeline.report.claims import VERDICT_CODES, ClaimResult, UntestableClaim
from pipeline.report.guards import BaselineLearning
from pipeline.report.reference import PAPER_SOURCES, ModelZooRow, paper_row
from pipeline.report.results import RunResult, ap_points, runs_of
from pipeline.plan.runplan import PlanSummary

IOU_COLUMNS = tuple(f"AP@{t}" for t in IOU_KEYS)
DELTA_COLUMNS = ("dAP", "dAP_sd", "dAP_ci_low", "dAP_ci_high", "dAP_image_ci_low", "dAP_image_ci_high")
COLUMNS = ("detector", "combination", "source", *COMPONENTS, "seeds", *BOX_METRICS, "AP_sd", "untrained_AP",
           *IOU_COLUMNS,
           *DELTA_COLUMNS, "score_iou_pearson", "score_iou_spearman", "train_time_ratio", "peak_mem_mb",
           "infer_ms_per_image")
"""Columns of ``ablation.csv``. Source: ours, paper or mmdet (the model zoo). Components: True/False
(empty where the detector has no such component); metrics in percent; ``AP_sd`` and ``dAP_sd`` over
seeds; ``untrained_AP`` (baselines) the AP of the same detectors before training, mean over seeds; ``dAP_ci_*`` the two-level (seeds and images) paired bootstrap interval, ``dAP_image_ci_*``
the image-only one; score-IoU correlations of the detections pooled over seeds;
``train_time_ratio`` the median training s/step over seeds divided by the baseline's (the median, so
that one run slowed by another process on the machine does not move it);
``peak_mem_mb`` the mean over seeds of the peak training memory (CUDA ``max_memory_allocated`` on a
GPU, rank 0's peak RSS on CPU; the zoo's training memory); ``infer_ms_per_image`` the zoo's."""


def _sd(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def _components(detector: str, combination: str) -> dict[str, Any]:
    parts = set(combination.split("+")) if combination != "baseline" else set()
    return {c: (c in parts) if c in DETECTOR_COMPONENTS[detector] else pd.NA for c in COMPONENTS}


def _cost(runs: list[RunResult], key: str) -> list[float]:
    """``metrics.json``'s ``cost.<key>`` of each run that recorded it."""
    values = [r.metrics.get("cost", {}).get(key) for r in runs]
    return [float(v) for v in values if v is not None]


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def _peak_memory_mb(run: RunResult) -> float | None:
    cost = run.metrics.get("cost", {})
    gpu = cost.get("train_peak_gpu_mem_mb")
    return gpu if gpu is not None else cost.get("train_peak_rss_mb")


def ablation_table(summary: PlanSummary, results: list[RunResult],
                   deltas: dict[tuple[str, str], PairedDelta],
                   correlations: dict[tuple[str, str], dict[str, float]],
                   learning: dict[str, BaselineLearning], model_zoo: Sequence[ModelZooRow] = ()) -> pd.DataFrame:
    """Rows in design order: ours for every combination, then the paper's row where the paper has one,
    then the mmdet model zoo's where ``model_zoo`` has one. ``learning``: the baselines before training."""
    rows = []
    for detector, spec in summary.detectors.items():
        baseline_s = _median(_cost(runs_of(results, detector, "baseline"), "train_s_per_step"))
        for combination in spec.combinations:
            runs = runs_of(results, detector, combination)
            if not runs:
                continue
            row: dict[str, Any] = {"detector": detector, "combination": combination, "source": "ours",
                                   **_components(detector, combination), "seeds": len(runs)}
            for metric in BOX_METRICS:
                row[metric] = float(np.mean([ap_points(r.metrics["bbox"][metric]) for r in runs]))
            row["AP_sd"] = _sd([ap_points(r.metrics["bbox"]["AP"]) for r in runs])
            if combination == "baseline" and detector in learning:
                row["untrained_AP"] = _mean(list(learning[detector].untrained))
            for t, column in zip(IOU_KEYS, IOU_COLUMNS):
                row[column] = float(np.mean([ap_points(r.metrics["ap_per_iou"][t]) for r in runs]))
            delta = deltas.get((detector, combination))
            if delta is not None:
                row.update(dAP=ap_points(delta.delta), dAP_sd=ap_points(delta.seed_sd),
                           dAP_ci_low=ap_points(delta.ci_low), dAP_ci_high=ap_points(delta.ci_high),
                           dAP_image_ci_low=ap_points(delta.image_ci_low),
                           dAP_image_ci_high=ap_points(delta.image_ci_high))
            corr = correlations.get((detector, combination), {})
            row.update(score_iou_pearson=corr.get("pearson", float("nan")),
                       score_iou_spearman=corr.get("spearman", float("nan")),
                       train_time_ratio=_median(_cost(runs, "train_s_per_step")) / baseline_s,
                       peak_mem_mb=_mean([m for m in map(_peak_memory_mb, runs) if m is not None]))
            rows.append(row)
            paper = paper_row(detector, combination)
            if paper:
                rows.append({"detector": detector, "combination": combination, "source": "paper",
                             **_components(detector, combination), **paper})
            for zoo in model_zoo:
                if (zoo.detector, zoo.combination) == (detector, combination):
                    rows.append({"detector": detector, "combination": combination, "source": "mmdet",
                                 **_components(detector, combination), "AP": zoo.AP, "peak_mem_mb": zoo.train_mem_mb,
                                 "infer_ms_per_image": zoo.infer_ms_per_image})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def summary_metrics(table: pd.DataFrame, claims: list[ClaimResult | UntestableClaim]) -> dict[str, Any]:
    """The DVC metrics file of the report: ``{detector: {combination: {AP, AP_sd, AP50, AP75, untrained_AP,
    dAP, dAP_ci_low, dAP_ci_high}}}`` of our rows (NaN values left out), and ``claims``: per claim its
    verdicts and their codes (:data:`VERDICT_CODES`), the ``reason`` where a claim is not testable or not
    'equivalent', and for a tested claim its difference, interval and Bonferroni-adjusted interval (AP
    points), the standard error with its seed and image parts, the minimum detectable effect and the seeds
    and images it was measured with."""
    out: dict[str, Any] = {}
    for row in table[table["source"] == "ours"].to_dict("records"):
        values = {k: round(float(row[k]), 3) for k in ("AP", "AP_sd", "AP50", "AP75", "untrained_AP", "dAP",
                                                       "dAP_ci_low", "dAP_ci_high")
                  if row[k] is not None and not pd.isna(row[k])}
        out.setdefault(row["detector"], {})[row["combination"]] = values
    out["claims"] = {c.claim.key: claim_metrics(c) for c in claims}
    return out


def claim_metrics(c: ClaimResult | UntestableClaim) -> dict[str, Any]:
    """A claim's entry of ``metrics.json`` (see :func:`summary_metrics`)."""
    values: dict[str, Any] = {"verdict": c.verdict, "verdict_code": VERDICT_CODES[c.verdict],
                              "adjusted_verdict": c.adjusted_verdict,
                              "adjusted_verdict_code": VERDICT_CODES[c.adjusted_verdict]}
    if c.reason:
        values["reason"] = c.reason
    if isinstance(c, ClaimResult):
        values.update(
            delta=ap_points(c.delta.delta), ci_low=ap_points(c.delta.ci_low), ci_high=ap_points(c.delta.ci_high),
            adjusted_ci_low=c.adjusted_low, adjusted_ci_high=c.adjusted_high, se=c.split.se(),
            se_seed=c.split.seed_se, se_image=c.split.image_se, seed_sd=c.split.seed_sd, mde=c.mde,
            seeds=c.split.seeds, images=c.split.images)
    return _rounded(values)


def headline_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The DVC metrics (``reports/headline.json``, the first columns of ``dvc exp show``): of
    :func:`summary_metrics`, AP and ΔAP per combination. The claims' verdicts stay in ``metrics.json``
    (``dvc metrics diff --targets reports/metrics.json``): nine more columns would push the APs off a
    terminal's first screen."""
    return {detector: {combination: {k: v for k, v in values.items() if k in ("AP", "dAP")}
                       for combination, values in combinations.items()}
            for detector, combinations in metrics.items() if detector != "claims"}


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    """Floats to 3 decimals; NaN (e.g. a seed spread from one seed) left out, as JSON has no NaN."""
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in values.items()
            if not (isinstance(v, float) and math.isnan(v))}


def claims_markdown(claims: list[ClaimResult | UntestableClaim], confidence: float, rope: float) -> list[str]:
    """The verdict table: claim, comparison, paper, ours with its interval and the Bonferroni-adjusted one
    (over the tested claims), both verdicts, the minimum detectable effect, and the reason where a claim is
    not testable or not 'equivalent'."""
    level = f"{round(100 * confidence)}%"
    rows = []
    for c in claims:
        named = [c.claim.text, f"{c.claim.combination} vs {c.claim.reference} ({c.claim.detector})", c.claim.measure,
                 c.claim.paper]
        if isinstance(c, ClaimResult):
            measured = [f"{ap_points(c.delta.delta):+.2f}",
                        f"[{ap_points(c.delta.ci_low):+.2f}, {ap_points(c.delta.ci_high):+.2f}]", f"**{c.verdict}**",
                        f"[{c.adjusted_low:+.2f}, {c.adjusted_high:+.2f}]", c.adjusted_verdict, f"{c.mde:.2f}"]
        else:
            measured = ["—", "—", f"**{c.verdict}**", "—", c.adjusted_verdict, "—"]
        rows.append([*named, *measured, (c.reason or "").replace("|", "/")])
    family = sum(isinstance(c, ClaimResult) for c in claims)
    return _md_table(["claim", "comparison", "measure", "paper", "ours (AP points)", f"{level} CI (seeds + images)",
                      "verdict", f"Bonferroni {level} CI (×{family})", "verdict (family)", "MDE", "reason"], rows)


def learning_markdown(learning: dict[str, BaselineLearning], margin: float) -> list[str]:
    """Per detector and seed: the baseline's AP before and after training, and whether it learned."""
    rows = [[baseline.detector, str(seed), f"{untrained:.2f}", f"{trained:.2f}", f"{gain:+.2f}",
             "yes" if gain > margin else "**no**"]
            for baseline in learning.values()
            for seed, trained, untrained, gain in zip(baseline.seeds, baseline.trained, baseline.untrained,
                                                      baseline.gains)]
    return _md_table(["detector", "seed", "AP untrained", "AP trained", "gain", f"learned (gain > {margin:g})"], rows)


def power_markdown(claims: list[ClaimResult], confidence: float, power: float, target_mde: float) -> list[str]:
    """Per claim: its standard error and the seed and image parts, the MDE, and the seeds a target MDE needs
    with these validation images, 4x and 16x as many, and infinitely many."""
    def needed(c: ClaimResult, scale: float) -> str:
        seeds = c.split.seeds_needed(target_mde, confidence, power, c.split.images * scale)
        return "—" if seeds is None else str(seeds)

    images = claims[0].split.images if claims else 0
    rows = [[c.claim.key, f"{c.split.se():.2f}", "— (one seed)" if c.split.images_only else f"{c.split.seed_se:.2f}",
             f"{c.split.image_se:.2f}",
             f"{c.mde:.2f}", *(needed(c, scale) for scale in (1, 4, 16, math.inf))] for c in claims]
    return _md_table(["claim", "SE", "seed part", "image part", "MDE",
                      f"seeds for MDE {target_mde:g} ({images} images)", f"({4 * images} images)",
                      f"({16 * images} images)", "(images → ∞)"], rows)


def _fmt(value: Any, digits: int = 1) -> str:
    return "" if value is None or pd.isna(value) else f"{value:.{digits}f}"


def _pm(mean: Any, sd: Any) -> str:
    text = _fmt(mean)
    return f"{text} ± {_fmt(sd)}" if text and not pd.isna(sd) else text


def _interval(row: dict[str, Any], prefix: str) -> str:
    low, high = row[f"{prefix}_low"], row[f"{prefix}_high"]
    return "" if pd.isna(low) else f"[{_fmt(low)}, {_fmt(high)}]"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def detector_markdown(table: pd.DataFrame, detector: str, confidence: float,
                      model_zoo: list[ModelZooRow] | None = None) -> list[str]:
    """The detector's sections of ``ablation.md``: main table (with the training cost relative to the
    baseline), its sources, AP per IoU threshold, score-IoU correlation. ``model_zoo``: the mmdet rows
    cited under the table (None: mmdet is not installed, which the text says)."""
    part = table[table["detector"] == detector]
    comps = list(DETECTOR_COMPONENTS[detector])
    level = f"{round(100 * confidence)}%"
    header = ["combination", *comps, "source", *BOX_METRICS, "ΔAP",
              f"ΔAP {level} CI (seeds + images)", f"ΔAP {level} CI (images only)", "train time ×", "peak mem (MB)"]
    rows = []
    for r in part.to_dict("records"):
        ours = r["source"] == "ours"
        rows.append([r["combination"] if ours else "", *("✓" if r[c] is True else "" for c in comps), r["source"],
                     _pm(r["AP"], r["AP_sd"]) if ours else _fmt(r["AP"]),
                     *(_fmt(r[m]) for m in BOX_METRICS[1:]),
                     _pm(r["dAP"], r["dAP_sd"]) if ours else _fmt(r["dAP"]),
                     _interval(r, "dAP_ci") if ours else "", _interval(r, "dAP_image_ci") if ours else "",
                     _fmt(r["train_time_ratio"], 2), _fmt(r["peak_mem_mb"], 0)])
    lines = _md_table(header, rows)
    lines += ["", f"Paper rows: {PAPER_SOURCES.get(detector, '')}", ""]
    if model_zoo is None:
        lines += ["mmdet rows: not shown, mmdet is not installed (`pip install mmdet==3.3.0`).", ""]
    else:
        cited = [f"{z.combination}: {z.citation}, inference {_fmt(z.infer_ms_per_image, 2)} ms/image "
                 f"({z.infer_hardware})"
                 for z in model_zoo if z.detector == detector]
        lines += [f"mmdet rows (training memory as the zoo's GB x 1024): {'; '.join(cited)}.", ""] if cited else []
    lines += [("Training cost: `train time ×` is the median training time per optimizer step over seeds "
               "divided by the baseline's (runs timed one at a time; the median keeps one run slowed by another "
               "process from moving it); `peak mem` the peak training memory (CUDA `max_memory_allocated` on a GPU, "
               "rank 0's peak resident set size on CPU), mean over seeds."), ""]
    ours = part[part["source"] == "ours"]
    lines += ["AP (%) at each IoU threshold, mean over seeds:", ""]
    lines += _md_table(["combination", *IOU_KEYS],
                       [[r["combination"], *(_fmt(r[c]) for c in IOU_COLUMNS)] for r in ours.to_dict("records")])
    lines += ["", ("Correlation of detection score and IoU with the best-matching ground truth of the same class "
                   "(all detections, seeds pooled):"), ""]
    lines += _md_table(["combination", "Pearson r", "Spearman ρ"],
                       [[r["combination"], _fmt(r["score_iou_pearson"], 3), _fmt(r["score_iou_spearman"], 3)]
                        for r in ours.to_dict("records")])
    return lines
