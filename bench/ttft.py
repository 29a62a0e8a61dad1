"""TTFT benchmark: full prefill vs transformers' prefix reuse vs kvmem cubes (disk / CPU memory / device).

One process, one model (SmolLM2-135M-Instruct or Gemma 3, float32), medians after warm-up with p10/p90 and
min/max. TTFT = from the call with the prompt ids in hand (cube in its tier) to the first new token id: one forward
over the tokens that still need computing, then argmax of the last logits (device synchronised, see kvmem.timing).

    .venv/bin/python bench/ttft.py                 # the full run (~12 min on 2 quiet CPU cores)
    .venv/bin/python bench/ttft.py --model gemma3  # the same with Gemma 3 -> results/ttft_cpu_gemma3.json
    .venv/bin/python bench/ttft.py --quick         # smoke run, under a minute; writes nothing unless --out is given

The machine may be shared: before each timed sample the script waits (up to --quiet-wait s) until other processes
use under 0.1 cores, and redoes a sample during which they used more than --busy cores (up to --retries times).
Every sample records the other processes' CPU use, and the discarded samples are kept in the JSON.

Methods (each timed region in brackets):
    full_prefill       [forward(memory + query)]
    prefix_reuse       [deepcopy(prefix DynamicCache); forward(query)]   transformers' documented recipe
    kvmem_disk         [MemCube.load(path); kvmem.prefill; forward(query)]   file in the OS page cache
    kvmem_disk_cold    same, after posix_fadvise(DONTNEED) evicted the file from the page cache (when it works)
    kvmem_cpu          [kvmem.prefill(cube on CPU); forward(query)]
    kvmem_device       [kvmem.prefill(cube already on the model's device); forward(query)]  == kvmem_cpu on CPU
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # bench/_common.py, also when imported from elsewhere

import kvmem  # noqa: E402
import _common  # noqa: E402
from kvmem.model.cache import cache_kwarg, output_cache  # noqa: E402
from workloads import memory_ids, query_ids  # noqa: E402

METHODS = ("full_prefill", "prefix_reuse", "kvmem_disk", "kvmem_disk_cold", "kvmem_cpu", "kvmem_device")


# ---------------------------------------------------------------- the page cache
def drop_page_cache(path: Path) -> None:
    """Ask the kernel to evict ``path`` from the page cache (a hint: check with `resident_bytes`)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_bytes(path: Path) -> int | None:
    """Bytes of ``path`` in the page cache per util-linux `fincore`, or None if it is not available."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                             capture_output=True, text=True, check=True).stdout.split()
        return int(out[0])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------- one memory length
def first_token(logits: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(first new token id on the host, the logits [vocab]): the argmax is part of every timed region."""
    return int(logits.argmax()), logits


