"""``execution`` in params.yaml: how ``libra dispatch`` runs the planned runs (not what they compute)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from detection.config import PositiveInt, StrictModel, validate_model

__all__ = ["SlurmSettings", "ExecutionSettings", "execution_settings"]


class SlurmSettings(StrictModel):
    """``execution.slurm``: the sbatch options of every run's job."""

    partition: str | None = None
    nodes: PositiveInt | None = None
    """Checked against each run's ``trainer.num_nodes`` (the source of truth: it changes the training)."""
    gpus_per_node: int | None = Field(None, ge=0)
    """Checked against each run's ``trainer.devices`` (0 for ``trainer.accelerator: cpu``)."""
    cpus_per_task: PositiveInt | None = None
    mem_gb: float | None = Field(None, gt=0)
    time_min: PositiveInt = 720
    max_timeouts: int = Field(3, ge=0)
    """How often a run may reach the time limit and be requeued before it counts as failed."""
    extra: dict[str, str | bool] = {}
    """More ``#SBATCH`` flags, e.g. ``{account: proj, qos: high, exclusive: true}``."""


class ExecutionSettings(StrictModel):
    """``execution``: the executor and what each run's job gets."""

    executor: Literal["inline", "local", "slurm"] = "local"
    """local: ``jobs`` runs at once, each kept to its share of the cores (on 2 cores 1.13x faster than
    inline for tiny runs of both detectors, see docs/results.md); inline: one run after another in the
    dispatching process, with every core; slurm: one sbatch job per run."""
    jobs: PositiveInt = 2
    """Runs at once with the local executor."""
    threads: PositiveInt | None = None
    """Torch threads per run (OMP_NUM_THREADS); None: the cores divided by ``jobs`` (local),
    every core (inline), ``slurm.cpus_per_task`` (slurm)."""
    job_dir: Path = Path("runs/.submitit")
    """submitit's pickles and logs (for SLURM: on a file system the nodes share)."""
    slurm: SlurmSettings = SlurmSettings()


def execution_settings(settings: ExecutionSettings, overrides: dict[str, Any]) -> ExecutionSettings:
    """``settings`` (params.yaml's ``execution``) with the non-None ``overrides`` (same keys; ``slurm`` merged
    key by key)."""
    raw = settings.model_dump(exclude_unset=True)
    slurm = {**(raw.get("slurm") or {}), **{k: v for k, v in (overrides.get("slurm") or {}).items() if v is not None}}
    raw.update({k: v for k, v in overrides.items() if k != "slurm" and v is not None})
    raw["slurm"] = slurm
    return validate_model(ExecutionSettings, raw, "params.yaml: execution (with the command line)")
