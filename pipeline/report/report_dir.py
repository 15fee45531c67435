"""A report directory: the one place that names the files ``libra report`` writes and ``libra track`` reads.

Like :class:`detection.run_dir.RunDir` for a run, every other module asks a :class:`ReportDir` for a
path; none spells a file name. ``dvc.yaml`` names the same files as the report stage's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ReportDir:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def markdown(self) -> Path:
        """The report: tables, claims with verdicts, figures linked."""
        return self.path / "ablation.md"

    @property
    def html(self) -> Path:
        """The report as one page with its figures inlined (what MLflow's artifact viewer can show)."""
        return self.path / "ablation.html"

    @property
    def table(self) -> Path:
        """The ablation table, one row per (detector, combination, source)."""
        return self.path / "ablation.csv"

    @property
    def metrics(self) -> Path:
        """The summary metrics and verdicts (DVC metrics; the MLflow parent run's metrics and tags)."""
        return self.path / "metrics.json"

    @property
    def headline(self) -> Path:
        """The few numbers ``dvc exp show`` puts in its table."""
        return self.path / "headline.json"

    @property
    def curves(self) -> Path:
        """Every run's per-epoch curves in one table (DVC plots)."""
        return self.path / "curves.csv"

    @property
    def figures(self) -> Path:
        """The ablation's figures."""
        return self.path / "figures"

    def figure(self, name: str) -> Path:
        return self.figures / f"{name}.png"

    @property
    def runs(self) -> Path:
        """One folder per run, ``<detector>/<combination>/seed<k>``: what ``libra track`` logs on its child run."""
        return self.path / "runs"

    def run(self, name: str) -> Path:
        return self.runs / name

    def iou_distributions(self, name: str) -> Path:
        """A run's IoU distributions (columns curve, iou, value; see
        :func:`pipeline.report.localization.iou_distributions`)."""
        return self.run(name) / "iou_distributions.csv"

    @property
    def tracking_record(self) -> Path:
        """What ``libra track`` logged where (written by it, not by the report)."""
        return self.path / "mlflow.json"

    def report_files(self) -> list[Path]:
        """The files of the report itself (every file but the runs' folders and the tracking record)."""
        return sorted(p for p in self.path.rglob("*")
                      if p.is_file() and p != self.tracking_record and self.runs not in p.parents)
