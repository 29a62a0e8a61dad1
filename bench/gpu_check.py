"""The GPU check: one command, under 10 minutes on one CUDA card, JSON + PNG with the card and versions.

    python bench/gpu_check.py            # on CUDA -> bench/results/gpu_check_<card>.json / .png
    python bench/gpu_check.py --smoke    # CPU, tiny shapes, seconds (--dry: the same): CI runs it
    # the later-session command (bench/README.md "GPU check"): 16/32 layers, under 9 minutes on an H100
    python bench/gpu_check.py --skip pytest splice --widths llama-8B-like llama-1B-like --layers 32 16 \
        --attns sdpa --reps 3 --budget-s 400

Steps (each row of the JSON says which, how long it took and whether it passed):
  pytest    `pytest -m gpu` (every GPU-gated test of the suite); --dry only collects them
  splice    kvmem's splice kernel (Triton on CUDA) vs a plain device copy of the same bytes: GB/s, target >= 80%
            of the copy's; and one launch for all layers vs one launch per layer (an 8B-like KV shape)
  ttft      random-weight 1B- and 8B-like widths at 4, 16 and 32 layers (--layers), bf16, 2,048 / 8,192 / 32,768
            memory tokens (--memory-tokens) + 167 query tokens: full prefill, transformers' prefix reuse (deepcopy
            of a DynamicCache), kvmem (kvmem.prefill: the plain loop), kvmem fast (static prefix + kvmem_sdpa);
            under sdpa and, where flash-attn is installed, flash_attention_2. Each method's request is also split
            into its cache setup and its query forward, each timed to the call's return (host) and after a device
            synchronisation (total): where host ~ total, the request waits on Python, not on the GPU. And each
            request's device-busy time (the kernels' own time, torch.profiler's CUDA activity) beside its wall time:
            idle = wall - busy is the time the GPU waited on the host. --capture adds kvmem_captured (the query
            forward through `capture_query`: CUDA graphs, one graph per query bucket; compiling is not timed)
  digest    the one-time weight digest (`kvmem.verify_weights`: every element hashed) per model, in seconds
  decode    tokens/s over 64 new tokens after the 8,192-token memory: prefix reuse vs kvmem vs kvmem fast
Every TTFT method's first token is compared with the full prefill's. The cubes' one-time weight digest converts
on the device and hashes on the host; the digest row times it; it is not in any timed request. --budget-s stops
starting new models/lengths once that many seconds have passed, so the JSON is written before a time limit.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _common  # noqa: E402

# real widths of a 1B / 8B llama, at the depths --layers asks for (4: one layer's costs; 16 / 32: real depth, where
# per-layer host work adds up)
WIDTHS = {
    "llama-1B-like": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                          head_dim=64, vocab_size=128256),
    "llama-8B-like": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                          head_dim=128, vocab_size=128256),
}
DEPTHS = (4, 16, 32)
MEMORY_TOKENS = (2048, 8192, 32768)
DECODE_MEMORY = 8192  # the decode part runs at this memory length only (the 10-minute budget)
DRY_WIDTH = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 vocab_size=1000)
DRY_DEPTHS, DRY_MEMORY = (2,), (32, 48)


def configs(widths: dict, depths) -> dict[str, dict]:
    """name -> llama config fields, one per width and depth ("llama-8B-like-32L")."""
    return {f"{name}-{n}L": {**width, "num_hidden_layers": n} for name, width in widths.items() for n in depths}


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "triton", "flash_attn", "accelerate", "kvmem"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001  (absent or broken: record that)
            out[name] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(card=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1))
        try:
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out["driver"] = None
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_s(fn, device, reps: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``reps`` calls. On CUDA the warm-up also runs for at least 0.2 s: a GPU left
    idle (a compile, a model load) runs at idle clocks for a while, and the first timed calls would measure that."""
    t_end = time.perf_counter() + (0.2 if device.type == "cuda" else 0.0)
    done = 0
    while done < warmup or (done < 50 and time.perf_counter() < t_end):
        fn()
        _sync(device)
        done += 1
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _kernel_s(fn, device, reps: int) -> float:
    """Median seconds of a kernel call: Triton's do_bench on CUDA (warm-up, L2 flushed between calls), else
    `_median_s`."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=50, rep=200, return_mode="median") / 1e3
    return _median_s(fn, device, reps)


def covered(spans) -> float:
    """The length of the union of ``spans`` [(start, end)]: kernels on streams that overlap count once."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total


