"""What a training run costs: wall time, optimizer steps, throughput, peak memory, system metrics.

:class:`TrainingCost` is a Lightning callback. Over the sessions of a run (a resumed run adds its
sessions), with ``T_fit`` the wall time of each ``fit``, ``t_i`` the time of optimizer step ``i``
(batch start to batch end: forward, backward, optimizer; no data loading, no validation) and
``B_i`` its images summed over processes:

    train_wall_s        = Σ_sessions T_fit
    train_steps         = N (optimizer steps, the checkpoint's ``global_step``)
    train_s_per_step    = Σ_i t_i / N
    train_images_per_s  = Σ_i B_i / Σ_i t_i
    train_peak_rss_mb   = max over sessions of rank 0's peak resident set size
    train_peak_gpu_mem_mb = max over sessions of ``torch.cuda.max_memory_allocated`` (None on CPU)

The totals travel in the checkpoint (the callback's state), so a run resumed from ``last.ckpt``
counts every step it keeps exactly once, and steps lost with a killed session are counted when
they run again. At the end of each session the totals are written atomically to the run's
:attr:`~detection.run_dir.RunDir.train_cost`; evaluation adds them to its metrics.

:class:`SystemMetricsSampler` samples MLflow's system-metrics monitors (CPU, memory, disk,
network, GPU when NVML finds one) in a background thread every ``interval_s`` seconds, and once
when training ends, appending rows ``timestamp_ms, step, name, value`` (names as MLflow logs them,
e.g. ``system/cpu_utilization_percentage``) to the run's :attr:`~detection.run_dir.RunDir.system_metrics`
(rewritten atomically).
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from detection.io import write_json_atomic, write_text_atomic
from detection.run_dir import RunDir

SYSTEM_METRICS_COLUMNS = ("timestamp_ms", "step", "name", "value")
COST_KEYS = ("train_wall_s", "train_steps", "train_s_per_step", "train_images_per_s", "train_peak_rss_mb",
             "train_peak_gpu_mem_mb", "eval_wall_s", "eval_images_per_s", "device", "threads")
"""Keys of the ``cost`` object of ``metrics.json``."""


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB of 2^20 bytes as torch's and mmdet's memory
    figures (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def device_name(device: torch.device, world_size: int) -> str:
    """``cpu``, or e.g. ``cuda (NVIDIA H200) x2``: the accelerator, its model and the number of processes."""
    name = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type
    return name if world_size == 1 else f"{name} x{world_size}"


class SystemMetricsSampler:
    """MLflow's system-metrics monitors sampled every ``interval_s`` seconds into a CSV file (rank 0)."""

    def __init__(self, path: Path, interval_s: float, step: Any):
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

        self.path, self.interval_s, self.step = Path(path), interval_s, step
        self.monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        try:
            self.monitors.append(GPUMonitor())
        except (ImportError, RuntimeError):  # no NVML library or no GPU: CPU-side metrics only
            pass
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="system-metrics", daemon=True)

    def sample(self) -> None:
        """Collects every monitor once and adds its rows; the file is replaced atomically, so a kill
        never leaves a torn row."""
        timestamp_ms, step = int(time.time() * 1000), int(self.step())
        rows = []
        for monitor in self.monitors:
            monitor.collect_metrics()
            rows += [f"{timestamp_ms},{step},system/{name},{value}\n"
                     for name, value in monitor.aggregate_metrics().items()]
            monitor.clear_metrics()
        old = self.path.read_text() if self.path.exists() else ",".join(SYSTEM_METRICS_COLUMNS) + "\n"
        write_text_atomic(self.path, old + "".join(rows))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class TrainingCost(Callback):
    """Accumulates the cost of training (see the module docstring); writes the run's ``train_cost``."""

    def __init__(self, run: RunDir, system_metrics_interval_s: float = 10.0):
        self.run = run
        self.interval_s = system_metrics_interval_s
        self.totals: dict[str, Any] = {"wall_s": 0.0, "steps": 0, "step_s": 0.0, "images": 0,
                                       "peak_rss_mb": 0.0, "peak_gpu_mem_mb": None}
        self._sampler: SystemMetricsSampler | None = None
        self._session: dict[str, Any] | None = None
        """This session's steps, step time and images, from ``on_train_start`` on."""
        self._start, self._step_start = 0.0, 0.0
        self._device, self._world_size = torch.device("cpu"), 1

    def state_dict(self) -> dict[str, Any]:
        return self._current()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.totals = dict(state_dict)

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()
        self._session = {"steps": 0, "step_s": 0.0, "images": 0}
        self._device, self._world_size = pl_module.device, trainer.world_size
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
        if trainer.is_global_zero:
            self._sampler = SystemMetricsSampler(self.run.system_metrics, self.interval_s,
                                                 lambda: trainer.global_step)
            self._sampler.start()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._session["step_s"] += time.perf_counter() - self._step_start
        self._session["steps"] += 1
        self._session["images"] += len(batch[0]) * self._world_size

    def _current(self) -> dict[str, Any]:
        """The run's totals up to now: earlier sessions plus this one's."""
        if self._session is None:
            return dict(self.totals)
        total = self.totals
        gpu = (torch.cuda.max_memory_allocated(self._device) / 2**20 if self._device.type == "cuda" else None)
        return {"wall_s": total["wall_s"] + time.perf_counter() - self._start,
                "steps": total["steps"] + self._session["steps"],
                "step_s": total["step_s"] + self._session["step_s"],
                "images": total["images"] + self._session["images"],
                "peak_rss_mb": max(total["peak_rss_mb"], peak_rss_mb()),
                "peak_gpu_mem_mb": gpu if total["peak_gpu_mem_mb"] is None else max(gpu or 0.0, total["peak_gpu_mem_mb"])}

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._finish(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._finish(trainer)

    def _finish(self, trainer) -> None:
        """Stops the sampler and writes the totals (a stopped or failed session writes them too)."""
        if self._session is None:
            return
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None
        if trainer.is_global_zero:
            write_json_atomic(self.run.train_cost, train_cost(
                self._current(), device_name(self._device, self._world_size), torch.get_num_threads()))


def train_cost(totals: dict[str, Any], device: str, threads: int) -> dict[str, Any]:
    """The ``train_*`` entries of ``metrics.json``'s ``cost`` from the accumulated totals."""
    steps, step_s = totals["steps"], totals["step_s"]
    gpu = totals["peak_gpu_mem_mb"]
    return {"train_wall_s": round(totals["wall_s"], 3), "train_steps": steps,
            "train_s_per_step": round(step_s / steps, 5) if steps else None,
            "train_images_per_s": round(totals["images"] / step_s, 3) if step_s else None,
            "train_peak_rss_mb": round(totals["peak_rss_mb"], 1),
            "train_peak_gpu_mem_mb": None if gpu is None else round(gpu, 1),
            "device": device, "threads": threads}


def run_cost(run: RunDir, eval_wall_s: float, eval_images: int, eval_device: str) -> dict[str, Any]:
    """``metrics.json``'s ``cost``: the training totals of the run's ``train_cost`` file (None where the run
    has none; then ``device`` and ``threads`` are the evaluation's) and this evaluation's wall time and
    images/s."""
    path = run.train_cost
    train = json.loads(path.read_text()) if path.exists() else {"device": eval_device, "threads": torch.get_num_threads()}
    cost = {key: train.get(key) for key in COST_KEYS}
    cost.update(eval_wall_s=round(eval_wall_s, 3),
                eval_images_per_s=round(eval_images / eval_wall_s, 3) if eval_wall_s > 0 else None)
    return cost
