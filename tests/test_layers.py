"""The layers import one way (ARCHITECTURE.md): a static read of every `vidrt.` import in the package, at the top of a
module and inside functions, relative ones resolved. No import runs up the layers, the families do not import each
other, no two files import each other (directly or round a cycle), and every import left inside a function says why
(`# lazy: ...`: an optional heavy dependency, or --help speed)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["core", "models", "export", "families", "runtime", "calibration", "builder", "app", "benchmarks"]
# inside families/: the contract below the families, the registry above them; the families are independent
FAMILY_TIERS = {"base": 0, "parts": 0, "vidrt": 1, "wan": 1, "ltx": 1, "registry": 2}


def _modules() -> dict[str, Path]:
    out = {}
    for layer in LAYERS:
        for p in (ROOT / layer).rglob("*.py"):
            parts = p.relative_to(ROOT).with_suffix("").parts
            out[".".join(("vidrt",) + (parts[:-1] if parts[-1] == "__init__" else parts))] = p
    return out


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int, bool, str]]:
    """(imported module, line, inside a function, source line) for every vidrt import of the module `name`."""
    src = path.read_text()
    tree, lines = ast.parse(src), src.splitlines()
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f)}
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([mod] if mod else []))
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for t in targets:
            if t.startswith("vidrt.") and t != name:
                out.append((t, node.lineno, id(node) in nested, lines[node.end_lineno - 1]))
    return out


def _graph():
    mods = _modules()
    return mods, {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def _rank(module: str) -> tuple[int, int]:
    parts = module.split(".")
    layer = LAYERS.index(parts[1]) if parts[1] in LAYERS else -1
    tier = FAMILY_TIERS.get(parts[2], 1) if parts[1] == "families" and len(parts) > 2 else 0
    return layer, tier


def test_no_import_runs_up_the_layers():
    _, graph = _graph()
    bad = [f"{m}:{line} imports {t}" for m, imps in graph.items() for t, line, _, _ in imps
           if _rank(t) > _rank(m)]
    assert not bad, "\n".join(bad)


def test_families_are_independent():
    _, graph = _graph()
    bad = [f"{m}:{line} imports {t}" for m, imps in graph.items() for t, line, _, _ in imps
           if m.startswith("vidrt.families.") and t.startswith("vidrt.families.") and _rank(m) == _rank(t) == (3, 1)
           and m.split(".")[2] != t.split(".")[2]]
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_files():
    mods, graph = _graph()
    edges = {m: {t for t, *_ in imps if t in mods} for m, imps in graph.items()}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))
    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_imports_inside_functions_say_why():
    _, graph = _graph()
    bad = [f"{m}:{line}: {src.strip()}" for m, imps in graph.items() for _, line, nested, src in imps
           if nested and "# lazy:" not in src]
    assert not bad, "move these to the top of the module, or give the reason as '# lazy: ...':\n" + "\n".join(bad)


def test_the_read_sees_every_layer():
    """The check above is only as good as its read: every layer has modules, and the known upward-free edges exist
    (runtime reads families, families read core), so a broken resolver cannot pass it vacuously."""
    mods, graph = _graph()
    assert {m.split(".")[1] for m in mods} == set(LAYERS)
    edges = {(m, t) for m, imps in graph.items() for t, *_ in imps}
    assert ("vidrt.runtime.pipeline", "vidrt.families.registry") in edges
    assert ("vidrt.families.wan.family", "vidrt.families.base") in edges
    assert _rank("vidrt.families.wan.family") == (3, 1) and _rank("vidrt.families.registry") == (3, 2)
