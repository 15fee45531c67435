"""Which worker owns a running trial, and failing the trials of workers that died.

Optuna's JournalStorage (and SQLite without heartbeats) keeps a killed worker's trial RUNNING
forever. Each trial therefore records its owner (host, process id, process creation time) as the user
attribute ``worker`` the moment it starts. Before a worker starts a trial it marks FAIL every
RUNNING trial owned by a process of *this host* that no longer exists (or is a zombie, or whose id
was reused by a newer process). Trials of other hosts are left to the RDB heartbeat
(see ``storage.py``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import optuna
import psutil
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

OWNER_ATTR = "worker"
FAIL_REASON_ATTR = "fail_reason"


def worker_identity() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": psutil.Process(pid).create_time()}


def owner_alive(owner: dict[str, Any]) -> bool | None:
    """True/False for a process on this host; None when the owner is on another host (unknown)."""
    if owner.get("host") != socket.gethostname():
        return None
    try:
        process = psutil.Process(int(owner["pid"]))
        if process.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return False
        start = owner.get("start")
        return start is None or process.create_time() == float(start)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # it exists; whether its id was reused cannot be told
        return True


def fail_dead_trials(study: optuna.Study,
                     on_failed: Callable[[FrozenTrial, str], None] | None = None) -> list[FrozenTrial]:
    """Mark FAIL the RUNNING trials whose owning process on this host is gone; returns them."""
    failed = []
    storage = study._storage
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(OWNER_ATTR)
        if not isinstance(owner, dict) or owner_alive(owner) is not False:
            continue
        reason = f"worker {owner['host']}:{owner['pid']} died while running this trial"
        try:
            storage.set_trial_user_attr(trial._trial_id, FAIL_REASON_ATTR, reason)
            if not storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:
            continue  # another worker got there first
        failed.append(trial)
        optuna.logging.get_logger("optuna").warning(f"Trial {trial.number} marked FAIL: {reason}.")
        if on_failed is not None:
            on_failed(trial, reason)
    return failed
