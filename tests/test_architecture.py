"""The package's layering, checked on the source: no import cycle between its parts, no private name
imported across them, and the layers import only from below (ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "seg4diff_fast")

# bottom-up; a part may import parts of a lower rank (or its own); same-rank parts must not form cycles
RANK = {
    "utils": 0, "kernels": 0, "_C": 0, "ops": 1, "capture": 2, "reader": 3, "segment": 4,
    "evaluation": 5, "eval": 5, "shapes": 6, "label": 7, "magnet": 7, "testing": 8, "models": 8,
    "demo": 9, "cli": 9, "seg4diff_fast": 10,
}


def _part(module: str) -> str:
    """seg4diff_fast.reader.family → reader; seg4diff_fast.cli_eval, seg4diff_fast.app.ui → cli;
    seg4diff_fast → seg4diff_fast."""
    parts = module.split(".")
    if len(parts) == 1:
        return "seg4diff_fast"
    return "cli" if parts[1].startswith("cli") or parts[1] == "app" else parts[1]  # the front ends: one part


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py") and f != "__main__.py":  # entry scripts: run, never imported
                rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(folder, f)
    return out


def _imports(module: str, path: str) -> list[tuple[str, list[str]]]:
    """(imported module, names) of every import in the file, lazy ones inside functions included."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("seg4diff_fast")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("seg4diff_fast"):
                out.append((target, [a.name for a in node.names]))
    return out


def _edges() -> list[tuple[str, str, str, list[str]]]:
    mods = _modules()
    edges = []
    for module, path in mods.items():
        for target, names in _imports(module, path):
            for name in names or [None]:  # ``from pkg import submodule`` imports the submodule
                sub = f"{target}.{name}" if name else None
                if sub in mods or name == "_C":
                    edges.append((module, sub, _part(sub), []))
                else:
                    edges.append((module, target, _part(target), [name] if name else []))
    return edges


def test_parts_import_only_from_below():
    wrong = [f"{m} imports {t}" for m, t, part, _ in _edges()
             if part != _part(m) and RANK[part] > RANK[_part(m)]]
    assert not wrong, "\n".join(wrong)


def _on_cycles(graph: dict[str, set[str]]) -> list[str]:
    """The nodes of a directed graph that can reach themselves."""

    def reach(a: str, seen: set[str]) -> set[str]:
        for b in graph.get(a, ()):
            if b not in seen:
                seen.add(b)
                reach(b, seen)
        return seen

    return sorted(a for a in graph if a in reach(a, set()))


def test_no_cycle_between_parts():
    graph: dict[str, set[str]] = {}
    for m, _, part, _ in _edges():
        if part != _part(m):
            graph.setdefault(_part(m), set()).add(part)
    cycles = _on_cycles(graph)
    assert not cycles, f"parts on an import cycle: {cycles}"


def test_no_private_name_across_parts():
    wrong = []
    for m, t, part, names in _edges():
        if part == _part(m):
            continue
        private = [n for n in names if n.startswith("_") and n not in ("__version__", "__all__")]
        if private or any(p.startswith("_") and p not in ("_C", "__init__") for p in t.split(".")[1:]):
            wrong.append(f"{m} imports {private or t} from {t}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("module", ["seg4diff_fast.ops", "seg4diff_fast.reader"])
def test_no_module_cycle_inside(module):
    """Inside ops/ and reader/ the module graph itself is acyclic (a backend never imports its dispatcher)."""
    mods = {m: p for m, p in _modules().items() if m.startswith(module)}
    graph = {m: {t for t, _ in _imports(m, p) if t in mods and t != m and t != module} for m, p in mods.items()}
    assert not [m for m in _on_cycles(graph) if m != module]
