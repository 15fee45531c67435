"""Whether an evaluated run trained its whole schedule: its metrics say so, and a stopped run's say how far it got.

`libra evaluate` scores whatever checkpoint a run has, also one a stop left after fewer steps than
the run's schedule; its ``metrics.json`` then says ``"complete": false``, with the steps trained and
scheduled, so that no reader (dispatch, report) takes it for a finished run's.
"""

from __future__ import annotations

from typing import Any


def completion(steps_trained: int, steps_scheduled: int) -> dict[str, Any]:
    """The entries of ``metrics.json`` that say how far the evaluated run trained."""
    return {"complete": steps_trained >= steps_scheduled, "steps_trained": steps_trained,
            "steps_scheduled": steps_scheduled}


def cut_short(metrics: dict[str, Any]) -> str | None:
    """Why an evaluated run is not finished, or None if its metrics say it trained its whole schedule (metrics
    without the mark, written before it existed, do not say so)."""
    if metrics.get("complete") is True:
        return None
    if "steps_trained" not in metrics:
        return "its metrics do not say whether it trained its whole schedule"
    return f"trained {metrics['steps_trained']} of its {metrics['steps_scheduled']} scheduled steps"
