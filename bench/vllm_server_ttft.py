"""TTFT in vLLM's OpenAI server with kvmem's connector: a cold cube against a warm prefix-cache hit, per CPU layout.

What a client of ``python -m vllm.entrypoints.openai.api_server`` waits for (SmolLM2-135M, float32, CPU; the wall
time of one ``/v1/completions`` call with ``max_tokens=1``, HTTP included), on prompts of ``memory + 16 query
tokens`` (token ids, greedy):
    prefix cache (warm)   vLLM's own automatic prefix caching, the memory's blocks already cached under the call's
                          cache salt (the best case, what a cube load is measured against)
    kvmem cube (cold)     the cube named in ``kv_transfer_params``, a fresh cache salt per call (vLLM's prefix cache
                          cannot hold the memory, as after a restart or on a new replica); the connector keeps no
                          cube between requests, so every call opens the cube file and its loader reads, verifies
                          and writes each layer while earlier layers compute (the file in the OS page cache)
    full prefill          a fresh cache salt and no cube: vLLM computes the whole prompt
The cube is saved by the server itself (``{"kvmem": {"save": ...}}``, with its key blocks), before timing.

Run it with the vLLM venv's Python (``.venv-vllm/bin/python bench/vllm_server_ttft.py``, ~10 min here).
Unlike bench/vllm_ttft.py (an engine in the bench's own process, which vLLM does not bind to cores), this runs the
server as a user does: vLLM's CPU worker is its own process whose OpenMP threads vLLM binds to cores
(``VLLM_CPU_OMP_THREADS_BIND``). One server per layout (``--layouts``), each ``BIND:LOADER``: ``BIND`` is
``VLLM_CPU_OMP_THREADS_BIND`` (``auto``: vLLM's default, every core of this machine where it has too few to spare
one; ``0``: the forward pass on core 0, the rest left to other work, as vLLM's auto binding leaves a core per rank
and one more for a KV connector on a machine with cores to spare) and ``LOADER`` the connector's ``loader_cpus``
(``auto``: the worker's CPUs no forward thread is bound to; ``inherit``: where the thread starting the loader runs,
the forward pass's first core: kvmem before ``loader_cpus``). Warm and cold calls alternate after a warm-up;
medians with p10..p90; every ratio compares calls of one server.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "vllm"))
from _common import RESULTS, loadavg, machine_facts, pyplot, save_figure, spread, write_results  # noqa: E402
from vllm_helpers import Server  # noqa: E402
from vllm_ttft import settle_fetch, start_redis  # noqa: E402

TARGET = 1.2  # issue 24: a cold cube within 1.2x of a warm prefix-cache hit


def timed(server, ids, *, salt: str, kvmem: dict | None = None) -> tuple[float, int, str]:
    """(seconds, cached prompt tokens, the token's text) of one greedy one-token completion on ``server``."""
    body = {"prompt": list(ids), "max_tokens": 1, "cache_salt": salt}
    if kvmem:
        body["kv_transfer_params"] = {"kvmem": kvmem}
    t0 = time.perf_counter()
    out = server.complete(body)
    dt = time.perf_counter() - t0
    cached = ((out.get("usage") or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return dt, cached, out["choices"][0]["text"]


def run_layout(ckpt: str, work: Path, layout: str, args, redis_url: str | None) -> list[dict]:
    bind, loader, source = (layout.split(":") + ["disk"])[:3]
    folder = work / layout.replace(":", "-")
    folder.mkdir()
    cache = folder / "replica"  # a Redis store's local copies (deleted after every cold call: a new replica)
    where = {"folder": str(folder)} if source == "disk" else \
        {"store": f"{redis_url}?prefix=srv{uuid.uuid4().hex[:8]}&cache={cache}"}
    # the vLLM tests' launcher: python -m vllm.entrypoints.openai.api_server on a free 127.0.0.1 port
    server = Server(ckpt, {**where, "auto": False, "loader_cpus": loader, "read_threads": args.read_threads},
                    folder / "server.log",
                    max_model_len=args.tokens + 128, role="kv_both", env={"VLLM_CPU_OMP_THREADS_BIND": bind})
    try:
        server.wait_ready()
        rng = random.Random(0)
        memory = [rng.randrange(100, 40000) for _ in range(args.tokens)]
        timed(server, memory, salt="save", kvmem={"save": "memory", "tokens": args.tokens})
        deadline = time.time() + 300
        while "saved cube 'memory'" not in server.text():  # logged once the cube and its key blocks are written
            if time.time() > deadline:
                raise SystemExit(f"the server did not save the cube:\n{server.text()[-3000:]}")
            time.sleep(0.5)
        samples = {"prefix cache (warm)": [], "kvmem cube (cold)": [], "full prefill": []}
        cached, same = {k: set() for k in samples}, {k: [] for k in samples}
        for i in range(args.warmup + args.reps):
            prompt = memory + [rng.randrange(100, 40000) for _ in range(16)]
            timed(server, memory + [5] * 16, salt="warm")  # the warm blocks stay the most recently used
            got = {"prefix cache (warm)": timed(server, prompt, salt="warm"),
                   "kvmem cube (cold)": timed(server, prompt, salt=f"cold{i}", kvmem={"cubes": ["memory"]})}
            if source == "redis" and not settle_fetch(cache):  # the replica's fetch ends, its copies go
                raise SystemExit(f"the replica fetched no local copy of the cube:\n{server.text()[-3000:]}")
            if args.warmup <= i < args.warmup + args.full_reps:
                got["full prefill"] = timed(server, prompt, salt=f"full{i}")
            for k, (dt, hit, first) in got.items():
                if "full prefill" in got:  # the same prompt: the same greedy token as vLLM's full prefill?
                    same[k].append(first == got["full prefill"][2])
                if i >= args.warmup:
                    samples[k].append(dt)
                    cached[k].add(hit)
        pid = next((line.split("pid=")[1].split(")")[0] for line in server.text().splitlines()
                    if line.startswith("(Worker pid=")), None)
        said = next((line.split("kvmem: ", 1)[1] for line in server.text().splitlines()
                      if "cube loads and saves run" in line), None)
        rows = []
        for k, xs in samples.items():
            if not xs:
                continue
            rows.append({"layout": layout, "omp_bind": bind, "loader_cpus": loader, "source": source,
                         "read_threads": args.read_threads, "method": k,
                         "tokens": args.tokens, "cached_tokens": sorted(cached[k]), **spread(xs, unit="ms"),
                         "first_tokens_equal_full_prefill": f"{sum(same[k])} of {len(same[k])}",
                         "worker_pid": pid, "connector_log": said})
        loads = [line.split("kvmem: ", 1)[1] for line in server.text().splitlines() if "cube load(s)" in line]
        rows[-1]["loader_log_tail"] = loads[-3:]
        return rows
    finally:
        server.stop()


def summarize(rows) -> dict:
    out = {}
    for layout in dict.fromkeys(r["layout"] for r in rows):
        at = {r["method"]: r["median_ms"] for r in rows if r["layout"] == layout}
        warm, cold, full = at.get("prefix cache (warm)"), at.get("kvmem cube (cold)"), at.get("full prefill")
        out[layout] = {"warm_ms": warm, "cold_ms": cold, "full_ms": full,
                       "cold / warm": round(cold / warm, 3),
                       f"target: cold within {TARGET}x of warm": cold <= TARGET * warm,
                       "cold below full prefill": None if full is None else round(1 - cold / full, 3)}
    return out


def plot(doc: dict, png: str) -> None:
    plt = pyplot()
    rows, facts = doc["rows"], doc["machine"]
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    methods = ("prefix cache (warm)", "kvmem cube (cold)")
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.38
    for j, m in enumerate(methods):
        xs, ys, lo, hi = [], [], [], []
        for i, layout in enumerate(layouts):
            r = next((r for r in rows if r["layout"] == layout and r["method"] == m), None)
            if r is None:
                continue
            xs.append(i + (j - 0.5) * width)
            ys.append(r["median_ms"])
            lo.append(r["median_ms"] - r["p10_ms"])
            hi.append(r["p90_ms"] - r["median_ms"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=m, color=("#999", "#2a7")[j])
    for i, layout in enumerate(layouts):
        s = doc["summary"][layout]
        ax.text(i, max(s["warm_ms"], s["cold_ms"]) * 1.04, f"{s['cold / warm']:.2f}x", ha="center", fontsize=9)
    ax.set_xticks(range(len(layouts)))
    ax.set_xticklabels([f"OpenMP bind {layout.split(':')[0]}\nloader_cpus {layout.split(':')[1]}"
                        for layout in layouts], fontsize=8)
    ax.set_ylabel("TTFT, ms (median, p10..p90)")
    ax.set_title(f"vLLM {facts.get('vllm')} OpenAI server, {facts.get('cpu_cores')} CPU cores, "
                 f"{doc['rows'][0]['tokens']} memory tokens: cold cube vs warm prefix hit", fontsize=9)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
    ax.legend(fontsize=8, loc="upper left")
    save_figure(fig, png, facts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="memory tokens (a block multiple)")
    parser.add_argument("--layouts", nargs="+", default=["auto:auto", "0:inherit", "0:auto", "auto:auto:redis",
                                                          "0:auto:redis"],
                        help="BIND:LOADER[:SOURCE] (SOURCE disk, the default, or redis; see the module docstring)")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--full-reps", type=int, default=2, help="full prefills per layout (each costs seconds)")
    parser.add_argument("--read-threads", type=int, default=1,
                        help="the connector's read_threads (reader threads a cold load's bytes are read on; default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1,024 tokens, layouts auto:auto and 0:auto, 2 reps; writes nothing unless --out")
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/vllm_server_ttft_cpu.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.layouts, args.reps, args.warmup, args.full_reps = 1024, ["auto:auto", "0:auto"], 2, 1, 1
        if args.out is None:
            args.out = str(Path(tempfile.mkdtemp(prefix="kvmem-bench-server-quick-")) / "vllm_server_ttft.json")
    args.out = args.out or str(RESULTS / "vllm_server_ttft_cpu.json")
    for layout in args.layouts:
        if layout.count(":") not in (1, 2) or layout.count(":") == 2 and not layout.endswith((":disk", ":redis")):
            parser.error(f"--layouts: {layout!r} is not BIND:LOADER[:disk|redis] (e.g. 0:auto, 0:auto:redis)")
    from kvmem.demo.models import smollm2_checkpoint

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB: the warm memory, a cold one and a full prefill
    ckpt = str(smollm2_checkpoint())
    facts = machine_facts(packages=("torch", "transformers", "vllm", "kvmem"))
    work = Path(tempfile.mkdtemp(prefix="kvmem-bench-server-"))
    rows, redis_proc, redis_url = [], None, None
    try:
        if any(layout.endswith(":redis") for layout in args.layouts):
            redis_proc, redis_url = start_redis(work)
        for layout in args.layouts:
            rows += run_layout(ckpt, work, layout, args, redis_url)
            print(json.dumps(summarize(rows)[layout]), flush=True)
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)  # a 4k cube and its key blocks: ~280 MB a layout
    facts["loadavg_end"] = loadavg()
    doc = {"bench": "vllm_server_ttft", "machine": facts, "rows": rows, "summary": summarize(rows),
           "how": __doc__.split("\n\n")[1]}
    print(json.dumps(doc["summary"], indent=1))
    write_results(doc, args.out, plot)


if __name__ == "__main__":
    main()
