"""Recover the cross-attention that separately built cubes miss, by recomputing a few tokens' KV in place.

Both modes run one forward over the chosen tokens, at their own positions, with a cache whose layers are the
composed buffers: at each layer the chosen tokens' fresh K/V are written into the buffer first, then they attend
to what that layer attends to in a full prefill, stale or fresh: everything before them for full attention, the
last ``window`` positions for a sliding-window layer, their own chunk for chunked attention (4-D masks, one per
layer type, passed as the dict the model's own forward builds). Deeper layers therefore see corrected inputs.

- ``leading`` (EPIC / "LegoLink"): the first ``budget`` tokens of every cube after the first. Each cube
  otherwise starts without context and its first tokens become attention sinks of their own.
- ``selective`` (CacheBlend): the ``budget`` fraction of tokens whose layer-1 K/V deviate most once the
  tokens see the full context (measured by one pass through the first layer only).
- ``blend`` (EPIC + CacheBlend per cube): each later cube's first ``budget // 2`` tokens (its would-be sinks) plus
  its ``budget - budget // 2`` highest-deviation other tokens, so every cube gets the same share of the budget.
- ``deep``: ``blend`` with the deviation measured at layers 1, 2 and 3 (`DEEP_LAYERS`), each normalised by its
  mean: a deeper signal for about twice blend's probe cost.
- ``query`` (the tokens the query attends to most): each later cube's first ``budget // 2`` tokens plus its
  ``budget - budget // 2`` others that get the most attention from the request's query, summed over every layer
  and head (one forward of the query's few tokens over the composed prefix, as it stands). Without the query,
  the last cube's last 32 tokens stand in for it (`QUERY_PROXY_TOKENS`).
The first cube (with the anchor) is exact and never recomputed.
"""

from __future__ import annotations

import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from ..model import ape
from ..model.cache import cache_kwarg
from ..model.rope import attention_kinds


class _Stop(Exception):
    """Raised from inside the forward once the probe layer's fresh K/V are in hand."""


class _ScatterLayer(DynamicLayer):
    """A cache layer over a preallocated [1, heads, T, dim] buffer: `update` writes the new tokens' K/V at
    their positions and returns the whole buffer. With ``probe``, it records the fresh K/V (and with ``stop``,
    stops the forward there: no deeper layer is needed)."""

    def __init__(self, keys, values, positions, probe: list | None = None, stop: bool = True):
        super().__init__()
        self.keys, self.values = keys, values
        self.device, self.is_initialized = keys.device, True
        self.positions, self.probe, self.stop = positions, probe, stop

    def update(self, key_states, value_states, *args, **kwargs):
        if self.probe is not None:
            self.probe.extend([key_states, value_states])
            if self.stop:
                raise _Stop
        self.keys[:, :, self.positions] = key_states.to(self.keys.dtype)
        self.values[:, :, self.positions] = value_states.to(self.values.dtype)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]


class _AppendLayer(DynamicLayer):
    """A cache layer over a composed [1, heads, T, dim] buffer that returns it with the new tokens' K/V appended,
    writing nothing: a query's probe forward leaves the composed prefix as it was."""

    def __init__(self, keys, values):
        super().__init__()
        self.keys, self.values = keys, values
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        return (torch.cat([self.keys, key_states.to(self.keys.dtype)], -2),
                torch.cat([self.values, value_states.to(self.values.dtype)], -2))

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]


