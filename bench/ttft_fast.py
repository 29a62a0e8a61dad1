"""Issue 13's bench: kvmem's fast path (static prefix cache + kvmem_sdpa) against transformers' own prefix reuse.

One process, SmolLM2-135M float32, medians after warm-up (methods interleaved round robin), JSON + PNG.

    .venv/bin/python bench/ttft_fast.py           # full run -> bench/results/ttft_fast_cpu.json / .png
    .venv/bin/python bench/ttft_fast.py --quick   # smoke run, short lengths, writes nothing unless --out

Three parts:
  ttft    memory 512..6,064 tokens + a 167-token query; timed region = [make the cache; forward(query); argmax]
            full_prefill          forward(memory + query)
            prefix_reuse          deepcopy(DynamicCache of the memory)      transformers' documented recipe
            prefix_reuse_static   deepcopy(StaticCache of the memory)       the same with a static cache
            kvmem                 kvmem.prefill(cube)                       the plain loop (its growing cache, sdpa)
            kvmem_gqa             kvmem.prefill(cube), kvmem_sdpa           attention alone
            kvmem_static          static_prefix(kvmem.prefill(cube)), sdpa  static cache alone
            kvmem_fast            static_prefix(kvmem.prefill(cube)), kvmem_sdpa  (what kvmem.wrap does by default)
            query_alone           forward(query) with no memory at all: the part no method can remove (a bound)
  decode  128 new tokens after the 6,064-token memory with model.generate; tokens/s over the 127 decode steps
          (each step stamped by a logits processor, so the query forward is not in it); the *_compiled methods
          decode through transformers' compiled forward (CompileConfig, inductor, fullgraph, static shapes; the
          compile is in the warm-up, not in the timed calls); *_frozen adds inductor's freezing (weights folded
          into the graph as constants and prepacked: only for a model whose weights never change afterwards, no
          adapter swaps, which is why kvmem never turns it on); no_memory decodes after the query alone: the
          bound (the weights' reads) no cache can beat; kvmem_fast_one_call is kvmem_fast with its decode
          split off (one CPU flash call per layer over all keys, as before issue 20's split: the paired A/B of
          `decode_parts`); kvmem_fast_kernel is kvmem_fast with ``decode_kernel=True`` (its decode steps on
          kvmem's CPU decode kernel, `kvmem.kernels.cpu_decode`, built before timing); each decode row also
          gives the bound an exact method has with the memory (the no-memory step plus reading the memory's KV at
          the rate the weights were read) and the bound with torch's CPU attention kernel (the no-memory step
          plus that kernel over the memory)
  batch   B = 1, 4, 8 requests, each its own cube (different lengths) and query; one generate over
          prefill_batch vs B sequential static_prefix + generate calls; new tokens per second

Every method's tokens are checked against a full prefill's (first token for ttft, all 128 for decode, each row
against its own sequential call for batch). The machine may be shared: load averages are recorded per part.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import kvmem  # noqa: E402
import _common  # noqa: E402
from kvmem.model import attention  # noqa: E402
from kvmem.model.attention import attend_grouped, use_gqa_attention  # noqa: E402
from kvmem.inject.batch import prefill_batch  # noqa: E402
from kvmem.model.cache import cache_kwarg, output_cache  # noqa: E402
from kvmem.model.static_cache import static_prefix  # noqa: E402
from kvmem.demo.models import load_smollm2  # noqa: E402
from workloads import memory_ids, query_ids  # noqa: E402

TTFT_METHODS = ("full_prefill", "prefix_reuse", "prefix_reuse_static", "kvmem", "kvmem_gqa", "kvmem_static",
                "kvmem_fast", "query_alone")
DECODE_METHODS = ("prefix_reuse", "prefix_reuse_static", "kvmem", "kvmem_fast", "kvmem_fast_kernel",
                  "kvmem_fast_one_call", "prefix_reuse_static_compiled", "kvmem_fast_compiled",
                  "kvmem_fast_compiled_frozen", "no_memory")
GQA = {"kvmem_gqa", "kvmem_fast", "kvmem_fast_kernel", "kvmem_fast_one_call", "kvmem_fast_compiled",
       "kvmem_fast_compiled_frozen"}
KERNEL = {"kvmem_fast_kernel": "kvmem_fast"}  # kvmem_fast with its decode steps on kvmem's CPU decode kernel
UNSPLIT = {"kvmem_fast_one_call": "kvmem_fast"}  # kvmem_fast with decode_parts off: one flash call per layer
SPLIT_KEYS = attention.MIN_PART_KEYS
COMPILED = {"prefix_reuse_static_compiled": "prefix_reuse_static", "kvmem_fast_compiled": "kvmem_fast",
            "kvmem_fast_compiled_frozen": "kvmem_fast"}


def _loadavg():
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


class _Setup:
    """Untimed per memory length: the memory's caches (both kinds) and its cube."""

    def __init__(self, model, tok, n_mem: int, room: int):
        from transformers import DynamicCache, StaticCache

        kw = cache_kwarg(model)
        self.mem = memory_ids(tok, n_mem)
        with torch.inference_mode():
            self.dynamic = output_cache(model(input_ids=self.mem, logits_to_keep=1,
                                              **{kw: DynamicCache(config=model.config)}))
            self.static = StaticCache(config=model.config, max_cache_len=n_mem + room)
            model(input_ids=self.mem, logits_to_keep=1, **{kw: self.static})
        self.cube = kvmem.MemCube.from_ids(model, self.mem, progress=False)

    def cache(self, method: str, model, room: int):
        """The cache a method's request starts from (this is the copy / splice inside the timed region)."""
        method = COMPILED.get(method, UNSPLIT.get(method, KERNEL.get(method, method)))
        if method == "prefix_reuse":
            return copy.deepcopy(self.dynamic)
        if method == "prefix_reuse_static":
            return copy.deepcopy(self.static)
        prefix = kvmem.prefill(model, self.cube)
        if method in ("kvmem_static", "kvmem_fast"):
            return static_prefix(model, prefix, max_new_tokens=room, query_len=0).cache
        return prefix.cache


