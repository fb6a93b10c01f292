"""The layer table of docs/design.md holds for pserver's imports (read with ast: nothing is imported)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pserver"
DESIGN = ROOT / "docs" / "design.md"

# Imports allowed against the table, as (importing module, imported module), each with its reason.
ALLOWED: set[tuple[str, str]] = set()


def layer_table() -> list[tuple[str, list[str]]]:
    """(layer, module paths) rows of the "## Layers" table of docs/design.md, bottom up."""
    text = DESIGN.read_text().split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        paths = re.findall(r"`(pserver/[\w/]*(?:\.py)?)`", cells[1]) if len(cells) == 3 else []
        if paths:
            rows.append((cells[0], paths))
    return rows


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _holds(doc_path: str, module: str) -> bool:
    """`pserver/kv/` holds pserver.kv and its modules; `pserver/cli.py` only pserver.cli."""
    name = doc_path.removesuffix("/").removesuffix(".py").removesuffix("/__init__")
    name = name.replace("/", ".")
    return module == name or (doc_path.endswith("/") and module.startswith(name + "."))


def layer_of(module: str, table: list[tuple[str, list[str]]]) -> int | None:
    """Index of the row whose most specific path holds ``module`` (None: no row does)."""
    best, best_len = None, -1
    for i, (_, paths) in enumerate(table):
        for p in paths:
            if _holds(p, module) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def _resolve(name: str) -> str:
    """`pserver.x.f` (a name imported from a module) -> `pserver.x`, the longest module that exists."""
    while name.count("."):
        rel = Path(*name.split("."))
        if (ROOT / rel).with_suffix(".py").exists() or (ROOT / rel / "__init__.py").exists():
            return name
        name = name.rsplit(".", 1)[0]
    return name


def imports_of(path: Path, source: str | None = None) -> set[str]:
    """Every pserver module ``path`` imports, at the top or inside functions."""
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.update(f"{target}.{a.name}" for a in node.names)  # a module or a name in one
    return {_resolve(m) for m in found if m == "pserver" or m.startswith("pserver.")}


def test_the_table_reads_as_the_layers_bottom_up():
    names = [name for name, _ in layer_table()]
    assert names[0] == "wire" and names[-1] == "shells" and len(names) >= 8, names


def test_every_module_has_a_layer():
    table = layer_table()
    missing = [_module(p) for p in sorted(PACKAGE.rglob("*.py")) if layer_of(_module(p), table) is None]
    assert not missing, f"add these modules to the layer table of docs/design.md: {missing}"


def test_imports_go_down_the_layers():
    table = layer_table()
    wrong, used = [], set()
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = _module(path)
        for imported in imports_of(path):
            lower, upper = layer_of(imported, table), layer_of(importer, table)
            if lower is None or upper is None or lower <= upper:
                continue
            if (importer, imported) in ALLOWED:
                used.add((importer, imported))
                continue
            wrong.append(f"{importer} ({table[upper][0]}) imports {imported} ({table[lower][0]})")
    assert not wrong, "imports against the layer order of docs/design.md:\n" + "\n".join(wrong)
    assert used == ALLOWED, f"allowances no longer needed (remove them): {sorted(ALLOWED - used)}"


@pytest.mark.parametrize("source, expected", [
    ("from ..errors import X", {"pserver.errors"}),
    ("from .worker import KVWorker", {"pserver.kv.worker"}),
    ("from ..ft import replication", {"pserver.ft.replication"}),
    ("def f():\n    from ..membership.client import request", {"pserver.membership.client"}),
    ("import pserver.wire as w", {"pserver.wire"}),
    ("import numpy", set()),
])
def test_imports_are_read_relative_to_the_module_and_inside_functions(source, expected):
    assert imports_of(PACKAGE / "kv" / "server.py", source) == expected
