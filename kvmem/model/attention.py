"""GQA attention over a long memory without expanding KV heads, through transformers' attention registry.

Stock `sdpa` in transformers expands the key/value heads (`repeat_kv`: 3 -> 9 heads on SmolLM2) whenever a mask
is passed, which a query over a spliced memory always does: that copies the whole cache once per layer per
forward. `kvmem_sdpa` hands the grouped heads to torch's GQA-aware `scaled_dot_product_attention` instead:
`enable_gqa=True` where torch runs it natively with a mask (CPU), or the queries of one group packed along the
sequence axis (any backend that takes a mask, e.g. CUDA's memory-efficient kernel).

It also reads the mask's shape of visibility once per forward (`Visible`: the same mask object reaches every
layer of a layer type) and skips what the mask makes pointless:
- keys no query may see at the end (a static cache's unused room) are not read;
- keys every query sees (the memory, for a request after a prefix) need no mask: when all visible keys are
  such, the call takes no mask at all (decode steps; on CUDA that lets the flash kernels run). On the CPU, in
  float32, a request's forward is split: the memory part without a mask (each group's queries packed into one
  pass over its keys) and the request's own keys under the mask, the two softmaxes merged by their
  log-sum-exps (torch's CPU flash kernel returns them). Same products, same sums, another order: exact to
  float rounding against the stock path (tests/test_attention.py), like any two sdpa kernels.

Selected the supported way, not by editing model code:

    >>> kvmem.attention.use_gqa_attention(model)          # or AutoModel...(..., attn_implementation="kvmem_sdpa")
    >>> model.config._attn_implementation
    'kvmem_sdpa'
"""

from __future__ import annotations

import weakref

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from ..errors import CubeError
from ..kernels import cpu_decode
from .facts import base_model, switch_attention
from .visibility import noted, visible_mask

NAME = "kvmem_sdpa"
# attention layers whose decode steps run kvmem's CPU decode kernel (`use_gqa_attention(..., decode_kernel=True)`)
_KERNEL_LAYERS: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


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
    if (attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.shape[-1] == kv_len
            and not torch.compiler.is_compiling()):  # a compiled graph keeps fixed shapes and no host reads
        seen = Visible.of(attention_mask)
        if seen.end == 0:  # no query sees any key: what stock sdpa computes for it (no shortcut to take)
            pass
        else:
            key, value, attention_mask = key[:, :, :seen.end], value[:, :, :seen.end], attention_mask[..., :seen.end]
            if seen.full == seen.end:  # every query sees every remaining key
                attention_mask = None
            elif _split_here(query, seen) and key.stride(-1) == 1 and value.stride(-1) == 1:
                out = attend_split(query, key, value, attention_mask, seen.full, scale=scaling)
                return out.transpose(1, 2).contiguous(), None
    # CUDA's GQA kernels take no mask (a masked enable_gqa call falls back to the math kernel): pack there. On the
    # CPU, a call with no mask (a decode step over what it sees) packs too: the flash kernel then runs one pass per
    # KV head, 1.5x faster than its own enable_gqa (0.37 vs 0.57 ms a layer at 6k keys, SmolLM2's 9/3 heads).
    pack = (attention_mask is not None and query.device.type != "cpu") or \
        (attention_mask is None and not is_causal and query.device.type == "cpu")
    if pack and attention_mask is None and dropout == 0.0 and module in _KERNEL_LAYERS \
            and cpu_decode.applies(query, key, value):  # a decode step on kvmem's CPU kernel (opted in)
        return cpu_decode.decode_attention(query, key, value, scale=scaling).transpose(1, 2).contiguous(), None
    out = attend_grouped(query, key, value, attention_mask, scale=scaling, dropout=dropout, is_causal=is_causal,
                         pack=pack)
    return out.transpose(1, 2).contiguous(), None


class Visible:
    """Which keys a boolean mask [batch or 1, 1, q_len, kv_len] lets its queries see, per key column:
    ``end`` = 1 + the last column any query sees (0: none), ``full`` = how many leading columns every query sees.
    Read once per mask object (and version: an in-place edit is read again, except on an inference tensor, which
    keeps no version: transformers builds a fresh mask per forward); the layers of one forward share it (the last
    four masks are remembered: sliding-window and full-attention layers get one each)."""

    _recent: list[tuple] = []  # (weakref to a mask, its _version, its Visible): one per layer type of a forward

    def __init__(self, end: int, full: int):
        self.end, self.full = end, full

    @classmethod
    def of(cls, mask: torch.Tensor) -> "Visible":
        known = noted(mask)  # what the mask builder knew on the host (kvmem.model.visibility): no device read
        if known is not None:
            return cls(*known)
        version = None if mask.is_inference() else mask._version  # inference tensors keep no version counter
        for ref, seen_version, seen in cls._recent:
            if ref() is mask and seen_version == version:
                return seen
        cols = mask.flatten(0, -2)
        seen_any, seen_all = cols.any(0), cols.all(0)
        end = int(seen_any.nonzero()[-1]) + 1 if bool(seen_any.any()) else 0
        full = int((~seen_all).int().argmax()) if not bool(seen_all.all()) else mask.shape[-1]
        found = cls(end, min(full, end))
        cls._recent = [(weakref.ref(mask), version, found)] + [e for e in cls._recent if e[0]() is not None][:3]
        return found


