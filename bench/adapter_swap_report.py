"""What adapter_swap.py's rows mean: speed-ups, the issue's targets, tables (terminal and markdown) and the plot.

    .venv/bin/python bench/adapter_swap.py --report bench/results/adapter_swap_cpu.json [--png out.png]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py
import _common  # noqa: E402
from workloads import ADAPTER_SPECS  # noqa: E402

HEADLINE = "attn_r16"  # the spec the targets are judged on (rank 16, the issue's case)
KVMEM_METHODS = ("kvmem_resident", "kvmem_cold", "kvmem_disk", "kvmem_hotswap")
PEFT_METHODS = ("peft_set_adapter", "peft_load_adapter", "peft_from_pretrained", "peft_unload")
RELOAD_METHODS = ("reload_model_adapter", "reload_load_smollm2")
METHODS = KVMEM_METHODS + PEFT_METHODS + RELOAD_METHODS
TARGET_MS = 10.0
TARGET_SPEEDUP = 50.0


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_X = median(X, same adapter shape; reloads: the headline shape) / median(this row), wall clock;
    cpu_speedup_vs_X the same with CPU-time medians."""
    for key, prefix in (("median_ms", "speedup_vs_"), ("cpu_median_ms", "cpu_speedup_vs_")):
        med = {(r["method"], r["spec"]): r[key] for r in rows}
        for r in rows:
            for base in ("peft_from_pretrained", "peft_load_adapter") + RELOAD_METHODS:
                b = med.get((base, r["spec"])) or (med.get((base, HEADLINE)) if base in RELOAD_METHODS else None)
                r[prefix + base] = b / r[key] if b else None


def check_targets(rows: list[dict]) -> dict:
    by = {r["method"]: r for r in rows if r["spec"] == HEADLINE}
    t = {"spec": HEADLINE, "target_median_ms": TARGET_MS, "target_speedup_vs_reload": TARGET_SPEEDUP,
         "reload_compared_to": "reload_model_adapter: AutoModelForCausalLM.from_pretrained of the converted "
                               "checkpoint (safetensors, in the OS page cache) + PeftModel.from_pretrained"}
    for m in KVMEM_METHODS:
        if m in by:
            for clock, key, prefix in (("wall", "median_ms", "speedup_vs_"),
                                       ("cpu", "cpu_median_ms", "cpu_speedup_vs_")):
                t[f"{m}_{clock}_median_ms"] = by[m][key]
                t[f"{m}_{clock}_le_{TARGET_MS:g}ms"] = by[m][key] <= TARGET_MS
                sp = by[m].get(prefix + "reload_model_adapter")
                t[f"{m}_{clock}_speedup_vs_reload"] = sp
                t[f"{m}_{clock}_ge_{TARGET_SPEEDUP:g}x_vs_reload"] = None if sp is None else sp >= TARGET_SPEEDUP
                t[f"{m}_{clock}_speedup_vs_peft_from_pretrained"] = by[m].get(prefix + "peft_from_pretrained")
    return t


