"""kvmem: persistent memory for HuggingFace transformers that cuts time-to-first-token.

Activation memory (MemCube: a saved KV cache spliced into the model's cache at prefill), with parametric
(LoRA AdapterCubes) and plaintext memory (an index choosing cubes) to follow. See README.md.
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
