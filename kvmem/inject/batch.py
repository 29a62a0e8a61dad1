"""Batched requests: B prompts, each with its own cubes, in one `model.generate` call.

Each row is a request alone: its cubes spliced by `kvmem.prefill` (same recompute modes), then its query.
Rows are padded the way transformers pads a batch, on the left, with the attention mask marking the padding:

    row b:  [pad ... pad | prefix_b | pad ... pad | query_b]    (prefix part: the cache; query part: generate)
            |<------------ P ------>|<------------ Q -------->|

The cache holds the first P positions of every row (prefix_b right-aligned at P), so generate only runs the
query part. transformers numbers positions by the mask (`cumsum - 1`), so every real token keeps the
position it has when its request runs alone: each row's greedy tokens equal that request's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import CubeError
from ..model.cache import cache_kwarg, kv_from_cache, new_cache
from ..model.devices import model_device
from ..model.static_cache import fill_static_cache
from .prefill import DEFAULT_RECOMPUTE, prefill


@dataclass
class BatchPrefix:
    """What `prefill_batch` returns: the cache and the padded batch to hand to generate.

    Attributes:
        cache: a StaticCache (or DynamicCache) holding rows' prefixes, right-aligned at ``prefix_len``.
        input_ids: LongTensor [B, prefix_len + query_len]: padding, prefix ids, padding, query ids per row.
        attention_mask: LongTensor [B, prefix_len + query_len]: 1 on real tokens, 0 on padding.
        prefix_len: P, the positions the cache holds.
        spans: per row, where each cube's own tokens sit in ``input_ids``.
        names: per row, the cube names.
        prompt_tokens: per row, its real tokens (prefix + query; ``attention_mask[b].sum()``), known on the host:
            reading the mask instead would wait for the GPU.
    """

    cache: object
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prefix_len: int
    spans: list[list[tuple[int, int]]] = field(default_factory=list)
    names: list[list[str]] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)

    def generate_kwargs(self, model) -> dict:
        """``input_ids``, ``attention_mask`` and the cache under the name ``model.generate`` takes."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, cache_kwarg(model): self.cache}

    def new_tokens(self, output: torch.Tensor) -> list[torch.Tensor]:
        """Per row, the tokens generate added (``output[b, input_len:]``)."""
        return list(output[:, self.input_ids.shape[1]:])


def prefill_batch(model, rows, queries, *, max_new_tokens: int, pad_token_id: int = 0, static: bool = True,
                  recompute: str = DEFAULT_RECOMPUTE, budget=None, tokenizer=None) -> BatchPrefix:
    """Prefill B requests, each with its own cubes, into one cache for one ``model.generate`` call.

    Args:
        model: the transformers model the cubes were built for.
        rows: per request, a MemCube or a list of MemCubes (rows may differ in cubes and lengths).
        queries: per request, its query ids (1-D LongTensor or list of ints; lengths may differ).
        max_new_tokens: tokens generate will add (sizes the static cache).
        pad_token_id: the id written on padding (never attended).
        static: a StaticCache allocated once with room for everything (True), or a DynamicCache.
        recompute, budget, tokenizer: as in `kvmem.prefill`, for every row.

    Returns:
        BatchPrefix(cache, input_ids, attention_mask, prefix_len, spans, names).

    Raises:
        CubeError: mismatched rows and queries, an empty query, or sliding-window layers that padding between
            prefix and query would make inexact (queries of different lengths and a window shorter than the batch).

    Example:
        >>> batch = prefill_batch(model, [[cube_a], [cube_b, cube_c]], [q0, q1], max_new_tokens=32)
        >>> out = model.generate(**batch.generate_kwargs(model), max_new_tokens=32, do_sample=False)
        >>> batch.new_tokens(out)  # row b's tokens == the same request run alone
    """
    rows, queries = list(rows), [torch.as_tensor(q, dtype=torch.long).reshape(-1) for q in queries]
    if not rows or len(rows) != len(queries):
        raise CubeError(f"need one query per row of cubes, got {len(rows)} rows and {len(queries)} queries")
    if any(q.numel() == 0 for q in queries):
        raise CubeError("every query needs at least one token (generate continues from the query's last token)")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise CubeError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    prefixes = [prefill(model, cubes, recompute=recompute, budget=budget, tokenizer=tokenizer, query_ids=q)
                for cubes, q in zip(rows, queries)]  # each row's query: recompute="query" picks what it attends to
    lengths = [p.num_tokens for p in prefixes]
    prefix_len, query_len = max(lengths), max(q.numel() for q in queries)
    total = prefix_len + query_len + max_new_tokens
    kv = [kv_from_cache(p.cache) for p in prefixes]
    if static:
        cache = fill_static_cache(model, kv, lengths, max_cache_len=total)
    elif len(prefixes) == 1:  # one row needs no padding: its prefix's own cache (the cubes' tensors, uncopied)
        cache = prefixes[0].cache
    else:
        cache = new_cache(model, _left_padded(kv, prefix_len))
    _check_windows(cache, queries, total)

    device = model_device(model)
    batch = len(rows)
    ids = torch.full((batch, prefix_len + query_len), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    spans = []
    for b, (p, q) in enumerate(zip(prefixes, queries)):
        shift = prefix_len - p.num_tokens
        ids[b, shift:prefix_len] = p.input_ids[0]
        ids[b, ids.shape[1] - q.numel():] = q.to(device, non_blocking=True)  # blocking would wait for the GPU
        mask[b, shift:prefix_len] = 1
        mask[b, ids.shape[1] - q.numel():] = 1
        spans.append([(s + shift, e + shift) for s, e in p.spans])
    return BatchPrefix(cache, ids, mask, prefix_len, spans, [p.names for p in prefixes],
                       [n + q.numel() for n, q in zip(lengths, queries)])


def _left_padded(kv, prefix_len: int):
    """Per layer (keys, values) [B, heads, prefix_len, dim]: each row's KV right-aligned, zeros before it."""
    out = []
    for layer in zip(*kv):
        k0, v0 = layer[0]
        keys = k0.new_zeros(len(layer), k0.shape[1], prefix_len, k0.shape[-1])
        values = v0.new_zeros(len(layer), v0.shape[1], prefix_len, v0.shape[-1])
        for b, (k, v) in enumerate(layer):
            keys[b, :, prefix_len - k.shape[2]:] = k[0]
            values[b, :, prefix_len - v.shape[2]:] = v[0]
        out.append((keys, values))
    return out


def _check_windows(cache, queries, total: int) -> None:
    """Padding between a prefix and a shorter query sits inside a sliding window that counts positions, not
    tokens: with queries of different lengths such a window would see fewer of the row's tokens than alone."""
    if len({q.numel() for q in queries}) == 1:
        return
    for i, layer in enumerate(cache.layers):
        window = getattr(layer, "sliding_window", None) or (layer.max_cache_len if layer.is_sliding else None)
        if layer.is_sliding and window is not None and window < total:
            raise CubeError(f"layer {i} attends a sliding window of {window} positions, shorter than this batch "
                            f"({total}); padding inside it would change results: batch queries of one length, "
                            "or run these requests one at a time")
