"""Assemble the ablation report from the evaluated runs: tables, bootstrap intervals, figures."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from detection.config import BalancedL1Config, BoxLossConfig, ExperimentConfig
from pipeline.plan.params import ReportConfig
from detection.engine.coco_eval import IOU_THRESHOLDS
from pipeline.report import figures
from pipeline.report.claims import CLAIMS, ClaimResult, UntestableClaim, assess_claims
from pipeline.report.bootstrap import APSamples, PairedDelta, ap_samples, paired_delta, resample_counts
from pipeline.report.localization import detection_ious, iou_distributions, score_iou_correlation
from pipeline.report.per_image import match_images
from pipeline.report.reference import ModelZooRow, model_zoo_rows
from pipeline.report.failures import failures_markdown, read_failures
from pipeline.report.guards import BaselineLearning, baseline_learning, design_reason, image_count_reason
from pipeline.report.report_dir import ReportDir
from pipeline.report.results import RunResult, ap_points, load_results, runs_of, validation_ground_truth
from pipeline.report.tables import (IOU_COLUMNS, ablation_table, claims_markdown, detector_markdown, headline_metrics,
                                    learning_markdown, power_markdown, summary_metrics)
from pipeline.plan.runplan import PlanSummary, RunPlan
from detection.io import write_text_atomic

DETECTOR_TITLES = {"faster_rcnn": "Faster R-CNN", "retinanet": "RetinaNet"}


def _ground_truths(results: list[RunResult]) -> dict[str, dict[str, Any]]:
    """Validation ground truth per run name (loaded once per distinct data setting)."""
    cache: dict[str, dict[str, Any]] = {}
    out = {}
    for r in results:
        key = json.dumps(r.plan.config["data"], sort_keys=True)
        if key not in cache:
            cache[key] = validation_ground_truth(r.plan)
        out[r.name] = cache[key]
    return out


def _paired_runs(results: list[RunResult], detector: str, combination: str, reference: str
                 ) -> tuple[list[RunResult], list[RunResult]]:
    """The runs of ``combination`` and of ``reference`` for the seeds both have, paired by seed."""
    runs = {(r.plan.combination, r.plan.seed): r for r in results if r.plan.detector == detector}
    seeds = sorted(s for c, s in runs if c == combination and (reference, s) in runs)
    return [runs[(combination, s)] for s in seeds], [runs[(reference, s)] for s in seeds]


def compute_deltas(summary: PlanSummary, results: list[RunResult], samples: dict[str, APSamples],
                   settings: ReportConfig) -> dict[tuple[str, str], PairedDelta]:
    """ΔAP of every combination over its detector's baseline, runs paired by seed."""
    deltas = {}
    for detector, spec in summary.detectors.items():
        for combination in spec.combinations:
            runs, baseline = _paired_runs(results, detector, combination, "baseline")
            if combination != "baseline" and runs:
                deltas[(detector, combination)] = paired_delta([samples[r.name] for r in runs],
                                                         [samples[r.name] for r in baseline],
                                                         settings.confidence, seed=settings.seed)
    return deltas


def evaluate_claims(results: list[RunResult], samples: dict[str, APSamples], settings: ReportConfig,
                    learning: dict[str, BaselineLearning], unfinished: list[tuple[RunPlan, str]]
                    ) -> list[ClaimResult | UntestableClaim]:
    """Every claim of :data:`CLAIMS` whose two combinations are both planned, in order: tested (paired
    difference, verdicts, power) where the guards (:mod:`pipeline.report.guards`) let the evidence carry a
    verdict, else not testable with the reasons. ``learning``: each planned detector's baseline;
    ``unfinished``: the planned runs without a result, with why."""
    planned = [r.plan for r in results] + [plan for plan, _ in unfinished]
    why_unfinished = {plan.name: why for plan, why in unfinished}
    tested, untestable = [], {}
    for claim in CLAIMS:
        sides = [p for p in planned
                 if p.detector == claim.detector and p.combination in (claim.combination, claim.reference)]
        if {p.combination for p in sides} != {claim.combination, claim.reference}:
            continue
        images = [samples[p.name].num_images for p in sides if p.name in samples]
        reasons = [reason for reason in (design_reason(claim, sides, why_unfinished),
                                         learning[claim.detector].reason(settings.learned_margin),
                                         image_count_reason(min(images), settings) if images else None) if reason]
        if reasons:
            untestable[claim.key] = UntestableClaim(claim, "; ".join(reasons))
            continue
        claimed, reference = _paired_runs(results, claim.detector, claim.combination, claim.reference)
        tested.append((claim, paired_delta([samples[r.name] for r in claimed], [samples[r.name] for r in reference],
                                           settings.confidence, claim.statistic, settings.seed)))
    baseline_ap = {detector: baseline.mean_ap for detector, baseline in learning.items() if baseline.seeds}
    assessed = {c.claim.key: c for c in assess_claims(tested, baseline_ap, settings)}
    return [assessed.get(claim.key) or untestable[claim.key] for claim in CLAIMS
            if claim.key in assessed or claim.key in untestable]


