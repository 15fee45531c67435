"""Per-epoch training curves, parsed once from the log that Lightning's CSVLogger writes in a run directory.

The logger writes one row per logging event: step rows (``train/*_step``, ``lr``), an epoch-end
row of training means (``train/*_epoch``) and a validation row (``val/*``), each with ``epoch``
and ``step`` and empty cells elsewhere. :func:`epoch_curves` folds them into one row per epoch;
:func:`write_curves` saves that table in the run directory when training ends, and every reader
(dispatch, report, tracking) takes it from there with :func:`read_curves`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from detection.io import write_text_atomic
from detection.run_dir import RunDir

CURVE_COLUMNS = ["epoch", "step"]
"""The columns every curves table has, also an empty one (a run that logged nothing)."""


def read_metrics_csv(path: Path) -> pd.DataFrame:
    """The raw log (empty frame with ``epoch`` and ``step`` columns for a missing or empty file)."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    return pd.read_csv(path)


def epoch_curves(log: pd.DataFrame) -> pd.DataFrame:
    """One row per epoch (1-based ``epoch``): ``step`` (last optimizer step), the epoch means of the
    training losses without the ``_epoch`` suffix (``train/loss``, ``train/loss_classifier``, ...),
    the last ``lr`` of the epoch and the ``val/*`` metrics (NaN for epochs without validation)."""
    if log.empty:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    epoch_cols = [c for c in log.columns if c.endswith("_epoch")]
    val_cols = [c for c in log.columns if c.startswith("val/")]
    grouped = log.groupby("epoch", sort=True)
    out = pd.DataFrame({"step": grouped["step"].max()})
    for col in epoch_cols:
        out[col.removesuffix("_epoch")] = grouped[col].last()
    if "lr" in log.columns:
        out["lr"] = grouped["lr"].last()
    for col in val_cols:
        out[col] = grouped[col].last()
    out = out.reset_index()
    out["epoch"] = out["epoch"].astype(int) + 1
    return out


def write_curves(run: RunDir) -> None:
    """Parse the run's training log into its curves file (:func:`epoch_curves`, written atomically)."""
    write_text_atomic(run.curves, epoch_curves(read_metrics_csv(run.training_log)).to_csv(index=False))


def read_curves(run: RunDir) -> pd.DataFrame:
    """The run's per-epoch curves as :func:`write_curves` saved them (pandas reads every float back
    exactly); an empty table if it has none (a run that never trained)."""
    if not run.curves.exists():
        return pd.DataFrame(columns=CURVE_COLUMNS)
    return pd.read_csv(run.curves)


def write_runs_curves(runs: dict[str, RunDir], path: Path) -> None:
    """One CSV of the curves of every run (name -> run directory): run, epoch, train_loss, val_AP
    (empty where not logged)."""
    frames = []
    for name, run in runs.items():
        curves = read_curves(run)
        if curves.empty:
            continue
        frames.append(pd.DataFrame({"run": name, "epoch": curves["epoch"],
                                    "train_loss": curves.get("train/loss"), "val_AP": curves.get("val/AP")}))
    table = pd.concat(frames) if frames else pd.DataFrame(columns=["run", "epoch", "train_loss", "val_AP"])
    write_text_atomic(path, table.to_csv(index=False, float_format="%.6g"))
