"""A run directory: the one place that names the files a run writes and reads.

Training writes the config, checkpoints, Lightning's log and what training cost; evaluation the metrics
and detections; ``libra dispatch`` the run key and its job's log. Every other module asks a
:class:`RunDir` for a file's path; none spells its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Checkpoint = Literal["last", "best"]
"""``last``: saved every epoch and on a stop; ``best``: the highest val AP during training."""


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        """The resolved config the run trains."""
        return self.path / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, which: Checkpoint = "last") -> Path:
        return self.checkpoints / f"{which}.ckpt"

    @property
    def training_log(self) -> Path:
        """Lightning's CSV log: per-step and per-epoch losses, learning rate, val AP."""
        return self.path / "metrics.csv"

    @property
    def hparams(self) -> Path:
        """Lightning's record of the module's hyper-parameters."""
        return self.path / "hparams.yaml"

    @property
    def curves(self) -> Path:
        """One row per epoch, parsed from :attr:`training_log` once, when training ends
        (:func:`detection.engine.curves.write_curves`); what dispatch, report and tracking read."""
        return self.path / "epoch_curves.csv"

    @property
    def metrics(self) -> Path:
        """The evaluation: COCO metrics, counts, the weights scored, the run's cost."""
        return self.path / "metrics.json"

    @property
    def detections(self) -> Path:
        """The evaluation's detections in COCO's results format."""
        return self.path / "detections.json"

    @property
    def train_cost(self) -> Path:
        return self.path / "train_cost.json"

    @property
    def system_metrics(self) -> Path:
        return self.path / "system_metrics.csv"

    @property
    def init_report(self) -> Path:
        """What ``model.init_from`` loaded and re-initialised, in a fresh run that has it."""
        return self.path / "init_from.json"

    @property
    def run_key(self) -> Path:
        """The key of the result in the directory, written by ``libra dispatch`` before the run trains."""
        return self.path / "run_key"

    def dispatch_log(self, rank: int = 0) -> Path:
        """The output of every attempt of the run's ``libra dispatch`` job (one file per DDP rank), appended."""
        return self.path / ("dispatch.log" if rank == 0 else f"dispatch.rank{rank}.log")

    @property
    def lock(self) -> Path:
        """Held by the one process that writes the run (:func:`detection.ownership.run_lock`)."""
        return self.path / ".libra.lock"