def _box_losses(configs: list[ExperimentConfig]) -> dict[str, Callable]:
    """The box losses the runs of ``configs`` used, as functions of the regression error, for the loss figure:
    the detectors' own losses, smooth L1 with β = 1 (the paper's comparison) and each Balanced L1 setting
    (the default one if no run enabled it), each built as the detectors build theirs."""
    import torch

    from detection.models.box_loss import build_box_loss

    def of_error(own: BoxLossConfig, balanced_l1: BalancedL1Config) -> Callable:
        loss = build_box_loss(own, balanced_l1)
        return lambda x: loss(x, torch.zeros_like(x))

    disabled = BalancedL1Config()
    losses = {"smooth L1 (β=1)": of_error(BoxLossConfig(type="smooth_l1", beta=1.0), disabled)}
    for config in configs:
        own = config.model.box_loss
        name = "L1" if own.type == "l1" else f"smooth L1 (β={own.beta:.3g})"
        losses[f"{config.model.detector} default: {name}"] = of_error(own, disabled)
    enabled = [c.components.balanced_l1 for c in configs if c.components.balanced_l1.enabled]
    for bl in enabled or [BalancedL1Config(enabled=True)]:
        losses[f"Balanced L1 (α={bl.alpha:g}, γ={bl.gamma:g}, β={bl.beta:g}, {bl.formula})"] = of_error(
            BoxLossConfig(), bl)
    return losses


def curves_table(results: list[RunResult]) -> pd.DataFrame:
    """Every run's training loss and validation AP (AP points) per epoch: ``reports/curves.csv``, the file
    ``dvc plots`` draws (one line per run)."""
    frames = [pd.DataFrame({"run": r.name, "epoch": r.curves["epoch"], "train_loss": r.curves.get("train/loss"),
                            "val_AP": r.curves.get("val/AP", pd.Series(dtype=float)).map(ap_points)})
              for r in results if not r.curves.empty]
    return pd.concat(frames) if frames else pd.DataFrame(columns=["run", "epoch", "train_loss", "val_AP"])


def _mean_curves(runs: list[RunResult]) -> pd.DataFrame:
    frames = [r.curves.set_index("epoch") for r in runs if not r.curves.empty]
    if not frames:
        return pd.DataFrame(columns=["epoch"])
    return pd.concat(frames).groupby(level=0).mean(numeric_only=True).reset_index()


def write_run_files(result: RunResult, gt: dict[str, Any], report: ReportDir) -> list[Path]:
    """The files of one run that ``libra track`` logs on its MLflow run: its IoU distributions
    (:meth:`ReportDir.iou_distributions`) and its figures (training curves, score vs IoU, sampled-negative IoUs),
    whose paths it returns."""
    out_dir = report.run(result.name)
    paths = [figures.training_curves({result.plan.combination: result.curves}, out_dir / "training_curves.png",
                                     result.name)]
    scores, ious = detection_ious(gt, result.detections)
    distributions = pd.DataFrame(iou_distributions(scores, ious, result.negative_iou), columns=["curve", "iou", "value"])
    write_text_atomic(report.iou_distributions(result.name), distributions.to_csv(index=False, float_format="%.6g"))
    paths.append(figures.score_vs_iou({result.plan.combination: (scores, ious, score_iou_correlation(scores, ious))},
                                      out_dir / "score_vs_iou.png", result.name))
    if result.negative_iou is not None:
        paths.append(figures.negative_iou_histogram({result.plan.combination: result.negative_iou},
                                                    out_dir / "negative_iou.png"))
    return paths


