"""Per-epoch training curves from the log that Lightning's CSVLogger writes in a run directory.

The logger writes one row per logging event: step rows (``train/*_step``, ``lr``), an epoch-end
row of training means (``train/*_epoch``) and a validation row (``val/*``), each with ``epoch``
and ``step`` and empty cells elsewhere. :func:`epoch_curves` folds them into one row per epoch.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from detection.io import write_text_atomic
from detection.run_dir import RunDir


def read_metrics_csv(path: Path) -> pd.DataFrame:
    """The raw log (empty frame with ``epoch`` and ``step`` columns for a missing or empty file)."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame(columns=["epoch", "step"])
    return pd.read_csv(path)


def epoch_curves(log: pd.DataFrame) -> pd.DataFrame:
    """One row per epoch (1-based ``epoch``): ``step`` (last optimizer step), the epoch means of the
    training losses without the ``_epoch`` suffix (``train/loss``, ``train/loss_classifier``, ...),
    the last ``lr`` of the epoch and the ``val/*`` metrics (NaN for epochs without validation)."""
    if log.empty:
        return pd.DataFrame(columns=["epoch", "step"])
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


def write_curve_files(run_dir: Path) -> None:
    """``<run>/curves/train_loss.csv`` and ``<run>/curves/val_AP.csv``: ``epoch`` and one value per
    epoch, the files DVC renders as plots (the last column is the plotted one). A file that already
    holds these values is left untouched."""
    curves = epoch_curves(read_metrics_csv(RunDir(run_dir).training_log))
    for name, column in (("train_loss", "train/loss"), ("val_AP", "val/AP")):
        frame = pd.DataFrame({"epoch": curves["epoch"],
                              name: curves[column] if column in curves else pd.Series(dtype=float)})
        path = Path(run_dir) / "curves" / f"{name}.csv"
        text = frame.dropna().to_csv(index=False)
        if path.exists() and path.read_text() == text:
            continue
        write_text_atomic(path, text)


def write_runs_curves(run_dirs: dict[str, Path], path: Path) -> None:
    """One CSV of the curves of every run (name -> run directory): run, epoch, train_loss, val_AP
    (empty where not logged)."""
    frames = []
    for name, run_dir in run_dirs.items():
        curves = epoch_curves(read_metrics_csv(RunDir(run_dir).training_log))
        if curves.empty:
            continue
        frames.append(pd.DataFrame({"run": name, "epoch": curves["epoch"],
                                    "train_loss": curves.get("train/loss"), "val_AP": curves.get("val/AP")}))
    table = pd.concat(frames) if frames else pd.DataFrame(columns=["run", "epoch", "train_loss", "val_AP"])
    write_text_atomic(path, table.to_csv(index=False, float_format="%.6g"))