def bench_length(model, tok, device, n_mem: int, q: torch.Tensor, args, quiet: _common.Quiet,
                 workdir: Path) -> tuple[list[dict], dict]:
    kw = cache_kwarg(model)
    from transformers import DynamicCache

    mem = memory_ids(tok, n_mem).to(device)
    q = q.to(device)
    full = torch.cat([mem, q], dim=-1)

    # Untimed setup: the prefix cache of the documented recipe, and the cube (built, saved, loaded, moved).
    with torch.inference_mode():
        prefix_cache = output_cache(model(input_ids=mem, use_cache=True, logits_to_keep=1,
                                          **{kw: DynamicCache(config=model.config)}))
    cube = kvmem.MemCube.from_ids(model, mem.cpu(), progress=False)
    path = workdir / f"memory-{n_mem}.safetensors"
    cube.save(path)
    # The cube in CPU memory is the built one: MemCube.load returns tensors backed by an mmap of the file, which
    # would keep the file's pages mapped (then the cold-disk row could not evict them).
    cube_cpu = cube
    cube_dev = cube_cpu.to(device)

    def forward(ids, cache=None):
        extra = {kw: cache} if cache is not None else {}
        return model(input_ids=ids, use_cache=True, logits_to_keep=1, **extra).logits[0, -1]

    def run_disk():
        return first_token(forward(q, kvmem.prefill(model, kvmem.MemCube.load(path)).cache))

    fns = {"full_prefill": lambda: first_token(forward(full)),
           "prefix_reuse": lambda: first_token(forward(q, copy.deepcopy(prefix_cache))),
           "kvmem_disk": run_disk, "kvmem_disk_cold": run_disk,
           "kvmem_cpu": lambda: first_token(forward(q, kvmem.prefill(model, cube_cpu).cache)),
           "kvmem_device": lambda: first_token(forward(q, kvmem.prefill(model, cube_dev).cache))}
    fns = {m: fns[m] for m in METHODS if m in args.methods}
    long = n_mem >= args.long_from
    reps = {m: args.full_reps if m == "full_prefill" and long else args.reps for m in fns}
    warm = {m: args.full_warmup if m == "full_prefill" and long else args.warmup for m in fns}

    resident_before_load = []

    def before(m):  # untimed, before every call: the cold row starts from an evicted file
        if m == "kvmem_disk_cold":
            drop_page_cache(path)
            resident_before_load.append(resident_bytes(path))

    waited0 = quiet.waited_s
    with torch.inference_mode():
        series = _common.round_robin(fns, reps, warmup=warm, device=device, quiet=quiet, before=before)

    ref_token, ref_logits = series["full_prefill"].first if "full_prefill" in series else (None, None)
    rows = []
    for m, s in series.items():
        token, logits = s.first  # the first call's output (a warm-up): the correctness check
        logits = logits.float().cpu()
        row = {"memory_tokens": n_mem, "query_tokens": q.shape[1], "method": m, "device": str(device),
               "reps": reps[m], "warmup": warm[m], **_common.spread(s.seconds),
               "other_processes_cpu_cores": [None if x is None else x[0] for x in s.other],
               "other_niced_processes_cpu_cores": [None if x is None else x[1] for x in s.other],
               "samples_with_other_load": s.busy(args.busy),
               "discarded_disturbed_samples_s": s.discarded_s,
               "first_token": token,
               "same_first_token_as_full": None if ref_token is None else token == ref_token,
               "max_abs_logit_diff_vs_full": None if ref_logits is None else float((logits - ref_logits.float().cpu()).abs().max())}
        if m.startswith("kvmem_disk"):
            row["cube_file_bytes"] = path.stat().st_size
        if m == "kvmem_disk_cold":
            row["page_cache_resident_bytes_before_load"] = resident_before_load
        if m == "kvmem_device" and device.type == "cpu":
            row["note"] = "on CPU the model's device is the CPU: same tier as kvmem_cpu"
        rows.append(row)
    base = {r["method"]: r["median_s"] for r in rows}
    for r in rows:
        r["reduction_vs_full"] = 1 - r["median_s"] / base["full_prefill"] if "full_prefill" in base else None
        r["ratio_vs_prefix_reuse"] = r["median_s"] / base["prefix_reuse"] if "prefix_reuse" in base else None

    print(f"(waited {quiet.waited_s - waited0:.0f} s in total for other processes to go quiet)", flush=True)
    breakdown = profile_kvmem(model, path, cube_cpu, prefix_cache, q, forward, device, args.reps,
                              args.quiet_wait) if args.breakdown and n_mem == max(args.lengths) else {}
    path.unlink(missing_ok=True)
    return rows, breakdown


