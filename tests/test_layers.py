"""DESIGN.md's rule, checked: imports inside kvmem point downward only (interface -> operation ->
infrastructure), and no two modules import each other, directly or around a loop.

Every module of the package must be in LAYERS: a new module fails here until it is given its layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# installed name -> source folder
PACKAGES = {"kvmem": ROOT / "kvmem", "kvmem.kernels": ROOT / "kvmem" / "kernels",
            "kvmem.patches": ROOT / "kvmem" / "patches"}

INFRASTRUCTURE, OPERATION, INTERFACE = 0, 1, 2
LAYERS = {
    # infrastructure: formats, validation, storage, kernels, model facts
    "kvmem._version": INFRASTRUCTURE, "kvmem._deprecation": INFRASTRUCTURE, "kvmem.errors": INFRASTRUCTURE, "kvmem.modelinfo": INFRASTRUCTURE,
    "kvmem.sqlite_db": INFRASTRUCTURE, "kvmem.cube_format": INFRASTRUCTURE, "kvmem.fingerprint": INFRASTRUCTURE,
    "kvmem.cache": INFRASTRUCTURE, "kvmem.cube": INFRASTRUCTURE, "kvmem.adapter": INFRASTRUCTURE,
    "kvmem.store": INFRASTRUCTURE, "kvmem.embedding_cache": INFRASTRUCTURE, "kvmem.timing": INFRASTRUCTURE,
    "kvmem.store_backend": INFRASTRUCTURE, "kvmem.store_sqlite": INFRASTRUCTURE, "kvmem.store_redis": INFRASTRUCTURE,
    "kvmem.kernels": INFRASTRUCTURE, "kvmem.patches": INFRASTRUCTURE,
    # operation: which memories, where they live, how a prompt is laid out, recompute, adapters
    "kvmem.index": OPERATION, "kvmem.lexical": OPERATION, "kvmem.fusion": OPERATION, "kvmem.encoder": OPERATION,
    "kvmem.retrieval_text": OPERATION, "kvmem.scheduler": OPERATION, "kvmem.adapter_bridge": OPERATION,
    "kvmem.recompute": OPERATION, "kvmem.recall": OPERATION, "kvmem.prompt": OPERATION, "kvmem.report": OPERATION,
    # interface: what users call
    "kvmem": INTERFACE, "kvmem.prefix": INTERFACE, "kvmem.memory_model": INTERFACE, "kvmem.cli": INTERFACE,
    "kvmem.demo": INTERFACE, "kvmem.integrations": INTERFACE,
    # issue 13's fast path: static prefix cache (cache glue), GQA attention, batched prefill over kvmem.prefill
    "kvmem.prefix_cache": INFRASTRUCTURE, "kvmem.attention": OPERATION, "kvmem.batch": INTERFACE, "kvmem.batch_generate": INTERFACE,
    # demo and test support (real models, generated memory texts): may use anything, nothing imports them
    "kvmem.real_model": INTERFACE, "kvmem.memory_text": INTERFACE,
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = f
    return out


def _layer(module: str) -> int:
    """The layer of ``module``: its own entry, else the nearest enclosing package's."""
    name = module
    while name not in LAYERS:
        if "." not in name:
            raise KeyError(module)
        name = name.rsplit(".", 1)[0]
    return LAYERS[name]


def _imports(module: str, path: Path) -> set[str]:
    """kvmem modules that ``module`` imports (at any depth of the file: lazy imports count too)."""
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "kvmem"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "kvmem":
                continue
            # `from . import x` / `from .pkg import mod` name modules; `from .mod import name` names the module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    found.discard(module)
    return found


MODULES = _modules()


def test_every_module_has_a_layer():
    missing = []
    for m in MODULES:
        try:
            _layer(m)
        except KeyError:
            missing.append(m)
    assert not missing, f"give these modules a layer in tests/test_layers.py: {missing}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_downward(module):
    if module == "kvmem":  # the package face re-exports every layer
        return
    up = [t for t in _imports(module, MODULES[module]) if t in MODULES or t == "kvmem"
          if _layer(t) > _layer(module) or t == "kvmem"]
    assert not up, f"{module} (layer {_layer(module)}) imports upward or the package face: {up}"


def test_no_import_cycles():
    graph = {m: {t for t in _imports(m, p) if t in MODULES and t != "kvmem"} for m, p in MODULES.items()
             if m != "kvmem"}
    # a package's __init__ importing its own submodules is not a cycle with them
    for m in graph:
        graph[m] = {t for t in graph[m] if not t.startswith(m + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_checker_sees_a_planted_upward_import(tmp_path):
    """The check can fail: an infrastructure module importing an interface one is caught."""
    f = tmp_path / "bad.py"
    f.write_text("from .memory_model import wrap\nfrom . import cube\n")
    got = _imports("kvmem.bad", f)
    assert "kvmem.memory_model" in got and "kvmem.cube" in got
    assert any(_layer(t) > INFRASTRUCTURE for t in got)