def _split_here(query: torch.Tensor, seen: Visible) -> bool:
    """Split off the unmasked memory part: on the CPU's flash kernel (it returns the log-sum-exp), in float32
    (merging two rounded halves in half precision would round twice), when the unmasked part is the larger. The
    caller also checks the keys'/values' last axis is contiguous: torch 2.13's CPU flash op, called directly,
    misreads other strides (max |diff| 0.35 against the same values contiguous); the public sdpa copies them."""
    return (query.device.type == "cpu" and query.dtype == torch.float32 and _CPU_FLASH is not None
            and seen.full >= seen.end - seen.full)


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attend_split(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, full: int, *,
                 scale: float | None = None) -> torch.Tensor:
    """sdpa of grouped heads where the first ``full`` keys are seen by every query: those without a mask (each
    group's queries packed into one pass over its keys), the rest under ``mask[..., full:]``, merged exactly by
    the two parts' log-sum-exps. CPU flash kernel; shapes as `attend_grouped`. Returns [batch, heads, q_len, dim]."""
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    packed = query.reshape(batch, kv_heads, groups * q_len, dim)  # heads are kv-major: a view
    out_a, lse_a = _CPU_FLASH(packed, key[:, :, :full], value[:, :, :full], scale=scale)
    out_a, lse_a = out_a.reshape(batch, heads, q_len, -1), lse_a.reshape(batch, heads, q_len)
    tail = mask[..., full:]
    sees_tail = tail.any(-1)  # [batch or 1, 1, q_len]: the kernel gives a query that sees no key lse 0, not -inf
    tail = tail.expand(tail.shape[0], 1, q_len, tail.shape[-1]).repeat(1, 1, groups, 1)
    tail = torch.zeros(tail.shape, dtype=query.dtype, device=query.device).masked_fill_(~tail, float("-inf"))
    out_b, lse_b = _CPU_FLASH(packed, key[:, :, full:], value[:, :, full:], attn_mask=tail, scale=scale)
    out_b, lse_b = out_b.reshape(batch, heads, q_len, -1), lse_b.reshape(batch, heads, q_len)
    lse_b = lse_b.masked_fill(~sees_tail, float("-inf"))
    top = torch.maximum(lse_a, lse_b)  # lse_a is finite: every query sees the first `full` keys
    w_a, w_b = torch.exp(lse_a - top), torch.exp(lse_b - top)  # w_b == 0 where a query sees none of the tail
    out_b = torch.where(w_b[..., None] > 0, out_b, 0.0)
    return (out_a * w_a[..., None] + out_b * w_b[..., None]) / (w_a + w_b)[..., None]


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
    parts = decode_parts(query, key, value) if mask is None and not is_causal and dropout == 0.0 else 1
    if parts > 1:  # a decode step on several threads: the keys split so every thread gets as much work
        packed = query.reshape(batch, kv_heads, groups * q_len, dim)
        return attend_parts(packed, key, value, parts, scale=scale).reshape(batch, heads, q_len, dim)
    if is_causal:  # a causal flag would align to the packed rows: spell the mask out
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)[None, None]
    # heads are kv-major (head h reads kv head h // groups), so this reshape is a view
    packed = query.reshape(batch, kv_heads, groups * q_len, dim)
    if mask is not None:
        mask = mask.expand(mask.shape[0], 1, q_len, kv_len).repeat(1, 1, groups, 1)  # row g*q_len + i is query i
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scale)
    return out.reshape(batch, heads, q_len, dim)


MIN_PART_KEYS = 2048  # below this many keys a part, the split's extra ops may cost more than the idle thread


