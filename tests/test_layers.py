"""The code's one boundary and its floors (docs/architecture.md): ``detection`` (what a run executes)
imports nothing from ``pipeline`` (what plans, dispatches, reports and tracks runs); inside each, a module
imports only from its own floor or below; ``detection/components`` imports nothing else of the project."""

from __future__ import annotations

import ast

from conftest import ROOT

FLOORS: dict[str, int] = {
    "detection.components": 1, "detection.config": 1, "detection.io": 1, "detection.signals": 1,
    "detection.ownership": 1, "detection.run_dir": 1,
    "detection.data": 2,
    "detection.models": 3,
    "detection.engine": 4,
    "pipeline.plan": 5, "pipeline.mmdet_import": 5,
    "pipeline.dispatch": 6, "pipeline.report": 6, "pipeline.own_data": 6,
    "pipeline.tracking": 7, "pipeline.tuning": 7,
}
"""Module or package -> floor, as in the table of docs/architecture.md."""
PACKAGES = ("detection", "pipeline")


def floor(module: str) -> int:
    matches = [name for name in FLOORS if module == name or module.startswith(name + ".")]
    assert matches, f"{module} has no floor: add it to docs/architecture.md and FLOORS"
    return FLOORS[max(matches, key=len)]


def is_project_module(name: str) -> bool:
    """``detection.x.y`` or ``pipeline.x.y`` names a module or package (not a function or class imported from one)."""
    path = ROOT / name.replace(".", "/")
    return name.split(".")[0] in PACKAGES and "." in name and (path.with_suffix(".py").exists() or path.is_dir())


def imports(path) -> set[str]:
    """Every project module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if is_project_module(n) or n in PACKAGES}
    return found


def modules(package: str):
    for path in sorted((ROOT / package).rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if module not in PACKAGES:
            yield module, path


def test_what_a_run_executes_imports_nothing_that_orchestrates_runs():
    outward = [f"{module} imports {imported}" for module, path in modules("detection")
               for imported in imports(path) if imported.split(".")[0] == "pipeline"]
    assert not outward, "\n".join(outward)


def test_every_import_goes_to_the_same_floor_or_below():
    upward = []
    for package in PACKAGES:
        for module, path in modules(package):
            for imported in imports(path) - set(PACKAGES):
                if floor(imported) > floor(module):
                    upward.append(f"{module} (floor {floor(module)}) imports {imported} (floor {floor(imported)})")
    assert not upward, "\n".join(upward)


def test_components_import_nothing_else_of_the_project():
    for path in (ROOT / "detection/components").rglob("*.py"):
        outside = {m for m in imports(path) if not m.startswith("detection.components")}
        assert not outside, f"{path.name} imports {outside}"
