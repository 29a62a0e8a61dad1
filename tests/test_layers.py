"""DESIGN.md's rule, checked: imports inside kvmem point downward only, and no two modules import each other,
directly or around a loop.

The rule is one line per folder: a module's rank is its folder's (or, at the package root, its own). A module may
import modules of its own rank or lower. A new folder or root module fails here until it is given its rank.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"kvmem": ROOT / "kvmem"}  # installed name -> source folder

LAYERS = {
    # infrastructure: shared basics, kernels, model facts, cube formats, storage
    "kvmem._version": 0, "kvmem._deprecation": 0, "kvmem._lazy": 0, "kvmem.errors": 0, "kvmem.timing": 0,
    "kvmem.kernels": 1,        # Triton kernels + their torch references
    "kvmem.model": 2,          # what kvmem reads from and registers on a transformers model
    "kvmem.cubes": 3,          # MemCube, AdapterCube, the file format, fingerprints
    "kvmem.store": 4,          # CubeStore, record rules, local and Redis backends
    # operation: memory into the model; which memories, where they live
    "kvmem.inject": 5,         # prefill and the one composer, recompute, batches, adapter slots
    "kvmem.memory": 6,         # index, scoring, dates, embeddings, scheduler, recall
    "kvmem.prompt": 6, "kvmem.report": 6,
    # interface: what users call
    "kvmem.memory_model": 7,   # wrap() / MemoryModel
    "kvmem.travel": 7,         # signed bundles, installs, the market, migration to another model
    "kvmem.evolve": 7,         # memory changing kind: distillation into adapters, the policy that moves memory
    "kvmem.cli": 8, "kvmem.demo": 8, "kvmem.integrations": 8,
    "kvmem": 9,                # the package face re-exports every layer
}
INFRASTRUCTURE = 4  # the highest infrastructure rank (the planted-import test below)


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
    f.write_text("from ..memory_model import wrap\nfrom . import memcube\n")
    got = _imports("kvmem.cubes.bad", f)
    assert "kvmem.memory_model" in got and "kvmem.cubes.memcube" in got
    assert _layer("kvmem.cubes.bad") <= INFRASTRUCTURE
    assert any(_layer(t) > _layer("kvmem.cubes.bad") for t in got)