def profile_kvmem(model, path, cube_cpu, prefix_cache, q, forward, device, reps: int, quiet_wait: float) -> dict:
    """Median seconds of each piece of the kvmem path (and the prefix-reuse copy), to see where time goes.

    Times kvmem's checksum and fingerprint functions directly; pieces missing in this kvmem are skipped.
    """
    from safetensors.torch import load_file

    pieces = {
        "safetensors_load_file": lambda: load_file(str(path), device="cpu"),
        "MemCube.load": lambda: kvmem.MemCube.load(path),
        "kvmem.prefill(cube_cpu)": lambda: kvmem.prefill(model, cube_cpu),
        "deepcopy(prefix_cache)": lambda: copy.deepcopy(prefix_cache),
        "forward(query, prefill cache)": lambda: forward(q, kvmem.prefill(model, cube_cpu).cache),
    }
    try:
        from kvmem.cubes.format import checksum
        tensors = load_file(str(path), device="cpu")
        pieces["checksum(xxh3 over tensors)"] = lambda: checksum("f", "1", "{}", tensors)
    except Exception as exc:  # noqa: BLE001  (modules may move; the breakdown is best effort)
        print(f"breakdown: no checksum timing ({exc})")
    try:
        from kvmem.cubes.fingerprint import fingerprint_fields
        pieces["fingerprint_fields(model)"] = lambda: fingerprint_fields(model)
    except Exception as exc:  # noqa: BLE001
        print(f"breakdown: no fingerprint timing ({exc})")
    quiet = _common.Quiet(wait_s=quiet_wait)
    with torch.inference_mode():
        return {name: statistics.median(_common.repeat(lambda i, fn=fn: fn(), reps, warmup=1, device=device,
                                                       quiet=quiet).seconds)
                for name, fn in pieces.items()}


# ---------------------------------------------------------------- report
def print_table(rows: list[dict]) -> None:
    """busy = timed samples during which other processes used the CPU (see --busy)."""
    head = f"{'memory':>6} {'method':<16} {'median ms':>10} {'p10..p90 ms':>19} {'n':>2} {'vs full':>8} " \
           f"{'/prefix':>7} {'same tok':>8} {'max|dlogit|':>11} {'busy':>4}"
    print(head)
    print("-" * len(head))
    for r in rows:
        red = f"{100 * r['reduction_vs_full']:.1f}%" if r["reduction_vs_full"] is not None else "-"
        rat = f"{r['ratio_vs_prefix_reuse']:.3f}" if r["ratio_vs_prefix_reuse"] is not None else "-"
        diff = r["max_abs_logit_diff_vs_full"]
        print(f"{r['memory_tokens']:>6} {r['method']:<16} {1e3 * r['median_s']:>10.1f} "
              f"{1e3 * r['p10_s']:>9.1f}..{1e3 * r['p90_s']:<9.1f} {r['reps']:>2} {red:>8} {rat:>7} "
              f"{str(r['same_first_token_as_full']):>8} {'-' if diff is None else f'{diff:.2e}':>11} "
              f"{r['samples_with_other_load']:>4}")


