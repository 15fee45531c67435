"""The report's figures tell every line apart: one run's or combination's line never shares its colour and dash."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

from pipeline.report import figures


@pytest.fixture
def drawn(monkeypatch):
    """The figures drawn, kept open instead of saved."""
    kept = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: kept.append(fig) or path)
    return kept


def _styles(ax, kind: str) -> list[tuple[str, str]]:
    """(colour, dash) of each of the axes' step patches (``kind="patches"``) or lines."""
    if kind == "patches":
        return [(to_hex(p.get_edgecolor()), str(p.get_linestyle())) for p in ax.patches]
    return [(to_hex(line.get_color()), str(line.get_linestyle())) for line in ax.lines]


def test_twelve_runs_get_twelve_different_lines(drawn, tmp_path):
    """A detector's 4 combinations x 3 seeds (12 lines) in the sampled-negative histogram and the curves."""
    edges = np.linspace(0, 0.5, 6)
    histograms = {f"combination{c} seed{s}": (edges, np.arange(1, 6) + c + s) for c in range(4) for s in range(3)}
    figures.negative_iou_histogram(histograms, tmp_path / "h.png")
    curves = {name: pd.DataFrame({"epoch": [0, 1], "train/loss": [1.0, 0.5], "val/AP": [0.1, 0.2]})
              for name in histograms}
    figures.training_curves(curves, tmp_path / "c.png", "curves")
    histogram, curve = drawn
    stairs = _styles(histogram.axes[0], "patches")
    assert len(stairs) == 12 and len(set(stairs)) == 12
    for ax in curve.axes:
        lines = _styles(ax, "lines")
        assert len(lines) == 12 and len(set(lines)) == 12
    assert stairs == _styles(curve.axes[0], "lines"), "the same run has the same style in every figure"


def test_line_styles_are_distinct_up_to_forty():
    styles = [(to_hex(s["color"]), s["linestyle"]) for s in map(figures.line_style, range(40))]
    assert len(set(styles)) == 40
    assert figures.line_style(40) == figures.line_style(0)


def test_a_panel_without_lines_draws_no_legend_and_warns_nothing(drawn, tmp_path):
    """Runs that never validated (one step): the AP panel stays empty, without matplotlib's legend warning."""
    curves = {"baseline": pd.DataFrame({"epoch": [0], "train/loss": [1.0], "val/AP": [np.nan]})}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figures.training_curves(curves, tmp_path / "c.png", "curves")
    loss, ap = drawn[0].axes
    assert loss.get_legend() is not None and ap.get_legend() is None and not ap.lines
