"""MLflow tracking: where the store is, and how configs become run parameters."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def tracking_uri(project_dir: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<absolute project dir>/mlflow.db``.

    The path is absolute so that runs started from a ``dvc exp`` temporary copy land in the
    project's store, not in the copy.
    """
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = (project_dir or Path.cwd()).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def flatten_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``, the form MLflow stores parameters in."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat
