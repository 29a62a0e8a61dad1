"""kvmem.patches: what kvmem knows of each model's attention layers, read from the model (and, where needed,
revertible patches for transformers).

`rope_facts` says, per layer, whether and how its cached keys are rotated (so a cube can be moved) and what the
layer attends to; `attention_kinds` says the latter alone.
"""

from .rope import (LENGTH_DEPENDENT, LINEAR_IN_POSITION, LayerRope, RopeFacts, attention_kinds, rope_facts,
                   rope_types)

__all__ = ["LENGTH_DEPENDENT", "LINEAR_IN_POSITION", "LayerRope", "RopeFacts", "attention_kinds", "rope_facts",
           "rope_types"]
