"""kvmem: persistent memory for HuggingFace transformers that cuts time-to-first-token.

Activation memory (MemCube: a saved KV cache spliced into the model's cache at prefill), with parametric
(LoRA AdapterCubes) and plaintext memory (an index choosing cubes) to follow. See README.md.
"""

__version__ = "0.1.0"

from .errors import CubeError, FingerprintMismatch  # noqa: E402
from .cube import MemCube  # noqa: E402
from .prefill import Prefix, prefill  # noqa: E402
from .adapter import AdapterCube  # noqa: E402
from .memory_model import MemoryModel, wrap  # noqa: E402
from .index import MemoryIndex  # noqa: E402
from .scheduler import MemScheduler  # noqa: E402
from .store import CubeStore, StoreView  # noqa: E402

__all__ = ["CubeError", "FingerprintMismatch", "MemCube", "AdapterCube", "Prefix", "prefill", "MemoryModel", "wrap",
           "MemoryIndex", "MemScheduler", "CubeStore", "StoreView",
           "__version__"]
