"""Where jobs run: inline (in this process), local (submitit's LocalExecutor) or on SLURM (submitit)."""

from __future__ import annotations

import os
import shlex
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

from detection.config import ConfigError
from pipeline.dispatch.job import JobResult, RunJob
from pipeline.dispatch.runs import PlannedRun
from pipeline.plan.execution import ExecutionSettings
from pipeline.dispatch.processes import cores
from pipeline.plan.runplan import RunPlan

LOCAL_TIMEOUT_MIN = 60 * 24 * 30
"""Local jobs have no time limit of their own; submitit's LocalExecutor needs one (default 2 min)."""


class Handle(Protocol):
    def result(self) -> JobResult | None:
        """The job's result, or None while it runs."""

    def stop(self) -> None:
        """Ask the job to stop; it saves a checkpoint and ends with status ``stopped``."""


class Backend(Protocol):
    description: str

    def room_for(self, run: PlannedRun, running: int) -> bool:
        """Whether ``run`` may start now, with ``running`` jobs running."""

    def start(self, run: PlannedRun, job: RunJob) -> Handle: ...

    def release(self, run: PlannedRun) -> None:
        """``run``'s job ended: its resources are free."""


class _Finished:
    def __init__(self, result: JobResult):
        self._result = result

    def result(self) -> JobResult:
        return self._result

    def stop(self) -> None:
        pass


class InlineBackend:
    """Runs each job in this process when it starts (one after another)."""

    description = "inline (one run after another, in this process)"

    def room_for(self, run: PlannedRun, running: int) -> bool:
        return running == 0

    def start(self, run: PlannedRun, job: RunJob) -> Handle:
        return _Finished(job())

    def release(self, run: PlannedRun) -> None:
        pass


class _SubmititHandle:
    def __init__(self, job: submitit.Job, stop: Callable[[submitit.Job], None]):
        self.job = job
        self._stop = stop

    def result(self) -> JobResult | None:
        if not self.job.done():
            return None
        try:
            return self.job.results()[0]
        except (UncompletedJobError, FailedJobError) as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            return JobResult("failed", f"job {self.job.job_id} ended without a result ({lines[0] if lines else exc!r}); "
                             f"see {self.job.paths.stderr} and {self.job.paths.stdout}")

    def stop(self) -> None:
        self._stop(self.job)


@contextmanager
def _sigint_blocked() -> Iterator[None]:
    """While submitting a local job: its controller process starts with SIGINT blocked, so a Ctrl-C in
    the terminal does not make it kill the job after a second; the dispatcher stops jobs with SIGTERM,
    which the controller forwards."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _gpus_wanted(plan: RunPlan, available: int) -> int:
    trainer = plan.config["trainer"]
    if trainer["accelerator"] in ("cpu", "mps") or (trainer["accelerator"] == "auto" and available == 0):
        return 0
    return available if trainer["devices"] == "auto" else int(trainer["devices"])


class LocalBackend:
    """submitit's LocalExecutor: ``jobs`` runs at once on this machine; GPUs, and cores when each job
    can have its own ``threads`` of them, shared out without overlap (processes that the scheduler
    moves between cores can run many times slower than processes kept to their cores)."""

    def __init__(self, settings: ExecutionSettings, gpus: list[int], threads: int):
        self.jobs = settings.jobs
        self.executor = submitit.LocalExecutor(folder=settings.job_dir)
        self.free_gpus = list(gpus)
        self.total_gpus = len(gpus)
        available = sorted(os.sched_getaffinity(0))
        self.threads = threads if settings.jobs * threads <= len(available) else None
        self.free_cpus = available
        self.assigned: dict[str, tuple[list[int], list[int]]] = {}
        pinned = f", each kept to {threads} core(s)" if self.threads else ""
        self.description = f"local ({settings.jobs} at once{pinned})"

    def room_for(self, run: PlannedRun, running: int) -> bool:
        wanted = _gpus_wanted(run.plan, self.total_gpus)
        return running < self.jobs and (wanted <= len(self.free_gpus) or wanted > self.total_gpus)

    def start(self, run: PlannedRun, job: RunJob) -> Handle:
        wanted = _gpus_wanted(run.plan, self.total_gpus)
        if wanted > self.total_gpus:  # fails at once rather than waiting for GPUs that do not exist
            return _Finished(JobResult("failed", f"needs {wanted} GPUs (trainer.devices), this machine has "
                                                 f"{self.total_gpus}"))
        gpus, self.free_gpus = self.free_gpus[:wanted], self.free_gpus[wanted:]
        cpus: list[int] = []
        if self.threads:
            cpus, self.free_cpus = self.free_cpus[:self.threads], self.free_cpus[self.threads:]
            job = job.on_cpus(tuple(cpus))
        self.assigned[run.name] = (gpus, cpus)
        self.executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN, tasks_per_node=1, gpus_per_node=wanted,
                                        visible_gpus=gpus)
        with _sigint_blocked():
            job_handle = self.executor.submit(job)
        return _SubmititHandle(job_handle, _signal_local_job)

    def release(self, run: PlannedRun) -> None:
        gpus, cpus = self.assigned.pop(run.name, ([], []))
        self.free_gpus += gpus
        self.free_cpus = sorted(self.free_cpus + cpus)


def _signal_local_job(job: submitit.Job) -> None:
    """SIGTERM to the job's controller process (its pid is the job id), which forwards it to the job."""
    if job.state == "RUNNING":
        os.kill(int(job.job_id), signal.SIGTERM)


