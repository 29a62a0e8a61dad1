"""Measure what quantizing a cube changes, on the cube's own tokens, so every quantized cube carries its error.

A few probes re-read windows of the memory after the cube (the model then predicts each next token from the
cube's KV: what a question about the memory needs). For each probe, the model runs once over the exact cube's
KV and once over the dequantized KV; per position, KL(exact || quantized) of the next-token distributions; then
``GREEDY_TOKENS`` greedy tokens are generated after the probe from both, and compared.
"""

from __future__ import annotations

import torch

from ..model.cache import cache_kwarg, new_cache, output_cache
from ..model.facts import eval_mode

PROBES = 4           # windows of the memory re-read after the cube
PROBE_TOKENS = 16    # tokens per window
GREEDY_TOKENS = 8    # greedy tokens compared after each window


def probe_windows(n_memory: int, *, probes: int = PROBES, probe_tokens: int = PROBE_TOKENS) -> list[tuple[int, int]]:
    """[(start, stop)] of up to ``probes`` windows of ``probe_tokens`` evenly spread over a memory of
    ``n_memory`` tokens (fewer, shorter ones for a short memory)."""
    width = min(probe_tokens, n_memory)
    last = n_memory - width
    starts = sorted({round(i * last / max(probes - 1, 1)) for i in range(probes)})
    return [(s, s + width) for s in starts]


def _sig(x: torch.Tensor) -> float:
    """Four significant digits: enough to compare, short in the metadata (an int8 error can be 1e-7 nats)."""
    return float(f"{float(x):.4g}")


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) in nats per row of two [n, vocab] logit tensors (float64)."""
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _run(model, kv, probe: torch.Tensor, greedy_tokens: int) -> tuple[torch.Tensor, list[int]]:
    """(next-token logits [len(probe), vocab] over ``probe`` read after ``kv``, the greedy tokens after it)."""
    kw = cache_kwarg(model)
    cache = new_cache(model, [(k[None], v[None]) for k, v in kv])
    out = model(input_ids=probe[None], use_cache=True, **{kw: cache})
    logits, cache = out.logits[0], output_cache(out)
    tokens, nxt = [], logits[-1].argmax()
    for _ in range(greedy_tokens):
        tokens.append(int(nxt))
        out = model(input_ids=nxt.reshape(1, 1), use_cache=True, **{kw: cache})
        cache, nxt = output_cache(out), out.logits[0, -1].argmax()
    return logits, tokens


def measure_error(model, exact_kv, approx_kv, ids: torch.Tensor, *, anchor_len: int, probes: int | None = None,
                  probe_tokens: int | None = None, greedy_tokens: int | None = None) -> dict:
    """What ``approx_kv`` changes against ``exact_kv`` (per layer (keys, values) [kv_heads, T, head_dim] of
    ``ids`` [T], on the model's device and in its dtype), measured on windows of the memory ``ids[anchor_len:]``.

    Returns:
        {"kl_mean", "kl_max": nats over every probed position, "greedy_same": the fraction of probes whose
        greedy continuation is unchanged, "probes", "probe_tokens", "greedy_tokens"}.
    """
    probes = PROBES if probes is None else probes  # read at call time: tests make them smaller
    probe_tokens = PROBE_TOKENS if probe_tokens is None else probe_tokens
    greedy_tokens = GREEDY_TOKENS if greedy_tokens is None else greedy_tokens
    device = exact_kv[0][0].device
    memory = ids[anchor_len:].to(device)
    kls, same = [], []
    with torch.inference_mode(), eval_mode(model):
        for start, stop in probe_windows(memory.numel(), probes=probes, probe_tokens=probe_tokens):
            probe = memory[start:stop]
            p_logits, p_tokens = _run(model, exact_kv, probe, greedy_tokens)
            q_logits, q_tokens = _run(model, approx_kv, probe, greedy_tokens)
            kls.append(_kl(p_logits, q_logits).clamp_min(0))
            same.append(p_tokens == q_tokens)
    kl = torch.cat(kls)
    return {"kl_mean": _sig(kl.mean()), "kl_max": _sig(kl.max()),
            "greedy_same": round(sum(same) / len(same), 4), "probes": len(same), "probe_tokens": int(probe.numel()),
            "greedy_tokens": greedy_tokens}
