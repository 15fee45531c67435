"""Each DVC stage lists, as deps, every project module its `libra` command imports (transitively),
so a code change reruns the stages that run that code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

PIPELINES = ["dvc.yaml", "configs/studies/dvc.yaml"]
SUBPROCESSES = {"dispatch": ("run",)}
"""Commands a stage's command runs as subprocesses (their code is the stage's code too)."""


def module_file(name: str) -> Path | None:
    """The file of a project module (``detection.x``, ``pipeline.x.y`` or ``stages.x``), package or module; None if not ours."""
    if name.split(".")[0] not in ("detection", "pipeline", "stages"):
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Project modules ``path`` imports anywhere (also inside functions), with the packages on the way."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    else:
        package = package.removesuffix(".__init__")
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{node.module}" if node.module else parent
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    with_parents = set()
    for name in found:
        parts = name.split(".")
        with_parents.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return with_parents


def closure(entry: Path) -> set[Path]:
    """Every project file ``entry`` needs: itself and, transitively, what it imports."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [f for f in map(module_file, imported_modules(path)) if f is not None and f not in seen]
    return seen


def stages() -> list[tuple[str, str, dict]]:
    out = []
    for pipeline in PIPELINES:
        for name, stage in yaml.safe_load((ROOT / pipeline).read_text())["stages"].items():
            out.append((pipeline, name, stage))
    return out


@pytest.mark.parametrize("pipeline, name, stage", stages(), ids=[f"{p}:{n}" for p, n, _ in stages()])
def test_stage_deps_cover_the_code_it_runs(pipeline, name, stage):
    command = stage["cmd"] if isinstance(stage["cmd"], str) else " ".join(stage["cmd"])
    sub = re.match(r"\s*libra\s+([\w-]+)", command)
    assert sub, f"{pipeline}:{name}: expected a `libra` command, got {command!r}"
    base = (ROOT / pipeline).parent / stage.get("wdir", ".")
    deps = [(base / (d if isinstance(d, str) else next(iter(d)))).resolve() for d in stage.get("deps", [])]
    needed = set().union(*(closure(ROOT / "stages" / f"{command}.py")
                           for command in (sub.group(1), *SUBPROCESSES.get(sub.group(1), ()))))
    needed = {p for p in needed if p.parent != ROOT}
    uncovered = sorted(str(p.relative_to(ROOT)) for p in needed
                       if not any(p == d or d in p.parents for d in deps))
    assert not uncovered, f"{pipeline}:{name} runs code its deps do not list: {uncovered}"