def _cancel_slurm_job(job: submitit.Job) -> None:
    """scancel: SLURM sends SIGTERM to every process of the job (training saves its checkpoint), then SIGKILL."""
    job.cancel(check=False)


def slurm_parameters(run: PlannedRun, settings: ExecutionSettings, job: RunJob) -> dict[str, Any]:
    """submitit's AutoExecutor parameters of ``run``'s job: one task per device and node (DDP ranks)."""
    trainer, slurm = run.plan.config["trainer"], settings.slurm
    devices = trainer["devices"]
    if devices == "auto":
        raise ConfigError(f"{run.plan_file}: trainer.devices=auto; a SLURM job must ask for a number of devices, "
                          "set trainer.devices (params.yaml) to the GPUs (or CPU processes) per node")
    gpus = 0 if trainer["accelerator"] in ("cpu", "mps") else int(devices)
    checks = (("nodes", trainer["num_nodes"], "trainer.num_nodes"), ("gpus_per_node", gpus, "trainer.devices"))
    for option, wanted, field in checks:
        given = getattr(slurm, option)
        if given is not None and given != wanted:
            raise ConfigError(
                f"{run.plan_file}: execution.slurm.{option}={given}, but the run's {field} asks for {wanted} "
                f"(trainer.accelerator {trainer['accelerator']}, devices {devices}, num_nodes {trainer['num_nodes']}); "
                "devices and nodes are part of a run's config (with train.batch_size they make the global batch): "
                f"set {field} in params.yaml, or leave execution.slurm.{option} empty")
    threads = settings.threads or slurm.cpus_per_task
    parameters: dict[str, Any] = {
        "name": f"libra:{run.name}", "timeout_min": slurm.time_min, "nodes": trainer["num_nodes"],
        "tasks_per_node": int(devices), "gpus_per_node": gpus, "cpus_per_task": slurm.cpus_per_task,
        "mem_gb": slurm.mem_gb, "slurm_partition": slurm.partition,
        "slurm_additional_parameters": {"requeue": True, **slurm.extra},
        "slurm_setup": [f"# libra dispatch: {run.name} (rank 0 evaluates): {shlex.join(job.command())}",
                        *([f"export OMP_NUM_THREADS={threads}"] if threads else [])],
    }
    return {k: v for k, v in parameters.items() if v is not None}


class SlurmBackend:
    """submitit on SLURM: every run's job is submitted at once; SLURM schedules them."""

    def __init__(self, settings: ExecutionSettings):
        self.settings = settings
        self.executor = submitit.AutoExecutor(folder=settings.job_dir, cluster="slurm",
                                              slurm_max_num_timeout=settings.slurm.max_timeouts)
        where = f"partition {settings.slurm.partition}" if settings.slurm.partition else "the default partition"
        self.description = f"slurm ({where}, one job per run, {settings.slurm.time_min} min per job before requeue)"

    def room_for(self, run: PlannedRun, running: int) -> bool:
        return True

    def start(self, run: PlannedRun, job: RunJob) -> Handle:
        self.executor.update_parameters(**slurm_parameters(run, self.settings, job))
        return _SubmititHandle(self.executor.submit(job), _cancel_slurm_job)

    def release(self, run: PlannedRun) -> None:
        pass


def visible_gpus() -> list[int]:
    """Indices of this machine's GPUs that jobs may use (CUDA_VISIBLE_DEVICES is honoured by torch)."""
    import torch

    return list(range(torch.cuda.device_count()))


def make_backend(settings: ExecutionSettings, runs: list[PlannedRun]) -> tuple[Backend, int | None]:
    """The executor's backend and the torch threads per run."""
    if settings.executor == "inline":
        return InlineBackend(), settings.threads or cores()
    if settings.executor == "local":
        needs_gpus = any(r.plan.config["trainer"]["accelerator"] not in ("cpu", "mps") for r in runs)
        threads = settings.threads or max(1, cores() // settings.jobs)
        return LocalBackend(settings, visible_gpus() if needs_gpus else [], threads), threads
    return SlurmBackend(settings), settings.threads or settings.slurm.cpus_per_task
