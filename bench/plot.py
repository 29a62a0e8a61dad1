"""Plot TTFT vs memory length from the JSON rows that bench/ttft.py writes.

    .venv/bin/python bench/plot.py bench/results/ttft_cpu.json [out.png]
    .venv/bin/python bench/plot.py bench/results/ttft_cpu.json --table     # markdown table of the rows
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py
import _common  # noqa: E402

STYLE = {  # method: (label, color, marker, linestyle)
    "full_prefill": ("full prefill (memory + query)", "#d62728", "o", "-"),
    "prefix_reuse": ("transformers prefix reuse (deepcopy cache)", "#7f7f7f", "s", "-"),
    "kvmem_disk": ("kvmem, cube on disk (page cache)", "#1f77b4", "^", "-"),
    "kvmem_disk_cold": ("kvmem, cube on disk (evicted)", "#17becf", "v", ":"),
    "kvmem_cpu": ("kvmem, cube in CPU memory", "#2ca02c", "D", "-"),
    "kvmem_device": ("kvmem, cube on device", "#9467bd", "x", "--"),
}


def plot(doc: dict, png_path: str) -> None:
    """Left: median TTFT (p10..p90 bars) vs memory tokens, log y, one line per method.
    Right: each method's median over the documented prefix reuse's median, with the issue's 1.03x / 1.10x targets."""
    plt = _common.pyplot()
    rows, facts = doc["rows"], doc["machine"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.5), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
    for method, (label, color, marker, ls) in STYLE.items():
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["memory_tokens"])
        if not rs:
            continue
        x = [r["memory_tokens"] for r in rs]
        y = [1e3 * r["median_s"] for r in rs]
        lo = [1e3 * (r["median_s"] - r["p10_s"]) for r in rs]
        hi = [1e3 * (r["p90_s"] - r["median_s"]) for r in rs]
        ax.errorbar(x, y, yerr=[lo, hi], label=label, color=color, marker=marker, linestyle=ls, capsize=3,
                    markersize=5, linewidth=1.5, alpha=0.9)
        if method != "full_prefill" and all(r.get("ratio_vs_prefix_reuse") is not None for r in rs):
            ax2.plot(x, [r["ratio_vs_prefix_reuse"] for r in rs], color=color, marker=marker, linestyle=ls,
                     markersize=5, linewidth=1.5, alpha=0.9, label=label)
    lengths = sorted({r["memory_tokens"] for r in rows})
    q = rows[0]["query_tokens"] if rows else "?"
    ax.set_yscale("log")
    ax.set_xlabel(f"memory tokens (query: {q} tokens)")
    ax.set_ylabel("time to first token, ms (median, bars p10..p90)")
    ax.set_xticks(lengths)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    dev = facts.get("gpu") or f"{facts.get('cpu')}, {facts.get('torch_threads')} threads"
    model = str(facts.get("model", _common.MODEL_NAME)).split(" (")[0]
    ax.set_title(f"TTFT, {model} {facts.get('dtype', '').replace('torch.', '')}, "
                 f"{facts.get('device')} ({dev})", fontsize=10)
    for level, text in ((1.03, "1.03x (target, cube in memory)"), (1.10, "1.10x (target, cube on disk)")):
        ax2.axhline(level, color="#444", linewidth=0.8, linestyle="--")
        ax2.text(lengths[0] if lengths else 0, level, " " + text, fontsize=7, va="bottom", color="#444")
    ax2.axhline(1.0, color="#7f7f7f", linewidth=1.0)
    ax2.set_xticks(lengths)
    ax2.set_xlabel("memory tokens")
    ax2.set_ylabel("median TTFT / median of prefix reuse")
    ax2.set_title("vs transformers' prefix reuse (lower is faster)", fontsize=10)
    ax2.grid(True, alpha=0.3)
    _common.save_figure(fig, png_path, facts)


def markdown_table(json_path: str) -> str:
    """The rows as a markdown table (for bench/README.md)."""
    rows = json.loads(Path(json_path).read_text())["rows"]
    out = ["| memory tokens | method | median TTFT ms | p10 .. p90 ms | min .. max ms | timed reps | TTFT change vs full prefill "
           "| / prefix reuse | same 1st token | max abs logit diff |",
           "|---:|---|---:|---:|---:|---:|---:|---:|:---:|---:|"]
    for r in rows:
        red = f"{-100 * r['reduction_vs_full']:+.1f}%" if r["reduction_vs_full"] else "-"
        d = r["max_abs_logit_diff_vs_full"]
        out.append(f"| {r['memory_tokens']} | {r['method']} | {1e3 * r['median_s']:.0f} | "
                   f"{1e3 * r['p10_s']:.0f} .. {1e3 * r['p90_s']:.0f} | {1e3 * r['min_s']:.0f} .. {1e3 * r['max_s']:.0f} | "
                   f"{r['reps']} | {red} | {r['ratio_vs_prefix_reuse']:.3f} | "
                   f"{'yes' if r['same_first_token_as_full'] else 'NO'} | {'-' if d is None else f'{d:.1e}'} |")
    return "\n".join(out)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--table"]
    src = args[0] if args else str(Path(__file__).parent / "results" / "ttft_cpu.json")
    if "--table" in sys.argv:
        print(markdown_table(src))
    else:
        plot(json.loads(Path(src).read_text()), args[1] if len(args) > 1 else str(Path(src).with_suffix(".png")))
