"""Splice throughput: GB/s that composing N cubes into one KV buffer moves, per implementation.

GB/s counts bytes read + bytes written (keys and values, every layer and head, the tokens copied), so a copy of
B bytes moves 2B. Shapes are SmolLM2-135M's (30 layers x 3 kv heads x 64 dims) unless told otherwise; each
cube is built after a 3-token anchor that only the first cube brings (what `kvmem.prefill` composes).

    .venv/bin/python bench/splice_kernel.py              # the full run (~2 min on 2 CPU cores)
    .venv/bin/python bench/splice_kernel.py --quick      # smoke run; writes nothing unless --out is given

Implementations (CPU, and on CUDA when available; each timed region in brackets):
    splice_reference  [kvmem.kernels.splice.splice_reference]  the CPU path: per cube and layer, rotate keys in
                      float32 by the cube's position delta, cast, copy
    torch_batched     [per cube: stack the layers, rotate all at once, copy]  an alternative reference
    slice_loop        [per cube and layer: dst[l, :, a:b] = src[:, s:e]]  no rotation: what naive MemOS-style
                      concatenation costs; the floor for any loop over cubes and layers
    copy_ceiling      [dst_k.copy_(src_k); dst_v.copy_(src_v)] one contiguous copy of the same bytes: the ceiling
    splice_triton     [kvmem.kernels.splice.splice_triton]  CUDA only. Under TRITON_INTERPRET=1 Triton runs on CPU
                      in a Python interpreter: a correctness tool, never timed here (--interpret-check checks it)

Every implementation's output is compared with splice_reference's before timing (max |diff| in the rows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # bench/_common.py, also when imported from elsewhere

import _common  # noqa: E402

import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ANCHOR = 3          # tokens of the shared anchor (SmolLM2's chat template system header)
ROPE_THETA = 100000.0  # SmolLM2-135M's rope_theta


# ---------------------------------------------------------------- inputs
class Case:
    """Sources, destination and splice arguments for ``n_cubes`` cubes of ``tokens`` tokens each.

    src_k[c][l], src_v[c][l]  [heads, ANCHOR + tokens, dim]   contiguous, like MemCube.kv
    dst_k, dst_v              [layers, heads, T, dim]          T = ANCHOR + n_cubes * tokens
    flat_k, flat_v            [layers, heads, T, dim]          contiguous copies for the copy_ ceiling
    """

    def __init__(self, layers, heads, dim, n_cubes, tokens, dtype, device, seed=0):
        g = torch.Generator().manual_seed(seed)
        mk = lambda: torch.randn(heads, ANCHOR + tokens, dim, generator=g).to(device, dtype)  # noqa: E731
        self.src_k = [[mk() for _ in range(layers)] for _ in range(n_cubes)]
        self.src_v = [[mk() for _ in range(layers)] for _ in range(n_cubes)]
        self.src_start, self.dst_start, self.length, self.delta = [], [], [], []
        offset = 0
        for c in range(n_cubes):
            skip = 0 if c == 0 else ANCHOR
            self.src_start.append(skip)
            self.dst_start.append(offset)
            self.length.append(ANCHOR + tokens - skip)
            self.delta.append(offset - skip)
            offset += self.length[-1]
        self.dst_k = torch.empty(layers, heads, offset, dim, dtype=dtype, device=device)
        self.dst_v = torch.empty_like(self.dst_k)
        self.flat_k, self.flat_v = torch.randn_like(self.dst_k), torch.randn_like(self.dst_v)
        self.inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        el = torch.finfo(dtype).bits // 8
        self.bytes_moved = 2 * 2 * layers * heads * offset * dim * el  # (K + V) x (read + write)
        self.kwargs = dict(src_start=self.src_start, dst_start=self.dst_start, length=self.length,
                           delta=self.delta, inv_freq=self.inv_freq.to(device))

    def reset(self):
        self.dst_k.zero_()
        self.dst_v.zero_()


# ---------------------------------------------------------------- implementations
def run_reference(case: Case):
    from kvmem.kernels.splice import splice_reference
    splice_reference(case.dst_k, case.dst_v, case.src_k, case.src_v, **case.kwargs)


def run_triton(case: Case):
    from kvmem.kernels.splice import splice_triton
    splice_triton(case.dst_k, case.dst_v, case.src_k, case.src_v, **case.kwargs)


def run_batched(case: Case):
    """Per cube: stack its layers [layers, heads, n, dim], rotate them in one go (float32), copy once."""
    from kvmem.kernels import rotation_tables
    cos, sin = rotation_tables(case.delta, case.inv_freq, case.dst_k.device)
    half = cos.shape[1]
    for c, (ks, vs) in enumerate(zip(case.src_k, case.src_v)):
        s, d, n = case.src_start[c], case.dst_start[c], case.length[c]
        k = torch.stack([x[:, s:s + n] for x in ks]).float()  # [layers, heads, n, dim]
        x1, x2 = k[..., :half], k[..., half:2 * half]
        k = torch.cat((x1 * cos[c] - x2 * sin[c], x2 * cos[c] + x1 * sin[c], k[..., 2 * half:]), dim=-1)
        case.dst_k[:, :, d:d + n] = k
        case.dst_v[:, :, d:d + n] = torch.stack([x[:, s:s + n] for x in vs])


def run_slice_loop(case: Case):
    """Per cube and layer, a slice copy with no rotation (keys stay at the positions they were built at)."""
    for c, (ks, vs) in enumerate(zip(case.src_k, case.src_v)):
        s, d, n = case.src_start[c], case.dst_start[c], case.length[c]
        for layer, (k, v) in enumerate(zip(ks, vs)):
            case.dst_k[layer, :, d:d + n] = k[:, s:s + n]
            case.dst_v[layer, :, d:d + n] = v[:, s:s + n]


def run_copy(case: Case):
    case.dst_k.copy_(case.flat_k)
    case.dst_v.copy_(case.flat_v)


IMPLS = {"splice_reference": run_reference, "torch_batched": run_batched, "slice_loop": run_slice_loop,
         "copy_ceiling": run_copy, "splice_triton": run_triton}


# ---------------------------------------------------------------- correctness
def check(case: Case, impl: str) -> float | None:
    """Max |impl - splice_reference| over dst K and V (None for the copy ceiling, which copies other data)."""
    if impl == "copy_ceiling":
        return None
    case.reset()
    run_reference(case)
    ref_k, ref_v = case.dst_k.clone(), case.dst_v.clone()
    case.reset()
    IMPLS[impl](case)
    if impl == "slice_loop":  # no rotation: compare values only (keys differ by design)
        return float((case.dst_v.float() - ref_v.float()).abs().max())
    return max(float((case.dst_k.float() - ref_k.float()).abs().max()),
               float((case.dst_v.float() - ref_v.float()).abs().max()))


def bench_device(device, args) -> list[dict]:
    impls = [i for i in args.impls if i != "splice_triton" or device.type == "cuda"]
    rows = []
    for dname in args.dtypes:
        for n_cubes, tokens in args.shapes:
            case = Case(args.layers, args.heads, args.dim, n_cubes, tokens, DTYPES[dname], device)
            diffs = {impl: check(case, impl) for impl in impls}
            # round robin: drift and other load hit every implementation alike
            series = _common.round_robin({impl: lambda fn=IMPLS[impl], c=case: fn(c) for impl in impls}, args.reps,
                                         warmup=args.warmup, device=device)
            for impl in impls:
                diff, t = diffs[impl], _common.spread(series[impl].seconds, keep=False)
                gb = case.bytes_moved / 1e9
                rows.append({"device": str(device), "impl": impl, "dtype": dname, "n_cubes": n_cubes,
                             "tokens_per_cube": tokens, "anchor_tokens": ANCHOR, "layers": args.layers,
                             "kv_heads": args.heads, "head_dim": args.dim, "bytes_moved": case.bytes_moved,
                             "reps": args.reps, "warmup": args.warmup, **t, "gbps": gb / t["median_s"],
                             "gbps_p10_p90": [gb / t["p90_s"], gb / t["p10_s"]],
                             "max_abs_diff_vs_reference": diff})
                r = rows[-1]
                print(f"{r['device']:<6} {dname:<5} {n_cubes}x{tokens:<5} {impl:<17} {1e3 * t['median_s']:>8.2f} ms "
                      f"{r['gbps']:>7.2f} GB/s  diff {diff if diff is None else f'{diff:.1e}'}", flush=True)
            del case, series  # free the buffers before the next shape's
    base = {(r["device"], r["dtype"], r["n_cubes"], r["tokens_per_cube"]): r["gbps"] for r in rows
            if r["impl"] == "copy_ceiling"}
    for r in rows:
        b = base.get((r["device"], r["dtype"], r["n_cubes"], r["tokens_per_cube"]))
        r["fraction_of_copy_ceiling"] = r["gbps"] / b if b else None
    return rows


def interpret_check(args) -> dict:
    """splice_triton under TRITON_INTERPRET=1 against splice_reference on a small shape (correctness only)."""
    if "kvmem.kernels._splice_triton" in sys.modules:
        return {"skipped": "Triton was already loaded in compiled mode (CUDA run); run with --no-cuda-style "
                           "separate process: TRITON_INTERPRET must be set before the kernel module is imported"}
    os.environ["TRITON_INTERPRET"] = "1"
    out = {}
    for dname in args.dtypes:
        case = Case(2, 3, 64, 3, 37, DTYPES[dname], torch.device("cpu"), seed=1)
        try:
            out[dname] = {"shape": "2 layers x 3 heads x 64 dim, 3 cubes x 37 tokens",
                          "max_abs_diff_vs_reference": check(case, "splice_triton")}
        except Exception as exc:  # noqa: BLE001  (report, do not abort the benchmark)
            out[dname] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"TRITON_INTERPRET=1 check {dname}: {out[dname]}", flush=True)
    return out


# ---------------------------------------------------------------- report
def machine_facts() -> dict:
    facts = _common.machine_facts(packages=("torch", "transformers", "triton"),
                                  cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


def plot(doc: dict, png: str) -> None:
    """GB/s per implementation, one panel per device x dtype, groups = shapes; dotted = copy ceiling."""
    plt = _common.pyplot()
    rows, facts = doc["rows"], doc["machine"]
    panels = list(dict.fromkeys((r["device"], r["dtype"]) for r in rows))
    impls = [i for i in IMPLS if any(r["impl"] == i for r in rows)]
    colors = {"splice_reference": "#1f77b4", "torch_batched": "#ff7f0e", "slice_loop": "#7f7f7f",
              "copy_ceiling": "#d62728", "splice_triton": "#2ca02c"}
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), dpi=110, squeeze=False)
    for ax, (dev, dt) in zip(axes[0], panels):
        rs = [r for r in rows if r["device"] == dev and r["dtype"] == dt]
        shapes = list(dict.fromkeys((r["n_cubes"], r["tokens_per_cube"]) for r in rs))
        w = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            by = {(r["n_cubes"], r["tokens_per_cube"]): r for r in rs if r["impl"] == impl}
            xs = [i + (j - (len(impls) - 1) / 2) * w for i in range(len(shapes))]
            g = [by[s]["gbps"] if s in by else 0 for s in shapes]
            lo = [by[s]["gbps"] - by[s]["gbps_p10_p90"][0] if s in by else 0 for s in shapes]
            hi = [by[s]["gbps_p10_p90"][1] - by[s]["gbps"] if s in by else 0 for s in shapes]
            ax.bar(xs, g, w, yerr=[lo, hi], capsize=2, label=impl, color=colors[impl],
                   error_kw={"elinewidth": 0.8})
        ax.set_xticks(range(len(shapes)))
        mb = {(r["n_cubes"], r["tokens_per_cube"]): r["bytes_moved"] / 2 ** 20 for r in rs}
        ax.set_xticklabels([f"{n} x {t}\n{mb[(n, t)]:.0f} MiB moved" for n, t in shapes], fontsize=8)
        ax.set_xlabel("cubes x tokens per cube")
        ax.set_ylabel("GB/s (read + written), median, p10..p90 (log)")
        ax.set_yscale("log")
        ax.set_title(f"{dev}, {dt}", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(impls), fontsize=8, bbox_to_anchor=(0.5, 0.93))
    r0 = rows[0]
    dev = facts.get("gpu") or f"{facts['cpu']}, {facts['torch_threads']} threads"
    fig.suptitle(f"kvmem splice throughput, {r0['layers']} layers x {r0['kv_heads']} kv heads x {r0['head_dim']} dim "
                 f"(SmolLM2-135M) on {dev}", fontsize=10)
    _common.save_figure(fig, png, facts, top=0.89)


def print_table(rows: list[dict]) -> None:
    head = f"{'device':<6} {'dtype':<5} {'shape':>9} {'impl':<17} {'median ms':>10} {'GB/s':>7} {'p10..p90 GB/s':>15} {'of copy':>7}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        f = r["fraction_of_copy_ceiling"]
        print(f"{r['device']:<6} {r['dtype']:<5} {str(r['n_cubes']) + 'x' + str(r['tokens_per_cube']):>9} "
              f"{r['impl']:<17} {1e3 * r['median_s']:>10.2f} {r['gbps']:>7.2f} "
              f"{r['gbps_p10_p90'][0]:>7.2f}..{r['gbps_p10_p90'][1]:<6.2f} {'-' if f is None else f'{100 * f:.0f}%':>7}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--shapes", nargs="+", default=["4x1500", "2x1500", "8x1500", "4x512", "4x4096"],
                   help="cubes x tokens per cube")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-cpu", dest="cpu", action="store_false", help="skip the CPU rows (with CUDA)")
    p.add_argument("--interpret-check", action="store_true",
                   help="also check splice_triton under TRITON_INTERPRET=1 on a small CPU shape (never timed)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/splice_kernel_<cpu|cuda>.json)")
    p.add_argument("--quick", action="store_true", help="smoke run: small shapes; writes nothing unless --out")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.reps, args.warmup = ["2x64", "3x100"], 3, 1
    args.shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes]
    if args.threads:
        torch.set_num_threads(args.threads)

    facts = machine_facts()
    print(json.dumps({k: v for k, v in facts.items() if k != "git_dirty_paths"}), flush=True)
    devices = ([torch.device("cpu")] if args.cpu else []) + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for dev in devices:
            rows += bench_device(dev, args)
        interp = interpret_check(args) if args.interpret_check else None
    facts["bench_wall_s"] = time.perf_counter() - t0
    print()
    print_table(rows)
    if not torch.cuda.is_available():
        print("\nno CUDA device: splice_triton not timed (Triton on CPU runs only under TRITON_INTERPRET=1, a "
              "Python interpreter for correctness tests, not a speed path)")
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    out = args.out or (None if args.quick else str(ROOT / "bench" / "results" / f"splice_kernel_{kind}.json"))
    if out:
        doc = {"machine": facts, "args": {k: v for k, v in vars(args).items()},
               "triton_interpret_check": interp,
               "note": "GB/s = (bytes read + bytes written) / median seconds. splice_triton is timed on CUDA only; "
                       "TRITON_INTERPRET=1 on CPU is a correctness tool and is never timed.",
               "rows": rows}
        _common.write_results(doc, out, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
