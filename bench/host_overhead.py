"""Issue 20's bench: what `kvmem.prefill` costs the host per request, and TTFT where the forward is cheap.

    .venv/bin/python bench/host_overhead.py            # -> bench/results/host_overhead_cpu.json / .png
    .venv/bin/python bench/host_overhead.py --quick    # smoke run (fewer reps), writes nothing unless --out

Two parts, each in one process, methods interleaved round robin (`_common.round_robin`), medians after warm-up,
the load average recorded with every row (the machine may be shared):
  proxy   the CPU stand-in for a GPU, where the query forward is cheap and host work shows: a random 32-layer
          llama with tiny widths (hidden 64, 4 heads / 2 KV heads), 1,024-token memory, 8-token query, one thread.
            deepcopy_setup   copy.deepcopy of the memory's prefilled DynamicCache (transformers' prefix reuse)
            kvmem_setup      kvmem.prefill(model, cube)
            deepcopy_ttft    deepcopy + forward(query) + argmax
            kvmem_ttft       kvmem.prefill + forward(query) + argmax (a repeated request on the cube: the
                             query forward writes after the cube's KV in the model's prefix pool, no copy)
            kvmem_ttft_pool_empty   the same with the prefix pool dropped first (the first request on a cube,
                             or one while another request's cache is alive: the forward copies the memory once)
          Targets (issue 20): kvmem_ttft <= 0.9x deepcopy_ttft; kvmem_setup within 0.5 ms of deepcopy_setup.
  host    SmolLM2-135M (30 layers) on the CPU: prefill's host work by part, per request once the model's facts
          are resolved (kvmem.model.resolve: the one-pass watch), round robin on a model that does not change;
          then, in a second round, what a change costs once: prefill right after `mark_changed`, and the full
          check alone (every weight's identity and sampled values; the digests of changed weights).
          Target: prefill <= 1 ms.
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import kvmem  # noqa: E402
import _common  # noqa: E402
from kvmem.cubes.fingerprint import fingerprint_fields, weights_digest  # noqa: E402
from kvmem.model.cache import free_prefix_pool, new_cache  # noqa: E402
from kvmem.model.resolve import resolve  # noqa: E402
from kvmem.model.watch import mark_changed, watch  # noqa: E402

PROXY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             vocab_size=1000, num_hidden_layers=32, max_position_embeddings=4096)


def _proxy_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**PROXY)).eval()


def _on_cpu(fn, cpu: list, faults: list):
    """``fn`` recording each call's CPU time (this thread's: what other processes' load does not add, unlike the
    wall clock the medians are taken on) and minor page faults (memory the call touched fresh)."""
    def call():
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.thread_time()
        out = fn()
        cpu.append(time.thread_time() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        return out
    return call


def _rows(part: str, series: dict, reps: int, warmup: int, **extra) -> list[dict]:
    return [{"part": part, "method": m, "reps": reps, "warmup": warmup, **extra,
             **_common.spread(s.seconds, unit="ms"), "loadavg": _common.loadavg()} for m, s in series.items()]


def bench_proxy(args) -> list[dict]:
    """kvmem.prefill (+ the query forward) against deepcopy of a prefilled cache (+ the same forward), one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _proxy_model()
        kw = resolve(model).cache_kwarg
        mem = torch.randint(0, PROXY["vocab_size"], (1, args.proxy_memory), generator=torch.Generator().manual_seed(1))
        q = torch.randint(0, PROXY["vocab_size"], (1, args.proxy_query), generator=torch.Generator().manual_seed(2))
        with torch.inference_mode():
            from transformers import DynamicCache

            prefilled = model(input_ids=mem, use_cache=True, **{kw: DynamicCache(config=model.config)})
            prefilled = getattr(prefilled, "cache", None) or prefilled.past_key_values
        cube = kvmem.MemCube.from_ids(model, mem, progress=False)

        def first(cache):
            return int(model(input_ids=q, logits_to_keep=1, **{kw: cache}).logits[0, -1].argmax())

        fns = {"deepcopy_setup": lambda: copy.deepcopy(prefilled),
               "kvmem_setup": lambda: kvmem.prefill(model, cube),
               "deepcopy_ttft": lambda: first(copy.deepcopy(prefilled)),
               "kvmem_ttft": lambda: first(kvmem.prefill(model, cube).cache),
               "kvmem_ttft_pool_empty": lambda: (free_prefix_pool(model), first(kvmem.prefill(model, cube).cache))[1]}
        cpu, faults = {m: [] for m in fns}, {m: [] for m in fns}
        with torch.inference_mode():
            series = _common.round_robin({m: _on_cpu(fn, cpu[m], faults[m]) for m, fn in fns.items()}, args.reps,
                                         warmup=args.warmup)
        same = series["kvmem_ttft"].first == series["deepcopy_ttft"].first
        rows = _rows("proxy", series, args.reps, args.warmup, memory_tokens=args.proxy_memory,
                     query_tokens=args.proxy_query, layers=PROXY["num_hidden_layers"], threads=1,
                     same_first_token=same)
        for r in rows:  # the timed calls' CPU time and page faults (the warm-up calls' dropped)
            r.update(_common.spread(cpu[r["method"]][args.warmup:], unit="ms", prefix="cpu_"),
                     minor_page_faults_median=statistics.median(faults[r["method"]][args.warmup:]))
    finally:
        torch.set_num_threads(threads)
    med = {r["method"]: r["median_ms"] for r in rows}
    cpu_med = {r["method"]: r["cpu_median_ms"] for r in rows}
    summary = {"part": "proxy_summary", "ttft_ratio_kvmem_vs_deepcopy": med["kvmem_ttft"] / med["deepcopy_ttft"],
               "setup_diff_ms": med["kvmem_setup"] - med["deepcopy_setup"], "target_ttft_ratio": 0.9,
               "cpu_ttft_ratio_kvmem_vs_deepcopy": cpu_med["kvmem_ttft"] / cpu_med["deepcopy_ttft"],
               "target_setup_diff_ms": 0.5, "loadavg": _common.loadavg()}
    summary["met"] = summary["ttft_ratio_kvmem_vs_deepcopy"] <= 0.9 and summary["setup_diff_ms"] <= 0.5
    return rows + [summary]


