"""kvmem: persistent memory for HuggingFace transformers that cuts time-to-first-token.

Three kinds of memory: activation (MemCube: a saved KV cache spliced into the model's cache by `prefill`),
parametric (AdapterCube: a LoRA adapter hot-swapped per request) and plaintext (CubeStore + MemoryIndex: the
memories `wrap(...).generate(prompt, cubes="auto")` picks from). See README.md.

Demo and test support, not API: `kvmem.real_model` (offline real models) and `kvmem.memory_text` (invented notes).
"""

from ._version import __version__
from .errors import CubeError, FingerprintMismatch
from .cube import MemCube
from .prefill import Prefix, prefill
from .adapter import AdapterCube
from .memory_model import GenerationReport, MemoryModel, wrap
from .index import MemoryIndex
from .scheduler import MemScheduler
from .store import CubeStore, StoreView

__all__ = ["CubeError", "FingerprintMismatch", "MemCube", "AdapterCube", "Prefix", "prefill", "MemoryModel", "GenerationReport", "wrap",
           "MemoryIndex", "MemScheduler", "CubeStore", "StoreView",
           "__version__"]