def _switch(model, method: str) -> None:
    use_gqa_attention(model, enabled=method in GQA, decode_kernel=method in KERNEL)
    attention.MIN_PART_KEYS = 1 << 62 if method in UNSPLIT else SPLIT_KEYS  # the A/B of the decode split


def bench_ttft(model, tok, n_mem: int, q: torch.Tensor, args) -> list[dict]:
    kw = cache_kwarg(model)
    s = _Setup(model, tok, n_mem, room=q.shape[1] + 1)
    full = torch.cat([s.mem, q], -1)

    def forward(ids, cache=None):
        logits = model(input_ids=ids, logits_to_keep=1, **({kw: cache} if cache is not None else {})).logits[0, -1]
        return int(logits.argmax()), logits.float()

    fns = {m: (lambda: forward(full)) if m == "full_prefill" else (lambda: forward(q)) if m == "query_alone" else
           (lambda m=m: forward(q, s.cache(m, model, q.shape[1] + 1))) for m in args.methods}
    long = n_mem >= 2048
    reps = {m: (args.full_reps if m == "full_prefill" and long else args.reps) for m in fns}
    load0 = _loadavg()
    with torch.inference_mode():
        series = _common.round_robin(fns, reps, warmup=args.warmup, before=lambda m: _switch(model, m))
    _switch(model, "kvmem")
    ref_token, ref_logits = series["full_prefill"].first if "full_prefill" in series else (None, None)
    rows = []
    for m, ser in series.items():
        token, logits = ser.first
        rows.append({"part": "ttft", "memory_tokens": n_mem, "query_tokens": q.shape[1], "method": m,
                     "reps": reps[m], "warmup": args.warmup, **_common.spread(ser.seconds),
                     "first_token": token, "same_first_token_as_full": None if ref_token is None else token == ref_token,
                     "max_abs_logit_diff_vs_full": None if ref_logits is None else
                     float((logits - ref_logits).abs().max()),
                     "loadavg_before": load0, "loadavg_after": _loadavg()})
    base = {r["method"]: r["median_s"] for r in rows}
    for r in rows:
        r["ratio_vs_prefix_reuse"] = r["median_s"] / base["prefix_reuse"] if "prefix_reuse" in base else None
        r["reduction_vs_full"] = 1 - r["median_s"] / base["full_prefill"] if "full_prefill" in base else None
        if r["method"] == "query_alone":  # not a method: its first token is another answer (no memory)
            r["same_first_token_as_full"] = r["max_abs_logit_diff_vs_full"] = None
    return rows


