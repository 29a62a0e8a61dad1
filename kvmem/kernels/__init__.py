"""kvmem.kernels: Triton kernels and their pure-torch references (same signatures).

The reference is the CPU path and the test oracle. Triton is imported lazily, inside the launchers, so
importing kvmem never touches CUDA or needs Triton installed.
"""

from .dequant_splice import dequant_splice, dequant_splice_reference, dequant_splice_triton
from .rotation import rotation_tables
from .splice import splice, splice_reference, splice_triton

__all__ = ["dequant_splice", "dequant_splice_reference", "dequant_splice_triton", "rotation_tables", "splice",
           "splice_reference", "splice_triton"]
