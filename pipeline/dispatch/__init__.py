"""Dispatch an ablation's planned runs: reuse finished runs, resume interrupted ones, train the rest.

A run is identified by its **key** (:func:`pipeline.plan.runplan.compute_run_key`: its resolved config,
data, backbone weights, ``model.init_from`` checkpoint and the code it executes). Before a run trains, its key is written to ``<run>/run_key``. Per planned run, :func:`dispatch`
then decides (:mod:`.runs`):

* ``metrics.json`` present and the same key: **reused**, nothing runs;
* the same key, not evaluated yet, ``checkpoints/last.ckpt`` present: **resumed** from it (a run
  stopped by a signal, killed, preempted or failed before: a retry continues where it stopped);
* otherwise **trained**: a directory with another key (its config, data, weights or code changed) or
  without one is moved aside and deleted first (it is this pipeline's own output).

Each run to do is one job (:class:`RunJob`, :mod:`.job`): ``libra run --plan P --out RUN --resume``,
which trains the run and then evaluates it in one subprocess in the repository root, with its output
appended to ``<run>/dispatch.log``. Executors (:mod:`.backends`; settings: :mod:`pipeline.plan.execution`):
``inline`` (one after another in this process), ``local`` (submitit's LocalExecutor: ``jobs`` runs at
once, each with its share of the cores) and ``slurm`` (submitit: one sbatch job per run, nodes and GPUs
from the run's ``trainer`` settings, Lightning DDP over them through Lightning's SLURM environment; at
the time limit or a preemption the job stops its training, which saves ``last.ckpt``, and is requeued
to continue with ``--resume``).

A failed run (non-finite loss, out of memory, a lost node) does not stop the others; it is
recorded in ``runs/index.json`` with its reason and :func:`dispatch` (:mod:`.scheduler`) reports
failure at the end, so DVC does not record an incomplete ablation; the next dispatch retries only
the unfinished runs. SIGTERM or SIGINT stops every job (each saves a checkpoint to resume from) and
starts no new one.
"""

from pipeline.dispatch.backends import InlineBackend, LocalBackend, SlurmBackend, make_backend, slurm_parameters
from pipeline.dispatch.job import JobResult, RunJob, describe_exit
from pipeline.dispatch.runs import PlannedRun, decide, planned_runs, prepare_run_dir, resumed_step
from pipeline.dispatch.scheduler import DispatchOutcome, RunStatus, dispatch
from pipeline.plan.execution import ExecutionSettings, SlurmSettings, execution_settings

__all__ = ["InlineBackend", "LocalBackend", "SlurmBackend", "make_backend", "slurm_parameters", "JobResult", "RunJob",
           "describe_exit", "PlannedRun", "decide", "planned_runs", "prepare_run_dir", "resumed_step",
           "DispatchOutcome", "RunStatus", "dispatch", "ExecutionSettings", "SlurmSettings", "execution_settings"]
