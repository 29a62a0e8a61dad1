"""A prefix cache that never copies the memory again: transformers' StaticCache, allocated once with room for
the prefix, the request and its new tokens, filled from a `kvmem.Prefix`.

A DynamicCache concatenates its whole storage on every update: the query forward over a spliced memory copies
the memory once, and every decode step copies it again. A StaticCache writes new tokens in place
(`index_copy_`), so after the one fill here neither the query nor any decode step touches the cube's KV, and
its fixed shapes let `torch.compile` reuse one decode graph for every request of the same padded length.

Rows of a batch are right-aligned at the longest prefix (left padding, as transformers pads): row b of a
layer's storage is [zeros for padding | row b's prefix KV | room], and the attention mask hides the padding.

Sliding-window layers keep what a DynamicSlidingWindowLayer kept (the last window - 1 entries), placed where a
StaticSlidingWindowLayer that had seen the whole prefix would hold them.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

from ..errors import CubeError
from .cache import kv_from_cache
from .devices import layer_devices
from .facts import base_model


def static_prefix(model, prefix, *, max_new_tokens: int, query_len: int):
    """``prefix`` with its cache moved into a StaticCache that has room for ``query_len + max_new_tokens`` more.

    Args:
        model: the model the prefix was made for (PEFT-wrapped or accelerate-dispatched alike).
        prefix: a `kvmem.Prefix` (from `kvmem.prefill`); it is not changed, nor are its cubes.
        max_new_tokens: tokens generate may add.
        query_len: tokens of the request that follow the prefix.

    Returns:
        A Prefix (same ids, spans and names) whose ``cache`` is a fresh, filled StaticCache.

    Raises:
        CubeError: a bad size, or a model whose cache layers are not static-capable.

    Example:
        >>> prefix = static_prefix(model, kvmem.prefill(model, cube), max_new_tokens=32, query_len=q.shape[-1])
        >>> model.generate(prefix.extend(q), cache=prefix.cache, max_new_tokens=32)
    """
    for name, value in (("max_new_tokens", max_new_tokens), ("query_len", query_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CubeError(f"{name} must be an int >= 0, got {value!r}")
    n = prefix.input_ids.shape[1]
    cache = fill_static_cache(model, [kv_from_cache(prefix.cache)], [n], max_cache_len=n + query_len + max_new_tokens)
    return dataclasses.replace(prefix, cache=cache)


def fill_static_cache(model, rows: list[list[tuple[torch.Tensor, torch.Tensor]]], lengths: list[int], *,
                      max_cache_len: int) -> StaticCache:
    """A StaticCache for ``model`` holding one prefix per batch row, right-aligned at the longest.

    Args:
        rows: per row, per layer (keys, values) [1, kv_heads, m, head_dim] as a kvmem prefix cache holds them
            (m = the row's length, or fewer on a sliding-window layer that dropped what its window cannot see).
        lengths: per row, the number of tokens its prefix stands for.
        max_cache_len: storage per layer, in tokens (>= the longest prefix).

    Returns:
        StaticCache with ``get_seq_length() == max(lengths)``; each layer's storage on the device that layer runs on.
    """
    if not rows or len(rows) != len(lengths):
        raise CubeError(f"need one length per row, got {len(rows)} rows and {len(lengths)} lengths")
    longest = max(lengths)
    if not isinstance(max_cache_len, int) or max_cache_len < longest:
        raise CubeError(f"max_cache_len={max_cache_len!r} cannot hold a {longest}-token prefix: pass at least "
                        "the prefix length plus the request and max_new_tokens")
    cache = StaticCache(config=base_model(model).config, max_cache_len=max_cache_len)
    for b, row in enumerate(rows):
        if len(row) != len(cache.layers):
            raise CubeError(f"the model has {len(cache.layers)} cache layers, prefix {b} has {len(row)}: "
                            "make each prefix with kvmem.prefill for this model")
    devices = layer_devices(model, len(cache.layers))
    for i, layer in enumerate(cache.layers):
        if type(layer) not in (StaticLayer, StaticSlidingWindowLayer):
            raise CubeError(f"cache layer {i} is a {type(layer).__name__}; kvmem fills only StaticLayer and "
                            "StaticSlidingWindowLayer: use kvmem.prefill's own cache for this model")
        _fill_layer(layer, [r[i] for r in rows], lengths, longest, devices[i])
    return cache


def _fill_layer(layer: StaticLayer, kv: list[tuple[torch.Tensor, torch.Tensor]], lengths: list[int], longest: int,
                device: torch.device) -> None:
    k0, v0 = kv[0]
    heads, dim, vdim = k0.shape[1], k0.shape[-1], v0.shape[-1]
    batch = len(kv)
    layer.lazy_initialization(torch.empty(batch, heads, 0, dim, dtype=k0.dtype, device=device),
                              torch.empty(batch, heads, 0, vdim, dtype=v0.dtype, device=device))  # zeros, once
    sliding = isinstance(layer, StaticSlidingWindowLayer)
    # where position `longest - 1` sits: slot longest - 1, or the last slot of a sliding layer already full
    end = min(longest, layer.max_cache_len)
    for b, ((k, v), n) in enumerate(zip(kv, lengths)):
        m = k.shape[2]
        if m != n and not (sliding and m < n and m <= end):
            raise CubeError(f"a prefix cache layer holds {m} entries for {n} tokens; "
                            "rebuild the prefix with kvmem.prefill")
        # [heads, m, dim] into slots end - m .. end - 1 of row b: the one copy of the memory
        layer.keys[b, :, end - m:end].copy_(k[0], non_blocking=True)
        layer.values[b, :, end - m:end].copy_(v[0], non_blocking=True)
    layer.cumulative_length.fill_(longest)
    if sliding:
        layer.cumulative_length_int = longest


# generate options under which a cache sized for one sequence of known length is not what generate needs
_OWN_CACHE = ("assistant_model", "prompt_lookup_num_tokens", "cache_implementation", "return_legacy_cache")


def static_room(model, prompt_len: int, generate_kwargs: dict) -> int | None:
    """How many new tokens a static prefix cache must leave room for, given the options ``model.generate`` will
    get; None when a static cache is not the right one: beams or several sequences per prompt (generate grows
    the batch), assisted/lookup decoding, a cache implementation of the caller's, or no length bound.

    Args:
        model: the transformers model (its generation_config fills in what ``generate_kwargs`` leaves out).
        prompt_len: tokens of the prompt (prefix + request) generate starts from.
        generate_kwargs: the keyword arguments for ``model.generate``.
    """
    config = getattr(model, "generation_config", None)
    if sequences_per_prompt(model, generate_kwargs) != 1:
        return None
    if any(generate_kwargs.get(name) is not None for name in _OWN_CACHE) or generate_kwargs.get("generation_config"):
        return None
    new = generate_kwargs.get("max_new_tokens")
    if new is None and generate_kwargs.get("max_length") is not None:
        new = generate_kwargs["max_length"] - prompt_len
    if new is None:
        new = getattr(config, "max_new_tokens", None)
    if new is None and getattr(config, "max_length", None) is not None:
        new = config.max_length - prompt_len
    return new if isinstance(new, int) and not isinstance(new, bool) and new >= 1 else None


def sequences_per_prompt(model, generate_kwargs: dict) -> int:
    """How many rows ``model.generate`` makes of each prompt row (beams, returned sequences): a cache passed in
    must be repeated that many times, since generate expands the inputs but not a cache of the caller's."""
    config = getattr(model, "generation_config", None)
    option = lambda name: generate_kwargs.get(name) or getattr(config, name, None) or 1  # noqa: E731
    return max(option("num_beams"), option("num_return_sequences"))


def static_capable(model) -> bool:
    """Whether every cache layer transformers' StaticCache makes for ``model`` is one `fill_static_cache` fills
    (full or sliding-window attention; not linear-attention or other hybrid layers)."""
    layers = StaticCache(config=base_model(model).config, max_cache_len=1).layers  # storage allocated lazily
    return all(type(layer) in (StaticLayer, StaticSlidingWindowLayer) for layer in layers)
