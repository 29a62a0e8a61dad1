"""kvmem.kernels: Triton kernels and their pure-torch references (same signatures).

The reference is the CPU path and the test oracle. Triton is imported lazily, inside the launchers, so
importing kvmem never touches CUDA or needs Triton installed.
"""

from .rerotate import rerotate_reference

__all__ = ["rerotate_reference"]
