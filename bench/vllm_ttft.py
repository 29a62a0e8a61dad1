"""TTFT in vLLM with kvmem's KV connector at 2k, 4k and ~8k memory tokens (SmolLM2-135M, float32, CPU).

Methods, per memory length, on prompts of ``memory + query`` (token ids, greedy, ``max_tokens=1``):
    full prefill          vLLM computes the whole prompt (a fresh cache salt per call: its prefix cache cannot hit)
    prefix cache (warm)   vLLM's own automatic prefix caching, the prompt's blocks already cached (the best case)
    kvmem, local disk     the cube named per request, read by KvmemConnector from a local cube folder, its layers
                          written by a loader thread while earlier layers compute (``layerwise``, the default);
                          where the backend stores a part as rows (vLLM CPU: float32 values) it is read from the
                          file straight into the request's blocks; keys, which vLLM's CPU backend keeps as columns,
                          are read straight into the blocks too from the cube's key-blocks sidecar
                          (`kvmem.integrations.key_blocks`, written for the engine's block size before timing)
    kvmem, disk, 2 read threads  A/B in the same engine: the same load read by two threads, each a layer ahead
                          (``"read_threads": 2``; the default is 1)
    kvmem, disk, keys copied  A/B in the same engine: the same load without the sidecar (keys read into a buffer
                          and copied transposed into the blocks: a cube without a sidecar)
    kvmem, disk, op writes  A/B in the same engine: the same load with every layer written through the backend's
                          own ``do_kv_cache_update`` op from a read buffer (the writer before plain copies, no sidecar)
    kvmem, disk, all layers first   the same with ``"layerwise": false``: every layer written before the forward
    kvmem, Redis          the same, from a Redis store, the local copy deleted before every call (a new replica:
                          the copy the replica fetches once a request is done, `settle_fetch`, is waited for and
                          deleted, so no fetch runs during a timed call); keys read straight into the blocks from
                          the cube's key blocks in Redis
                          (`kvmem.integrations.key_blocks.store_key_blocks`, set before timing, as a server saving the
                          cube into Redis sets them)
    kvmem, Redis, keys copied  A/B in the Redis engine: the same load without them (keys read into a buffer and
                          copied transposed into the blocks)
kvmem runs as a *fresh engine* would: a fresh cache salt per call, so vLLM's prefix cache never holds the memory
(as after a restart or on a new replica), and the connector keeps no cube between requests: every call opens the
cube again (header, metadata and ids read and verified when the request arrives) and its loader thread reads each
layer's KV from the file, verifies it against its own checksum and writes it while earlier layers compute (the
file is in the OS page cache, as a cube just built or fetched is; a disk read of 189 MB would add its own time).

TTFT is the wall time of ``LLM.generate`` for one token: request in, prefill (or cube load), first token out.
Each row also has ``phases_ms``, medians of time stamps taken in the engine (ms after the call began): the
connector planned the request (``planned``: the cube opened, its header checked), started its load
(``load_started``), the forward pass reached its first attention layer and left its last (``forward_started``,
``forward_ended``: `wait_for_layer_load` is called before every layer, loads or not) and how long those waits
were in all (``forward_waited``: the forward pass held up by a load that had not reached its layer).
Timed calls of the methods are interleaved round robin after a warm-up; medians with p10..p90. One engine per
cube source (``--worker``: its own process): each engine times its kvmem method against a warm prefix-cache hit
in that same engine, so every ratio compares rows of one engine; the local-disk engine also times the full
prefill. The parent builds the cubes (transformers), starts a throwaway ``redis-server`` unless ``--redis``
names one, and writes bench/results/vllm_ttft_cpu.{json,png}.

Run in the vLLM venv (see .ci/run): ``.venv-vllm/bin/python bench/vllm_ttft.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the connector of this checkout, not whichever kvmem the venv has installed (vLLM imports it by module path)
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from _common import RESULTS, loadavg, machine_facts, pyplot, round_robin, save_figure, spread, write_results  # noqa: E402

NOTES = Path(__file__).resolve().parents[1] / "kvmem" / "demo" / "data" / "team_notes.txt"
QUERY = "\nQuestion: who leads the team, and which city do they live in?\nAnswer:"
METHODS = ("full prefill", "prefix cache (warm)", "kvmem, local disk", "kvmem, disk, 2 read threads",
           "kvmem, disk, keys copied", "kvmem, disk, op writes", "kvmem, disk, all layers first", "kvmem, Redis",
           "kvmem, Redis, keys copied")
TWO_READERS = "kvmem, disk, 2 read threads"
OP_WRITES = "kvmem, disk, op writes"
KEYS_COPIED = "kvmem, disk, keys copied"
REDIS_KEYS_COPIED = "kvmem, Redis, keys copied"
KVMEM_METHODS = {"disk": "kvmem, local disk", "upfront": "kvmem, disk, all layers first", "redis": "kvmem, Redis"}
TARGETS = {"kvmem_vs_warm_max": 1.2, "saving_vs_full_min": 0.70, "at_tokens": 4096}


# ---------------------------------------------------------------- the parent: cubes, Redis, workers, results
def build_cubes(lengths, folder: Path, store_url: str | None) -> dict:
    """Cubes of ``L`` ids (anchor + memory) for each L, saved to ``folder/default`` and put into the Redis store."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kvmem
    from kvmem.demo.models import smollm2_checkpoint

    ckpt = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    anchor = tok(kvmem.wrap(model, tok).anchor, add_special_tokens=False).input_ids
    text_ids = tok(NOTES.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    query = tok(QUERY, add_special_tokens=False).input_ids
    view = kvmem.CubeStore(store_url).view("default") if store_url else None
    spec = {"ckpt": str(ckpt), "query": query, "cubes": {}}
    for n in lengths:
        ids = (text_ids * (n // len(text_ids) + 1))[:n - len(anchor)]  # the notes, repeated to length
        t0 = time.perf_counter()
        cube = kvmem.MemCube.from_ids(model, ids, name=f"mem{n}", anchor_ids=anchor, tokenizer=tok)
        built_s = time.perf_counter() - t0
        cube.save(folder / "default" / f"mem{n}.safetensors")
        if view is not None:
            view.put_cube(f"mem{n}", cube, text=f"team notes, {n} tokens")
        spec["cubes"][str(n)] = {"name": f"mem{n}", "ids": cube.all_ids[0].tolist(), "build_s": built_s,
                                 "bytes": (folder / "default" / f"mem{n}.safetensors").stat().st_size}
        print(f"built mem{n}: {n} tokens in {built_s:.1f} s, {cube.nbytes / 1e6:.0f} MB", flush=True)
    return spec


def start_redis(folder: Path):
    import socket

    import redis

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                             "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client, deadline = redis.Redis(port=port), time.time() + 30
    while True:
        try:
            client.ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.exceptions.ConnectionError:
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"redis-server did not start (exit {proc.poll()})")
            time.sleep(0.1)


def settle_fetch(cache: Path, timeout: float = 60.0) -> bool:
    """Wait for a Redis replica's background fetch into ``cache`` (the cube's local copy and its key blocks, started
    when the request that read the cube from Redis finished) to end, then delete both, so that no fetch runs during
    the next timed call and the next cube call reads from Redis again, as a new replica does. Whether it ended."""
    deadline, done = time.time() + timeout, False
    while time.time() < deadline:
        done = any(cache.glob("*.safetensors")) and any(cache.glob("*.keys-b*"))
        if done:
            break
        time.sleep(0.05)
    time.sleep(0.05)  # the fetch thread's last bookkeeping
    drop_copies(cache)
    return done


def drop_copies(cache: Path) -> None:
    """Delete a Redis replica's local copies in ``cache`` and their key blocks (not the cache's marker): its next
    cube call reads from Redis, as a new replica does."""
    for pattern in ("*.safetensors", "*.keys-b*"):
        for f in cache.glob(pattern):
            f.unlink()


def plot(doc: dict, png: str) -> None:
    plt = pyplot()
    lengths = sorted({r["tokens"] for r in doc["rows"]})
    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        rows = {r["tokens"]: r for r in doc["rows"] if r["method"] == method
                and (method != "prefix cache (warm)" or r.get("engine", "disk") == "disk")}
        xs = [j + (i - (len(METHODS) - 1) / 2) * width for j, n in enumerate(lengths) if n in rows]
        med = [rows[n]["median_ms"] for n in lengths if n in rows]
        err = [[rows[n]["median_ms"] - rows[n]["p10_ms"] for n in lengths if n in rows],
               [rows[n]["p90_ms"] - rows[n]["median_ms"] for n in lengths if n in rows]]
        ax.bar(xs, med, width, yerr=err, capsize=3, label=method)
        for x, m in zip(xs, med):
            ax.text(x, m, f"{m:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(lengths)), [f"{n} memory tokens" for n in lengths])
    ax.set_yscale("log")
    ax.set_ylabel("TTFT, ms (median, p10..p90; log scale)")
    facts = doc["machine"]
    ax.set_title(f"vLLM {facts.get('vllm')} on {facts.get('cpu_cores')} CPU cores: TTFT with kvmem's KV connector",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    save_figure(fig, png, facts)


def parent(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="kvmem-bench-vllm-"))
    redis_proc = None
    try:
        url = args.redis
        if url is None:
            redis_proc, url = start_redis(work)
        store_url = f"{url}?prefix=bench{uuid.uuid4().hex[:6]}"
        facts = machine_facts(packages=("torch", "transformers", "vllm", "kvmem", "redis"))
        # the engine's OpenMP threads: spinning after each parallel region (unset: libgomp's default) or sleeping
        # ("PASSIVE"), which decides how a loader thread shares the cores with the forward pass (docs/serving-vllm.md)
        facts["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY")
        spec = build_cubes(args.tokens, work / "cubes", f"{store_url}&cache={work / 'writer'}")
        spec.update(reps=args.reps, warmup=args.warmup, max_model_len=min(max(args.tokens) + 128, 8192),
                    full_reps=args.full_reps if args.full_reps is not None else args.reps)
        rows = []
        engines = {"disk": {"folder": str(work / "cubes")},
                   "upfront": {"folder": str(work / "cubes"), "layerwise": False},
                   "redis": {"store": f"{store_url}&cache={work / 'replica'}"}}
        for source, config in ((s, engines[s]) for s in args.sources):
            spec_path, out_path = work / f"spec-{source}.json", work / f"rows-{source}.json"
            spec_path.write_text(json.dumps({**spec, "source": source, "config": config,
                                             "cache": str(work / "replica")}))
            subprocess.run([sys.executable, __file__, "--worker", str(spec_path), "--worker-out", str(out_path)],
                           check=True)
            rows += json.loads(out_path.read_text())
        facts["loadavg_end"] = loadavg()
        doc = {"bench": "vllm_ttft", "machine": facts, "targets": TARGETS, "rows": rows,
               "summary": summarize(rows), "how": __doc__.split("\n\n")[1]}
        print(json.dumps(doc["summary"], indent=1))
        write_results(doc, args.out, plot)
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def summarize(rows) -> dict:
    """Per memory length: every median, and each kvmem method against the warm hit of its own engine and the full
    prefill (timed in the local-disk engine)."""
    out = {}
    for n in sorted({r["tokens"] for r in rows}):
        at = [r for r in rows if r["tokens"] == n]
        full = next((r["median_ms"] for r in at if r["method"] == "full prefill"), None)
        s = {f"{r['method']} [{r.get('engine', 'disk')} engine] (ms)": round(r["median_ms"], 1) for r in at}
        for r in at:
            if r["method"] not in (*KVMEM_METHODS.values(), OP_WRITES, KEYS_COPIED, TWO_READERS, REDIS_KEYS_COPIED):
                continue
            warm = next((w["median_ms"] for w in at if w["method"] == "prefix cache (warm)"
                         and w.get("engine") == r.get("engine")), None)
            if warm:
                s[f"{r['method']} / warm prefix cache (same engine)"] = round(r["median_ms"] / warm, 2)
            if full:
                s[f"{r['method']}: saving vs full prefill"] = round(1 - r["median_ms"] / full, 3)
        disk = s.get("kvmem, local disk / warm prefix cache (same engine)")
        if n == TARGETS["at_tokens"] and disk is not None and full:
            s["target: kvmem (disk) within 1.2x of warm"] = disk <= TARGETS["kvmem_vs_warm_max"]
            saving = s["kvmem, local disk: saving vs full prefill"]
            s["target: kvmem (disk) >= 70% below full"] = saving >= TARGETS["saving_vs_full_min"]
        out[str(n)] = s
    return out


# ---------------------------------------------------------------- a worker: one engine, one cube source
PHASES = ("planned", "load_started", "forward_started", "forward_ended", "forward_waited", "total")


def phase_marks() -> dict:
    """Time stamps of one call's steps, taken in this engine's process: the connector planned the request
    (opened the cube), started its load, and the forward pass reached its first layer and left its last
    (`wait_for_layer_load` is called before every attention layer, loads or not; what it waited is summed)."""
    from kvmem.integrations.vllm import KvmemConnector
    from kvmem.integrations.vllm_pages import LayerWriter

    marks: dict = {}
    plan, start, wait = KvmemConnector.on_new_request, KvmemConnector.start_load_kv, LayerWriter.wait

    def planned(self, *a, **k):
        out = plan(self, *a, **k)
        marks.setdefault("planned", time.perf_counter())
        return out

    def started(self, *a, **k):
        out = start(self, *a, **k)
        marks.setdefault("load_started", time.perf_counter())
        return out

    def waited(self, name):
        t = time.perf_counter()
        wait(self, name)
        end = time.perf_counter()
        marks.setdefault("forward_started", t)
        marks["forward_ended"] = end
        marks["forward_waited"] = marks.get("forward_waited", 0.0) + end - t

    KvmemConnector.on_new_request, KvmemConnector.start_load_kv, LayerWriter.wait = planned, started, waited
    return marks


def phases(marks: dict, t0: float, t1: float) -> dict:
    """`phase_marks`' stamps as ms after the call began (``forward_waited``: ms waited in all)."""
    out = {k: 1e3 * (v if k == "forward_waited" else v - t0) for k, v in marks.items()}
    out["total"] = 1e3 * (t1 - t0)
    return out


def worker(spec_path: str, out_path: str) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "3")  # 2k + 4k + 8k warm prefixes and one more 8k request
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from kvmem.integrations.key_blocks import store_key_blocks, write_key_blocks
    from kvmem.integrations.vllm_pages import BlockPlacement, LayerWriter

    plain_copies, key_blocks, start = LayerWriter.placement, BlockPlacement.takes_key_blocks, LayerWriter.start

    def start_with(readers):
        def start_readers(self, loads, layers):
            self.readers = readers
            return start(self, loads, layers)
        return start_readers
    spec = json.loads(Path(spec_path).read_text())
    source = spec["source"]
    llm = LLM(model=spec["ckpt"], dtype="float32", enforce_eager=True, max_model_len=spec["max_model_len"], seed=0,
              kv_transfer_config=KVTransferConfig(
                  kv_connector="KvmemConnector", kv_connector_module_path="kvmem.integrations.vllm",
                  kv_role="kv_consumer", kv_load_failure_policy="recompute",
                  kv_connector_extra_config={**spec["config"], "auto": False}))

    marks = phase_marks()

    def generate(ids, *, salt, cubes=None):
        params = {"kvmem": {"cubes": cubes} if cubes else {"auto": False}}
        marks.clear()
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": ids, "cache_salt": salt}],
                           SamplingParams(max_tokens=1, temperature=0.0, extra_args={"kv_transfer_params": params}),
                           use_tqdm=False)[0]
        return out.outputs[0].token_ids[0], out.num_cached_tokens, phases(marks, t0, time.perf_counter())

    block_size = llm.llm_engine.vllm_config.cache_config.block_size
    if "folder" in spec["config"]:  # written with the cube, as a server saving it would: before any request
        for cube in spec["cubes"].values():
            write_key_blocks(Path(spec["config"]["folder"]) / "default" / f"{cube['name']}.safetensors",
                             block_size=block_size)
    if "store" in spec["config"]:  # in Redis beside the blob, as a server saving the cube into Redis sets them
        from kvmem.store.cubestore import CubeStore

        store = CubeStore(spec["config"]["store"])
        with tempfile.TemporaryDirectory(prefix="kvmem-bench-keys-") as staging:
            for cube in spec["cubes"].values():
                store_key_blocks(store, store.view("default").get(cube["name"]).blob, block_size=block_size,
                                 staging=staging)
    rows = []
    for n, cube in spec["cubes"].items():
        ids = cube["ids"] + spec["query"]
        seen: dict[str, list] = {}

        fetching = []

        def call(method, **kw):
            seen.setdefault(method, []).append(generate(ids, **kw))  # (first token, cached tokens) per call
            if source == "redis" and kw.get("cubes"):  # the replica fetches a local copy once the request is done
                fetching.append(method)

        kvmem_method = KVMEM_METHODS[source]
        fns = {kvmem_method: lambda: call(kvmem_method, salt=uuid.uuid4().hex, cubes=[cube["name"]]),
               "prefix cache (warm)": lambda: call("prefix cache (warm)", salt=f"warm-{n}")}
        before = None
        if source == "disk":
            fns[TWO_READERS] = lambda: call(TWO_READERS, salt=uuid.uuid4().hex, cubes=[cube["name"]])
            fns[KEYS_COPIED] = lambda: call(KEYS_COPIED, salt=uuid.uuid4().hex, cubes=[cube["name"]])
            fns[OP_WRITES] = lambda: call(OP_WRITES, salt=uuid.uuid4().hex, cubes=[cube["name"]])
            fns["full prefill"] = lambda: call("full prefill", salt=uuid.uuid4().hex)

            def before(name):  # A/B in this engine: the writers before the sidecar (keys copied) and before plain
                # copies (the backend's op) for their calls
                LayerWriter.placement = (lambda self, layer: None) if name == OP_WRITES else plain_copies
                BlockPlacement.takes_key_blocks = (lambda self, kb, cache: False) if name == KEYS_COPIED \
                    else key_blocks
                LayerWriter.start = start_with(2 if name == TWO_READERS else 1)
        elif source == "redis":
            fns[REDIS_KEYS_COPIED] = lambda: call(REDIS_KEYS_COPIED, salt=uuid.uuid4().hex, cubes=[cube["name"]])

            def before(name):  # a new replica every call; A/B: the key blocks in Redis not used (keys copied)
                if fetching:  # the last cube call's background fetch ends (and its copies go) before a timed call
                    settle_fetch(Path(spec["cache"]))
                    fetching.clear()
                drop_copies(Path(spec["cache"]))  # a new replica has no local copy
                BlockPlacement.takes_key_blocks = (lambda self, kb, cache: False) if name == REDIS_KEYS_COPIED \
                    else key_blocks
        reps = {name: spec["full_reps"] if name == "full prefill" else spec["reps"] for name in fns}
        series = round_robin(fns, reps, warmup=spec["warmup"], before=before)
        for method, s in series.items():
            timed = seen[method][spec["warmup"]:]  # the timed calls (after the warm-up)
            rows.append({"method": method, "engine": source, "tokens": int(n), "prompt_tokens": len(ids),
                         "cached_tokens": [c for _, c, _ in timed], "first_tokens": [t for t, _, _ in timed],
                         "phases_ms": {k: statistics.median(p[k] for _, _, p in timed if k in p)
                                       for k in PHASES if any(k in p for _, _, p in timed)},
                         "cube_bytes": cube["bytes"], "reps": len(s.seconds),
                         "other_cores": [o[0] if o else None for o in s.other], **spread(s.seconds, unit="ms")})
            ph = rows[-1]["phases_ms"]
            print(f"{n:>5} tokens  {method:<22} {rows[-1]['median_ms']:9.1f} ms  (cached {timed[-1][1]}; forward "
                  f"{ph.get('forward_started', float('nan')):.1f} -> {ph.get('forward_ended', float('nan')):.1f} ms, "
                  f"waited {ph.get('forward_waited', float('nan')):.1f} ms)", flush=True)
    Path(out_path).write_text(json.dumps(rows))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", "--lengths", type=int, nargs="+", default=[2048, 4096, 7936],
                        help="memory lengths (block multiples; SmolLM2 holds 8,192 positions)")
    parser.add_argument("--sources", nargs="+", choices=("disk", "upfront", "redis"),
                        default=["disk", "upfront", "redis"], help="cube sources, one engine each (default: all)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--full-reps", type=int, default=None,
                        help="timed full prefills per length (default --reps; each costs seconds)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--redis", default=None, help="redis://host:port/db to use (default: start one)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 256 and 512 tokens, 1 rep, writes nothing unless --out is given")
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/vllm_ttft_cpu.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.worker_out)
        return
    if args.quick:
        args.tokens, args.reps, args.warmup = [256, 512], 1, 1
    if args.out is None and args.quick:
        args.out = str(Path(tempfile.mkdtemp(prefix="kvmem-bench-vllm-quick-")) / "vllm_ttft.json")
    parent(args if args.out else argparse.Namespace(**{**vars(args), "out": str(RESULTS / "vllm_ttft_cpu.json")}))


if __name__ == "__main__":
    main()
