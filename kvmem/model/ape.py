"""APE-style attention adjustment for composed cubes (Yang et al. 2025, "APE: Faster and Longer Context-Augmented
Generation via Adaptive Parallel Encoding"), through transformers' attention registry, for one request only.

Cubes composed side by side were each encoded after the same shared anchor, never seeing one another. APE keeps
that shared prefix as the attention sink and changes only how the *query* tokens (the request after the composed
prefix, and optionally the tokens generated from it) attend to the parallel context: their logits toward the
context's keys are divided by a temperature ``T`` (< 1 sharpens them) and the context's attention weight is
multiplied by a scale ``S`` relative to the prefix and the query's own keys. For a query row ``i`` and key ``j``:

    weight[i, j]  ∝  S * exp(s[i, j] / T)   for j in the context span
                     exp(s[i, j])           otherwise (the anchor, the query, generated tokens)

with ``s`` the model's own scaled logits (after its soft-capping) and its mask applied after. Rows before the query
(the cubes' own tokens, recomputed or not) are never adjusted.

`adjusted` is a context manager: inside it the model runs ``kvmem_ape_<base>`` (its previous attention function,
wrapped), outside it the model is as it was; the spans travel in a context variable, never in a global that
outlives the request. With ``T == 1`` and ``S == 1`` (or no context span) it changes nothing at all: the model is
not touched, so the result is bit-exact. The same wrapped function can ``record`` how much attention each key gets
from the query rows (summed over heads and rows, one row per layer): `kvmem.inject.recompute`'s ``query`` mode
picks the composed tokens the query attends to most from it.

    >>> with kvmem.model.ape.adjusted(model, context=(3, 1500), query_start=1500, temperature=0.8, scale=0.9):
    ...     out = model.generate(ids, past_key_values=prefix.cache, max_new_tokens=32)
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import sys
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from ..errors import CubeError
from .facts import base_model, switch_attention

PREFIX = "kvmem_ape_"


@dataclass
class _Request:
    """What one adjusted request needs inside attention (kept in a context variable)."""

    base: str  # the attention implementation the model ran before the request
    context: tuple[int, int]  # [start, end) positions of the composed (parallel) cubes' tokens
    query_start: int  # rows at positions >= this are adjusted
    query_end: int | None  # rows at positions >= this are generated tokens (None: no limit)
    temperature: float
    scale: float
    record: list | None = field(default=None)  # per layer: [kv_len] attention mass from the query rows


_ACTIVE: contextvars.ContextVar[_Request | None] = contextvars.ContextVar("kvmem_ape", default=None)


def _base_function(module: torch.nn.Module, name: str):
    """The attention function ``name`` stands for in ``module``'s model ("eager" is each model file's own)."""
    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return AttentionInterface()[name]


def _row_positions(query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """[q_len]: the position of each query row (the model's position_ids where it passes them; else the rows are
    the last q_len keys, as in a dynamic cache)."""
    pos = kwargs.get("position_ids")
    if pos is not None and pos.shape[-1] == query.shape[2]:
        return pos.reshape(-1, query.shape[2])[0].to(query.device)
    return torch.arange(key.shape[2] - query.shape[2], key.shape[2], device=query.device)


def ape_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          softcap: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: the adjustment for the active request's query rows, else the
    base function untouched.

    Args:
        query: [batch, heads, q_len, head_dim]; key, value: [batch, kv_heads, kv_len, head_dim].
        attention_mask: None, or bool (True attends) / additive [batch or 1, 1, q_len, kv_len].

    Returns:
        ([batch, q_len, heads, head_dim], None).
    """
    request = _ACTIVE.get()
    name = getattr(getattr(module, "config", None), "_attn_implementation", "") or ""
    base_name = request.base if request is not None else name.removeprefix(PREFIX)
    base = _base_function(module, base_name)
    extra = {"softcap": softcap} if softcap is not None else {}
    if request is None or kwargs.get("s_aux") is not None:  # no request (or attention sinks: not adjustable)
        return base(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **extra, **kwargs)
    rows = _row_positions(query, key, kwargs)
    adjust = rows >= request.query_start
    if request.query_end is not None:
        adjust &= rows < request.query_end
    if not bool(adjust.any()):
        return base(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **extra, **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, 1) if groups > 1 else key
    v = value.repeat_interleave(groups, 1) if groups > 1 else value
    scores = torch.matmul(query.float(), k.float().transpose(2, 3)) * scaling  # [b, h, q, kv]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    cols = torch.arange(k.shape[2], device=query.device)
    start, end = request.context
    in_context = adjust[:, None] & (cols >= start)[None, :] & (cols < end)[None, :]  # [q, kv]
    if request.temperature != 1.0 or request.scale != 1.0:
        bias = math.log(request.scale)
        scores = torch.where(in_context, scores / request.temperature + bias, scores)
    if attention_mask is None:  # no mask: causal by position (a decode step sees every key)
        attention_mask = (cols[None, :] <= rows[:, None])[None, None]
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :k.shape[2]], float("-inf"))
    else:
        scores = scores + attention_mask[..., :k.shape[2]].float()
    weights = torch.softmax(scores, dim=-1)
    if request.record is not None:
        request.record.append((weights * adjust[:, None]).sum((0, 1, 2)))  # [kv]: mass from the query rows
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights.to(v.dtype), v)
    return out.transpose(1, 2).contiguous(), None