def check_targets(rows: list[dict], length: int) -> dict:
    """The issue's targets at the longest memory length."""
    by = {r["method"]: r for r in rows if r["memory_tokens"] == length}
    t = {"memory_tokens": length}
    if "kvmem_disk" in by and "full_prefill" in by:
        t["disk_reduction_vs_full"] = by["kvmem_disk"]["reduction_vs_full"]
        t["disk_reduction_ge_95pct"] = by["kvmem_disk"]["reduction_vs_full"] >= 0.95
    if "kvmem_disk" in by and "prefix_reuse" in by:
        t["disk_ratio_vs_prefix_reuse"] = by["kvmem_disk"]["ratio_vs_prefix_reuse"]
        t["disk_within_1.10x_prefix_reuse"] = by["kvmem_disk"]["ratio_vs_prefix_reuse"] <= 1.10
    if "kvmem_cpu" in by and "prefix_reuse" in by:
        t["cpu_ratio_vs_prefix_reuse"] = by["kvmem_cpu"]["ratio_vs_prefix_reuse"]
        t["cpu_within_1.03x_prefix_reuse"] = by["kvmem_cpu"]["ratio_vs_prefix_reuse"] <= 1.03
    return t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_model_argument(p)
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="memory lengths in tokens (default 512 1024 2048 4096 6064)")
    p.add_argument("--query-tokens", type=int, default=None, help="default 167")
    p.add_argument("--reps", type=int, default=7, help="timed reps of every method but long full prefills")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--full-reps", type=int, default=3, help="timed reps of full prefill from --long-from tokens")
    p.add_argument("--full-warmup", type=int, default=1)
    p.add_argument("--long-from", type=int, default=2048)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                   help="skip the per-piece timing of the kvmem path (done at the longest length)")
    p.add_argument("--quiet-wait", type=float, default=10.0,
                   help="before each timed sample, wait up to this many seconds for other processes to go quiet")
    p.add_argument("--busy", type=float, default=0.25,
                   help="count a sample as disturbed when other processes used more than this many cores")
    p.add_argument("--retries", type=int, default=2,
                   help="redo a disturbed sample up to this many times (the disturbed times are kept apart)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=None,
                   help="JSON path (default bench/results/ttft_<device>.json; ttft_<device>_<model>.json for others)")
    p.add_argument("--no-plot", dest="plot", action="store_false")
    p.add_argument("--quick", action="store_true", help="smoke run: short lengths, 1 rep, no files unless --out")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.query_tokens = args.lengths or [64, 128], args.query_tokens or 16
        args.reps = args.full_reps = 1
        args.warmup = args.full_warmup = 1
    args.lengths = args.lengths or [512, 1024, 2048, 4096, 6064]
    args.query_tokens = args.query_tokens or 167
    if "full_prefill" not in args.methods or "prefix_reuse" not in args.methods:
        print("note: without full_prefill / prefix_reuse there is nothing to compare against", flush=True)

    # a kill (SIGTERM) unwinds like Ctrl-C, so the scratch folder with the cube files is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tok = _common.load_model(args.model, device=device, verbose=True)
    facts = _common.machine_facts(model=model, model_name=_common.MODELS[args.model][1], device=str(device))
    print(json.dumps({k: v for k, v in facts.items() if k != "git_dirty_paths"}), flush=True)
    q = query_ids(tok, args.query_tokens)
    quiet = _common.Quiet(wait_s=args.quiet_wait, busy=args.busy, retries=args.retries)

    out = args.out or (None if args.quick else _common.result_path("ttft", device=device.type, model=args.model))

    def write(complete: bool) -> None:  # after every length, so an interrupted run keeps what it measured
        if not out:
            return
        facts["bench_wall_s"] = time.perf_counter() - t_start
        facts["loadavg_end"] = _common.loadavg()
        doc = {"complete": complete, "machine": facts, "args": dict(vars(args)),
               "targets": check_targets(rows, max(r["memory_tokens"] for r in rows)) if rows else {},
               "breakdown_s": breakdowns, "rows": rows}
        from plot import plot  # bench/plot.py
        _common.write_results(doc, out, plot if complete and args.plot else None, quiet=not complete)

    t_start = time.perf_counter()
    rows, breakdowns = [], {}
    with tempfile.TemporaryDirectory(prefix="kvmem-bench-", dir=ROOT / "bench") as work:
        for n in args.lengths:
            t0 = time.perf_counter()
            r, b = bench_length(model, tok, device, n, q, args, quiet, Path(work))
            rows += r
            if b:
                breakdowns[str(n)] = b
            print(f"\n== memory {n} tokens + query {args.query_tokens} ({time.perf_counter() - t0:.0f} s)")
            print_table(r)
            if b:
                print("kvmem path breakdown (median ms): " + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in b.items()))
            sys.stdout.flush()
            write(complete=False)

    print("\n== all lengths")
    print_table(rows)
    print("\ntargets at", json.dumps(check_targets(rows, max(args.lengths))))
    write(complete=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
