"""The digest of the code a run executes: the part of a run's key that follows the code.

A run executes the ``detection`` package (config schema, data, models, training and evaluation), but
of the balanced-learning components only the files its config enables (:data:`COMPONENT_CODE`). Its
code digest hashes exactly those files, so

* editing a component's file changes the key of the runs that enable it, and of no other run;
* editing any other file of ``detection`` changes every run's key;
* editing ``pipeline`` (planning, dispatch, report, tracking, tuning), ``stages`` or docs changes no key.

Each file is hashed as its syntax tree without docstrings (``ast.dump``), so an edit of comments,
docstrings or layout retrains nothing; any change of what the code does retrains.
``tests/test_code_digest.py`` trains a run and fails if it imports a module of ``pipeline`` other
than the plan readers, and checks that a baseline executes no function of a component's file.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "detection"
"""The package a run executes; the paths below are relative to it."""

COMPONENT_CODE: dict[str, str] = {
    "iou_balanced_sampling": "components/sampler.py",
    "bfp": "components/bfp.py",
    "balanced_l1": "components/balanced_l1.py",
    "iou_balanced_cls": "components/iou_balanced.py",
    "iou_balanced_loc": "components/iou_balanced.py",
}
"""Per ``components.<section>`` of the config: the file it executes when enabled."""


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def source_digest(path: Path) -> str:
    """SHA-256 of what ``path``'s Python code does: its syntax tree without docstrings and comments."""
    stat = path.stat()
    return _source_digest(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=None)
def _source_digest(path: Path, mtime_ns: int, size: int) -> str:
    tree = ast.parse(path.read_text(), filename=str(path))
    return hashlib.sha256(ast.dump(_strip_docstrings(tree)).encode()).hexdigest()


def code_files(config: dict[str, Any], root: Path = PACKAGE_ROOT) -> list[Path]:
    """The files a run of ``config`` (a resolved experiment config) executes, in a fixed order."""
    enabled = [section for section, settings in sorted(config.get("components", {}).items())
               if settings.get("enabled")]
    unknown = [section for section in enabled if section not in COMPONENT_CODE]
    if unknown:
        raise KeyError(f"components {unknown} have no file in pipeline.plan.code_digest.COMPONENT_CODE")
    used = {root / COMPONENT_CODE[section] for section in enabled}
    skipped = {root / path for path in COMPONENT_CODE.values()} - used
    return sorted(path for path in root.rglob("*.py") if "__pycache__" not in path.parts and path not in skipped)


def code_digest(config: dict[str, Any], root: Path = PACKAGE_ROOT) -> str:
    """The digest of the code a run of ``config`` executes (see the module docstring)."""
    digest = hashlib.sha256()
    for path in code_files(config, root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + source_digest(path).encode())
    return digest.hexdigest()[:16]