def _compile_config(frozen: bool = False):
    """Compiled decoding as transformers does it on CUDA by itself, asked for on the CPU too (no CUDA graphs)."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, dynamic=False, mode=None if frozen else "default",
                           options={"freezing": True} if frozen else None)
    config._compile_all_devices = True
    return config


class _Stamps:
    """A logits processor that only records when each generation step's logits arrive."""

    def __init__(self):
        self.t: list[float] = []

    def __call__(self, input_ids, scores):
        self.t.append(time.perf_counter())
        return scores


def bench_decode(model, tok, n_mem: int, q: torch.Tensor, args) -> list[dict]:
    from transformers import LogitsProcessorList

    kw = cache_kwarg(model)
    n_new = args.new_tokens
    s = _Setup(model, tok, n_mem, room=q.shape[1] + n_new)
    ids = torch.cat([s.mem, q], -1)
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
               pad_token_id=tok.eos_token_id)
    with torch.inference_mode():
        truth = model.generate(ids, **gen)[0, ids.shape[1]:]  # the full prefill's tokens
    rows = []
    load0 = _loadavg()
    tok_s = {m: [] for m in args.decode_methods}
    same = dict.fromkeys(args.decode_methods, True)
    compile_s = {}
    for i in range(args.warmup + args.decode_reps):  # round robin: load drift hits every method alike
        for m in args.decode_methods:
            _switch(model, m)
            stamps = _Stamps()
            extra = {"compile_config": _compile_config(frozen=m.endswith("_frozen"))} if m in COMPILED else \
                {"disable_compile": True}
            t0 = time.perf_counter()
            with torch.inference_mode():
                if m == "no_memory":  # the same query and 128 tokens, no memory: not compared with the truth
                    out = None
                    model.generate(q, logits_processor=LogitsProcessorList([stamps]), **extra,
                                   **{**gen, "attention_mask": torch.ones_like(q)})
                else:
                    out = model.generate(ids, logits_processor=LogitsProcessorList([stamps]), **extra,
                                         **{kw: s.cache(m, model, q.shape[1] + n_new)}, **gen)[0, ids.shape[1]:]
            if i == 0 and m in COMPILED:
                compile_s[m] = time.perf_counter() - t0  # the first call compiles
            same[m] = None if out is None else same[m] and torch.equal(out, truth)
            if i >= args.warmup:
                tok_s[m].append((len(stamps.t) - 1) / (stamps.t[-1] - stamps.t[0]))
    for m, rates in tok_s.items():
        secs = [1 / x for x in rates]  # seconds per decode step
        rows.append({"part": "decode", "memory_tokens": n_mem, "query_tokens": q.shape[1], "method": m,
                     "new_tokens": n_new, "reps": args.decode_reps, "tokens_per_s_samples": rates,
                     "median_tokens_per_s": sorted(rates)[len(rates) // 2],
                     **_common.spread(secs, unit="ms", prefix="step_"),
                     "same_tokens_as_full": same[m], "first_call_s_incl_compile": compile_s.get(m),
                     "loadavg_before": load0, "loadavg_after": _loadavg()})
    _switch(model, "kvmem")
    base = {r["method"]: r["median_tokens_per_s"] for r in rows}
    bound = _exact_bound(model, s.cube, base.get("no_memory"))
    for r in rows:
        r["speedup_vs_prefix_reuse"] = r["median_tokens_per_s"] / base["prefix_reuse"] if "prefix_reuse" in base \
            else None
        if bound is not None:
            r.update(bound, fraction_of_exact_bound=r["median_tokens_per_s"] / bound["exact_bound_tokens_per_s"])
            if "kernel_bound_tokens_per_s" in bound:
                r["fraction_of_kernel_bound"] = r["median_tokens_per_s"] / bound["kernel_bound_tokens_per_s"]
    return rows


def _exact_bound(model, cube, no_memory_tok_s: float | None) -> dict | None:
    """The decode rate no exact method beats on this machine: a step with no memory reads the weights once; with
    the memory it must also read the memory's KV, at the rate the no-memory step read the weights:
    step = no_memory_step * (1 + KV bytes / weight bytes). Beside it, the bound with torch's own CPU attention
    kernel: the no-memory step plus that kernel's calls over the memory's KV as the fast path makes them (one per
    layer, each group's queries packed, the keys split into runs where the KV heads do not divide among the
    threads), timed here; `decode_profile.py` shows the fast step's excess over the no-memory step is these
    calls, and that they cost more than reading the bytes."""
    if not no_memory_tok_s:
        return None
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in cube.kv)
    step = (1 / no_memory_tok_s) * (1 + kv_bytes / weight_bytes)
    bound = {"exact_bound_tokens_per_s": 1 / step, "memory_kv_bytes": kv_bytes, "weight_bytes": weight_bytes}
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    if kv_heads and heads % kv_heads == 0:
        kv = [(k if k.dim() == 4 else k[None], v if v.dim() == 4 else v[None]) for k, v in cube.kv]  # [1, h, n, d]
        q = torch.randn(1, heads, 1, kv[0][0].shape[-1], dtype=kv[0][0].dtype)

        def attend():  # as kvmem_sdpa calls it for a decode step (groups packed, keys split over threads)
            for k, v in kv:
                attend_grouped(q, k, v, None, scale=k.shape[-1] ** -0.5, pack=True)

        with torch.inference_mode():
            attend()
            times = []
            for _ in range(7):
                t0 = time.perf_counter()
                attend()
                times.append(time.perf_counter() - t0)
        attention_s = sorted(times)[3]
        bound.update(attention_kernel_ms=attention_s * 1e3,
                     kernel_bound_tokens_per_s=1 / (1 / no_memory_tok_s + attention_s))
    return bound