def _busy_ms(fn, device, calls: int = 3) -> tuple[float | None, str | None]:
    """Device-busy milliseconds of one call of ``fn``: the time any kernel or copy of its calls ran (the union of
    torch.profiler's CUDA activity spans, annotations left out), averaged over ``calls`` calls after one
    unprofiled call; wall - busy is the time the device sat waiting on the host. (None, why) off CUDA or where
    the profiler fails."""
    if device.type != "cuda":
        return None, "no CUDA device: the device is the host"
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        fn()
        _sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            _sync(device)
        spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
                 if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
        return covered(spans) / 1e3 / calls, None
    except Exception as exc:  # noqa: BLE001  (a profiler problem must not cost the timings)
        return None, f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------- pytest -m gpu
def step_pytest(dry: bool, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu"] + (["--co"] if dry else [])
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        tail, rc = (r.stdout + r.stderr).strip().splitlines()[-15:], r.returncode
    except subprocess.TimeoutExpired:
        tail, rc = [f"timed out after {timeout} s"], None
    summary = next((line for line in reversed(tail) if re.search(r"passed|failed|error|selected|collected", line)),
                   tail[-1] if tail else "")
    return {"step": "pytest", "cmd": " ".join(cmd[1:]), "rc": rc, "summary": summary, "tail": tail,
            "seconds": time.perf_counter() - t0, "passed": rc == 0}


# ---------------------------------------------------------------- splice vs copy
def step_splice(device, dtype, *, layers, heads, dim, cubes, tokens, reps) -> list[dict]:
    from kvmem.kernels.splice import splice, splice_triton, triton_usable

    g = torch.Generator().manual_seed(0)
    src_k = [[torch.randn(heads, tokens, dim, generator=g).to(device, dtype) for _ in range(layers)]
             for _ in range(cubes)]
    src_v = [[torch.randn(heads, tokens, dim, generator=g).to(device, dtype) for _ in range(layers)]
             for _ in range(cubes)]
    total = cubes * tokens
    dst_k = torch.empty(layers, heads, total, dim, dtype=dtype, device=device)
    dst_v = torch.empty_like(dst_k)
    args = dict(src_start=[0] * cubes, dst_start=[c * tokens for c in range(cubes)], length=[tokens] * cubes,
                delta=[c * tokens for c in range(cubes)],
                inv_freq=1.0 / (500000.0 ** (torch.arange(0, dim, 2, device=device).float() / dim)))
    flat_k, flat_v = torch.randn_like(dst_k), torch.randn_like(dst_v)
    moved = 2 * 2 * dst_k.numel() * dst_k.element_size()  # read + write, keys + values

    def all_layers():
        splice(dst_k, dst_v, src_k, src_v, **args)

    def tuned(block_t, num_warps):
        return lambda: splice_triton(dst_k, dst_v, src_k, src_v, block_t=block_t, num_warps=num_warps, **args)

    def per_layer():
        for layer in range(layers):
            splice(dst_k[layer:layer + 1], dst_v[layer:layer + 1], [[c[layer]] for c in src_k],
                   [[c[layer]] for c in src_v], **args)

    def plain_copy():
        dst_k.copy_(flat_k)
        dst_v.copy_(flat_v)

    fns = [("copy", plain_copy), ("splice_all_layers", all_layers), ("splice_per_layer", per_layer)]
    if device.type == "cuda" or triton_usable(device):  # the kernel's tile and warp counts, for its defaults
        fns += [(f"tune_block{b}_warps{w}", tuned(b, w)) for b, w in
                ((16, 4), (32, 4), (64, 4), (64, 8), (128, 4), (128, 8), (256, 8))] if device.type == "cuda" else \
            [("tune_block8_warps4", tuned(8, 4))]
    t = {name: _kernel_s(fn, device, reps) for name, fn in fns}
    gbs = {name: moved / s / 1e9 for name, s in t.items()}
    shape = dict(layers=layers, kv_heads=heads, head_dim=dim, cubes=cubes, tokens_per_cube=tokens, dtype=str(dtype))
    kernel = "triton" if triton_usable(device) else "torch reference"
    return [{"step": "splice", "what": name, "kernel": kernel if name != "copy" else "copy_", **shape,
             "median_s": t[name], "GB_per_s": gbs[name], "fraction_of_copy": gbs[name] / gbs["copy"],
             **({"passed": gbs[name] / gbs["copy"] >= 0.8, "target": ">= 0.80 of copy"}
                if name == "splice_all_layers" and device.type == "cuda" else {})}
            for name in t] + [{"step": "splice", "what": "launch", **shape,
                               "per_layer_over_all_layers": t["splice_per_layer"] / t["splice_all_layers"]}]


# ---------------------------------------------------------------- TTFT and decode on a random-weight model
def _model(config: dict, attn: str, device, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", max_position_embeddings=40960, tie_word_embeddings=False, **config)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
    return model.eval()


def _phases_s(setup, forward, device, reps: int) -> dict:
    """One request in two phases, each timed to its call's return (host) and after a synchronisation (total):
    ``cache = setup()``, then ``forward(cache)``. Medians over ``reps`` calls after one warm-up, in ms."""
    setup_host, setup_total, fwd_host, fwd_total = [], [], [], []
    for i in range(reps + 1):
        _sync(device)
        t0 = time.perf_counter()
        cache = setup()
        t1 = time.perf_counter()
        _sync(device)
        t2 = time.perf_counter()
        out = forward(cache)
        t3 = time.perf_counter()
        _sync(device)
        t4 = time.perf_counter()
        del out, cache
        if i:
            setup_host.append(t1 - t0), setup_total.append(t2 - t0), fwd_host.append(t3 - t2), fwd_total.append(t4 - t2)
    med = lambda xs: 1e3 * sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"setup_host_ms": med(setup_host), "setup_total_ms": med(setup_total),
            "forward_host_ms": med(fwd_host), "forward_total_ms": med(fwd_total)}


def step_model(name: str, config: dict, attn: str, device, dtype, *, memory_tokens, n_query: int, n_new: int,
               reps: int, decode_memory: int, profile_dir=None, capture: str | None = None,
               deadline: float = float("inf")) -> list[dict]:
    """TTFT (with its host/device breakdown) at every length of ``memory_tokens`` on one random-weight model;
    decode at ``decode_memory``; the model's one-time weight digest. ``capture``: None, or the compile mode /
    backend `capture_query` gets ("reduce-overhead" on CUDA; "eager" for the smoke run). Lengths not started by
    ``deadline`` (time.perf_counter) are recorded as skipped."""
    from kvmem.cubes.fingerprint import fingerprint_fields

    model = _model(config, attn, device, dtype)
    t0 = time.perf_counter()
    fingerprint_fields(model)  # the one-time digest: every element of every weight hashed (kvmem.cubes.weights)
    _sync(device)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = [{"step": "digest", "config": name, "layers": config["num_hidden_layers"], "attn": attn,
             "weights_GB": size / 1e9, "seconds": time.perf_counter() - t0}]
    print(f"digest {name:<18} {size / 1e9:6.2f} GB of weights hashed in {rows[0]['seconds']:.2f} s", flush=True)
    captured = None
    if capture is not None:
        from kvmem.inject.capture import capture_query

        bucket = 1 << max(0, n_query - 1).bit_length()  # the query's length rounded up to a power of two
        options = {"backend": "eager", "mode": None} if capture == "eager" else {"mode": capture}
        captured = capture_query(model, buckets=(bucket,), **options)
    for n_mem in memory_tokens:
        if time.perf_counter() > deadline:
            rows.append({"step": "skipped", "config": name, "attn": attn, "memory_tokens": n_mem,
                         "reason": "--budget-s spent"})
            continue
        rows += _guarded("ttft", lambda n_mem=n_mem: _one_length(
            model, name, config, attn, device, dtype, n_mem=n_mem, n_query=n_query, n_new=n_new, reps=reps,
            decode=n_mem == decode_memory, profile_dir=profile_dir, captured=captured),
            config=name, attn=attn, memory_tokens=n_mem)
    del model
    if captured is not None:  # dynamo's compiled graphs keep the model alive until reset
        del captured
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _one_length(model, name: str, config: dict, attn: str, device, dtype, *, n_mem: int, n_query: int, n_new: int,
                reps: int, decode: bool, profile_dir=None, captured=None) -> list[dict]:
    import kvmem
    from transformers import DynamicCache
    from kvmem.cubes.fingerprint import fingerprint_fields
    from kvmem.model.attention import use_gqa_attention
    from kvmem.model.cache import cache_kwarg, output_cache
    from kvmem.model.static_cache import static_prefix

    kw = cache_kwarg(model)
    g = torch.Generator().manual_seed(1)
    mem = torch.randint(10, config["vocab_size"], (1, n_mem), generator=g).to(device)
    q = torch.randint(10, config["vocab_size"], (1, n_query), generator=g).to(device)
    ids = torch.cat([mem, q], -1)
    with torch.inference_mode():
        prefix_cache = output_cache(model(input_ids=mem, logits_to_keep=1, **{kw: DynamicCache(config=model.config)}))
    cube = kvmem.MemCube.from_ids(model, mem.cpu(), progress=False).to(device)
    gqa = attn == "sdpa"  # kvmem_sdpa replaces sdpa; flash-attention handles grouped heads itself
    where = {"config": name, "layers": config["num_hidden_layers"], "attn": attn, "memory_tokens": n_mem}

    def cache_of(method, room):
        if method == "prefix_reuse":
            return copy.deepcopy(prefix_cache)
        if method == "full_prefill":
            return None
        prefix = kvmem.prefill(model, cube)
        if method == "kvmem_captured":  # the query forward (`forward`) refills the captured cache from it
            return prefix
        return static_prefix(model, prefix, max_new_tokens=room, query_len=0).cache if method == "kvmem_fast" \
            else prefix.cache

    def forward(method):
        if method == "full_prefill":
            return lambda cache: model(input_ids=ids, logits_to_keep=1).logits[0, -1].argmax()
        if method == "kvmem_captured":
            return lambda prefix: captured(prefix, q, max_new_tokens=1)[0][0].argmax()
        return lambda cache: model(input_ids=q, logits_to_keep=1, **{kw: cache}).logits[0, -1].argmax()

    def switch(method):
        if gqa:
            use_gqa_attention(model, enabled=method in ("kvmem_fast", "kvmem_captured"))

    def first(method):
        switch(method)
        step = forward(method)
        return lambda: int(step(cache_of(method, n_query + 1)))

    rows = []
    with torch.inference_mode():
        switch("kvmem")
        parts = {
            "fingerprint_fields": lambda: fingerprint_fields(model),
            "kvmem.prefill": lambda: kvmem.prefill(model, cube),
            "deepcopy(prefix cache)": lambda: copy.deepcopy(prefix_cache),
            "static_prefix(kvmem.prefill)": lambda: static_prefix(model, kvmem.prefill(model, cube),
                                                                  max_new_tokens=n_query + 1, query_len=0),
            "query forward, no cache": lambda: model(input_ids=q, logits_to_keep=1),
        }
        for what, fn in parts.items():
            rows.append({"step": "breakdown", **where, "what": what, "median_s": _median_s(fn, device, reps)})
        if profile_dir is not None:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            for method in ("prefix_reuse", "kvmem"):
                fn = first(method)
                fn()
                with profile(activities=acts) as prof:
                    for _ in range(3):
                        fn()
                    _sync(device)
                table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=45)
                (Path(profile_dir) / f"profile_{name}_{attn}_{n_mem}_{method}.txt").write_text(table)
        truth = first("full_prefill")()
        methods = ("full_prefill", "prefix_reuse", "kvmem", "kvmem_fast") + (("kvmem_captured",) if captured else ())
        for method in methods:
            fn = first(method)
            token = fn()  # for kvmem_captured also the compile (and CUDA-graph capture) of its bucket: not timed
            s = _median_s(fn, device, reps)
            busy, why = _busy_ms(fn, device)
            switch(method)
            phases = _phases_s(lambda m=method: cache_of(m, n_query + 1), forward(method), device, reps)
            rows.append({"step": "ttft", **where, "method": method, "query_tokens": n_query, "dtype": str(dtype),
                         "median_s": s, **phases, "device_busy_ms": busy,
                         "device_idle_ms": None if busy is None else max(0.0, 1e3 * s - busy),
                         **({"device_busy_note": why} if why else {}),
                         "first_token": token, "passed": token == truth})
        full = next(r["median_s"] for r in rows if r.get("method") == "full_prefill")
        reuse = next(r["median_s"] for r in rows if r.get("method") == "prefix_reuse")
        for r in rows:
            if r["step"] == "ttft":
                r["ratio_vs_prefix_reuse"], r["reduction_vs_full"] = r["median_s"] / reuse, 1 - r["median_s"] / full
        if decode:
            rows += _decode(model, kw, ids, n_query, n_new, cache_of, switch, where, dtype, device, reps)
    del prefix_cache, cube
    return rows


