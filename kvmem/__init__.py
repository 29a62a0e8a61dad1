"""kvmem: persistent memory for HuggingFace transformers that cuts time-to-first-token.

Three kinds of memory: activation (MemCube: a saved KV cache spliced into the model's cache by `prefill`),
parametric (AdapterCube: a LoRA adapter hot-swapped per request) and plaintext (CubeStore + MemoryIndex: the
memories `wrap(...).generate(prompt, cubes="auto")` picks from). See README.md.

The public names load on first use (PEP 562), so `import kvmem` and the `kvmem` command start without torch or
transformers; `kvmem.MemCube` etc. behave as plain attributes.

Demo and test support, not API: `kvmem.real_model` (offline real models) and `kvmem.memory_text` (invented notes).
"""

from ._version import __version__
from .errors import CubeError, FingerprintMismatch

# public name -> the module that defines it (no public name equals a submodule's name, so importing a submodule
# never hides a public name behind a module object)
_PUBLIC = {
    "MemCube": ".cube", "Prefix": ".prefix", "prefill": ".prefix", "AdapterCube": ".adapter",
    "GenerationReport": ".report", "MemoryModel": ".memory_model", "wrap": ".memory_model",
    "MemoryIndex": ".index", "MemScheduler": ".scheduler", "CubeStore": ".store", "StoreView": ".store",
}

__all__ = ["CubeError", "FingerprintMismatch", *_PUBLIC, "__version__"]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'kvmem' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
