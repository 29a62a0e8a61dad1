"""Issue 20: where a decode step of the fast path (static prefix + kvmem_sdpa) spends the time the exact bound
(`ttft_fast.py`'s ``exact_bound_tokens_per_s``) does not account for.

One process, SmolLM2-135M float32, one torch thread, CPU time of this thread (the machine may be shared: wall
time says little there), methods round robin, medians:

    .venv/bin/python bench/decode_profile.py            # -> bench/results/decode_profile_cpu.json / .png
    .venv/bin/python bench/decode_profile.py --quick    # short memory, writes nothing unless --out

Rows (ms of CPU time per decode step after ``--memory`` memory tokens + a 167-token query):
  fast_step       one decode forward from the static prefix, kvmem_sdpa (what `kvmem.wrap` decodes with)
  no_memory_step  one decode forward after the query alone (stock sdpa): the weights' reads, the bound's base
  attention       the 30 attention calls the fast step makes, on the same cache tensors, nothing else:
                  kvmem's `attend_grouped` as `kvmem_sdpa` calls it for a decode step (each group's queries
                  packed; on more than one thread, the keys split into equal runs where the KV heads do not
                  divide among the threads: `decode_parts`)
  attention_one_call  the same with one CPU flash call per layer over all keys (no split: kvmem before the
                  split, and what it still runs on one thread)
  kv_read         reading those same keys and values once (a sum over each): the bytes an exact method must read
  bound_kv_term   what the bound charges for the memory: its KV bytes at the rate the no-memory step read weights
  attention_kernel  the same calls on kvmem's CPU decode kernel (`kvmem.kernels.cpu_decode`, what the fast path
                  runs with ``decode_kernel=True``; left out where it cannot be built)
An exact alternative to the attention kernel, timed on the same tensors (a candidate, not what kvmem runs):
  attention_transposed     matmuls over keys and values stored transposed ([kv_heads, dim, seq], copied outside
                           the timing): q @ K^T reads K contiguously and p @ V reads V along its long axis; what a
                           transposed cache layout would buy per step (its fill and the query forward would pay
                           the transposition; torch's CPU flash op cannot read that layout)
``--threads N`` times wall clock instead of thread CPU time when N > 1 (the other threads' work is not in this
thread's CPU time): run it on a quiet machine.
The fast step's excess over the no-memory step, against `attention`, says whether anything else (copies, mask,
Python per layer) is left; `attention` against `kv_read` says how far torch's kernel is from reading the bytes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import kvmem  # noqa: E402
import _common  # noqa: E402
from kvmem.demo.models import load_smollm2  # noqa: E402
from kvmem.kernels import cpu_decode  # noqa: E402
from kvmem.model.attention import attend_grouped, decode_parts, use_gqa_attention  # noqa: E402
from kvmem.model.cache import cache_kwarg  # noqa: E402
from kvmem.model.static_cache import static_prefix  # noqa: E402
from workloads import memory_ids, query_ids  # noqa: E402

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_CLOCK = [time.thread_time]  # set by main: wall clock with more than one thread


def _decode_steps(model, cache, query, start: int, steps: int) -> tuple[list[float], list[int]]:
    """Forward ``query`` at position ``start``, then ``steps`` greedy single-token forwards: each one's thread CPU
    seconds and the tokens."""
    kw = cache_kwarg(model)
    ids, pos, times, tokens = query, start, [], []
    for i in range(steps + 1):
        n = ids.shape[1]
        t0 = _CLOCK[0]()
        out = model(input_ids=ids, cache_position=torch.arange(pos, pos + n),
                    attention_mask=torch.ones(1, pos + n, dtype=torch.long), logits_to_keep=1, **{kw: cache})
        if i:
            times.append(_CLOCK[0]() - t0)
        ids, pos = out.logits[:, -1:].argmax(-1), pos + n
        tokens.append(int(ids))
    return times, tokens


def _attend_transposed(packed, kt, vt, scale):
    """softmax(q K^T) V with K^T = ``kt`` [1, kv_heads, dim, seq] and V = ``vt``.transpose (stored [dim, seq])."""
    return torch.matmul(torch.softmax(torch.matmul(packed * scale, kt), -1), vt.transpose(-1, -2))


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--memory", type=int, default=6064)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads (> 1: wall clock, quiet machine only)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.quick:
        args.memory, args.rounds, args.steps = 512, 2, 3
    torch.set_num_threads(args.threads)
    clock = _CLOCK[0] = time.thread_time if args.threads == 1 else time.perf_counter
    model, tok = load_smollm2()
    mem, q = memory_ids(tok, args.memory), query_ids(tok, 167)
    cube = kvmem.MemCube.from_ids(model, mem, progress=False)
    n = args.memory
    try:
        cpu_decode.build()
    except kvmem.CubeError as exc:
        print(f"attention_kernel left out: {exc}")
    samples = {m: [] for m in ("fast_step", "no_memory_step", "attention", "attention_one_call", "kv_read",
                               "attention_transposed") + (("attention_kernel",) if cpu_decode.built() else ())}
    max_diff = 0.0
    same = True
    with torch.inference_mode():
        from transformers import DynamicCache

        ids = kvmem.prefill(model, cube).extend(q)  # the prefix's ids (kvmem's anchor token + the memory) + query
        start = ids.shape[1] - 167
        _, full = _decode_steps(model, DynamicCache(config=model.config), ids, 0, args.steps)  # full prefill
        for _ in range(args.rounds + 1):  # the first round warms up
            use_gqa_attention(model)
            prefix = static_prefix(model, kvmem.prefill(model, cube), max_new_tokens=args.steps + 1, query_len=167)
            fast, tokens = _decode_steps(model, prefix.cache, q, start, args.steps)
            same = same and tokens == full
            use_gqa_attention(model, enabled=False)
            plain, _ = _decode_steps(model, DynamicCache(config=model.config), q, 0, args.steps)
            # the fast step's attention calls alone, on the cache's own tensors (views up to the last token)
            end = start + 167 + args.steps
            layers = [(lay.keys[:, :, :end], lay.values[:, :, :end]) for lay in prefix.cache.layers]
            heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
            query = torch.randn(1, heads, 1, layers[0][0].shape[-1])  # one decode token's queries
            packed = query.reshape(1, kv_heads, heads // kv_heads, -1)  # kv-major heads: each group's rows
            transposed = [(k.transpose(-1, -2).contiguous(), v.transpose(-1, -2).contiguous()) for k, v in layers]
            scale = layers[0][0].shape[-1] ** -0.5
            parts = decode_parts(query, *layers[0])
            passes = {"attention": lambda: [attend_grouped(query, k, v, None, scale=scale, pack=True)
                                            for k, v in layers],
                      "attention_one_call": lambda: [_FLASH(packed, k, v, scale=scale)[0] for k, v in layers],
                      "kv_read": lambda: [(k.sum(), v.sum()) for k, v in layers],
                      "attention_transposed": lambda: [_attend_transposed(packed, kt, vt, scale)
                                                       for kt, vt in transposed]}
            if cpu_decode.built():
                passes["attention_kernel"] = lambda: [cpu_decode.decode_attention(query, k, v, scale=scale)
                                                      for k, v in layers]
            reference = [o.reshape(query.shape) for o in passes["attention_one_call"]()]
            for name in [n for n in ("attention", "attention_transposed", "attention_kernel") if n in passes]:
                # exact to float rounding, or not a candidate
                max_diff = max(max_diff, *((a - b.reshape(a.shape)).abs().max().item()
                                           for a, b in zip(reference, passes[name]())))
            timed = {name: [] for name in passes}
            for _ in range(5):  # each a median of five: one pass is ~50 ms, short enough for a shared machine's jitter
                for name, run in passes.items():  # interleaved
                    t0 = clock()
                    run()
                    timed[name].append(clock() - t0)
            transposed = None  # the copies go before the next round
            samples["fast_step"].append(_median(fast))
            samples["no_memory_step"].append(_median(plain))
            for name, xs in timed.items():
                samples[name].append(_median(xs))
    for name in samples:
        samples[name] = samples[name][1:]
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    kv_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in cube.kv)
    med = {name: _median(xs) * 1e3 for name, xs in samples.items()}
    med["bound_kv_term"] = med["no_memory_step"] * kv_bytes / weight_bytes
    med["bound_step"] = med["no_memory_step"] + med["bound_kv_term"]
    rows = [{"method": name, "median_ms": ms, "samples_ms": [x * 1e3 for x in samples.get(name, [])]}
            for name, ms in med.items()]
    summary = {
        "fast_excess_over_no_memory_ms": med["fast_step"] - med["no_memory_step"],
        "fast_excess_not_in_attention_ms": med["fast_step"] - med["no_memory_step"] - med["attention"],
        "attention_over_kv_read": med["attention"] / med["kv_read"],
        "fraction_of_exact_bound": med["bound_step"] / med["fast_step"],
        "weight_read_gb_per_s": weight_bytes / med["no_memory_step"] / 1e6,
        "kv_read_gb_per_s": kv_bytes / med["kv_read"] / 1e6,
        "attention_gb_per_s": kv_bytes / med["attention"] / 1e6,
        "same_tokens_as_full_prefill": same, "memory_kv_bytes": kv_bytes, "weight_bytes": weight_bytes,
        "max_abs_diff_vs_one_flash_call": max_diff, "threads": args.threads,
        "key_parts": parts,  # decode_parts at the last token: what `attention` ran
        "fraction_of_exact_bound_with_one_call": med["bound_step"] / (med["fast_step"] - med["attention"]
                                                                      + med["attention_one_call"]),
        "fraction_of_exact_bound_with_transposed": med["bound_step"] / (med["fast_step"] - med["attention"]
                                                                        + med["attention_transposed"]),
    }
    if "attention_kernel" in med:
        summary["fraction_of_exact_bound_with_kernel"] = med["bound_step"] / (
            med["fast_step"] - med["attention"] + med["attention_kernel"])
        summary["attention_kernel_gb_per_s"] = kv_bytes / med["attention_kernel"] / 1e6
    for r in rows:
        print(f"{r['method']:>16}: {r['median_ms']:8.2f} ms")
    print(summary)
    facts = _common.machine_facts(model=model, memory_tokens=n, query_tokens=167, torch_threads=args.threads,
                                  clock="thread CPU time" if args.threads == 1 else "wall clock")
    out = args.out or (None if args.quick else ROOT / "bench" / "results" / "decode_profile_cpu.json")
    if out:
        _common.write_results({"machine": facts, "args": vars(args), "summary": summary, "rows": rows}, out,
                              plot=_plot)
    return 0


def _plot(doc: dict, png: str) -> None:
    plt = _common.pyplot()
    rows = doc["rows"]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.barh([r["method"] for r in rows], [r["median_ms"] for r in rows], color="#4c72b0")
    for i, r in enumerate(rows):
        ax.text(r["median_ms"], i, f" {r['median_ms']:.1f}", va="center", fontsize=8)
    ax.invert_yaxis()
    m = doc["machine"]
    ax.set_xlabel(f"ms of {m.get('clock', 'thread CPU time')} per decode step (median)")
    ax.set_title(f"decode step after {m.get('memory_tokens')} memory tokens, SmolLM2 fp32, "
                 f"{m.get('torch_threads', 1)} thread(s)\n"
                 f"load {m.get('loadavg_start')}", fontsize=9)
    _common.save_figure(fig, png, m)


if __name__ == "__main__":
    sys.exit(main())