def decode_parts(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                 threads: int | None = None) -> int:
    """How many parts to split the keys of an unmasked decode step into (1: no split), so that torch's CPU flash
    kernel, which hands each thread whole (batch x kv head) tasks, gives every thread the same work.

    SmolLM2 decodes with 3 KV heads: on 2 threads one thread attends over two heads and the other over one, so
    the call takes 2/3 of the one-thread time instead of 1/2. With the keys in 2 parts, 6 tasks split 3 + 3.
    The number of parts ``p`` is the smallest that minimizes ``ceil(tasks * p / threads) / p`` (the busiest
    thread's share); none where the tasks already divide evenly, on one thread, or where a part would hold fewer
    than `MIN_PART_KEYS` keys (short contexts: the extra ops outweigh the idle thread).
    Taken only where `attend_parts` is exact and safe: the CPU in float32 (half-precision parts would round
    twice), one decode query (``q_len == 1``), batch 1 (the parts take the batch axis), keys and values with a
    contiguous last axis (the direct flash op misreads other strides), not while compiling.

    Args:
        query: [batch, heads, q_len, dim]; key, value: [batch, kv_heads, kv_len, dim].
        threads: torch's intra-op threads (default: ``torch.get_num_threads()``).

    Returns:
        The number of parts, >= 1.
    """
    batch, _, q_len, _ = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if (q_len != 1 or batch != 1 or query.device.type != "cpu" or query.dtype != torch.float32
            or _CPU_FLASH is None or key.stride(-1) != 1 or value.stride(-1) != 1
            or torch.compiler.is_compiling()):
        return 1
    threads = torch.get_num_threads() if threads is None else threads
    return cpu_decode.balanced_runs(kv_heads, threads, kv_len // MIN_PART_KEYS)


def attend_parts(packed: torch.Tensor, key: torch.Tensor, value: torch.Tensor, parts: int, *,
                 scale: float | None = None) -> torch.Tensor:
    """Unmasked attention with the keys split into ``parts`` runs (flash-decoding), in one CPU flash call: the
    runs are views of the same storage laid along the batch axis (no copy), the query repeated over them, and
    the parts' outputs are merged exactly by their log-sum-exps.

    Runs are ``m = s + r`` keys long and start every ``s = kv_len // parts`` keys (``r = kv_len % parts``): run
    i covers keys [i*s, i*s + m), and its first ``r`` keys, which run i-1 already covers, are masked out of it
    (an additive -inf mask [parts, 1, 1, m], only when r > 0). So every key counts once and no second call is
    needed for a remainder (a second call cost more than the mask: one more parallel region and merge).

    Args:
        packed: [1, kv_heads, rows, dim] (each group's queries packed as rows)
        key, value: [1, kv_heads, kv_len, dim], last axis contiguous, kv_len >= parts.
        parts: the number of runs (>= 2).

    Returns:
        [1, kv_heads, rows, dim], what one flash call over all keys returns, to float rounding.
    """
    kv_len = key.shape[2]
    step, rest = divmod(kv_len, parts)
    span = step + rest
    runs = [t.as_strided((parts, t.shape[1], span, t.shape[3]), (step * t.stride(2), t.stride(1), t.stride(2), 1))
            for t in (key, value)]  # run i = keys [i*step, i*step + span): the last ends at kv_len, inside the tensor
    mask = None
    if rest:
        mask = torch.zeros(parts, 1, 1, span, dtype=packed.dtype, device=packed.device)
        mask[1:, ..., :rest] = float("-inf")  # keys the run before already counted
    out, lse = _CPU_FLASH(packed.expand(parts, *packed.shape[1:]), *runs, attn_mask=mask, scale=scale)[:2]
    # out: [parts, kv_heads, rows, dim], lse: [parts, kv_heads, rows], each finite (every run keeps >= 1 key)
    if parts == 2:  # part 1's share of the total is sigmoid(lse1 - lse0): three small ops, no reduction
        return torch.lerp(out[:1], out[1:], torch.sigmoid(lse[1:] - lse[:1])[..., None])
    return (out * torch.softmax(lse, 0)[..., None]).sum(0, keepdim=True)


def register_gqa_attention() -> str:
    """Register ``kvmem_sdpa`` (attention function and its mask builder, sdpa's) with transformers; idempotent.

    Returns:
        The name to pass as ``attn_implementation``.
    """
    AttentionInterface.register(NAME, gqa_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, visible_mask)  # sdpa's mask, its visibility noted on the host
    return NAME


def grouped_sdpa(model) -> bool:
    """Whether ``model`` runs transformers' stock ``sdpa`` and groups its key/value heads (where kvmem_sdpa pays)."""
    target = base_model(model)
    config = getattr(target, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    return any(getattr(m, "num_key_value_groups", 1) > 1 for m in target.modules())


def use_gqa_attention(model, *, enabled: bool = True, decode_kernel: bool = False) -> str:
    """Switch ``model`` to ``kvmem_sdpa`` (or, with ``enabled=False``, back to stock ``sdpa``).

    Args:
        model: a transformers model (PEFT-wrapped or not).
        enabled: True selects kvmem_sdpa, False restores sdpa.
        decode_kernel: also run its decode steps on kvmem's CPU decode kernel (`kvmem.kernels.cpu_decode`:
            built on the first such call on a machine, ~25 s, then cached) where it applies (one query per head,
            batch 1, every key visible, float32 on a CPU with AVX-512); False (the default) keeps torch's flash
            kernel for them.

    Returns:
        The attention implementation now in use.

    Raises:
        CubeError: the model cannot take an attention function from the registry, or ``decode_kernel`` was asked
        for and the kernel cannot be built here (the message says why; the model is left as it was).
    """
    if not isinstance(decode_kernel, bool):
        raise CubeError(f"decode_kernel must be True or False, got {decode_kernel!r:.40}")
    if decode_kernel and not enabled:
        raise CubeError("decode_kernel=True needs kvmem_sdpa (enabled=True): the kernel runs inside it")
    if decode_kernel:
        cpu_decode.build()  # before switching anything: a failure leaves the model as it was
    register_gqa_attention()
    name = switch_attention(model, NAME if enabled else "sdpa", fix="keep its own attention implementation")
    layers = [m for m in base_model(model).modules() if hasattr(m, "num_key_value_groups")]
    for layer in layers:
        if decode_kernel:
            _KERNEL_LAYERS.add(layer)
        else:
            _KERNEL_LAYERS.discard(layer)
    return name