def print_table(rows: list[dict]) -> None:
    head = (f"{'adapter':<13} {'method':<21} {'median ms':>10} {'p10..p90 ms':>21} {'cpu ms':>9} {'n':>4} "
            f"{'x from_pre':>10} {'x reload':>9} {'max|dlogit|':>11} {'base ==':>7} {'load':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        sp1, sp2 = r.get("speedup_vs_peft_from_pretrained"), r.get("speedup_vs_reload_model_adapter")
        d = r.get("max_abs_logit_diff_vs_fresh_peft")
        eq = r.get("base_bit_identical_after_none")
        load = r.get("other_processes_cpu_cores")
        print(f"{r['spec']:<13} {r['method']:<21} {r['median_ms']:>10.3f} "
              f"{r['p10_ms']:>10.3f}..{r['p90_ms']:<9.3f} {r['cpu_median_ms']:>9.3f} {r['samples']:>4} "
              f"{'-' if sp1 is None else f'{sp1:.1f}':>10} {'-' if sp2 is None else f'{sp2:.0f}':>9} "
              f"{'-' if d is None else f'{d:.1e}':>11} {'-' if eq is None else str(eq):>7} "
              f"{'-' if load is None else f'{load:.2f}':>5}")


def print_breakdowns(breakdowns: dict) -> None:
    """Where each kvmem swap's time goes, per adapter shape (see adapter_swap.time_pieces)."""
    for spec, bs in breakdowns.items():
        for method, b in bs.items():
            print(f"{method} breakdown, {spec} (mean of {b['swaps']} swaps, {b['mean_ms_per_swap']:.2f} ms each):")
            for k, v in b["pieces_mean_ms"].items():
                print(f"    {v:9.3f} ms  {k}")
            if "add_adapter+set_state_dict_low_cpu_mem_usage_median_ms" in b:
                print(f"    (add_adapter + set_peft_model_state_dict with low_cpu_mem_usage=True, no random init: "
                      f"{b['add_adapter+set_state_dict_low_cpu_mem_usage_median_ms']:.3f} ms median)")


def markdown_table(doc: dict) -> str:
    """The rows of a results JSON as a markdown table (for bench/README.md)."""
    lines = ["| adapter | method | median ms | p10..p90 ms | CPU ms | n | x from_pretrained | x reload "
             "| max abs logit diff | base exact | other load |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|:-:|--:|"]

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    for r in doc["rows"]:
        d, eq, load = (r.get("max_abs_logit_diff_vs_fresh_peft"), r.get("base_bit_identical_after_none"),
                       r.get("other_processes_cpu_cores"))
        prec = ".3f" if r["median_ms"] < 100 else ".1f"
        lines.append(
            f"| {r['spec']} | {r['method']} | {r['median_ms']:{prec}} | {r['p10_ms']:{prec}}..{r['p90_ms']:{prec}} "
            f"| {r['cpu_median_ms']:{prec}} | {r['samples']} | {f(r.get('speedup_vs_peft_from_pretrained'), '.1f')} "
            f"| {f(r.get('speedup_vs_reload_model_adapter'), '.1f')} | {'-' if d is None else f'{d:.1e}'} "
            f"| {'-' if eq is None else ('yes' if eq else 'NO')} | {f(load, '.2f')} |")
    return "\n".join(lines)


def plot(doc: dict, png: Path) -> None:
    """Grouped bars (log y): median ms per method, one bar per adapter shape, p10..p90 whiskers."""
    plt = _common.pyplot()
    rows, facts = doc["rows"], doc["machine"]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    specs = [s for s in ADAPTER_SPECS if any(r["spec"] == s for r in rows)]
    colors = {"attn_r4": "#9ecae1", "attn_r16": "#1f77b4", "attn_r64": "#08306b", "attn_mlp_r16": "#ff7f0e"}
    labels = {"attn_r4": "rank 4, attention", "attn_r16": "rank 16, attention", "attn_r64": "rank 64, attention",
              "attn_mlp_r16": "rank 16, attention + MLP"}
    fig, ax = plt.subplots(figsize=(11, 5.8), dpi=120)
    width = 0.8 / len(specs)
    for j, spec in enumerate(specs):
        xs, ys, lo, hi, cpu = [], [], [], [], []
        for i, m in enumerate(methods):
            r = next((r for r in rows if r["method"] == m and r["spec"] == spec), None)
            if r is None:
                continue
            xs.append(i + (j - (len(specs) - 1) / 2) * width)
            ys.append(r["median_ms"])
            lo.append(r["median_ms"] - r["p10_ms"])
            hi.append(r["p90_ms"] - r["median_ms"])
            cpu.append(r["cpu_median_ms"])
        ax.bar(xs, ys, width=width * 0.95, color=colors.get(spec), label=labels.get(spec, spec),
               yerr=[lo, hi], capsize=2, error_kw={"elinewidth": 0.8})
        ax.scatter(xs, cpu, marker="D", s=14, facecolor="white", edgecolor="black", linewidths=0.8, zorder=3,
                   label="this process's CPU time (median)" if j == 0 else None)
    ax.axhline(TARGET_MS, color="#d62728", linestyle="--", linewidth=1)
    ax.text(len(methods) - 0.5, TARGET_MS * 1.12, f"target {TARGET_MS:g} ms", color="#d62728", ha="right", fontsize=8)
    for i in range(len(methods) - 1):  # separate kvmem / PEFT / reload groups
        if methods[i].split("_")[0] != methods[i + 1].split("_")[0]:
            ax.axvline(i + 0.5, color="#bbbbbb", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([m.replace("_", "\n", 1) for m in methods], fontsize=8)
    ax.set_ylabel("ms per swap / load (wall-clock median, p10..p90)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.set_title(f"LoRA adapter swap, SmolLM2-135M-Instruct {facts['dtype'].replace('torch.', '')}, "
                 f"CPU ({facts['cpu']}, {facts['torch_threads']} threads)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    _common.save_figure(fig, png, facts)
