"""kvmem.patches: per-model-family facts (and, where needed, revertible patches) for transformers.

A registry keyed on ``config.model_type`` says what kvmem knows of each family's KV cache and RoPE.
"""

from .rope import RopeFacts, rope_facts, SUPPORTED_FAMILIES

__all__ = ["RopeFacts", "rope_facts", "SUPPORTED_FAMILIES"]
