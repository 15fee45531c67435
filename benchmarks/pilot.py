"""The recipe pilot: how precisely each candidate training recipe measures a component's effect, per unit of
compute, so that the ablation's recipe is chosen by measurement (issue 24, point 3).

For every candidate recipe (a named set of config overrides, read from --candidates) and detector, it trains
--seeds paired seeds of the detector's baseline and of one variant (at the same seed both share data order,
sampling and the initial weights of every shared module), evaluates each run on the validation set, and
reports the baseline's mean AP and per-seed sd, the sd of the paired difference (variant - baseline), the
minimum detectable effect (MDE) of that difference with the ablation's number of seeds, the training compute,
and whether the baseline learned (gained more than report.learned_margin AP over the same detector before
training, at every seed). The sd of the difference comes with its 95% interval, and each candidate's spread is
tested against the --reference candidate's (an F test of the two variances): with a few seeds an sd is itself
uncertain, so a candidate replaces the reference only when the test tells their spreads apart. Run configs are
composed as the ablation's (pipeline/plan/compose.py, the params file's profile); a finished run in --work-dir is
reused, an interrupted one resumed.

    python benchmarks/pilot.py                                   # the default candidates, 3 seeds, both detectors
    python benchmarks/pilot.py --detectors retinanet --only ema --seeds 2
    python benchmarks/pilot.py --set data.source=coco --set data.root=/data/mine --set data.num_val=500
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import statistics
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.plan.compose import compose_config
from detection.config import ConfigError, ExperimentConfig, StrictModel, read_yaml, validate_model
from detection.data import write_synthetic_coco
from detection.engine.evaluate import evaluate_run
from detection.engine.train import train
from detection.io import flatten, write_json_atomic, write_text_atomic
from detection.ownership import NotOwnedError, check_replaceable, mark
from detection.run_dir import RunDir
from pipeline.plan.params import DETECTOR_COMPONENTS, Params, load_params, parse_combination
from pipeline.report.guards import untrained_ap
from pipeline.report.power import VarianceSplit
from pipeline.report.results import ap_points
from pipeline.plan.runplan import RunPlan
from scipy import stats

PILOT = "benchmarks/pilot.py"
"""The writer this tool marks its outputs with (see detection/ownership.py): it replaces only those."""
DEFAULT_CANDIDATES = Path("benchmarks/pilot_candidates.yaml")
DEFAULT_VARIANTS = {"faster_rcnn": "IS+BFP+BL", "retinanet": "BFP+BL"}
"""Each detector's variant: the full Libra stack, the largest effect the papers claim (Faster R-CNN +2.5 AP,
Libra R-CNN Table 2; RetinaNet +2.0 AP, Table 1) and the one that changes the most modules, so the sd of its
paired difference bounds those of the smaller claims from above rather than below."""


class Candidate(StrictModel):
    """One recipe: overrides (in the structure of detection/config.py) of every run of the profile."""

    about: str = ""
    set: dict[str, Any] = {}
    """For every detector."""
    faster_rcnn: dict[str, Any] = {}
    """For Faster R-CNN only, after ``set``."""
    retinanet: dict[str, Any] = {}
    detectors: tuple[Literal["faster_rcnn", "retinanet"], ...] | None = None
    """The detectors the recipe applies to (None: every one the pilot trains)."""

    def overrides(self, detector: str) -> list[str]:
        tree = {**flatten(self.set), **flatten(getattr(self, detector))}
        return [f"{key}={json.dumps(value)}" for key, value in tree.items()]


class Candidates(StrictModel):
    candidates: dict[str, Candidate]


def read_candidates(path: Path, only: list[str]) -> dict[str, Candidate]:
    candidates = validate_model(Candidates, read_yaml(path), str(path)).candidates
    unknown = sorted(set(only) - set(candidates))
    if unknown:
        raise ConfigError(f"--only {unknown}: not candidates of {path} ({sorted(candidates)})")
    return {name: c for name, c in candidates.items() if not only or name in only}


@dataclass
class Row:
    """One candidate x detector: AP in AP points, per seed in ``seeds`` order."""

    candidate: str
    detector: str
    variant: str
    seeds: list[int]
    baseline_ap: list[float]
    variant_ap: list[float]
    untrained_ap: list[float]
    steps: int
    images_per_step: int
    train_wall_s: float
    mean_ap: float = math.nan
    sd_ap: float = math.nan
    mean_diff: float = math.nan
    sd_diff: float = math.nan
    mde: float | None = None
    mde_note: str = ""
    sd_diff_interval: tuple[float, float] | None = None
    spread_p: float | None = None
    """Two-sided p of the F test that the difference's variance equals the reference candidate's (None: no
    reference, or this is it)."""
    learned: bool = False

    def summarise(self, ablation_seeds: int, confidence: float, power: float, margin: float) -> None:
        diffs = [v - b for v, b in zip(self.variant_ap, self.baseline_ap)]
        self.mean_ap, self.mean_diff = statistics.fmean(self.baseline_ap), statistics.fmean(diffs)
        self.learned = all(b - u > margin for b, u in zip(self.baseline_ap, self.untrained_ap))
        if len(self.seeds) < 2:
            self.mde_note = "not estimable: one seed has no spread"
            return
        self.sd_ap, self.sd_diff = statistics.stdev(self.baseline_ap), statistics.stdev(diffs)
        self.sd_diff_interval = sd_interval(self.sd_diff, len(self.seeds), confidence)
        # the seed part alone: the pilot runs no image bootstrap (the ablation's image part: docs/results.md)
        split = VarianceSplit(self.sd_diff, 0.0, len(self.seeds), 1)
        self.mde = split.mde(confidence, power, seeds=ablation_seeds)


def sd_interval(sd: float, n: int, confidence: float) -> tuple[float, float]:
    """The interval of a normal sample's standard deviation from ``n`` values: (n - 1) s² / σ² ~ χ²(n - 1), so
    σ lies in [s √((n - 1) / χ²_{1-a/2}), s √((n - 1) / χ²_{a/2})] with a = 1 - confidence."""
    tail = (1 - confidence) / 2
    return (sd * math.sqrt((n - 1) / stats.chi2.ppf(1 - tail, n - 1)),
            sd * math.sqrt((n - 1) / stats.chi2.ppf(tail, n - 1)))


def spread_p(row: Row, reference: Row) -> float:
    """Two-sided p of the F test of equal variances of two rows' paired differences: F = s₁² / s₂² ~ F(n₁ - 1,
    n₂ - 1) under equal variances (the rows' seeds are the same numbers, but different recipes draw differently)."""
    f = stats.f(len(row.seeds) - 1, len(reference.seeds) - 1)
    ratio = row.sd_diff ** 2 / reference.sd_diff ** 2
    return min(1.0, 2 * min(f.cdf(ratio), f.sf(ratio)))


def compare_spreads(rows: list[Row], reference: str) -> None:
    """Set each row's ``spread_p`` against the reference candidate's row of the same detector."""
    references = {r.detector: r for r in rows if r.candidate == reference and r.sd_diff > 0}
    for row in rows:
        ref = references.get(row.detector)
        if ref is not None and row is not ref and not math.isnan(row.sd_diff):
            row.spread_p = spread_p(row, ref)


def synthetic_set(cfg: ExperimentConfig, work_dir: Path) -> Path:
    """The built-in set of ``cfg.data``'s size and seed, written once under ``work_dir``."""
    d = cfg.data
    root = work_dir / "data" / f"synthetic_s{d.seed}_{d.num_train}x{d.num_val}_{d.image_size}px"
    if not (root / "annotations" / "instances_val.json").exists():
        write_synthetic_coco(root, d.seed, d.num_train, d.num_val, d.image_size)
    return root


def run_config(params: Params, profile: str, detector: str, combination: str, seed: int, overrides: list[str],
               work_dir: Path) -> ExperimentConfig:
    components = parse_combination(combination, DETECTOR_COMPONENTS[detector])
    cfg = compose_config(params, detector, profile, components, seed, overrides=overrides)
    if cfg.data.source != "synthetic":
        return cfg
    return compose_config(params, detector, profile, components, seed,
                          overrides=[*overrides, f"data.root={synthetic_set(cfg, work_dir)}"])


def train_and_evaluate(cfg: ExperimentConfig, run: Path) -> dict[str, Any]:
    """The run's metrics, training and evaluating what is not done yet; their console output goes
    to ``run/pilot.log``."""
    run.mkdir(parents=True, exist_ok=True)
    with (run / "pilot.log").open("a") as log, redirect_stdout(log), redirect_stderr(log):
        trained = train(cfg, run, resume=True, progress_bar=False)
        if trained is not None or not RunDir(run).metrics.exists():
            return evaluate_run(run)
    return json.loads(RunDir(run).metrics.read_text())


def cached_untrained_ap(plan: RunPlan, work_dir: Path) -> float:
    """:func:`untrained_ap`, computed once per work dir for the settings it depends on (the model, the
    validation data, the evaluation and the seed), whichever candidate's training recipe asks."""
    cfg = plan.experiment_config()
    key = hashlib.sha256(json.dumps([cfg.model.model_dump(mode="json"), cfg.data.model_dump(mode="json"),
                                     cfg.eval.model_dump(mode="json"), cfg.train.seed], sort_keys=True).encode()).hexdigest()
    cache = work_dir / "untrained_ap.json"
    known = json.loads(cache.read_text()) if cache.exists() else {}
    if key not in known:
        known[key] = untrained_ap(plan)
        write_json_atomic(cache, known)
    return known[key]


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def markdown(rows: list[Row], header: dict[str, Any], candidates: dict[str, Candidate]) -> str:
    s, ref = header["ablation_seeds"], header["reference"]
    lines = [f"# Recipe pilot ({header['profile']} profile, seeds {header['seeds']})", "",
             f"AP in AP points on {header['num_val']} validation images. MDE: the smallest paired difference "
             f"{s} seeds detect ({header['confidence']:.0%} two-sided, power {header['power']:.0%}), seed part "
             f"only. Learned: the baseline gained more than {header['learned_margin']:g} AP over the same detector "
             f"before training at every seed. The sd of the difference with its {header['confidence']:.0%} interval; "
             f"p: the F test that its variance equals the {ref!r} candidate's (a small p tells the spreads apart).", "",
             "| candidate | detector | variant | baseline AP | sd AP | variant - baseline | sd of difference | "
             f"p, same spread as {ref} | MDE ({s} seeds) | steps x images per run | wall s (all runs) | learned |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mde = fmt(r.mde, 2) if r.mde is not None else r.mde_note
        sd_diff = fmt(r.sd_diff, 2) + (" [{}, {}]".format(*(fmt(x, 2) for x in r.sd_diff_interval))
                                       if r.sd_diff_interval else "")
        lines.append(f"| {r.candidate} | {r.detector} | {r.variant} | {fmt(r.mean_ap)} | {fmt(r.sd_ap, 2)} | "
                     f"{fmt(r.mean_diff, 2)} | {sd_diff} | {fmt(r.spread_p, 2)} | {mde} | "
                     f"{r.steps} x {r.images_per_step} | "
                     f"{r.train_wall_s:.0f} | {'yes' if r.learned else 'no'} |")
    lines += ["", "Candidates:", ""]
    lines += [f"* **{name}**: {c.about or json.dumps(c.model_dump(exclude_defaults=True))}"
              for name, c in candidates.items()]
    return "\n".join(lines) + "\n"


def parse_variants(texts: list[str]) -> dict[str, str]:
    variants = dict(DEFAULT_VARIANTS)
    for text in texts:
        detector, sep, combination = text.partition("=")
        if not sep or detector not in DETECTOR_COMPONENTS:
            raise ConfigError(f"--variant {text!r}: expected DETECTOR=COMBINATION with a detector of "
                              f"{sorted(DETECTOR_COMPONENTS)}, e.g. faster_rcnn=IS")
        parse_combination(combination, DETECTOR_COMPONENTS[detector], f"--variant {detector}")
        variants[detector] = combination
    return variants


def pilot(args: argparse.Namespace) -> list[Row]:
    params = load_params(args.params)
    profile = args.profile or params.profile
    candidates = read_candidates(args.candidates, args.only)
    variants = parse_variants(args.variant)
    detectors = args.detectors.split(",")
    unknown = sorted(set(detectors) - set(DETECTOR_COMPONENTS))
    if unknown:
        raise ConfigError(f"--detectors {unknown}: known are {sorted(DETECTOR_COMPONENTS)}")
    outputs = [args.out, args.out.with_suffix(".json")]
    for path in outputs:
        check_replaceable(path, (PILOT,), args.force)
    seeds = list(range(args.seeds))
    ablation_seeds = args.ablation_seeds or len(params.ablation.seeds)
    cells = [(name, c, d) for name, c in candidates.items() for d in detectors if c.detectors is None or d in c.detectors]
    total, done, rows = len(cells) * 2 * len(seeds), 0, []
    num_val = None
    for name, candidate, detector in cells:
        overrides = [*candidate.overrides(detector), *args.set]
        ap: dict[str, list[float]] = {"baseline": [], variants[detector]: []}
        untrained, steps, batch, wall = [], 0, 0, 0.0
        for seed in seeds:
            for combination in ap:
                cfg = run_config(params, profile, detector, combination, seed, overrides, args.work_dir)
                run = args.work_dir / name / detector / combination / f"seed{seed}"
                start = time.perf_counter()
                metrics = train_and_evaluate(cfg, run)
                ap[combination].append(ap_points(metrics["bbox"]["AP"]))
                cost = metrics["cost"]
                steps, batch, wall = cost["train_steps"], cfg.train.batch_size, wall + cost["train_wall_s"]
                num_val = metrics["num_images"]
                if combination == "baseline":
                    untrained.append(cached_untrained_ap(RunPlan(detector, combination, (), seed, run, cfg.to_dict()),
                                                         args.work_dir))
                done += 1
                print(f"[{done}/{total}] {name} {detector} {combination} seed {seed}: AP {ap[combination][-1]:.1f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
        row = Row(name, detector, variants[detector], seeds, ap["baseline"], ap[variants[detector]], untrained,
                  steps, batch, wall)
        row.summarise(ablation_seeds, params.report.confidence, params.report.power, params.report.learned_margin)
        rows.append(row)
    compare_spreads(rows, args.reference)
    header = {"profile": profile, "seeds": seeds, "ablation_seeds": ablation_seeds, "num_val": num_val,
              "reference": args.reference, "confidence": params.report.confidence, "power": params.report.power,
              "learned_margin": params.report.learned_margin}
    table = markdown(rows, header, candidates)
    print(table)
    for path, write in ((outputs[0], lambda p: write_text_atomic(p, table)),
                        (outputs[1], lambda p: write_json_atomic(p, {**header, "rows": [asdict(r) for r in rows]}))):
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
        mark(path, PILOT)
    print(f"wrote {outputs[0]} and {outputs[1]}")
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", type=Path, default=DEFAULT_CANDIDATES,
                   help="YAML file of candidate recipes, {candidates: {name: {about, set, faster_rcnn, retinanet, "
                        "detectors}}} (default: %(default)s)")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only this candidate (repeatable; default: every candidate of the file)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"),
                   help="the params file whose profile, component knobs, data, trainer and report settings the runs "
                        "use (default: %(default)s)")
    p.add_argument("--profile", default=None, help="profile of the params file (default: its `profile`)")
    p.add_argument("--detectors", default="faster_rcnn,retinanet", help="comma-separated (default: %(default)s)")
    p.add_argument("--variant", action="append", default=[], metavar="DETECTOR=COMBINATION",
                   help="the variant compared with a detector's baseline (repeatable; default: "
                        + ", ".join(f"{d}={c}" for d, c in DEFAULT_VARIANTS.items()) + ")")
    p.add_argument("--reference", default="profile",
                   help="the candidate whose spread of the paired difference every other one is tested against "
                        "(default: %(default)s, the profile as it is)")
    p.add_argument("--seeds", type=int, default=3, help="paired seeds per candidate, 0..N-1 (default: %(default)s)")
    p.add_argument("--ablation-seeds", type=int, default=None,
                   help="seeds the MDE is computed for (default: the params file's ablation.seeds, counted)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run, after the candidate's (repeatable), e.g. "
                        "data.source=coco --set data.root=/data/mine")
    p.add_argument("--work-dir", type=Path, default=Path("runs/pilot"),
                   help="where the runs (<candidate>/<detector>/<combination>/seed<k>) and the built-in sets go; "
                        "finished runs there are reused (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("runs/pilot/pilot.md"),
                   help="the markdown table; the JSON goes beside it with suffix .json (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace --out files this tool did not write")
    return p


def main() -> None:
    args = parser().parse_args()
    if args.seeds < 1 or (args.ablation_seeds is not None and args.ablation_seeds < 1):
        parser().error("--seeds and --ablation-seeds must be >= 1")
    for name in ("lightning.pytorch", "lightning.fabric"):  # their handlers hold the console's stream
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        pilot(args)
    except (ConfigError, NotOwnedError, OSError) as exc:
        sys.exit(f"pilot: {exc}")


if __name__ == "__main__":
    main()
