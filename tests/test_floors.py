"""The package is built in floors (DESIGN section 6): a module imports only from below.

Read from the source, not by importing: every ``import``/``from ... import`` of an
``overlayfuse`` module, at module level and inside functions alike, is an edge.  Between the
parts of the package (top-level modules and subpackages) edges go strictly down the list of
floors below; inside a subpackage the modules import each other without a cycle; inside the
store they follow the floor map in ``overlayfuse/store/__init__.py`` and never import late.
"""
from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "overlayfuse")

# bottom up; a part imports only from floors strictly below its own
FLOORS: list[set[str]] = [
    {"errors", "xattrat", "sysmount"},
    {"idmap", "format"},
    {"fuseopts"},
    {"spec"},
    {"survey", "validate"},
    {"fusefs"},
    {"sandbox"},
    {"probe"},
    {"backends"},
    {"run"},
    {"store"},
    {"cli"},
    {"__main__", "__init__"},   # the package's face: overlayfuse/__init__.py
]

# upward imports that exist today, made late on purpose; each one is named here so a new one
# fails the test
EXEMPT: dict[tuple[str, str], str] = {
    # Report.verdict builds a backends.base.Verdict: the verdict type lives with the backends
    ("overlayfuse.probe.report", "overlayfuse.backends.base"): "Verdict type",
    # `overlayfuse check` prints the FUSE transport the fuse backend would use
    ("overlayfuse.probe.cli", "overlayfuse.backends.fuse"): "check's transport line",
}


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    late: bool      # inside a function or class body, not at module level
    line: int


def modules(root: str = ROOT) -> dict[str, str]:
    """Dotted module name -> file, for every .py under ``root``."""
    out = {}
    top = os.path.dirname(root)
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                name = os.path.relpath(path, top)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


def edges(root: str = ROOT) -> list[Edge]:
    mods = modules(root)
    out = []
    for name, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        module_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1])
                    source = base + ("." + node.module if node.module else "")
                else:
                    source = node.module or ""
                # `from . import x` imports the module x when there is one
                subs = [f"{source}.{a.name}" for a in node.names
                        if f"{source}.{a.name}" in mods]
                targets = subs if subs and len(subs) == len(node.names) else [source] + subs
            for t in targets:
                if t.split(".")[0] == "overlayfuse" and t in mods and t != name:
                    out.append(Edge(name, t, id(node) not in module_level, node.lineno))
    return out


def part(module: str) -> str:
    """The floor-list name of a module: its subpackage or top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def floor_of(name: str) -> int:
    for i, floor in enumerate(FLOORS):
        if name in floor:
            return i
    raise AssertionError(f"{name} is on no floor of tests/test_floors.py: add it")


def floor_breaks(root: str = ROOT) -> list[str]:
    bad = []
    for e in edges(root):
        a, b = part(e.src), part(e.dst)
        if a != b and floor_of(a) <= floor_of(b) and (e.src, e.dst) not in EXEMPT:
            bad.append(f"{e.src}:{e.line} imports {e.dst} ({a} is not above {b})")
    return bad


def cycles(root: str = ROOT) -> list[list[str]]:
    """Import cycles among the modules of one subpackage (late imports count)."""
    graph: dict[str, set[str]] = {}
    for e in edges(root):
        if part(e.src) == part(e.dst):
            graph.setdefault(e.src, set()).add(e.dst)
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def store_floor_map(root: str = ROOT) -> list[str]:
    """The module names of the floor map in the store's package docstring, bottom up."""
    with open(os.path.join(root, "store", "__init__.py"), encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    block = doc.split("Floors, bottom up", 1)[1].split("\n\n")[1]
    return [m.group(1) for m in re.finditer(r"^\s+(\w+)\s{2,}\S", block, re.M)]


def store_breaks(root: str = ROOT) -> list[str]:
    order = store_floor_map(root)
    listed = {m.rpartition(".")[2] for m in modules(root)
              if m.startswith("overlayfuse.store.")}
    bad = [f"store/{m}.py is not in the floor map" for m in sorted(listed - set(order))]
    for e in edges(root):
        if not (e.src.startswith("overlayfuse.store.") and e.dst.startswith("overlayfuse.store.")):
            continue
        a, b = e.src.rpartition(".")[2], e.dst.rpartition(".")[2]
        if e.late:
            bad.append(f"{e.src}:{e.line} imports {e.dst} late")
        if a in order and b in order and order.index(a) <= order.index(b):
            bad.append(f"{e.src}:{e.line} imports {e.dst}, not below it")
    return bad


def test_parts_import_only_from_floors_below() -> None:
    assert floor_breaks() == []


def test_exemptions_are_still_needed() -> None:
    """An exemption whose import is gone must leave the list, so the list stays the truth."""
    present = {(e.src, e.dst) for e in edges() if e.late}
    assert [k for k in EXEMPT if k not in present] == []


def test_no_import_cycle_inside_a_subpackage() -> None:
    assert cycles() == []


def test_store_modules_follow_the_floor_map() -> None:
    order = store_floor_map()
    assert order[:2] == ["catalog", "locks"] and order[-1] == "cli", order
    assert store_breaks() == []


def test_every_part_has_a_floor() -> None:
    for module in modules():
        floor_of(part(module))
