"""GQA attention over a long memory without expanding KV heads, through transformers' attention registry.

Stock `sdpa` in transformers expands the key/value heads (`repeat_kv`: 3 -> 9 heads on SmolLM2) whenever a mask
is passed, which a query over a spliced memory always does: that copies the whole cache once per layer per
forward. `kvmem_sdpa` hands the grouped heads to torch's GQA-aware `scaled_dot_product_attention` instead:
`enable_gqa=True` where torch runs it natively with a mask (CPU), or the queries of one group packed along the
sequence axis (any backend that takes a mask, e.g. CUDA's memory-efficient kernel). Same products, same sums:
exact against the stock path (tests/test_attention.py).

Selected the supported way, not by editing model code:

    >>> kvmem.attention.use_gqa_attention(model)          # or AutoModel...(..., attn_implementation="kvmem_sdpa")
    >>> model.config._attn_implementation
    'kvmem_sdpa'
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from .errors import CubeError
from .modelinfo import base_model

NAME = "kvmem_sdpa"


def gqa_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; grouped KV heads are never expanded.

    Args:
        query: [batch, heads, q_len, head_dim]
        key, value: [batch, kv_heads, kv_len, head_dim] (heads = groups * kv_heads)
        attention_mask: None, or bool/additive [batch or 1, 1, q_len, kv_len] as transformers' sdpa mask builds it.

    Returns:
        ([batch, q_len, heads, head_dim], None), like the stock sdpa function.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    unusual = (kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
               or kwargs.get("output_attentions", False) or groups == 1 or key.shape[-1] != value.shape[-1])
    if unusual:  # nothing to save, or a feature only the stock function handles: take it
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = q_len > 1 and attention_mask is None and is_causal
    if is_causal and kv_len > q_len:  # empty static cache prefill: upper-left causal alignment, as stock does
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    # CUDA's GQA kernels take no mask (a masked enable_gqa call falls back to the math kernel): pack there.
    pack = attention_mask is not None and query.device.type != "cpu"
    out = attend_grouped(query, key, value, attention_mask, scale=scaling, dropout=dropout, is_causal=is_causal,
                         pack=pack)
    return out.transpose(1, 2).contiguous(), None


def attend_grouped(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, *,
                   scale: float | None = None, dropout: float = 0.0, is_causal: bool = False,
                   pack: bool = False) -> torch.Tensor:
    """sdpa of ``heads`` query heads over ``kv_heads`` key/value heads, KV never expanded.

    Args:
        query: [batch, heads, q_len, dim]; key, value: [batch, kv_heads, kv_len, dim]; heads % kv_heads == 0.
        mask: None or [batch or 1, 1, q_len, kv_len] (bool: True attends; float: added).
        pack: fold each group's queries into the sequence axis ([b, kv, groups*q_len, d]) instead of
            ``enable_gqa=True`` (for kernels that take a mask but not grouped heads). Needs a mask or no causality.

    Returns:
        [batch, heads, q_len, dim]
    """
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if not pack:
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale, is_causal=is_causal, enable_gqa=True)
    groups = heads // kv_heads
    if is_causal:  # a causal flag would align to the packed rows: spell the mask out
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)[None, None]
    # heads are kv-major (head h reads kv head h // groups), so this reshape is a view
    packed = query.reshape(batch, kv_heads, groups * q_len, dim)
    if mask is not None:
        mask = mask.expand(mask.shape[0], 1, q_len, kv_len).repeat(1, 1, groups, 1)  # row g*q_len + i is query i
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scale)
    return out.reshape(batch, heads, q_len, dim)


def register_gqa_attention() -> str:
    """Register ``kvmem_sdpa`` (attention function and its mask builder, sdpa's) with transformers; idempotent.

    Returns:
        The name to pass as ``attn_implementation``.
    """
    AttentionInterface.register(NAME, gqa_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME


def use_gqa_attention(model, *, enabled: bool = True) -> str:
    """Switch ``model`` to ``kvmem_sdpa`` (or, with ``enabled=False``, back to stock ``sdpa``).

    Args:
        model: a transformers model (PEFT-wrapped or not).
        enabled: True selects kvmem_sdpa, False restores sdpa.

    Returns:
        The attention implementation now in use.

    Raises:
        CubeError: the model cannot take an attention function from the registry.
    """
    register_gqa_attention()
    name = NAME if enabled else "sdpa"
    target = base_model(model)
    try:
        target.set_attn_implementation(name)
    except (ValueError, AttributeError) as e:
        raise CubeError(f"{type(target).__name__} cannot switch its attention to {name!r} ({e}); "
                        "keep its own attention implementation") from e
    return target.config._attn_implementation