def write_report(plan_dir: Path, out_dir: Path, settings: ReportConfig, manifest: dict[str, Any] | None = None,
                 root: Path = Path("."), index: Path | None = None) -> dict[str, Any]:
    """Write the report (every file :class:`ReportDir` names, each run's figures included) under ``out_dir``;
    returns the summary metrics (also in :attr:`ReportDir.metrics`). The runs that ``index`` (runs/index.json)
    records as failed are listed with their reason instead of reported."""
    report = ReportDir(out_dir)
    summary, results, unfinished = load_results(plan_dir, read_failures(index) if index is not None else {}, root)
    failures = {plan.name: why for plan, why in unfinished}
    if not results:
        raise ValueError(f"{plan_dir}: no finished run to report ({len(failures)} failed, see {index})" if failures
                         else f"{plan_dir}: the plan selects no runs")
    gts = _ground_truths(results)
    matches = {r.name: match_images(gts[r.name], r.detections) for r in results}
    counts_by_images: dict[tuple[int, ...], np.ndarray] = {}
    samples = {}
    for r in results:
        ids = tuple(matches[r.name].image_ids)
        if ids not in counts_by_images:
            counts_by_images[ids] = resample_counts(len(ids), settings.bootstrap_resamples, settings.seed)
        samples[r.name] = ap_samples(matches[r.name], counts_by_images[ids])
    deltas = compute_deltas(summary, results, samples, settings)
    learning = {detector: baseline_learning(results, detector) for detector in summary.detectors}
    claims = evaluate_claims(results, samples, settings, learning, unfinished)

    correlations, score_panels = {}, {}
    for detector, spec in summary.detectors.items():
        score_panels[detector] = {}
        for combination in spec.combinations:
            runs = runs_of(results, detector, combination)
            if not runs:
                continue
            pairs = [detection_ious(gts[r.name], r.detections) for r in runs]
            scores, ious = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
            correlations[(detector, combination)] = score_iou_correlation(scores, ious)
            score_panels[detector][combination] = (scores, ious, correlations[(detector, combination)])

    model_zoo = model_zoo_rows()
    table = ablation_table(summary, results, deltas, correlations, learning, model_zoo or ())
    metrics = summary_metrics(table, claims)
    report.path.mkdir(parents=True, exist_ok=True)
    write_text_atomic(report.table, table.to_csv(index=False, float_format="%.3f"))
    write_text_atomic(report.metrics, json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    write_text_atomic(report.headline, json.dumps(headline_metrics(metrics), indent=1, sort_keys=True) + "\n")
    write_text_atomic(report.curves, curves_table(results).to_csv(index=False, float_format="%.6g"))

    drawn: list[tuple[str, Path]] = []
    histograms = {f"{r.plan.combination} seed{r.plan.seed} "
                  f"({'IoU-balanced' if 'IS' in r.plan.components else 'random'})": r.negative_iou
                  for r in results if r.negative_iou is not None}
    if histograms:
        drawn.append(("IoU of sampled negatives, random vs IoU-balanced sampling (Faster R-CNN, whole training)",
                      figures.negative_iou_histogram(histograms, report.figure("negative_iou_faster_rcnn"))))
    for detector, panels in score_panels.items():
        if panels:
            title = f"{DETECTOR_TITLES.get(detector, detector)}: detection score vs IoU (seeds pooled)"
            drawn.append((title, figures.score_vs_iou(panels, report.figure(f"score_vs_iou_{detector}"), title)))
    ap_curves = {detector: {combination: list(table[(table.detector == detector) & (table.combination == combination)
                                              & (table.source == "ours")][list(IOU_COLUMNS)].iloc[0])
                            for combination in spec.combinations
                            if runs_of(results, detector, combination)}
                 for detector, spec in summary.detectors.items()}
    drawn.append(("AP by IoU threshold (mean over seeds)",
                  figures.ap_by_iou(ap_curves, list(IOU_THRESHOLDS), report.figure("ap_by_iou"))))
    drawn.append(("Balanced L1 vs smooth L1: loss and gradient",
                  figures.loss_and_gradient(_box_losses([r.plan.experiment_config() for r in results]),
                                            report.figure("balanced_l1"))))
    for detector, spec in summary.detectors.items():
        curves = {combination: _mean_curves(runs_of(results, detector, combination))
                  for combination in spec.combinations}
        title = f"{DETECTOR_TITLES.get(detector, detector)}: training curves (mean over seeds)"
        drawn.append((title, figures.training_curves(curves, report.figure(f"training_curves_{detector}"), title)))
    for r in results:
        write_run_files(r, gts[r.name], report)

    markdown = _markdown(summary, table, claims, learning, settings, manifest, results, drawn, report.path, failures,
                         model_zoo)
    write_text_atomic(report.markdown, markdown)
    write_text_atomic(report.html, standalone_html(markdown, report.path))
    return metrics


def standalone_html(markdown: str, out_dir: Path) -> str:
    """The report as one HTML page with its figures inlined (the MLflow artifact viewer shows it with its
    figures; it cannot follow the Markdown's relative image links)."""
    from markdown_it import MarkdownIt

    def inline(match: re.Match) -> str:
        png = base64.b64encode((out_dir / match.group(1)).read_bytes()).decode()
        return f'src="data:image/png;base64,{png}"'

    body = re.sub(r'src="([^"]+\.png)"', inline, MarkdownIt("commonmark").enable("table").render(markdown))
    style = ("body{font-family:sans-serif;max-width:1200px} table{border-collapse:collapse} "
             "td,th{border:1px solid #ccc;padding:2px 6px} img{max-width:100%}")
    return f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><style>{style}</style></head><body>\n{body}</body></html>\n"


def _markdown(summary: PlanSummary, table: pd.DataFrame, claims: list[ClaimResult | UntestableClaim],
              learning: dict[str, BaselineLearning], settings: ReportConfig, manifest: dict[str, Any] | None,
              results: list[RunResult], drawn: list[tuple[str, Path]], out_dir: Path, failures: dict[str, str],
              model_zoo: list[ModelZooRow] | None) -> str:
    val_images = results[0].metrics.get("num_images")
    data = (f"{manifest['source']} data ({manifest['root']}, digest {manifest['digest'][:12]})" if manifest
            else "see the run configs")
    lines = [
        "# Ablation report", "",
        (f"Profile `{summary.profile}`, design `{summary.design}`, seeds {list(summary.seeds)}, {data}; "
         f"{len(results)} runs, each evaluated on {val_images} validation images. COCO bbox metrics in percent "
         "(ours: mean over seeds, ± sample standard deviation over seeds)."), "",
        *failures_markdown(failures),
    ]
    if len(summary.seeds) == 1:
        lines += [("**One seed**: every interval is over the validation images only (there is no second seed to "
                   "resample), so it leaves out the training noise between seeds; each standard error and MDE is its "
                   "image part alone, a lower bound. Run more seeds (`ablation.seeds`) before reading a verdict as "
                   "the paper's claim."), ""]
    tested = [c for c in claims if isinstance(c, ClaimResult)]
    if claims:
        lines += ["## Verdicts on the papers' claims", "", *claims_markdown(claims, settings.confidence, settings.rope),
                  "", ("Did the baselines learn? COCO AP (points) of each baseline before training (the same "
                       "detector built from its run config: same seed, initial weights, backbone weights and "
                       "validation images) and after:"), "", *learning_markdown(learning, settings.learned_margin),
                  ""]
    if tested:
        lines += ["## What this design can detect", "",
                  (f"Standard error of each claim's difference (AP points) and its parts: seeds (the spread of the "
                   f"per-seed differences / √seeds) and validation images (the image bootstrap); MDE: the smallest "
                   f"effect this design detects with {round(100 * settings.power)}% power at the "
                   f"{round(100 * settings.confidence)}% level. The last columns give the seeds a target MDE of "
                   f"{settings.target_mde:g} AP needs with as many, 4x and 16x as many validation images, and "
                   "with infinitely many (— : the image part alone exceeds it). `libra plan --power` computes "
                   "this for any target."), "",
                  *power_markdown(tested, settings.confidence, settings.power, settings.target_mde), ""]
    for detector in summary.detectors:
        if (table["detector"] == detector).any():
            lines += [f"## {DETECTOR_TITLES.get(detector, detector)}", ""]
            lines += [*detector_markdown(table, detector, settings.confidence, model_zoo), ""]
    lines += ["## Figures", ""]
    for title, path in drawn:
        lines += [f"### {title}", "", f"![{title}]({path.relative_to(out_dir).as_posix()})", ""]
    level = f"{round(100 * settings.confidence)}%"
    method = [
        ("**ΔAP** is the AP of a combination minus the AP of its detector's baseline, averaged over the seeds "
         "(combination seed k paired with baseline seed k); `±` is the standard deviation of the per-seed "
         "differences."),
        (f"**{level} CI (seeds + images)**: a two-level paired percentile bootstrap, {settings.bootstrap_resamples} resamples "
         f"(seed {settings.seed}). Each resample draws the validation images with replacement and, independently, "
         "the seed pairs with replacement; the statistic is the mean ΔAP over the drawn seed pairs on the drawn "
         "image multiset. The image draw is shared by every run, because every run is evaluated on the same "
         "validation set; the seed draw keeps combination seed k with baseline seed k. It assumes that seeds are "
         "exchangeable draws of the training noise and images exchangeable draws of the data; with "
         f"{len(summary.seeds)} seeds the seed level has few distinct values, so the interval is coarse and "
         "somewhat narrow (a bootstrap over S items has (S - 1)/S of the sample variance)."),
        (f"**{level} CI (images only)**: the same image resamples with every seed pair in every resample: the "
         "uncertainty from which images were evaluated, for these trained models."),
        ("**Weighted COCO AP**: COCO's per-image matching (pycocotools `evaluateImg`, area all, 100 detections "
         "per image) is computed once per run; for each resample the precision/recall accumulation is redone "
         "with every detection and ground truth of an image counted as often as the image was drawn, which "
         "equals evaluating the multiset with duplicated images re-indexed (up to the order of equal scores); "
         "with every image drawn once it reproduces COCOeval's AP exactly."),
        ("**Verdicts**: *reproduced* when the seeds + images interval of the claimed difference excludes 0 on "
         "the paper's side, *contradicted* when it excludes 0 on the other side, *equivalent* when it contains 0 "
         f"and lies inside the region of practical equivalence ±{settings.rope:g} AP (`report.rope`), *not "
         "resolved* when it contains 0 and reaches past ±rope (the design is too small to tell: see its MDE). "
         "*Equivalent* also needs ±rope to be at most "
         f"{settings.equivalence_rope_share:.0%} of the detector's baseline AP (`report.equivalence_rope_share`; the "
         "papers' typical gains are 2.0-2.5% of their baselines' AP, and a wider rope would call an effect of that "
         "relative size 'equivalent' to none): otherwise such an interval is *not resolved*, with the reason."),
        ("**Not testable**: no verdict, with the reason in the table, when the evidence cannot carry one: (1) a "
         "planned run of either combination has no result (failed, stopped or not evaluated; each is named), or "
         "a seed is planned for one combination and not the other (unpaired); (2) the detector's baseline did "
         "not learn: it *learned* when, at every seed, its AP exceeds by more than "
         f"{settings.learned_margin:g} AP (`report.learned_margin`) the AP of the same detector before training "
         "(built from the run's config: its seed fixes every module's initial weights; the same backbone weights "
         "and validation images) - over twice the largest gain the papers claim (+2.3 AP at IoU 0.9), so that "
         "an effect of the claimed size in either direction stays clear of the untrained floor; (3) fewer than "
         f"{settings.min_val_images} validation images (`report.min_val_images`): a percentile interval over n "
         "images covers near its level only once the resampled AP is close to normal (the usual n ≥ 30); below, "
         "it is too narrow ((n - 1)/n of the variance) and its tails are a few distinct multisets."),
        (f"**Multiplicity**: the {len(tested)} testable claims are tested together (a claim that is not testable "
         "is not in the family). The Bonferroni column widens each "
         f"interval to confidence 1 - {1 - settings.confidence:.2g}/{max(len(tested), 1)}, so that all its "
         f"verdicts hold together at {level}; the per-claim verdict holds for that claim alone. The adjusted "
         "interval is Δ ± z · sd of the same two-level resamples (a normal interval: a percentile that far "
         "out would rest on a few resamples)."),
        ("**Power**: SE² = s²/S + v, with s the standard deviation of the per-seed differences over the S "
         "seeds and v the bootstrap variance of the seed-averaged difference over image resamples; v shrinks "
         "as 1/images, the seed part only with more seeds (s is measured on these images and keeps the part "
         "of the training noise that shows only on them: an upper bound for more images). MDE = "
         "(z(1 - α/2) + z(power)) · SE, a normal approximation; with few seeds s itself is uncertain."),
        ("**Score vs IoU**: each detection's IoU with the best-overlapping ground truth of the same class in its "
         "image (0 if none); Pearson and Spearman correlation over all detections of the combination's seeds."),
        ("**Sampled negatives**: the IoU histogram the Faster R-CNN sampler accumulates over all training "
         "steps (`model.roi_heads.sampled_negative_iou` in the checkpoint)."),
        ("Paper rows come from the publications (COCO, R50-FPN, 1x); they are context, not targets, for the "
         "small models and the synthetic data of the `smoke` and `tiny` profiles."),
    ]
    lines += ["## Method", "", *(f"* {item}" for item in method), ""]
    return "\n".join(lines)