def register_ape(base: str) -> str:
    """Register ``kvmem_ape_<base>`` (the function, and ``base``'s mask builder); idempotent. Returns the name."""
    name = PREFIX + base
    AttentionInterface.register(name, ape_attention_forward)
    masks = ALL_MASK_ATTENTION_FUNCTIONS
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, masks[base] if base in masks else masks["eager"])
    return name


@contextlib.contextmanager
def adjusted(model, *, context: tuple[int, int], query_start: int, temperature: float = 1.0, scale: float = 1.0,
             decode: bool = True, query_end: int | None = None, record: list | None = None):
    """Run ``model`` with the APE adjustment for one request; everything is restored on exit.

    Args:
        model: a transformers model (PEFT-wrapped or not).
        context: (start, end) positions of the composed cubes' own tokens (the anchor before them is the sink).
        query_start: the first position of the request's own tokens (the composed prefix's length).
        temperature: T > 0 dividing the query rows' logits toward the context (APE: < 1).
        scale: S > 0 multiplying the context's attention weight for the query rows (APE: < 1).
        decode: also adjust the tokens generated after the query (False: only rows before ``query_end``).
        query_end: the position after the request's last token (needed with ``decode=False``).
        record: a list to append, per layer, the attention mass [kv_len] the query rows give each key (this
            forces the adjusted path even with T = S = 1; the output is then the same up to float rounding).

    Raises:
        CubeError: a non-positive temperature or scale, an empty or inverted span, decode=False without query_end,
            or a model that cannot switch its attention function.
    """
    if not (temperature > 0 and scale > 0):
        raise CubeError(f"APE temperature and scale must be > 0, got T={temperature!r}, S={scale!r}")
    start, end = context
    if not 0 <= start <= end <= query_start:
        raise CubeError(f"APE context {context!r} must be a span of positions before the query (which starts at "
                        f"{query_start}): pass the composed prefix's cube spans")
    if not decode and query_end is None:
        raise CubeError("APE with decode=False needs query_end (the position after the request's last token)")
    if record is None and (start == end or (temperature == 1.0 and scale == 1.0)):
        yield  # nothing to adjust: the model is not touched (bit-exact)
        return
    target = base_model(model)
    base = target.config._attn_implementation or "eager"
    if base.startswith(PREFIX):
        raise CubeError("APE adjustment is already active on this model: nest kvmem.model.ape.adjusted only once")
    switch_attention(model, register_ape(base), fix="compose without the APE adjustment")
    token = _ACTIVE.set(_Request(base, (start, end), query_start, None if decode else query_end, float(temperature),
                                 float(scale), record))
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        switch_attention(model, base, fix="restore it with set_attn_implementation")