def _forward(model, dst_k, dst_v, ids, positions, *, probe_layer: int | tuple[int, ...] | None = None):
    """Run ``ids[positions]`` through the model over the composed buffers; returns the probed layers' fresh K/V
    ([k, v] per probed layer, in order) if asked, stopping after the deepest."""
    probe: list = []
    probed = () if probe_layer is None else (probe_layer,) if isinstance(probe_layer, int) else tuple(probe_layer)
    layers = [_ScatterLayer(dst_k[i][None], dst_v[i][None], positions, probe if i in probed else None,
                            stop=i == max(probed, default=-1)) for i in range(dst_k.shape[0])]
    cache = Cache(layers=layers)
    dtype = dst_k.dtype if dst_k.dtype.is_floating_point else torch.float32
    try:
        with torch.inference_mode():
            model(input_ids=ids[:, positions], position_ids=positions[None],
                  attention_mask=layer_masks(model, positions, dst_k.shape[2], dtype=dtype),
                  use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    except _Stop:
        pass
    return probe


def _mask(kind: str, window: int | None, positions: torch.Tensor, length: int, dtype) -> torch.Tensor:
    """[1, 1, m, T] additive mask: query ``positions[i]`` may see key ``j`` as a full prefill's layer of ``kind``
    lets it (transformers' masking_utils: causal; sliding: q - k < window; chunked: same chunk)."""
    q, k = positions[:, None], torch.arange(length, device=positions.device)[None, :]
    allowed = k <= q
    if kind == "sliding_attention" and window:
        allowed &= k > q - window
    elif kind == "chunked_attention" and window:
        allowed &= torch.div(k, window, rounding_mode="floor") == torch.div(q, window, rounding_mode="floor")
    mask = torch.zeros(allowed.shape, dtype=dtype, device=positions.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def layer_masks(model, positions: torch.Tensor, length: int, *, dtype) -> torch.Tensor | dict[str, torch.Tensor]:
    """The attention mask for recomputing ``positions`` over a buffer of ``length`` tokens: one 4-D mask when every
    layer attends alike, else ``{layer_type: mask}``, the mapping models with mixed layers build for themselves."""
    kinds = dict(attention_kinds(model))  # layer type -> window (one window per type in every transformers model)
    masks = {kind: _mask(kind, window, positions, length, dtype) for kind, window in kinds.items()}
    if len(masks) == 1:
        return next(iter(masks.values()))
    return masks


def leading_positions(spans: list[tuple[int, int]], budget: int, device) -> torch.Tensor:
    """The first ``budget`` positions of every span after the first."""
    pos = [torch.arange(s, min(e, s + budget)) for s, e in spans[1:]]
    return torch.cat(pos).to(device) if pos else torch.zeros(0, dtype=torch.long, device=device)


def deviation(model, dst_k, dst_v, ids, candidates: torch.Tensor, *, layers: tuple[int, ...] = (1,)) -> torch.Tensor:
    """[m]: how far each of ``candidates``' K/V move once they see the full context, at ``layers`` (default layer 1:
    one pass through the first two layers only; CacheBlend's signal: tokens that deviate there keep deviating
    deeper). With several layers each layer's deviations are divided by their mean before summing, so no layer's
    scale dominates; the pass stops after the deepest."""
    layers = tuple(sorted({min(i, dst_k.shape[0] - 1) for i in layers}))
    fresh = _forward(model, dst_k.clone(), dst_v.clone(), ids, candidates, probe_layer=layers)
    total = torch.zeros(candidates.numel(), device=dst_k.device)
    for j, layer in enumerate(layers):
        fresh_k, fresh_v = fresh[2 * j], fresh[2 * j + 1]
        old_k, old_v = dst_k[layer][:, candidates], dst_v[layer][:, candidates]  # [heads, m, dim]
        dev = ((fresh_k[0].float() - old_k.float()).norm(dim=-1) +
               (fresh_v[0].float() - old_v.float()).norm(dim=-1)).sum(0)
        total += dev if len(layers) == 1 else dev / dev.mean().clamp_min(1e-12)
    return total


def selective_positions(model, dst_k, dst_v, ids, spans, fraction: float) -> torch.Tensor:
    """The ``fraction`` of later-cube tokens whose layer-1 K/V change most with full context (CacheBlend)."""
    candidates = torch.cat([torch.arange(s, e) for s, e in spans[1:]]).to(dst_k.device)
    dev = deviation(model, dst_k, dst_v, ids, candidates)
    n = max(1, round(fraction * candidates.numel()))
    return candidates[dev.topk(min(n, candidates.numel())).indices.sort().values]


DEEP_LAYERS = (1, 2, 3)  # "deep": deviation measured at these layers (4 of the model's layers run on the candidates)


def blend_positions(model, dst_k, dst_v, ids, spans, budget: int, *, layers: tuple[int, ...] = (1,)) -> torch.Tensor:
    """Per later cube: its first ``budget // 2`` positions and its ``budget - budget // 2`` others that deviate
    most (`deviation` at ``layers``); a cube no longer than ``budget`` is recomputed whole."""
    lead = budget // 2
    rest = [torch.arange(s + lead, e) for s, e in spans[1:] if e - s > budget]
    dev = deviation(model, dst_k, dst_v, ids, torch.cat(rest).to(dst_k.device), layers=layers) if rest else None
    picked, offset = [], 0
    for s, e in spans[1:]:
        if e - s <= budget:
            picked.append(torch.arange(s, e))
            continue
        n = e - s - lead
        top = dev[offset:offset + n].topk(budget - lead).indices.cpu() + s + lead
        offset += n
        picked += [torch.arange(s, s + lead), top.sort().values]
    return torch.cat(picked).to(dst_k.device) if picked else torch.zeros(0, dtype=torch.long, device=dst_k.device)


QUERY_PROXY_TOKENS = 32  # without the request's query, the last cube's last tokens stand in for it


def query_attention(model, dst_k, dst_v, ids, spans, query_ids: torch.Tensor | None) -> torch.Tensor:
    """[T]: the attention each composed position gets from the query's tokens (appended after the prefix), summed
    over layers, heads and query tokens; without ``query_ids``, from the last cube's last `QUERY_PROXY_TOKENS`."""
    length = dst_k.shape[2]
    if query_ids is None:
        s, e = spans[-1]
        query_ids = ids[0, max(s, e - QUERY_PROXY_TOKENS):e]
    query = torch.as_tensor(query_ids, device=ids.device).reshape(-1)
    positions = torch.arange(length, length + query.numel(), device=ids.device)
    layers = [_AppendLayer(dst_k[i][None], dst_v[i][None]) for i in range(dst_k.shape[0])]
    dtype = dst_k.dtype if dst_k.dtype.is_floating_point else torch.float32
    record: list[torch.Tensor] = []
    with ape.adjusted(model, context=(spans[0][0], spans[-1][1]), query_start=length, record=record), \
            torch.inference_mode():
        model(input_ids=query[None], position_ids=positions[None],
              attention_mask=layer_masks(model, positions, length + query.numel(), dtype=dtype),
              use_cache=True, logits_to_keep=1, **{cache_kwarg(model): Cache(layers=layers)})
    return torch.stack([r[:length] for r in record]).sum(0)


def query_positions(model, dst_k, dst_v, ids, spans, budget: int, query_ids) -> torch.Tensor:
    """Per later cube: its first ``budget // 2`` positions and the ``budget - budget // 2`` others the query
    attends to most (`query_attention`); a cube no longer than ``budget`` is recomputed whole."""
    lead = budget // 2
    mass = query_attention(model, dst_k, dst_v, ids, spans, query_ids).cpu()
    picked = []
    for s, e in spans[1:]:
        if e - s <= budget:
            picked.append(torch.arange(s, e))
            continue
        top = mass[s + lead:e].topk(budget - lead).indices + s + lead
        picked += [torch.arange(s, s + lead), top.sort().values]
    return torch.cat(picked).to(dst_k.device) if picked else torch.zeros(0, dtype=torch.long, device=dst_k.device)


def recompute(model, dst_k, dst_v, ids, spans, *, mode: str, budget, query_ids=None) -> int:
    """Recompute the chosen tokens' KV in ``dst_k``/``dst_v`` [layers, heads, T, dim] in place. Returns how many.
    ``query_ids``: [q] the request's tokens after the prefix (mode "query"; None: the last cube's tail)."""
    if len(spans) < 2 or mode == "none":
        return 0
    if mode == "leading":
        positions = leading_positions(spans, int(budget), dst_k.device)
    elif mode == "query":
        positions = query_positions(model, dst_k, dst_v, ids, spans, int(budget), query_ids)
    elif mode == "blend":
        positions = blend_positions(model, dst_k, dst_v, ids, spans, int(budget))
    elif mode == "deep":
        positions = blend_positions(model, dst_k, dst_v, ids, spans, int(budget), layers=DEEP_LAYERS)
    else:
        positions = selective_positions(model, dst_k, dst_v, ids, spans, float(budget))
    if positions.numel():
        _forward(model, dst_k, dst_v, ids, positions)
    return int(positions.numel())
