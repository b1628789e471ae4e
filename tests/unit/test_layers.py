"""The package layers point down and no module imports itself back.

``data`` imports none of our packages; ``models`` only ``data``; ``sharding`` ``data`` and
``models``; ``trainer`` all three; ``launch`` and ``bench`` sit on top. ``models/`` never
imports ``torch.distributed`` / ``torchrec.distributed``. Every import counts, including the
ones inside functions (a lazy import is still a dependency), and ``if TYPE_CHECKING:`` blocks
too (a type that lives in a higher layer is a dependency on it).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[2]
RANK = {"data": 0, "models": 1, "sharding": 2, "trainer": 3, "launch": 4, "bench": 4}
DISTRIBUTED = ("torch.distributed", "torchrec.distributed")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def our_modules() -> Dict[str, Path]:
    out: Dict[str, Path] = {}
    for top in RANK:
        for p in sorted((ROOT / top).rglob("*.py")):
            out[module_name(p)] = p
    return out


def imports(path: Path) -> List[Tuple[int, str]]:
    """(line, imported name) of every import in the file, relative imports resolved;
    ``from a.b import c`` gives both ``a.b`` and ``a.b.c`` (``c`` may be a submodule)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: List[Tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                me = module_name(path)
                package = me if path.name == "__init__.py" else me.rpartition(".")[0]
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def _owner(name: str, mods: Dict[str, Path]) -> str:
    """The module of ours that an imported dotted name refers to ('' if none)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in mods:
            return ".".join(parts[:i])
    return ""


def test_import_scan_sees_every_form(tmp_path: Path) -> None:
    p = tmp_path / "m.py"
    p.write_text("from torch import distributed as d\n"
                 "def f():\n    import trainer.config\n")
    names = {n for _, n in imports(p)}
    assert {"torch.distributed", "trainer.config"} <= names


def test_no_upward_imports() -> None:
    mods = our_modules()
    bad: Dict[str, str] = {}
    for name, path in mods.items():
        rank = RANK[name.split(".")[0]]
        for line, imp in imports(path):
            top = imp.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{line}"
            if top in RANK and RANK[top] > rank:
                bad.setdefault(where, f"{where} imports {imp}")
            if name.split(".")[0] == "models" and (imp + ".").startswith(
                    tuple(d + "." for d in DISTRIBUTED)):
                bad.setdefault(where, f"{where} imports distributed code {imp}")
    assert not bad, "imports that point up a layer:\n" + "\n".join(sorted(bad.values()))


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle of the directed graph (as a closed path), or [] if it has none."""
    colour: Dict[str, int] = {}
    stack: List[str] = []

    def visit(n: str) -> List[str]:
        colour[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if colour.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in colour:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        colour[n] = 2
        return []

    for n in sorted(graph):
        if n not in colour:
            found = visit(n)
            if found:
                return found
    return []


def test_find_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles() -> None:
    mods = our_modules()
    graph: Dict[str, Set[str]] = {}
    for name, path in mods.items():
        deps = {_owner(imp, mods) for _, imp in imports(path)}
        # A package's __init__ importing its own submodules (and them importing their package
        # for its re-exports) is the package's public face, not a design cycle.
        graph[name] = {d for d in deps if d and d != name
                       and not d.startswith(name + ".") and not name.startswith(d + ".")}
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def reachable(start: str, mods: Dict[str, Path]) -> Set[str]:
    """Every module of ours that importing ``start`` may load (lazy imports included)."""
    seen: Set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for _, imp in imports(mods[name]):
            owner = _owner(imp, mods)
            # Loading ``a.b.c`` runs the packages ``a`` and ``a.b`` first.
            parts = owner.split(".") if owner else []
            todo += [p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1))
                     if p in mods]
    return seen


def test_config_parsing_needs_no_model() -> None:
    # The model registry (and what the models pull in) is the validation step's
    # (trainer.validation): parsing a config never imports a model, even lazily.
    mods = our_modules()
    models = sorted(m for m in reachable("trainer.config", mods)
                    if m.split(".")[0] == "models")
    assert not models, f"trainer.config can import {models}"
