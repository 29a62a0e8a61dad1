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
  digest    the one-time weight digest per model (the first `fingerprint_fields`: every element hashed), seconds
(the ttft, decode and digest steps live in bench/gpu_ttft.py)
  decode    tokens/s over 64 new tokens after the 8,192-token memory: prefix reuse vs kvmem vs kvmem fast
Every TTFT method's first token is compared with the full prefill's. The cubes' one-time weight digest converts
on the device and hashes on the host; the digest row times it; it is not in any timed request. --budget-s stops
starting new models/lengths once that many seconds have passed, so the JSON is written before a time limit.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _common  # noqa: E402
from gpu_ttft import covered, guarded, median_s, step_model, sync  # noqa: E402,F401  (covered: tests)

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


def _kernel_s(fn, device, reps: int) -> float:
    """Median seconds of a kernel call: Triton's do_bench on CUDA (warm-up, L2 flushed between calls), else
    `_median_s`."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=50, rep=200, return_mode="median") / 1e3
    return median_s(fn, device, reps)


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
        rows += guarded("splice", lambda: step_splice(device, dtype, **shape))
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
                got = guarded("ttft", lambda: step_model(name, config, attn, device, dtype, **sizes,
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
