"""Old names keep working for one release, with a DeprecationWarning that names the new one.

Two kinds: renamed keyword arguments (`renamed`) and moved modules (`install_module_aliases`: `kvmem.prefix`
imports `kvmem.inject.prefill`, the very same module object, so a monkeypatch through either name reaches both).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# old module path -> new one. The README documented these; every other old path is here too so code written
# against the flat layout keeps running for one release.
MOVED_MODULES = {
    "kvmem.batch_generate": "kvmem.memory_model",
    "kvmem.real_model": "kvmem.demo.models",
    "kvmem.cube": "kvmem.cubes.memcube",
    "kvmem.adapter": "kvmem.cubes.adaptercube",
    "kvmem.cube_format": "kvmem.cubes.format",
    "kvmem.fingerprint": "kvmem.cubes.fingerprint",
    "kvmem.modelinfo": "kvmem.model.facts",
    "kvmem.cache": "kvmem.model.cache",
    "kvmem.prefix_cache": "kvmem.model.static_cache",
    "kvmem.attention": "kvmem.model.attention",
    "kvmem.patches": "kvmem.model.rope",
    "kvmem.prefix": "kvmem.inject.prefill",
    "kvmem.recompute": "kvmem.inject.recompute",
    "kvmem.batch": "kvmem.inject.batch",
    "kvmem.adapter_bridge": "kvmem.inject.adapters",
    "kvmem.index": "kvmem.memory.index",
    "kvmem.lexical": "kvmem.memory.lexical",
    "kvmem.fusion": "kvmem.memory.fusion",
    "kvmem.retrieval_text": "kvmem.memory.dates",
    "kvmem.encoder": "kvmem.memory.encoder",
    "kvmem.embedding_cache": "kvmem.memory.embedding_cache",
    "kvmem.scheduler": "kvmem.memory.scheduler",
    "kvmem.recall": "kvmem.memory.recall",
    "kvmem.store_backend": "kvmem.store.records",
    "kvmem.store_sqlite": "kvmem.store.local",
    "kvmem.store_redis": "kvmem.store.redis_backend",
    "kvmem.sqlite_db": "kvmem.store.sqlite_db",
}


def renamed(kwargs: dict, old: str, new: str, value, *, where: str):
    """``kwargs.pop(old)`` (warning that ``where``'s ``old=`` is now ``new=``) if the caller passed ``old``, else
    ``value``. Any other leftover keyword in ``kwargs`` is the caller's to refuse."""
    if old not in kwargs:
        return value
    warnings.warn(f"{where}: {old}= is renamed {new}= (one word per meaning)", DeprecationWarning, stacklevel=3)
    return kwargs.pop(old)


_REAL_SPECS: dict = {}


def renamed_function(function, old: str):
    """``function`` under its old name ``old``: the same behaviour, with a DeprecationWarning naming the new one."""
    import functools

    @functools.wraps(function)
    def old_name(*args, **kwargs):
        warnings.warn(f"{old} is renamed {function.__name__} (one word per meaning); the old name goes in the next "
                      "release", DeprecationWarning, stacklevel=2)
        return function(*args, **kwargs)

    old_name.__name__ = old_name.__qualname__ = old
    return old_name


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as its new module (the same object), warning once per import statement."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED_MODULES[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there (the old path goes in the next release)",
                      DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        _REAL_SPECS[spec.name] = module.__spec__  # importlib sets the alias's spec on the module: put the real one back
        return module

    def exec_module(self, module):  # the new module is already executed
        module.__spec__ = _REAL_SPECS[module.__spec__.name]


def install_module_aliases() -> None:
    """Put the alias finder on ``sys.meta_path`` once (applying twice is harmless)."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
