"""kvmem: persistent memory for HuggingFace transformers that cuts time-to-first-token.

Three kinds of memory: activation (MemCube: a saved KV cache spliced into the model's cache by `prefill`),
parametric (AdapterCube: a LoRA adapter hot-swapped per request) and plaintext (CubeStore + MemoryIndex: the
memories `wrap(...).generate(prompt, cubes="auto")` picks from). See README.md.

The public names load on first use (PEP 562), so `import kvmem` and the `kvmem` command start without torch or
transformers; `kvmem.MemCube` etc. behave as plain attributes.

Sub-packages, one job each (imports point downward, in this order): kernels, model, cubes, store, inject, memory;
then this face (memory_model: wrap / MemoryModel; prompt; report), cli, demo, integrations. Module paths of the
flat layout (`kvmem.prefix`, `kvmem.attention`, ...) still import, with a DeprecationWarning naming the new path.
"""

from ._deprecation import install_module_aliases
from ._lazy import lazy_names
from ._version import __version__
from .errors import CubeError, FingerprintMismatch

install_module_aliases()

# public name -> the module that defines it (no public name equals a submodule's name, so importing a submodule
# never hides a public name behind a module object)
_PUBLIC = {
    "MemCube": ".cubes.memcube", "AdapterCube": ".cubes.adaptercube",
    "Prefix": ".inject.prefill", "prefill": ".inject.prefill", "prefill_batch": ".inject.batch",
    "GenerationReport": ".report", "MemoryModel": ".memory_model", "wrap": ".memory_model",
    "MemoryIndex": ".memory.index", "MemScheduler": ".memory.scheduler",
    "CubeStore": ".store.cubestore", "StoreView": ".store.cubestore",
    # the fast path and the weight check's reset, for models you drive yourself
    "use_gqa_attention": ".model.attention", "static_prefix": ".model.static_cache",
    "capture_query": ".inject.capture",  # opt-in: the query forward compiled per length bucket (CUDA graphs on CUDA)
    "forget_digests": ".cubes.weights", "verify_weights": ".cubes.weights", "mark_changed": ".model.watch",
    "calibrate": ".inject.calibrate",  # the composition gate's measurement (kvmem.inject.gate reads it)
    # memory that changes kind: distil memories into a LoRA AdapterCube; the policy that moves them (issue 26)
    "distill": ".evolve.distill", "EvolvePolicy": ".evolve.policy",
}

__all__ = ["CubeError", "FingerprintMismatch", *_PUBLIC, "__version__"]


__getattr__, __dir__ = lazy_names(__name__, _PUBLIC)
