"""What a study leaves in ``reports/tuning/<study>/``.

- ``best_overrides.yaml``: only when validation adopted a trial (its interval, and its Bonferroni-adjusted
  one, exclude 0 above the default): the study's fixed overrides + that trial's values, a YAML list of
  ``key=value`` for ``libra train --set``. Written with libra's marker (``.best_overrides.yaml.libra``); when
  the default stands, such a file left by an earlier run is deleted, and one without the marker is refused
  (never deleted) unless ``--force``;
- ``summary.json``: target, counts per state, the objective and the default's values at the search's seeds,
  the search's best (value/trial/params: the maximum of noisy estimates), importances, the validation
  (per validated trial: AP per seed, ΔAP with its intervals, verdicts, MDE), the decision and why, and the
  compute spent (trainings, wall and CPU seconds of the search, the default, the validation);
- ``trials.csv``: one row per trial (number, state, value, params, duration, per-epoch values, per-seed values);
- ``history.png`` (optimization history), ``importances.png`` (parameter importances, needs
  >= 2 completed trials), ``contour.png`` (the study's two main parameters, needs >= 2 completed
  trials with distinct values), ``intermediate.png`` (per-step paired difference, pruned trials stop early),
  ``validation.png`` (ΔAP of each validated trial against the default, with its intervals).

A figure that cannot be drawn yet is written as a placeholder that says why, so the set of figures
is the same for every study size.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from detection.io import replace_atomic, write_text_atomic
from detection.ownership import check_replaceable, mark, marker_path
from pipeline.report.results import AP_UNIT
from pipeline.tuning.objective import SEEDS_ATTR, DefaultRun, PairedObjective, default_attr
from pipeline.tuning.plan import TuningPlan
from pipeline.tuning.training import Compute
from pipeline.tuning.validation import Validation

FIGURES = ("history", "importances", "contour", "intermediate", "validation")
TUNE = "libra tune"
"""The writer named in the marker of the ``best_overrides.yaml`` libra tune writes."""
BEST_OVERRIDES = "best_overrides.yaml"
VERDICT_COLORS = {"better": "tab:green", "worse": "tab:red", "equivalent": "tab:blue", "not resolved": "tab:gray"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _placeholder(path: Path, title: str, message: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, transform=ax.transAxes)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _save(ax: Any, path: Path) -> None:
    plt = _plt()
    fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def importances(study: optuna.Study) -> dict[str, float] | None:
    """Parameter importances (Optuna 5's default PED-ANOVA), or None with fewer than 2 completed trials."""
    if len(_complete(study)) < 2:
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = optuna.importance.get_param_importances(study)
    if any("too small" in str(w.message) for w in caught):
        return None
    return {k: float(v) for k, v in values.items()}


def draw_validation(validation: Validation, path: Path, title: str) -> None:
    """ΔAP of each validated trial against the default: its interval (thick) and its Bonferroni-adjusted one
    (thin), coloured by verdict, with ±rope shaded; a trial that is not testable is named with the reason."""
    plt = _plt()
    rows = validation.candidates
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.7 * len(rows)))
    ax.axvspan(-validation.rope, validation.rope, color="tab:blue", alpha=0.12, label=f"±rope {validation.rope:g}")
    ax.axvline(0, color="black", linewidth=0.8)
    for y, r in enumerate(rows):
        s = r.statistics
        label = r.verdict + (" (adopted)" if r.trial == validation.adopted else "")
        if "delta" not in s:
            ax.text(0, y, f"  not testable: {s.get('reason', '')}"[:120], va="center", fontsize=8)
            continue
        color = VERDICT_COLORS[r.verdict]
        ax.plot([s["adjusted_ci_low"], s["adjusted_ci_high"]], [y, y], color=color, linewidth=1)
        ax.plot([s["ci_low"], s["ci_high"]], [y, y], color=color, linewidth=5, alpha=0.6)
        ax.plot([s["delta"]], [y], "o", color=color)
        ax.annotate(f"{label}, MDE {s['mde']:.2f}", (s["delta"], y), textcoords="offset points", xytext=(0, 8),
                    ha="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [f"trial {r.trial} (search {r.search_value:+.2f})\n" + ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.params.items()) for r in rows], fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.invert_yaxis()
    ax.set_xlabel(f"Δ{validation.metric} vs the default (AP points)\n{round(100 * validation.confidence)}% interval "
                  "(thick), Bonferroni-adjusted (thin)", fontsize=9)
    ax.set_title(f"{title}: validation on seeds {validation.seeds}, {validation.images} images", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    _save(ax, path)


def write_figures(study: optuna.Study, plan: TuningPlan, out: Path, validation: Validation | None,
                  decision: str) -> dict[str, str]:
    """Draw the figures; returns {figure: note} for those that are placeholders."""
    import optuna.visualization.matplotlib as vm

    notes: dict[str, str] = {}
    complete = _complete(study)
    n = len(complete)
    target_name = plan.objective_name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if n:
            _save(vm.plot_optimization_history(study, target_name=target_name), out / "history.png")
        else:
            notes["history"] = "no completed trial yet"

        if importances(study) is not None:
            _save(vm.plot_param_importances(study, target_name=target_name), out / "importances.png")
        else:
            notes["importances"] = f"needs at least 2 completed trials (have {n})"

        pair = plan.spec.contour_params
        distinct = pair is not None and all(len({t.params.get(p) for t in complete if p in t.params}) >= 2
                                            for p in pair)
        if pair is None:
            notes["contour"] = "the study searches a single parameter"
        elif n >= 2 and distinct:
            _save(vm.plot_contour(study, params=list(pair), target_name=target_name), out / "contour.png")
        else:
            notes["contour"] = f"needs at least 2 completed trials with distinct {pair[0]} and {pair[1]} (have {n})"

        if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
            _save(vm.plot_intermediate_values(study), out / "intermediate.png")
        else:
            notes["intermediate"] = "no epoch was validated yet"

        if validation is not None and validation.candidates:
            draw_validation(validation, out / "validation.png", study.study_name)
        else:
            notes["validation"] = decision
    titles = {"history": "Optimization history", "importances": "Parameter importances",
              "contour": "Contour", "intermediate": "Intermediate values", "validation": "Validation"}
    for name, message in notes.items():
        _placeholder(out / f"{name}.png", f"{titles[name]} — {study.study_name}", message)
    return notes


def write_best_overrides(path: Path, study: optuna.Study, plan: TuningPlan, validation: Validation | None,
                         force: bool = False) -> list[str] | None:
    """Write the adopted trial's overrides to ``path`` (with libra's marker); with none adopted, delete a file
    an earlier run left there. A file libra did not write is never deleted or replaced (unless ``force``):
    :class:`~detection.ownership.NotOwnedError`. Returns the overrides written, or None."""
    check_replaceable(path, (TUNE,), force)
    if validation is None or validation.adopted is None:
        if path.exists():
            path.unlink()
            marker_path(path).unlink(missing_ok=True)
            print(f"removed {path}: no trial is adopted, so it no longer holds this study's result", flush=True)
        return None
    adopted = next(c for c in validation.candidates if c.trial == validation.adopted)
    overrides = [*plan.spec.fixed, *plan.spec.as_overrides(adopted.params)]
    shown = os.path.relpath(path) if path.is_relative_to(Path.cwd()) else path
    header = (f"# Trial {adopted.trial} of study {study.study_name} (profile {plan.profile_name}), validated on fresh "
              f"seeds {validation.seeds}:\n# {validation.decision}.\n"
              "# The study's fixed overrides + the tuned values. Train with:\n"
              f"#   libra train --config {plan.base_config} $(sed -n 's/^- /--set /p' {shown}) "
              f"--out runs/best_{plan.study}\n")
    write_text_atomic(path, header + yaml.safe_dump(overrides, default_flow_style=False, sort_keys=False))
    mark(path, TUNE)
    return overrides


def write_trials_csv(path: Path, study: optuna.Study) -> None:
    frame = study.trials_dataframe(attrs=("number", "state", "value", "params", "datetime_start", "duration"))
    trials = study.get_trials(deepcopy=False)
    per_step = {t.number: json.dumps({str(k): round(v, 6) for k, v in sorted(t.intermediate_values.items())})
                for t in trials}
    per_seed = {t.number: json.dumps(t.user_attrs.get(SEEDS_ATTR, {})) for t in trials}
    if len(frame):
        frame["intermediate_values"] = frame["number"].map(per_step)
        frame["seeds"] = frame["number"].map(per_seed)
        frame["worker"] = frame["number"].map(
            {t.number: "{host}:{pid}".format(**t.user_attrs["worker"]) if "worker" in t.user_attrs else ""
             for t in study.get_trials(deepcopy=False)})
    replace_atomic(path, lambda tmp: frame.to_csv(tmp, index=False))


def summarize(study: optuna.Study, plan: TuningPlan, objective: PairedObjective, n_trials: int,
              storage: str) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    counts["finished"] = counts["complete"] + counts["pruned"]
    counts["total"] = len(trials)
    complete = _complete(study)
    best = study.best_trial if complete else None
    defaults = {seed: DefaultRun.model_validate(study.user_attrs[default_attr(seed)]).value
                for seed in objective.seeds if default_attr(seed) in study.user_attrs}
    return {
        "study": plan.study, "study_name": study.study_name, "profile": plan.profile_name,
        "storage": storage, "metric": plan.metric, "unit": AP_UNIT, "direction": "maximize",
        "objective": {"name": plan.objective_name, **objective.as_attr(), "default": defaults},
        "n_trials_target": n_trials, "counts": counts,
        "best_value": best.value if best else None, "best_trial": best.number if best else None,
        "best_params": best.params if best else None,
        "best_seeds": best.user_attrs.get(SEEDS_ATTR) if best else None,
        "importances": importances(study),
    }


def write_reports(study: optuna.Study, plan: TuningPlan, objective: PairedObjective, out: Path, n_trials: int,
                  storage: str, validation: Validation | None, decision: str, compute: dict[str, Compute],
                  force: bool = False) -> tuple[dict[str, Any], list[Path]]:
    """Write every report file of the study into ``out``; returns the summary and the files written.
    ``decision``: why the default stands, or which trial is adopted; ``compute``: per part of the study."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(study, plan, objective, n_trials, storage)
    summary["validation"] = validation.model_dump(mode="json") if validation is not None else None
    overrides = write_best_overrides(out / BEST_OVERRIDES, study, plan, validation, force)
    summary["decision"] = {"adopted_trial": validation.adopted if validation is not None else None,
                           "best_overrides": overrides, "why": decision}
    summary["compute"] = {part: spent.model_dump() for part, spent in
                          {**compute, "total": sum(compute.values(), Compute())}.items()}
    write_trials_csv(out / "trials.csv", study)
    summary["placeholder_figures"] = write_figures(study, plan, out, validation, decision)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    files = [out / name for name in ("summary.json", "trials.csv")] + [out / f"{name}.png" for name in FIGURES]
    return summary, files + ([out / BEST_OVERRIDES] if overrides is not None else [])
