"""bench/gpu_check.py's model step: TTFT with its host / device breakdown, decode, and the one-time weight digest
on a random-weight llama (a 1B- or 8B-like width at a given depth), and the timing helpers the check shares.

Per memory length: full prefill, transformers' prefix reuse (deepcopy of a DynamicCache), kvmem (the plain loop),
kvmem fast (static prefix + kvmem_sdpa) and, when asked, kvmem captured (`capture_query`). Each request is timed
whole (median wall), split into its cache setup and its query forward (each to the call's return, host, and after
a synchronisation, total), and profiled for its device-busy time (CUDA only). Every first token is compared with
the full prefill's; decode tokens with prefix reuse's, allowing bf16 near-ties.
"""

from __future__ import annotations

import copy
import time
import traceback
from pathlib import Path

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_s(fn, device, reps: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``reps`` calls. On CUDA the warm-up also runs for at least 0.2 s: a GPU left
    idle (a compile, a model load) runs at idle clocks for a while, and the first timed calls would measure that."""
    t_end = time.perf_counter() + (0.2 if device.type == "cuda" else 0.0)
    done = 0
    while done < warmup or (done < 50 and time.perf_counter() < t_end):
        fn()
        sync(device)
        done += 1
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def covered(spans) -> float:
    """The length of the union of ``spans`` [(start, end)]: kernels on streams that overlap count once."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total


def busy_ms(fn, device, calls: int = 3) -> tuple[float | None, str | None]:
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
        sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            sync(device)
        spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
                 if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
        return covered(spans) / 1e3 / calls, None
    except Exception as exc:  # noqa: BLE001  (a profiler problem must not cost the timings)
        return None, f"{type(exc).__name__}: {exc}"


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
        sync(device)
        t0 = time.perf_counter()
        cache = setup()
        t1 = time.perf_counter()
        sync(device)
        t2 = time.perf_counter()
        out = forward(cache)
        t3 = time.perf_counter()
        sync(device)
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
    sync(device)
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
        rows += guarded("ttft", lambda n_mem=n_mem: _one_length(
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
            rows.append({"step": "breakdown", **where, "what": what, "median_s": median_s(fn, device, reps)})
        if profile_dir is not None:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            for method in ("prefix_reuse", "kvmem"):
                fn = first(method)
                fn()
                with profile(activities=acts) as prof:
                    for _ in range(3):
                        fn()
                    sync(device)
                table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=45)
                (Path(profile_dir) / f"profile_{name}_{attn}_{n_mem}_{method}.txt").write_text(table)
        truth = first("full_prefill")()
        methods = ("full_prefill", "prefix_reuse", "kvmem", "kvmem_fast") + (("kvmem_captured",) if captured else ())
        for method in methods:
            fn = first(method)
            token = fn()  # for kvmem_captured also the compile (and CUDA-graph capture) of its bucket: not timed
            s = median_s(fn, device, reps)
            busy, why = busy_ms(fn, device)
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
        total = median_s(run, device, max(1, reps // 2), warmup=1)
        first = median_s(one, device, max(1, reps // 2), warmup=1)
        rows.append({"step": "decode", **where, "method": method, "new_tokens": n_new, "dtype": str(dtype),
                     "generate_s": total, "decode_tokens_per_s": (n_new - 1) / max(total - first, 1e-9),
                     **_agreement(scored["prefix_reuse"], scored[method], ids.shape[-1], dtype)})
    return rows


def guarded(step: str, fn, **where) -> list[dict]:
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