def bench_host(args) -> list[dict]:
    """SmolLM2: prefill's host work per request, by part, and the full check a changed model pays once."""
    from kvmem.demo.models import load_smollm2

    model, tok = load_smollm2()
    ids = tok("Alice lives in Oslo and works at the harbour. " * 200, return_tensors="pt").input_ids[:, :args.memory]
    cube = kvmem.MemCube.from_ids(model, ids, progress=False)
    kv = [(k[None], v[None]) for k, v in cube.kv]
    facts = resolve(model)

    def full_check():  # what a request after a change pays: a new snapshot, then the per-weight check
        mark_changed(model)
        fingerprint_fields(model)

    # Two rounds: the per-request parts on a model that does not change, then what a change costs. In one round
    # the full check's mark_changed started a new model generation before every prefill, which then re-made the
    # generation's memo (cache template, per-cube checks): that is the first request after a change, not a request.
    steady = {"prefill": lambda: kvmem.prefill(model, cube),
              "watch_check": lambda: watch(model).unchanged(),
              "resolve_facts": lambda: resolve(model),
              "fingerprint_fields": lambda: fingerprint_fields(model, facts=resolve(model)),
              "new_cache": lambda: new_cache(model, kv, facts=resolve(model))}
    changed = {"prefill_after_a_change": lambda: (mark_changed(model), kvmem.prefill(model, cube)),
               "full_check_after_a_change": full_check,
               "weights_digest_per_weight_check": lambda: weights_digest(model)}
    with torch.inference_mode():
        series = _common.round_robin(steady, args.reps, warmup=args.warmup)
        series.update(_common.round_robin(changed, args.reps, warmup=args.warmup))
    del facts
    return _rows("host", series, args.reps, args.warmup, memory_tokens=ids.shape[1], model="SmolLM2-135M-Instruct",
                 layers=model.config.num_hidden_layers, threads=torch.get_num_threads(), target_prefill_ms=1.0)


def plot(doc: dict, png: str) -> None:
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    proxy = [r for r in doc["rows"] if r["part"] == "proxy"]
    if proxy:
        ax = axes[0]
        names = [r["method"] for r in proxy]
        ax.bar(names, [r["median_ms"] for r in proxy], color=["#888", "#4a7"] * 2,
               yerr=[[r["median_ms"] - r["p10_ms"] for r in proxy], [r["p90_ms"] - r["median_ms"] for r in proxy]])
        if all("cpu_median_ms" in r for r in proxy):
            ax.scatter(names, [r["cpu_median_ms"] for r in proxy], marker="_", s=600, color="k", zorder=3,
                       label="CPU time (median)")
            ax.legend(fontsize=7)
        ax.set_ylabel("ms (median, p10-p90)")
        load = proxy[0].get("loadavg") or [float("nan")]
        ax.set_title(f"CPU proxy: {PROXY['num_hidden_layers']}-layer tiny llama, 1 thread (load {load[0]:.1f})",
                     fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=20)
    host = [r for r in doc["rows"] if r["part"] == "host"]
    if host:
        ax = axes[1]
        ax.barh([r["method"] for r in host], [r["median_ms"] for r in host], color="#47a")
        ax.axvline(1.0, color="#a44", ls="--", lw=1, label="target: prefill <= 1 ms")
        ax.set_xscale("log")
        ax.set_xlabel("ms per call (median, log)")
        ax.set_title("SmolLM2 on the CPU: prefill's host work by part", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(fontsize=7)
    _common.save_figure(fig, png, doc["machine"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few reps, writes nothing unless --out")
    p.add_argument("--parts", nargs="+", default=["proxy", "host"], choices=["proxy", "host"])
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--memory", type=int, default=1024, help="SmolLM2 memory tokens")
    p.add_argument("--proxy-memory", type=int, default=1024)
    p.add_argument("--proxy-query", type=int, default=8)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.reps = args.reps or (5 if args.quick else 60)
    machine = _common.machine_facts()
    rows = []
    for part in args.parts:
        rows += {"proxy": bench_proxy, "host": bench_host}[part](args)
        for r in rows:
            if r.get("part") in (part, f"{part}_summary") and "median_ms" in r:
                extra = (f"  cpu {r['cpu_median_ms']:8.3f} ms  page faults {r['minor_page_faults_median']:6.0f}"
                         if "cpu_median_ms" in r else "")
                print(f"{part:6s} {r['method']:34s} {r['median_ms']:9.3f} ms{extra}", flush=True)
    summary = next((r for r in rows if r["part"] == "proxy_summary"), None)
    if summary:
        print(f"proxy: kvmem/deepcopy TTFT {summary['ttft_ratio_kvmem_vs_deepcopy']:.3f}x (CPU time "
              f"{summary['cpu_ttft_ratio_kvmem_vs_deepcopy']:.3f}x), setup {summary['setup_diff_ms']:+.3f} ms vs "
              f"deepcopy's", flush=True)
    machine["loadavg_end"] = _common.loadavg()
    doc = {"machine": machine, "rows": rows}
    out = args.out or (None if args.quick else _common.RESULTS / "host_overhead_cpu.json")
    if out:
        _common.write_results(doc, out, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
