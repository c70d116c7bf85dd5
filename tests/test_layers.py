"""The package's floors (docs/STYLE-like layering): every module imports only from its own
floor or the floors below it, and no module outgrows one job.

ground (cache, models, saes, generation, data/, features, ...) < methods/ < stages/ <
studies/ < viz/ < cli/. Imports inside functions and under ``TYPE_CHECKING`` count too: a
lazy import that points upward is still an upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import spare_tl

PACKAGE = Path(spare_tl.__file__).resolve().parent
FLOORS = {"methods": 1, "stages": 2, "studies": 3, "viz": 4, "cli": 5}
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(module: str) -> int:
    parts = module.split(".")
    return FLOORS.get(parts[1], 0) if len(parts) > 1 else 0


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The spare_tl modules one ``from ... import ...`` statement reads."""
    if node.level:
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if not source.startswith("spare_tl"):
        return []
    # `from spare_tl import cache` reads the submodule spare_tl.cache
    found = []
    for alias in node.names:
        candidate = f"{source}.{alias.name}"
        if (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists() or (
            PACKAGE.parent / candidate.replace(".", "/") / "__init__.py"
        ).exists():
            found.append(candidate)
        else:
            found.append(source)
    return found


def imports_of(path: Path) -> list[tuple[int, str]]:
    module = module_name(path)
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            out += [(node.lineno, m) for m in resolve(module, path.name == "__init__.py", node)]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("spare_tl")]
    return out


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_walk_sees_the_package():
    names = {module_name(p) for p in MODULES}
    assert {"spare_tl.methods.spare", "spare_tl.stages.evaluation", "spare_tl.cli"} <= names
    # and it would see an upward import: a ground-floor module reading a viz module
    node = ast.parse("from spare_tl.viz import figures_scan").body[0]
    assert isinstance(node, ast.ImportFrom)
    (target,) = resolve("spare_tl.features", False, node)
    assert target == "spare_tl.viz.figures_scan" and floor(target) > floor("spare_tl.features")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_upward_import(path: Path):
    module = module_name(path)
    upward = [
        f"line {line}: {target}"
        for line, target in imports_of(path)
        if floor(target) > floor(module)
    ]
    assert not upward, f"{module} imports from a floor above it: {upward}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_module_outgrows_one_job(path: Path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{module_name(path)} has {lines} lines; split it by job"


def _from_imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, module, name) of every ``from spare_tl... import name`` in ``path``."""
    module = module_name(path)
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (
            node.level or (node.module or "").startswith("spare_tl")
        ):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if path.name == "__init__.py" else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            out += [(node.lineno, source, a.name) for a in node.names if a.name != "*"]
    return out


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_every_import_inside_the_package_resolves(path: Path):
    """Lazy imports inside functions run only when their command runs: check them all here."""
    import importlib

    missing = []
    for line, source, name in _from_imports(path):
        module = importlib.import_module(source)
        if not hasattr(module, name):
            try:
                importlib.import_module(f"{source}.{name}")
            except ModuleNotFoundError:
                missing.append(f"line {line}: from {source} import {name}")
    assert not missing, f"{module_name(path)}: {missing}"


def _base_names(node: ast.ClassDef) -> list[str]:
    return [b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "") for b in node.bases]


def test_every_error_class_is_defined_in_errors_py():
    defined = [
        (module_name(path), node.name)
        for path in MODULES
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
        and any(b.endswith(("Error", "Exception")) for b in _base_names(node))
    ]
    elsewhere = [f"{m}.{name}" for m, name in defined if m != "spare_tl.errors"]
    assert len(defined) >= 10 and not elsewhere, f"define these in spare_tl/errors.py: {elsewhere}"


def test_the_embedded_model_name_is_written_in_one_module():
    literal = '"smollm2-135m-instruct"'
    writers = sorted(module_name(p) for p in MODULES if literal in p.read_text())
    assert writers == ["spare_tl.embedded"], writers


@pytest.mark.parametrize("name", sorted(FLOORS) + ["data"])
def test_every_subpackage_says_what_its_floor_is_for(name: str):
    doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text())) or ""
    first = doc.splitlines()[0] if doc else ""
    assert first.startswith(("Floor", "Ground floor")) and len(doc) > 200, first


def test_no_compatibility_scaffolding_is_left():
    assert not (PACKAGE / "figures.py").exists() and not (PACKAGE / "report.py").exists()
    assert not hasattr(spare_tl, "MOVED_MODULES")
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    assert "DeprecationWarning" not in pyproject