def bench_batch(model, tok, args) -> list[dict]:
    kw = cache_kwarg(model)
    n_new = args.batch_new_tokens
    biggest = max(args.batch_sizes)
    cubes = [kvmem.MemCube.from_ids(model, memory_ids(tok, args.batch_memory + 37 * i), progress=False)
             for i in range(biggest)]
    queries = [query_ids(tok, 24 + 3 * i)[0] for i in range(biggest)]
    gen = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=tok.eos_token_id)
    use_gqa_attention(model)

    def one(i):
        prefix = static_prefix(model, kvmem.prefill(model, cubes[i]), max_new_tokens=n_new,
                               query_len=queries[i].numel())
        ids = prefix.extend(queries[i])
        return model.generate(ids, attention_mask=torch.ones_like(ids), **{kw: prefix.cache}, **gen)[0, ids.shape[1]:]

    def batched(b):
        batch = prefill_batch(model, [[c] for c in cubes[:b]], queries[:b], max_new_tokens=n_new,
                              pad_token_id=tok.eos_token_id)
        return batch.new_tokens(model.generate(**batch.generate_kwargs(model), **gen))

    rows = []
    for b in args.batch_sizes:
        load0 = _loadavg()
        fns = {"sequential": lambda b=b: [one(i) for i in range(b)], "batched": lambda b=b: batched(b)}
        with torch.inference_mode():
            series = _common.round_robin(fns, args.batch_reps, warmup=1)
        seq = series["sequential"].first
        same = all(torch.equal(x, y) for x, y in zip(series["batched"].first, seq))
        for m, ser in series.items():
            med = sorted(ser.seconds)[len(ser.seconds) // 2]
            rows.append({"part": "batch", "batch": b, "method": m, "new_tokens_per_request": n_new,
                         "memory_tokens": [args.batch_memory + 37 * i for i in range(b)],
                         **_common.spread(ser.seconds), "tokens_per_s": b * n_new / med,
                         "same_tokens_as_sequential": same, "loadavg_before": load0, "loadavg_after": _loadavg()})
        rows[-1]["speedup_vs_sequential"] = rows[-2]["median_s"] / rows[-1]["median_s"]
    use_gqa_attention(model, enabled=False)
    return rows


def targets(rows: list[dict], n_mem: int, b: int) -> dict:
    """The issue's targets: kvmem TTFT <= 0.85x prefix reuse, decode >= 1.3x, batched B=8 >= 3x."""
    t = {}
    tt = {r["method"]: r for r in rows if r["part"] == "ttft" and r["memory_tokens"] == n_mem}
    if "kvmem_fast" in tt and "prefix_reuse" in tt:
        t["ttft_ratio_vs_prefix_reuse"] = tt["kvmem_fast"]["ratio_vs_prefix_reuse"]
        t["ttft_le_0.85x"] = t["ttft_ratio_vs_prefix_reuse"] <= 0.85
    if "kvmem_fast" in tt and "full_prefill" in tt:
        t["ttft_reduction_vs_full"] = tt["kvmem_fast"]["reduction_vs_full"]
    dd = {r["method"]: r for r in rows if r["part"] == "decode"}
    for m in ("kvmem_fast", "kvmem_fast_compiled", "kvmem_fast_compiled_frozen"):
        if m in dd and "prefix_reuse" in dd:
            t[f"decode_speedup_vs_prefix_reuse[{m}]"] = dd[m]["speedup_vs_prefix_reuse"]
            t[f"decode_ge_1.3x[{m}]"] = dd[m]["speedup_vs_prefix_reuse"] >= 1.3
    if "kvmem_fast" in dd and "fraction_of_exact_bound" in dd["kvmem_fast"]:
        t["decode_fraction_of_exact_bound[kvmem_fast]"] = dd["kvmem_fast"]["fraction_of_exact_bound"]
        t["decode_within_5pct_of_exact_bound[kvmem_fast]"] = dd["kvmem_fast"]["fraction_of_exact_bound"] >= 0.95
        t["decode_fraction_of_kernel_bound[kvmem_fast]"] = dd["kvmem_fast"].get("fraction_of_kernel_bound")
    if "kvmem_fast_kernel" in dd and "fraction_of_exact_bound" in dd["kvmem_fast_kernel"]:  # the fast recipe
        f = dd["kvmem_fast_kernel"]["fraction_of_exact_bound"]
        t["decode_fraction_of_exact_bound[kvmem_fast_kernel]"] = f
        t["decode_within_5pct_of_exact_bound[kvmem_fast_kernel]"] = f >= 0.95
        if "kvmem_fast" in dd:  # the kernel's paired A/B (same run)
            t["decode_kernel_speedup[kvmem_fast_kernel vs kvmem_fast]"] = (
                dd["kvmem_fast_kernel"]["median_tokens_per_s"] / dd["kvmem_fast"]["median_tokens_per_s"])
    if "kvmem_fast" in dd and "kvmem_fast_one_call" in dd:  # the decode split's paired A/B (same run)
        t["decode_split_speedup[kvmem_fast vs kvmem_fast_one_call]"] = (
            dd["kvmem_fast"]["median_tokens_per_s"] / dd["kvmem_fast_one_call"]["median_tokens_per_s"])
        t["decode_fraction_of_exact_bound[kvmem_fast_one_call]"] = dd["kvmem_fast_one_call"].get(
            "fraction_of_exact_bound")
    if "no_memory" in dd and "prefix_reuse" in dd:
        t["decode_bound_no_memory_vs_prefix_reuse"] = dd["no_memory"]["speedup_vs_prefix_reuse"]
    bb = [r for r in rows if r["part"] == "batch" and r["batch"] == b and r["method"] == "batched"]
    if bb:
        t[f"batch{b}_speedup_vs_sequential"] = bb[0]["speedup_vs_sequential"]
        t[f"batch{b}_ge_3x"] = bb[0]["speedup_vs_sequential"] >= 3
    return t


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        if r["part"] == "ttft":
            print(f"ttft   {r['memory_tokens']:>5} {r['method']:<20} {1e3 * r['median_s']:>9.1f} ms  "
                  f"x{r['ratio_vs_prefix_reuse'] or 0:.3f} of prefix_reuse  same={r['same_first_token_as_full']}")
        elif r["part"] == "decode":
            print(f"decode {r['memory_tokens']:>5} {r['method']:<20} {r['median_tokens_per_s']:>9.2f} tok/s "
                  f"x{r['speedup_vs_prefix_reuse'] or 0:.2f}  same={r['same_tokens_as_full']}")
        else:
            print(f"batch  B={r['batch']:<3} {r['method']:<20} {r['tokens_per_s']:>9.2f} tok/s "
                  f"{1e3 * r['median_s']:>9.0f} ms  same={r['same_tokens_as_sequential']}")


def plot(doc: dict, png: str) -> None:
    plt = _common.pyplot()
    rows = doc["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    for m in TTFT_METHODS:
        pts = sorted((r["memory_tokens"], r["median_s"]) for r in rows if r["part"] == "ttft" and r["method"] == m)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m)
    ax.set(xlabel="memory tokens (+167 query)", ylabel="TTFT median (s)", yscale="log", title="time to first token")
    if ax.lines:
        ax.legend(fontsize=7)
    dec = [r for r in rows if r["part"] == "decode"]
    axes[1].bar([r["method"] for r in dec], [r["median_tokens_per_s"] for r in dec], color="#4a7")
    axes[1].set(ylabel="tokens/s", title=f"decode after {dec[0]['memory_tokens'] if dec else '?'} memory tokens")
    axes[1].tick_params(axis="x", labelrotation=20, labelsize=7)
    bat = [r for r in rows if r["part"] == "batch"]
    for m, off in (("sequential", -0.2), ("batched", 0.2)):
        pts = [(r["batch"], r["tokens_per_s"]) for r in bat if r["method"] == m]
        if pts:
            axes[2].bar([i + off for i in range(len(pts))], [p[1] for p in pts], width=0.4, label=m)
            axes[2].set_xticks(range(len(pts)), [f"B={p[0]}" for p in pts])
    axes[2].set(ylabel="new tokens/s", title="B requests, own cubes")
    if bat:
        axes[2].legend(fontsize=7)
    _common.stamp(fig, doc["machine"])
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(png)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["ttft", "decode", "batch"], choices=["ttft", "decode", "batch"])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 6064])
    p.add_argument("--query-tokens", type=int, default=167)
    p.add_argument("--methods", nargs="+", default=list(TTFT_METHODS), choices=TTFT_METHODS)
    p.add_argument("--decode-methods", nargs="+", default=list(DECODE_METHODS),
                   choices=sorted(set(DECODE_METHODS) | set(TTFT_METHODS[1:]) - {"query_alone"}))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--full-reps", type=int, default=2, help="timed full prefills from 2,048 memory tokens")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--decode-reps", type=int, default=2)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--batch-memory", type=int, default=512, help="row i's memory: this + 37 i tokens")
    p.add_argument("--batch-new-tokens", type=int, default=32)
    p.add_argument("--batch-reps", type=int, default=3)
    p.add_argument("--out", default=None, help="default bench/results/ttft_fast_cpu.json")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 1 rep, no files unless --out")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.query_tokens, args.new_tokens = [64, 128], 16, 8
        args.reps = args.full_reps = args.decode_reps = args.batch_reps = 1
        args.batch_sizes, args.batch_memory, args.batch_new_tokens = [1, 3], 40, 4
    if any(m in KERNEL for m in args.decode_methods) and "decode" in args.parts:
        from kvmem.kernels import cpu_decode

        try:
            cpu_decode.build()
        except kvmem.CubeError as exc:  # no compiler or no AVX-512 here: the other methods still run
            print(f"left out {sorted(KERNEL)}: {exc}")
            args.decode_methods = [m for m in args.decode_methods if m not in KERNEL]
    from transformers.utils import logging
    logging.set_verbosity_error()
    model, tok = load_smollm2(verbose=False)
    q = query_ids(tok, args.query_tokens)
    facts = _common.machine_facts(model=model, loadavg_start=_loadavg())
    rows = []
    if "ttft" in args.parts:
        for n in args.lengths:
            rows += bench_ttft(model, tok, n, q, args)
            print_rows([r for r in rows if r["part"] == "ttft" and r["memory_tokens"] == n])
    if "decode" in args.parts:
        rows += bench_decode(model, tok, max(args.lengths), q, args)
        print_rows([r for r in rows if r["part"] == "decode"])
    if "batch" in args.parts:
        rows += bench_batch(model, tok, args)
        print_rows([r for r in rows if r["part"] == "batch"])
    t = targets(rows, max(args.lengths), max(args.batch_sizes))
    print(t)
    facts["loadavg_end"] = _loadavg()
    out = args.out or (None if args.quick else _common.ROOT / "bench" / "results" / "ttft_fast_cpu.json")
    if out:
        _common.write_results({"machine": facts, "args": vars(args), "targets": t, "rows": rows}, out, plot=plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
