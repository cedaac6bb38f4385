"""The package's layering (docs/ARCHITECTURE.md, "Layers"), checked on the source: every import of
a project module, function-local ones included, goes to a lower layer or within its own package,
and no two modules import each other, directly or around a loop."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "lmflow_ray"

BASE = {"errors", "config", "config_loading", "runtime", "plots", "outputs", "tracking", "console", "lazy_imports"}
# What each top-level package or module may import besides itself (lower layers only).
ALLOWED = {
    "errors": set(),
    "lazy_imports": set(),
    "config": {"errors"},
    "config_loading": {"errors"},
    "runtime": {"errors", "console"},
    "plots": set(),
    "outputs": {"errors"},
    "tracking": {"errors"},
    "console": {"errors"},
    "models": BASE,
    "data": BASE | {"models"},
    "inference": BASE | {"models", "data"},
    "train": BASE | {"models", "data"},
    "eval": BASE | {"models", "data", "inference"},
    "align": BASE | {"models", "data", "inference", "train", "eval"},
    "serve": BASE | {"models", "data", "inference"},
    "demo": BASE | {"models", "data", "inference", "train", "eval"},
    "pipeline": BASE | {"models", "data", "inference", "train", "eval", "align", "serve"},
    "cli": BASE | {"models", "data", "inference", "train", "eval", "align", "serve", "demo", "pipeline"},
    "__main__": {"cli"},
    "__init__": set(),
}


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts).removesuffix(".__init__")] = f
    return out


def _imports(path: Path) -> set[str]:
    """Every lmflow_ray name imported anywhere in the file (`from a import b` gives a and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmflow_ray"):
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("lmflow_ray")}
    return names


def test_every_import_goes_to_a_lower_layer():
    wrong = []
    for name, path in _modules().items():
        if name == "lmflow_ray":
            continue
        layer = name.split(".")[1]
        for target in _imports(path):
            parts = target.split(".")
            if len(parts) < 2 or parts[1] == layer or parts[1] == "__version__":
                continue
            if parts[1] not in ALLOWED[layer]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def test_no_import_cycles_between_modules():
    modules = _modules()
    graph = defaultdict(set)
    for name, path in modules.items():
        graph[name] = {t for t in _imports(path) if t in modules and t != name}
    state: dict[str, int] = {}  # 1 on the DFS stack, 2 done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for name in sorted(modules):
        if name not in state:
            cycle = visit(name, [name])
            assert cycle is None, " -> ".join(cycle)
