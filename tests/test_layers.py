"""The library's floors (docs/architecture.md): a module imports only from its own floor or below, never
upwards, and ``components/`` imports nothing else from ``pipeline``."""

from __future__ import annotations

import ast

from conftest import ROOT

FLOORS: dict[str, int] = {
    "pipeline.components": 1, "pipeline.config": 1, "pipeline.io": 1, "pipeline.execution": 1,
    "pipeline.signals": 1, "pipeline.processes": 1, "pipeline.code_digest": 1,
    "pipeline.ownership": 1,
    "pipeline.data": 2, "pipeline.mmdet_import": 2, "pipeline.mlflow_store": 2,
    "pipeline.models": 3,
    "pipeline.engine": 4,
    "pipeline.params": 5, "pipeline.compose": 5, "pipeline.ablation": 5, "pipeline.runplan": 5,
    "pipeline.report": 6, "pipeline.dispatch": 6,
    "pipeline.tracking": 7, "pipeline.tuning": 7,
}
"""Module or package -> floor, as in the table of docs/architecture.md."""


def floor(module: str) -> int:
    matches = [name for name in FLOORS if module == name or module.startswith(name + ".")]
    assert matches, f"{module} has no floor: add it to docs/architecture.md and FLOORS"
    return FLOORS[max(matches, key=len)]


def imports(path) -> set[str]:
    """Every ``pipeline`` module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if is_pipeline_module(n)}
    return found


def is_pipeline_module(name: str) -> bool:
    """``pipeline.x.y`` names a module or package (not a function or class imported from one)."""
    path = ROOT / name.replace(".", "/")
    return name.startswith("pipeline.") and (path.with_suffix(".py").exists() or path.is_dir())


def test_every_import_goes_to_the_same_floor_or_below():
    upward = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if module == "pipeline":
            continue
        for imported in imports(path):
            if floor(imported) > floor(module):
                upward.append(f"{module} (floor {floor(module)}) imports {imported} (floor {floor(imported)})")
    assert not upward, "\n".join(upward)


def test_components_import_nothing_else_from_pipeline():
    for path in (ROOT / "pipeline/components").rglob("*.py"):
        outside = {m for m in imports(path) if not m.startswith("pipeline.components")}
        assert not outside, f"{path.name} imports {outside}"
