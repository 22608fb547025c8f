"""Cheap checks of the documentation sources (the build itself, which executes every example, runs
in CI as ``python -m sphinx -W --keep-going -b html docs docs/_build/html``).

* every page is in a toctree, and every toctree entry is a page;
* every executed code cell and every static ``python`` example parses;
* pages with code cells are text notebooks myst-nb will execute, and the build fails on an error;
* cells that need a GPU or an optional framework print why they were skipped when it is missing;
* the API reference lists every public function and class of the documented modules.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.glob("*.md"))

CODE_CELL = re.compile(r"^```\{code-cell\}[^\n]*\n(.*?)^```\s*$", re.S | re.M)
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```\s*$", re.S | re.M)
TOCTREE = re.compile(r"^```\{toctree\}\n(.*?)^```\s*$", re.S | re.M)


def _cell_source(cell: str) -> str:
    """The code of a MyST code cell, without its options (``:key: value`` lines or a YAML block)."""
    lines = cell.splitlines()
    if lines and lines[0].strip() == "---":
        end = lines.index("---", 1)
        lines = lines[end + 1:]
    while lines and re.match(r"^:\w[\w-]*:", lines[0]):
        lines = lines[1:]
    return "\n".join(lines) + "\n"


def _cells(page: Path) -> list[str]:
    return [_cell_source(c) for c in CODE_CELL.findall(page.read_text())]


def test_docs_exist():
    assert (DOCS / "conf.py").is_file() and (DOCS / "index.md").is_file()
    assert len(PAGES) >= 10, [p.name for p in PAGES]


def test_every_page_is_in_the_toctree():
    entries = []
    for block in TOCTREE.findall((DOCS / "index.md").read_text()):
        entries += [line.strip() for line in block.splitlines()
                    if line.strip() and not line.strip().startswith(":")]
    pages = {p.stem for p in PAGES} - {"index"}
    assert len(entries) == len(set(entries)), f"listed twice: {entries}"
    assert set(entries) == pages, (f"not in a toctree: {sorted(pages - set(entries))}; "
                                   f"no such page: {sorted(set(entries) - pages)}")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_code_parses(page):
    for i, src in enumerate(_cells(page)):
        compile(src, f"{page.name}: code cell {i}", "exec")
    for i, src in enumerate(PYTHON_BLOCK.findall(page.read_text())):
        compile(src, f"{page.name}: python example {i}", "exec")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_with_code_cells_are_executed_notebooks(page):
    text = page.read_text()
    if not CODE_CELL.search(text):
        return
    front = text.split("---", 2)[1] if text.startswith("---") else ""
    assert "format_name: myst" in front and "kernelspec:" in front, (
        f"{page.name} has code cells but no jupytext/kernelspec front matter: myst-nb would not "
        "execute it")


def test_conf_executes_every_example_and_fails_on_errors():
    conf = ast.parse((DOCS / "conf.py").read_text())
    values = {t.id: node.value for node in conf.body if isinstance(node, ast.Assign)
              for t in node.targets if isinstance(t, ast.Name)}
    assert ast.literal_eval(values["nb_execution_mode"]) in ("force", "cache")
    assert ast.literal_eval(values["nb_execution_raise_on_error"]) is True
    assert "myst_nb" in ast.literal_eval(values["extensions"])


# cells that need something CI does not have must say so when they skip
_NEEDS = ("torch.cuda.is_available()", "import cupy", "jax.devices()", 'find_spec("tensorflow")')


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_optional_cells_skip_visibly(page):
    for i, src in enumerate(_cells(page)):
        if any(n in src for n in _NEEDS):
            assert 'print("skipped:' in src, f"{page.name}: code cell {i} can skip silently"


def _public_names(module_file: Path) -> list[str]:
    """``__all__`` of a module, read without importing it, minus submodules and constants."""
    tree = ast.parse(module_file.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__"
                                                for t in node.targets):
            names = ast.literal_eval(node.value)
            return [n for n in names if n != "reference" and not n.isupper()]
    raise AssertionError(f"{module_file} has no __all__")


@pytest.mark.parametrize("module", ["dwops", "dwops.reference", "dwops.torch", "dwops.jax"])
def test_api_reference_lists_every_public_name(module):
    path = ROOT / (module.replace(".", "/") + ("/__init__.py" if module == "dwops" else ".py"))
    api = (DOCS / "api.md").read_text()
    documented = set(re.findall(r"^\.\. auto(?:function|class|exception):: ([\w.]+)", api, re.M))
    missing = [n for n in _public_names(path) if f"{module}.{n}" not in documented]
    assert not missing, f"docs/api.md does not document {module}: {missing}"
