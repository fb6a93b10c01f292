"""The header schema (pserver.protocol) is the one place meta keys are defined: library code outside
it names header fields by its constants, and every key it uses is in the schema's table.

The scan reads each module's syntax tree for string-literal keys of message meta: ``meta[...]``,
``meta.get/pop/setdefault(...)``, ``... in meta``, dict literals assigned to ``meta``, passed as
``meta=`` or as ``Message``'s fourth argument, where ``meta`` is a name called ``meta``, a ``.meta``
attribute, or a local bound to one (``m = msg.meta``). Applications (pserver/apps) are left out: they
use the public API and never build or read a header.
"""

from __future__ import annotations

import ast
from pathlib import Path

from pserver import protocol

ROOT = Path(protocol.__file__).resolve().parent
CONSTANTS = {name: value for name, value in vars(protocol).items()
             if name.isupper() and not name.startswith("_") and isinstance(value, str)}


def _aliases(tree: ast.AST) -> set[int]:
    """ids of the Name nodes that are locals bound to ``<something>.meta`` in their function."""
    out: set[int] = set()
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        bound = set()
        for n in ast.walk(fn):
            if isinstance(n, ast.Assign) and len(n.targets) == 1:
                t, v = n.targets[0], n.value
                pairs = (zip(t.elts, v.elts) if isinstance(t, ast.Tuple) and isinstance(v, ast.Tuple)
                         else [(t, v)])
                bound |= {a.id for a, b in pairs if isinstance(a, ast.Name)
                          and isinstance(b, ast.Attribute) and b.attr == "meta"}
        out |= {id(n) for n in ast.walk(fn) if isinstance(n, ast.Name) and n.id in bound}
    return out


def _dict_keys(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.Dict):
        return [k for k in node.keys if k is not None]
    if isinstance(node, ast.IfExp):
        return _dict_keys(node.body) + _dict_keys(node.orelse)
    return []


def meta_keys(source: str) -> list[tuple[int, str]]:
    """(line, key) of every string-literal meta key in ``source``."""
    tree = ast.parse(source)
    aliases = _aliases(tree)

    def is_meta(n: ast.AST) -> bool:
        return ((isinstance(n, ast.Name) and (n.id == "meta" or id(n) in aliases))
                or (isinstance(n, ast.Attribute) and n.attr == "meta"))

    keys: list[ast.AST] = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Subscript) and is_meta(n.value):
            keys.append(n.slice)
        elif (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.args
              and n.func.attr in ("get", "pop", "setdefault") and is_meta(n.func.value)):
            keys.append(n.args[0])
        elif (isinstance(n, ast.Compare) and len(n.ops) == 1 and is_meta(n.comparators[0])
              and isinstance(n.ops[0], ast.In | ast.NotIn)):
            keys.append(n.left)
        elif isinstance(n, ast.Call):
            given = [k.value for k in n.keywords if k.arg == "meta"]
            if isinstance(n.func, ast.Name) and n.func.id == "Message" and len(n.args) >= 4:
                given.append(n.args[3])
            for d in given:
                keys += _dict_keys(d)
        elif isinstance(n, ast.Assign) and any(is_meta(t) for t in n.targets):
            keys += _dict_keys(n.value)
    return [(k.lineno, k.value) for k in keys
            if isinstance(k, ast.Constant) and isinstance(k.value, str)]


def _library_modules() -> list[Path]:
    return [p for p in sorted(ROOT.rglob("*.py"))
            if p.name != "protocol.py" and "apps" not in p.relative_to(ROOT).parts]


def test_the_scan_finds_literal_keys_in_every_form_it_checks():
    src = '''
def f(msg, other):
    m, op = msg.meta, msg.op
    meta = {"a1": 1}
    meta["a2"] = msg.meta.get("a3")
    if "a4" in m or m.pop("a5", 0):
        send(Message("ok", 1, "t", {"a6": 1}), meta={"a7": 1} if op else None)
    return other["not_meta"], other.get("nor_this")
'''
    assert sorted(k for _, k in meta_keys(src)) == ["a1", "a2", "a3", "a4", "a5", "a6", "a7"]


def test_library_code_uses_only_header_fields_the_schema_defines():
    unknown = [f"{p.relative_to(ROOT)}:{line}: {key!r}" for p in _library_modules()
               for line, key in meta_keys(p.read_text()) if key not in protocol.FIELDS]
    assert unknown == [], "meta keys missing from pserver/protocol.py FIELDS:\n" + "\n".join(unknown)


def test_library_code_names_header_fields_by_their_constants():
    literal = [f"{p.relative_to(ROOT)}:{line}: {key!r}" for p in _library_modules()
               for line, key in meta_keys(p.read_text())]
    assert literal == [], "use the pserver.protocol constant for:\n" + "\n".join(literal)


def test_every_constant_is_a_field_of_the_table_and_each_field_is_described():
    assert sorted(CONSTANTS.values()) == sorted(protocol.FIELDS)
    assert len(set(CONSTANTS.values())) == len(CONSTANTS)  # no key under two names
    for key, field in protocol.FIELDS.items():
        assert field.key == key and field.meaning and field.ops
        assert field.type in ("int", "str", "bool", "float", "list", "dict", "any"), key
        assert field.way in ("request", "reply", "both"), key
