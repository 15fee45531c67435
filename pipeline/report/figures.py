"""The report's figures (matplotlib, Agg): each function draws one figure into one PNG file."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

DPI = 110
DASHES = ("-", "--", ":", "-.")


def line_style(i: int) -> dict[str, object]:
    """The ``i``-th line's colour and dash: tab10's ten colours solid, then dashed, dotted and dash-dotted,
    so that up to 40 lines of one plot (a detector's 4 combinations x 3 seeds is 12) all look different."""
    return {"color": plt.get_cmap("tab10")(i % 10), "linestyle": DASHES[(i // 10) % len(DASHES)]}


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def negative_iou_histogram(histograms: dict[str, tuple[np.ndarray, np.ndarray]], path: Path,
                           title: str = "IoU of the negatives sampled by the R-CNN head") -> Path:
    """Fraction of sampled negatives per IoU bin (with their best ground truth), one line per combination."""
    fig, ax = plt.subplots(figsize=(7, 4))
    upper = 0.0
    for i, (label, (edges, counts)) in enumerate(histograms.items()):
        if counts.any():
            upper = max(upper, float(edges[np.nonzero(counts)[0][-1] + 1]))
        total = counts.sum()
        fraction = counts / total if total else counts.astype(float)
        ax.stairs(fraction, edges, label=f"{label} (n={int(total):,})", linewidth=1.8, **line_style(i))
    ax.set_yscale("log")
    ax.set_xlim(0, min(1.0, upper + 0.05) if upper else 1.0)
    ax.set_xlabel("IoU of the sampled negative with its best-matching ground truth")
    ax.set_ylabel("fraction of sampled negatives")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def score_vs_iou(panels: dict[str, tuple[np.ndarray, np.ndarray, dict[str, float]]], path: Path, title: str) -> Path:
    """One panel per combination: detection score against IoU with the best same-class ground truth."""
    n = max(1, len(panels))
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax, (label, (scores, ious, corr)) in zip(axes.flat, panels.items()):
        if len(scores):
            ax.hexbin(ious, scores, gridsize=30, extent=(0, 1, 0, 1), bins="log", cmap="viridis", mincnt=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{label}\nPearson {corr['pearson']:.3f}, Spearman {corr['spearman']:.3f}", fontsize=9)
        ax.set_xlabel("IoU with best same-class GT")
        ax.set_ylabel("detection score")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    return _save(fig, path)


def ap_by_iou(curves: dict[str, dict[str, list[float]]], thresholds: list[float], path: Path) -> Path:
    """AP (%) at each IoU threshold, one panel per detector, one line per combination."""
    fig, axes = plt.subplots(1, max(1, len(curves)), figsize=(6 * max(1, len(curves)), 4), squeeze=False)
    for ax, (detector, combinations) in zip(axes.flat, curves.items()):
        for i, (label, values) in enumerate(combinations.items()):
            ax.plot(thresholds, values, marker="o", markersize=3, label=label, **line_style(i))
        ax.set_title(detector)
        ax.set_xlabel("IoU threshold")
        ax.set_ylabel("AP (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def loss_and_gradient(losses: dict[str, callable], path: Path, x_max: float = 3.0) -> Path:
    """Loss and its gradient (by autograd) against the regression error |x|, one line per loss.

    ``losses`` maps a label to a function of a tensor of differences returning elementwise losses.
    """
    import torch

    x = torch.linspace(0.0, x_max, 601, dtype=torch.float64, requires_grad=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, loss_fn) in enumerate(losses.items()):
        loss = loss_fn(x)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        left.plot(x.detach(), loss.detach(), label=label, **line_style(i))
        right.plot(x.detach(), grad, label=label, **line_style(i))
    left.set_title("loss")
    right.set_title("gradient dL/dx")
    _side_by_side(left, right, "regression error |x|")
    return _save(fig, path)


def _side_by_side(left, right, xlabel: str) -> None:
    """Shared x label, grid and legend of a two-panel figure (a panel with no line has none)."""
    for ax in (left, right):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)


def training_curves(curves: dict[str, pd.DataFrame], path: Path, title: str) -> Path:
    """Training loss and validation AP per epoch, one line per combination (or run)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, frame) in enumerate(curves.items()):
        for ax, column, scale in ((left, "train/loss", 1), (right, "val/AP", 100)):
            part = frame.dropna(subset=[column]) if column in frame else frame.iloc[:0]
            if not part.empty:
                ax.plot(part["epoch"], scale * part[column], marker="o", markersize=3, label=label, **line_style(i))
    left.set_title("training loss (epoch mean)")
    right.set_title("validation AP (%)")
    _side_by_side(left, right, "epoch")
    fig.suptitle(title)
    return _save(fig, path)
