"""Small helpers shared by every layer: atomic writes (a killed process never leaves a torn file), file
digests and nested-dict flattening."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

__all__ = ["atomic_path", "replace_atomic", "write_text_atomic", "write_bytes_atomic", "write_json_atomic",
           "write_yaml_atomic", "digest_files", "flatten"]


def atomic_path(path: Path) -> Path:
    """A temporary name beside ``path`` (same file system), for write-then-rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def replace_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it to ``path``; if ``write`` fails,
    ``path`` is left as it was and the temporary file removed."""
    tmp = atomic_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    replace_atomic(path, lambda tmp: tmp.write_text(text))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    replace_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=1) + "\n")


def write_yaml_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, yaml.safe_dump(payload, sort_keys=False))


def digest_files(files: Iterable[tuple[str, Path]], hash_each: bool = True) -> str:
    """SHA-256 over named files, in order: per file ``name ‖ 0x00 ‖ sha256(bytes)``, or with
    ``hash_each=False`` ``name ‖ 0x00 ‖ bytes``.

    Both encodings are stored in run keys (the data digest, the backbone weights digest), so neither
    may change.
    """
    digest = hashlib.sha256()
    for name, path in files:
        digest.update(name.encode() + b"\0")
        content = hashlib.sha256() if hash_each else digest
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                content.update(block)
        if hash_each:
            digest.update(content.digest())
    return digest.hexdigest()


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"epochs": 6}}`` -> ``{"train.epochs": 6}``; values (an empty dict too) kept as they are."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
