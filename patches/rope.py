"""RoPE facts per model family: the inverse frequencies, rotary dims and layout kvmem re-rotates keys with.

Read from the model's own rotary module, so every scaling transformers implements (linear, llama3,
yarn) comes out as the frequencies the model really uses. Only RoPE whose angle is linear in the position
can be re-rotated exactly; dynamic NTK and longrope change with the sequence length and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmem.errors import CubeError
from kvmem.modelinfo import base_model, text_config

# model_type -> layout of the rotary pairs. NeoX: (i, i + d/2) halves; interleaved (GPT-J): (2i, 2i + 1).
SUPPORTED_FAMILIES: dict[str, str] = {
    "llama": "neox",
    "mistral": "neox",
    "qwen2": "neox",
    "qwen3": "neox",
}

# RoPE types whose angle is position * inv_freq with a fixed inv_freq.
_LINEAR_IN_POSITION = {"default", "linear", "llama3", "yarn"}


@dataclass(frozen=True)
class RopeFacts:
    inv_freq: torch.Tensor  # [rotary_dim // 2], float32
    rotary_dim: int
    head_dim: int
    interleaved: bool
    rope_type: str


def _rotary_module(model):
    inner = base_model(model)
    for candidate in (getattr(inner, "model", None), inner):
        emb = getattr(candidate, "rotary_emb", None)
        if emb is not None:
            return emb
    return None


def rope_facts(model) -> RopeFacts:
    """The RoPE facts of ``model``; CubeError when kvmem cannot move its keys exactly."""
    config = text_config(model)
    family = config.model_type
    if family not in SUPPORTED_FAMILIES:
        raise CubeError(f"moving cubes to new positions is not supported for model_type {family!r} yet "
                        f"(supported: {', '.join(sorted(SUPPORTED_FAMILIES))}); inject a single cube, "
                        "which needs no re-rotation")
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    if rope_type not in _LINEAR_IN_POSITION:
        raise CubeError(f"RoPE type {rope_type!r} is not linear in the position (its frequencies change with the "
                        "sequence length), so cubes cannot be re-rotated exactly; inject a single cube, or use a "
                        "model config with default/linear/llama3/yarn RoPE")
    emb = _rotary_module(model)
    if emb is None or not hasattr(emb, "inv_freq"):
        raise CubeError(f"could not find the rotary embedding of this {family} model (expected .model.rotary_emb)")
    inv_freq = emb.inv_freq
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return RopeFacts(inv_freq=inv_freq.detach().float().cpu(), rotary_dim=inv_freq.numel() * 2, head_dim=head_dim,
                     interleaved=SUPPORTED_FAMILIES[family] == "interleaved", rope_type=rope_type)
