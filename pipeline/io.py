"""Small file helpers shared by every layer: atomic writes, so a killed process never leaves a torn file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

__all__ = ["atomic_path", "write_text_atomic", "write_json_atomic", "write_yaml_atomic"]


def atomic_path(path: Path) -> Path:
    """A temporary name beside ``path`` (same file system), for write-then-rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = atomic_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=1) + "\n")


def write_yaml_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, yaml.safe_dump(payload, sort_keys=False))
