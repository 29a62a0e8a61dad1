"""Recover the cross-attention that separately built cubes miss, by recomputing a few tokens' KV in place.

Both modes run one forward over the chosen tokens, at their own positions, with a cache whose layers are the
composed buffers: at each layer the chosen tokens' fresh K/V are written into the buffer first, then they attend
to everything before them (a 4-D mask), stale or fresh. Deeper layers therefore see corrected inputs.

- ``leading`` (EPIC / "LegoLink"): the first ``budget`` tokens of every cube after the first. Each cube
  otherwise starts without context and its first tokens become attention sinks of their own.
- ``selective`` (CacheBlend): the ``budget`` fraction of tokens whose layer-1 K/V deviate most once the
  tokens see the full context (measured by one pass through the first layer only).
The first cube (with the anchor) is exact and never recomputed.
"""

from __future__ import annotations

import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from .cache import cache_kwarg


class _Stop(Exception):
    """Raised from inside the forward once the probe layer's fresh K/V are in hand."""


class _ScatterLayer(DynamicLayer):
    """A cache layer over a preallocated [1, heads, T, dim] buffer: `update` writes the new tokens' K/V at
    their positions and returns the whole buffer. With ``probe``, it records the fresh K/V and stops."""

    def __init__(self, keys, values, positions, probe: list | None = None):
        super().__init__()
        self.keys, self.values = keys, values
        self.device, self.is_initialized = keys.device, True
        self.positions, self.probe = positions, probe

    def update(self, key_states, value_states, *args, **kwargs):
        if self.probe is not None:
            self.probe.extend([key_states, value_states])
            raise _Stop
        self.keys[:, :, self.positions] = key_states.to(self.keys.dtype)
        self.values[:, :, self.positions] = value_states.to(self.values.dtype)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]


def _forward(model, dst_k, dst_v, ids, positions, *, probe_layer: int | None = None):
    """Run ``ids[positions]`` through the model over the composed buffers; returns probe K/V if asked."""
    probe: list = []
    layers = [_ScatterLayer(dst_k[i][None], dst_v[i][None], positions,
                            probe if i == probe_layer else None) for i in range(dst_k.shape[0])]
    cache = Cache(layers=layers)
    dtype = dst_k.dtype if dst_k.dtype.is_floating_point else torch.float32
    allowed = torch.arange(dst_k.shape[2], device=dst_k.device)[None, :] <= positions[:, None]  # [m, T]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=dst_k.device).masked_fill(~allowed, torch.finfo(dtype).min)
    try:
        with torch.inference_mode():
            model(input_ids=ids[:, positions], position_ids=positions[None], attention_mask=mask[None, None],
                  use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    except _Stop:
        pass
    return probe


def leading_positions(spans: list[tuple[int, int]], budget: int, device) -> torch.Tensor:
    """The first ``budget`` positions of every span after the first."""
    pos = [torch.arange(s, min(e, s + budget)) for s, e in spans[1:]]
    return torch.cat(pos).to(device) if pos else torch.zeros(0, dtype=torch.long, device=device)


def selective_positions(model, dst_k, dst_v, ids, spans, fraction: float) -> torch.Tensor:
    """The ``fraction`` of later-cube tokens whose layer-1 K/V change most with full context (CacheBlend)."""
    candidates = torch.cat([torch.arange(s, e) for s, e in spans[1:]]).to(dst_k.device)
    probe_layer = 1 if dst_k.shape[0] > 1 else 0
    fresh_k, fresh_v = _forward(model, dst_k.clone(), dst_v.clone(), ids, candidates, probe_layer=probe_layer)
    old_k, old_v = dst_k[probe_layer][:, candidates], dst_v[probe_layer][:, candidates]  # [heads, m, dim]
    deviation = ((fresh_k[0].float() - old_k.float()).norm(dim=-1) +
                 (fresh_v[0].float() - old_v.float()).norm(dim=-1)).sum(0)  # [m]
    n = max(1, round(fraction * candidates.numel()))
    return candidates[deviation.topk(min(n, candidates.numel())).indices.sort().values]


def recompute(model, dst_k, dst_v, ids, spans, *, mode: str, budget) -> int:
    """Recompute the chosen tokens' KV in ``dst_k``/``dst_v`` [layers, heads, T, dim] in place. Returns how many."""
    if len(spans) < 2 or mode == "none":
        return 0
    if mode == "leading":
        positions = leading_positions(spans, int(budget), dst_k.device)
    else:
        positions = selective_positions(model, dst_k, dst_v, ids, spans, float(budget))
    if positions.numel():
        _forward(model, dst_k, dst_v, ids, positions)
    return int(positions.numel())
