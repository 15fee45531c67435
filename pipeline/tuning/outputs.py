"""What a study leaves in ``reports/tuning/<study>/``.

- ``best_overrides.yaml``: the best trial as a YAML list of ``key=value`` overrides (the study's
  fixed overrides + the tuned values) for ``libra train --set``;
- ``summary.json``: target, counts per state, best value/trial/params, importances (DVC metrics);
- ``trials.csv``: one row per trial (number, state, value, params, duration, per-epoch values);
- ``history.png`` (optimization history), ``importances.png`` (parameter importances, needs
  >= 2 completed trials), ``contour.png`` (the study's two main parameters, needs >= 2 completed
  trials with distinct values), ``intermediate.png`` (per-epoch metric, pruned trials stop early).

A figure that cannot be drawn yet is written as a placeholder that says why, so the set of files
is the same for every study size (DVC declares them as outputs).
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
from pipeline.report.results import AP_UNIT
from pipeline.tuning.plan import TuningPlan

FIGURES = ("history", "importances", "contour", "intermediate")


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


def write_figures(study: optuna.Study, plan: TuningPlan, out: Path) -> dict[str, str]:
    """Draw the four figures; returns {figure: note} for those that are placeholders."""
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
    titles = {"history": "Optimization history", "importances": "Parameter importances",
              "contour": "Contour", "intermediate": "Intermediate values"}
    for name, message in notes.items():
        _placeholder(out / f"{name}.png", f"{titles[name]} — {study.study_name}", message)
    return notes


def best_overrides(study: optuna.Study, plan: TuningPlan) -> list[str] | None:
    if not _complete(study):
        return None
    return [*plan.spec.fixed, *plan.spec.as_overrides(study.best_trial.params)]


def write_best_overrides(path: Path, study: optuna.Study, plan: TuningPlan) -> list[str] | None:
    overrides = best_overrides(study, plan)
    shown = os.path.relpath(path) if path.is_relative_to(Path.cwd()) else path
    usage = (f"#   libra train --config {plan.base_config} "
             f"$(sed -n 's/^- /--set /p' {shown}) --out runs/best_{plan.study}\n")
    if overrides is None:
        header = f"# Study {study.study_name}: no completed trial yet.\n"
    else:
        best = study.best_trial
        header = (f"# Best trial {best.number} of study {study.study_name}: {plan.objective_name} = {best.value:.2f} "
                  f"(profile {plan.profile_name}).\n# The study's fixed overrides + the tuned values. Train with:\n")
    body = yaml.safe_dump(overrides or [], default_flow_style=False, sort_keys=False)
    write_text_atomic(path, header + (usage if overrides is not None else "") + body)
    return overrides


def write_trials_csv(path: Path, study: optuna.Study) -> None:
    frame = study.trials_dataframe(attrs=("number", "state", "value", "params", "datetime_start", "duration"))
    per_epoch = {t.number: json.dumps({str(k): round(v, 6) for k, v in sorted(t.intermediate_values.items())})
                 for t in study.get_trials(deepcopy=False)}
    if len(frame):
        frame["intermediate_values"] = frame["number"].map(per_epoch)
        frame["worker"] = frame["number"].map(
            {t.number: "{host}:{pid}".format(**t.user_attrs["worker"]) if "worker" in t.user_attrs else ""
             for t in study.get_trials(deepcopy=False)})
    replace_atomic(path, lambda tmp: frame.to_csv(tmp, index=False))


def summarize(study: optuna.Study, plan: TuningPlan, n_trials: int, storage: str) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    counts["finished"] = counts["complete"] + counts["pruned"]
    counts["total"] = len(trials)
    complete = _complete(study)
    best = study.best_trial if complete else None
    return {
        "study": plan.study, "study_name": study.study_name, "profile": plan.profile_name,
        "storage": storage, "metric": f"val/{plan.spec.metric}", "unit": AP_UNIT, "direction": "maximize",
        "n_trials_target": n_trials, "counts": counts,
        "best_value": best.value if best else None, "best_trial": best.number if best else None,
        "best_params": best.params if best else None,
        "importances": importances(study),
    }


def write_reports(study: optuna.Study, plan: TuningPlan, out: Path, n_trials: int,
                  storage: str) -> tuple[dict[str, Any], list[Path]]:
    """Write every report file of the study into ``out``; returns the summary and the files."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(study, plan, n_trials, storage)
    summary["best_overrides"] = write_best_overrides(out / "best_overrides.yaml", study, plan)
    write_trials_csv(out / "trials.csv", study)
    summary["placeholder_figures"] = write_figures(study, plan, out)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    files = [out / name for name in ("best_overrides.yaml", "summary.json", "trials.csv")]
    return summary, files + [out / f"{name}.png" for name in FIGURES]
