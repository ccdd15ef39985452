"""The package's shape: no import cycle (lazy imports inside functions count too, and so does the __init__ of a
package an import passes through) and no config module that imports a model, so a config never builds its own model (flax_sgm.models holds the one config -> model table)."""

import ast
from pathlib import Path

import flax_sgm

ROOT = Path(flax_sgm.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The flax_sgm modules `name` imports anywhere in its text (a `from p import m` of a submodule is m)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                out.add(target if target in modules else base)
    out = {m for m in out if m in modules and m != name}
    # Importing a.b.c runs a/b/__init__ first: an edge to each package above an import that is not above `name`
    # (flax_sgm's own __init__ always runs first, so it is left out).
    mine = {name, *_packages(name)}
    return out | {p for m in out for p in _packages(m) if p not in mine and p in modules and p != "flax_sgm"}


def _packages(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_cycle():
    graph, state, stack = _graph(), {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state and not node.endswith("__init__") and node != "flax_sgm":
            visit(node)


def test_no_config_imports_a_model():
    graph = _graph()
    models = {m for m in graph if m.endswith((".model", ".transformer", ".modules", ".blocks"))} | {"flax_sgm.models"}
    for name, imports in graph.items():
        if name.endswith(".config"):
            assert not imports & models, f"{name} imports {sorted(imports & models)}"