def _decode(model, kw, ids, n_query, n_new, cache_of, switch, where, dtype, device, reps) -> list[dict]:
    """tokens/s over ``n_new`` new tokens: prefix reuse, kvmem's plain loop and kvmem fast; greedy tokens compared."""
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
               do_sample=False, pad_token_id=0)
    methods = ("prefix_reuse", "kvmem", "kvmem_fast")
    scored = {}
    for method in methods:
        switch(method)
        scored[method] = model.generate(ids, **{kw: cache_of(method, n_query + n_new)}, **gen,
                                        output_scores=True, return_dict_in_generate=True)
    rows = []
    for method in methods:
        switch(method)
        run = lambda m=method: model.generate(ids, **{kw: cache_of(m, n_query + n_new)}, **gen)  # noqa: E731
        one = lambda m=method: model.generate(ids, **{kw: cache_of(m, n_query + 1)},  # noqa: E731
                                              **{**gen, "max_new_tokens": 1, "min_new_tokens": 1})
        total = _median_s(run, device, max(1, reps // 2), warmup=1)
        first = _median_s(one, device, max(1, reps // 2), warmup=1)
        rows.append({"step": "decode", **where, "method": method, "new_tokens": n_new, "dtype": str(dtype),
                     "generate_s": total, "decode_tokens_per_s": (n_new - 1) / max(total - first, 1e-9),
                     **_agreement(scored["prefix_reuse"], scored[method], ids.shape[-1], dtype)})
    return rows


def _guarded(step: str, fn, **where) -> list[dict]:
    """Run one step; a step that raises becomes one failed row with its traceback, and the next step still runs."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001  (a GPU check reports every failure; it does not stop at the first)
        print(f"{step} {where or ''} raised {type(exc).__name__}: {exc}", flush=True)
        traceback.print_exc()
        return [{"step": step, **where, "error": f"{type(exc).__name__}: {exc}",
                 "traceback": traceback.format_exc().splitlines()[-12:], "passed": False}]


def _agreement(ref, got, prompt_len: int, dtype) -> dict:
    """Greedy tokens of two caches: equal, or diverging first where the reference's own top two logits tie within
    ``dtype``'s rounding (bfloat16 attention kernels sum in another order; transformers' prefix reuse itself
    diverges so). Also the first step's largest logit difference, relative to the logits' scale."""
    a, b = ref.sequences[0, prompt_len:], got.sequences[0, prompt_len:]
    s0, g0 = ref.scores[0][0].float(), got.scores[0][0].float()
    finite = torch.isfinite(s0) & torch.isfinite(g0)  # min_new_tokens masks EOS with -inf
    out = {"same_tokens": bool(torch.equal(a, b)),
           "first_step_max_logit_diff": (s0 - g0)[finite].abs().max().item(),
           "logit_scale": s0[finite].abs().max().item()}
    if out["same_tokens"]:
        return {**out, "passed": True}
    i = int((a != b).nonzero()[0])
    step = ref.scores[i][0].float()
    margin = (step[a[i]] - step[b[i]]).abs().item()
    tol = 16 * torch.finfo(dtype).eps * step[torch.isfinite(step)].abs().max().item()
    return {**out, "diverged_at": i, "reference_margin_there": margin, "tie_tolerance": tol, "passed": margin <= tol}


# ---------------------------------------------------------------- report
def _label(row: dict) -> str:
    return (f"{row['config'].replace('llama-', '').replace('-like', '')} {row['memory_tokens']} {row['attn'][:5]}"
            f"\n{row['method']}")


def plot(doc: dict, png: str) -> None:
    plt = _common.pyplot()
    rows = doc["rows"]
    fig, axes = plt.subplots(1, 4, figsize=(22, 5))
    sp = [r for r in rows if r["step"] == "splice" and "GB_per_s" in r]
    colors = {"copy": "#888", "splice_all_layers": "#4a7", "splice_per_layer": "#a74"}
    axes[0].bar(range(len(sp)), [r["GB_per_s"] for r in sp], color=[colors.get(r["what"], "#7ab") for r in sp])
    axes[0].set_xticks(range(len(sp)), [r["what"].replace("tune_", "") for r in sp], fontsize=6, rotation=90)
    axes[0].set(ylabel="GB/s (read + write)", title="splice vs plain copy (tune_*: tokens per program, warps)")
    tt = [r for r in rows if r["step"] == "ttft" and "median_s" in r]
    labels = [_label(r) for r in tt]
    axes[1].bar(range(len(tt)), [r["median_s"] for r in tt], color="#47a")
    axes[1].set_xticks(range(len(tt)), labels, fontsize=5, rotation=90)
    axes[1].set(ylabel="TTFT median (s)", yscale="log", title="TTFT")
    dd = [r for r in rows if r["step"] == "decode" and "decode_tokens_per_s" in r]
    axes[2].bar(range(len(dd)), [r["decode_tokens_per_s"] for r in dd], color="#7a4")
    axes[2].set_xticks(range(len(dd)), [_label(r) for r in dd],
                       fontsize=5, rotation=90)
    axes[2].set(ylabel="tokens/s", title="decode")
    # host vs total per phase: a request waits on Python where the host bar reaches the total
    x = range(len(tt))
    axes[3].bar(x, [r["setup_total_ms"] for r in tt], color="#cbd", label="setup: total")
    axes[3].bar(x, [r["setup_host_ms"] for r in tt], color="#a47", label="setup: host")
    bottom = [r["setup_total_ms"] for r in tt]
    axes[3].bar(x, [r["forward_total_ms"] for r in tt], bottom=bottom, color="#bdc", label="query forward: total")
    axes[3].bar(x, [r["forward_host_ms"] for r in tt], bottom=bottom, color="#4a7", label="query forward: host")
    busy = [(i, r["device_busy_ms"]) for i, r in enumerate(tt) if r.get("device_busy_ms") is not None]
    if busy:  # the kernels' own time: where it sits far below the bar, the GPU waited on the host
        axes[3].scatter([i for i, _ in busy], [b for _, b in busy], marker="_", s=90, color="k", zorder=3,
                        label="device busy, whole request (profiler)")
    axes[3].set_xticks(x, labels, fontsize=5, rotation=90)
    axes[3].set(ylabel="ms (median)", yscale="log", title="request = setup + forward: host time vs total")
    axes[3].legend(fontsize=6)
    card = doc["versions"].get("card") or "CPU (dry)"
    fig.suptitle(f"kvmem GPU check: {card}, torch {doc['versions']['torch']}, "
                 f"transformers {doc['versions']['transformers']}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(png)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", "--smoke", dest="dry", action="store_true",
                   help="CPU, tiny shapes, pytest only collects, capture with the eager backend: what CI runs")
    p.add_argument("--skip", nargs="*", default=[], choices=["pytest", "splice", "ttft"])
    p.add_argument("--memory-tokens", type=int, nargs="+", default=list(MEMORY_TOKENS))
    p.add_argument("--layers", type=int, nargs="+", default=list(DEPTHS), help="depths of the random models")
    p.add_argument("--widths", nargs="+", default=list(WIDTHS), choices=list(WIDTHS), help="widths of the models")
    p.add_argument("--attns", nargs="+", default=None, choices=["sdpa", "flash_attention_2"],
                   help="attention implementations (default: sdpa, and flash_attention_2 where flash-attn is)")
    p.add_argument("--capture", action="store_true",
                   help="also time kvmem_captured (capture_query, CUDA graphs); each model compiles once per length")
    p.add_argument("--budget-s", type=float, default=float("inf"),
                   help="start no new model or memory length after this many seconds (rows say what was skipped)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--pytest-timeout", type=int, default=240)
    p.add_argument("--out", default=None, help="default bench/results/gpu_check_<card>.json")
    p.add_argument("--profile-dir", default=None, help="write torch.profiler tables of the TTFT paths here")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry
    if not cuda and not args.dry:
        print("no CUDA device: running the dry version (--dry)", flush=True)
        args.dry = True
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    t0 = time.perf_counter()
    versions = _versions()
    rows = []
    if "pytest" not in args.skip:
        rows.append(step_pytest(args.dry, args.pytest_timeout))
        print(f"pytest -m gpu: {rows[-1]['summary']}", flush=True)
    if "splice" not in args.skip:
        shape = dict(layers=32, heads=8, dim=128, cubes=4, tokens=2048, reps=args.reps) if cuda else \
            dict(layers=2, heads=2, dim=16, cubes=2, tokens=16, reps=1)
        rows += _guarded("splice", lambda: step_splice(device, dtype, **shape))
        for r in rows:
            if r["step"] == "splice" and "GB_per_s" in r:
                print(f"splice {r['what']:<18} {r['GB_per_s']:8.1f} GB/s  {r['fraction_of_copy']:.2f} of copy")
    if "ttft" not in args.skip:
        todo = configs({w: WIDTHS[w] for w in args.widths}, args.layers) if cuda else \
            configs({"dry": DRY_WIDTH}, DRY_DEPTHS)
        capture = ("reduce-overhead" if args.capture else None) if cuda else "eager"
        deadline = t0 + args.budget_s
        attns = ["sdpa"] + (["flash_attention_2"] if cuda and importlib.util.find_spec("flash_attn") else [])
        attns = [a for a in attns if args.attns is None or a in args.attns]  # models run in the order asked
        sizes = dict(memory_tokens=args.memory_tokens, n_query=167, n_new=64, reps=args.reps,
                     decode_memory=DECODE_MEMORY) if cuda else \
            dict(memory_tokens=DRY_MEMORY, n_query=8, n_new=4, reps=1, decode_memory=DRY_MEMORY[-1])
        for name, config in todo.items():
            for attn in attns:
                if time.perf_counter() > deadline:
                    rows.append({"step": "skipped", "config": name, "attn": attn, "reason": "--budget-s spent"})
                    continue
                got = _guarded("ttft", lambda: step_model(name, config, attn, device, dtype, **sizes,
                                                          profile_dir=args.profile_dir, capture=capture,
                                                          deadline=deadline),
                               config=name, attn=attn)
                rows += got
                for r in got:
                    if "error" in r or r["step"] in ("digest", "skipped"):
                        continue
                    at = f"{name:<18} {r['memory_tokens']:>6} {attn:<18}"
                    if r["step"] == "breakdown":
                        print(f"part   {at} {r['what']:<30} {r['median_s'] * 1e3:9.2f} ms", flush=True)
                    elif r["step"] == "ttft":
                        busy = "" if r["device_busy_ms"] is None else f"device busy {r['device_busy_ms']:.2f} ms, "
                        print(f"ttft   {at} {r['method']:<14} {r['median_s'] * 1e3:9.1f} ms ({busy}"
                              f"{r['ratio_vs_prefix_reuse']:.2f}x prefix reuse; setup host/total "
                              f"{r['setup_host_ms']:.2f}/{r['setup_total_ms']:.2f} ms, forward host/total "
                              f"{r['forward_host_ms']:.2f}/{r['forward_total_ms']:.2f} ms)  ok={r['passed']}",
                              flush=True)
                    else:
                        print(f"decode {at} {r['method']:<13} {r['decode_tokens_per_s']:9.1f} tok/s  "
                              f"ok={r['passed']}", flush=True)
    failed = [r for r in rows if r.get("passed") is False]
    doc = {"versions": versions, "machine": _common.machine_facts(), "dry": args.dry,
           "seconds": time.perf_counter() - t0, "failed": len(failed), "rows": rows}
    slug = re.sub(r"[^a-z0-9]+", "_", (versions.get("card") or "cpu_dry").lower()).strip("_")
    out = args.out or ROOT / "bench" / "results" / f"gpu_check_{'cpu_smoke' if args.dry else slug}.json"
    _common.write_results(doc, out, plot=plot)
    print(f"done in {doc['seconds']:.0f} s, {len(failed)} failed checks", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
