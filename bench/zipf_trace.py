"""A Zipf request trace through kvmem.memory.scheduler.MemScheduler: hit rate per tier, LRU vs LFU, and the TTFT it implies.

500 memories with SmolLM2-135M KV sizes (30 layers x 2 (K, V) x 3 KV heads x 64 dims x 4 bytes = 46,080 bytes
per token; lengths drawn uniformly from 512..2048 tokens, the range bench/ttft.py measures, so that no TTFT is
extrapolated), 10,000 requests for one memory each, popularity Zipf
(P(rank r) ~ 1 / r^s, s = 1.0 / 1.1 / 1.2; which memory has which rank is random, unrelated to its size).
Cubes are fakes with realistic byte sizes (no tensors move: this measures the policy, not copies). Device and CPU
budgets are fractions of all cube bytes (headline 5% / 20%, and a sweep).

Per request: the tier it was served from (device / cpu / disk), and an implied TTFT = the measured TTFT of that
tier at that memory length, from bench/results/ttft_cpu.json (kvmem_device / kvmem_cpu / kvmem_disk_cold or
kvmem_disk, and full_prefill for "always prefill"; linear in memory length between the measured lengths). Without
that file, placeholder costs are used and every row says so.

Policies (all kvmem's MemScheduler, promote_after=0) and a reference on the same trace:
    lru             policy="lru"
    lfu             policy="lfu" as shipped: one count per request shared by the tiers and kept across moves
                    and evictions, every count halved each lfu_halve_every=1000 requests (2x the memories here)
    lfu_no_aging    policy="lfu", lfu_halve_every=0: counts never fade
    static_oracle   the memories with the highest true request probability per byte pinned in device, then CPU
                    memory: about the best any policy can do on an independent-reference trace
Scenarios: "static" (one popularity ranking for the whole trace, s = 1.0, 1.1, 1.2; budget sweep at 1.1) and
"drift" (s = 1.1, the ranking reshuffled every 2,000 requests: the hot set moves, as a user's topics do).

    .venv/bin/python bench/zipf_trace.py           # ~1 min; writes bench/results/zipf_trace_cpu.{json,png}
    .venv/bin/python bench/zipf_trace.py --quick   # smoke run, seconds; writes nothing unless --out is given
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # bench/_common.py, also when imported from elsewhere

import _common  # noqa: E402
from kvmem.memory.scheduler import MemScheduler  # noqa: E402
from workloads import make_memories, make_trace, zipf_probs  # noqa: E402

BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4   # 46,080: SmolLM2-135M, float32 K and V
TIERS = ("device", "cpu", "disk")
# Placeholder TTFT seconds (used only without bench/results/ttft_cpu.json): a + b * tokens per method.
PLACEHOLDER = {"full_prefill": (0.02, 60e-6), "kvmem_device": (0.02, 2e-6), "kvmem_cpu": (0.02, 2e-6),
               "kvmem_disk": (0.02, 6e-6)}


# ---------------------------------------------------------------- fakes (as in tests/test_memory_system.py)
class FakeCube:
    def __init__(self, nbytes, device="cpu"):
        self.nbytes, self.device = nbytes, device

    def to(self, device):
        return FakeCube(self.nbytes, str(device))

    def pin_memory(self):
        return self


class FakeView:
    """The disk tier: every memory has a cube of its size."""

    def __init__(self, sizes: dict):
        self.sizes, self.loads = sizes, 0

    def load_cube(self, memory_id, device=None):
        if memory_id not in self.sizes:
            return None
        self.loads += 1
        return FakeCube(self.sizes[memory_id])


# ---------------------------------------------------------------- policies
def make_scheduler(policy: str, view, device_budget: int, cpu_budget: int) -> MemScheduler:
    kwargs = {"lru": {"policy": "lru"}, "lfu": {"policy": "lfu"},
              "lfu_no_aging": {"policy": "lfu", "lfu_halve_every": 0}}[policy]
    return MemScheduler(view, device_capacity_bytes=device_budget, cpu_capacity_bytes=cpu_budget, promote_after=0,
                        **kwargs)


def static_oracle(probs: dict, sizes_bytes: dict, device_budget: int, cpu_budget: int) -> dict:
    """id -> tier: highest probability per byte first, into device memory, then CPU memory, greedily."""
    placement, room = {}, {"device": device_budget, "cpu": cpu_budget}
    for m in sorted(probs, key=lambda m: probs[m] / sizes_bytes[m], reverse=True):
        for tier in ("device", "cpu"):
            if sizes_bytes[m] <= room[tier]:
                placement[m], room[tier] = tier, room[tier] - sizes_bytes[m]
                break
        else:
            placement[m] = "disk"
    return placement


def replay(policy: str, trace: list, drawn_from: list, sizes_bytes: dict, device_budget: int,
           cpu_budget: int) -> tuple[list, dict]:
    """The tier each request was served from, and the bytes read from disk and copied from CPU to device."""
    if policy == "static_oracle":  # knows the true probabilities (of the current phase, under drift)
        placements = {}
        for probs in drawn_from:
            if id(probs) not in placements:
                placements[id(probs)] = static_oracle(probs, sizes_bytes, device_budget, cpu_budget)
        served = [placements[id(p)][m] for m, p in zip(trace, drawn_from)]
        return served, {"bytes_disk_read": sum(sizes_bytes[m] for m, t in zip(trace, served) if t == "disk"),
                        "bytes_cpu_to_device": sum(sizes_bytes[m] for m, t in zip(trace, served) if t == "cpu")}
    sched = make_scheduler(policy, FakeView(sizes_bytes), device_budget, cpu_budget)
    served = []
    for m in trace:
        cube, tier_served = sched.fetch(m)
        assert cube is not None
        served.append(tier_served)
        for tier in sched.tiers.values():  # the budgets are hard limits
            assert tier.used <= tier.capacity
    return served, {k: sched.counters[k] for k in ("bytes_disk_read", "bytes_cpu_to_device")}


# ---------------------------------------------------------------- TTFT model
def load_ttft(path: Path) -> tuple[dict, str, dict | None]:
    """method -> sorted [(memory_tokens, median_s)], where the costs came from, and the file's machine facts."""
    if path.exists():
        doc = json.loads(path.read_text())
        table: dict = {}
        for r in doc["rows"]:
            table.setdefault(r["method"], []).append((r["memory_tokens"], r["median_s"]))
        done = "" if doc.get("complete", True) else " (a PARTIAL run: complete=false)"
        lengths = sorted({n for v in table.values() for n, _ in v})
        return ({m: sorted(v) for m, v in table.items()},
                f"measured: {path.resolve().relative_to(ROOT)}, memory lengths {lengths}{done}", doc.get("machine"))
    lengths = (200, 500, 1000, 2000)
    table = {m: [(n, a + b * n) for n in lengths] for m, (a, b) in PLACEHOLDER.items()}
    return table, "PLACEHOLDER costs (bench/results/ttft_cpu.json missing): not measured", None


def cost(table: dict, method: str, tokens: int) -> float:
    """Median TTFT of ``method`` at ``tokens``: linear between measured lengths, the end segments extended."""
    pts = table[method]
    if len(pts) == 1:
        return pts[0][1]
    i = next((i for i in range(len(pts) - 1) if tokens <= pts[i + 1][0]), len(pts) - 2)
    (x0, y0), (x1, y1) = pts[i], pts[i + 1]
    return max(y0 + (y1 - y0) * (tokens - x0) / (x1 - x0), 0.0)


def tier_methods(table: dict) -> dict:
    """Which measured method stands for each tier."""
    disk = "kvmem_disk_cold" if "kvmem_disk_cold" in table else "kvmem_disk"
    return {"device": "kvmem_device" if "kvmem_device" in table else "kvmem_cpu", "cpu": "kvmem_cpu", "disk": disk}


# ---------------------------------------------------------------- run
def summarise(served: list, trace: list, tokens: dict, table: dict, methods: dict, warmup: int) -> dict:
    """Hit rates per tier and implied mean TTFT, over all requests and after the first ``warmup``."""
    warm_disk = {**methods, "disk": "kvmem_disk"} if "kvmem_disk" in table else methods
    out = {}
    for part, lo in (("all", 0), ("steady", warmup)):
        s, t = served[lo:], trace[lo:]
        n = len(s)
        counts = Counter(s)
        ttft = [cost(table, methods[tier], tokens[m]) for tier, m in zip(s, t)]
        ttft_warm = [cost(table, warm_disk[tier], tokens[m]) for tier, m in zip(s, t)]
        prefill = [cost(table, "full_prefill", tokens[m]) for m in t]
        out[part] = {**{f"hit_rate_{tier}": counts[tier] / n for tier in TIERS},
                     "hit_rate_memory": (counts["device"] + counts["cpu"]) / n,
                     "mean_ttft_s": sum(ttft) / n, "mean_ttft_s_disk_in_page_cache": sum(ttft_warm) / n,
                     "mean_prefill_s": sum(prefill) / n, "ttft_vs_prefill": sum(ttft) / sum(prefill),
                     "n_requests": n}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memories", type=int, default=500)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--warmup", type=int, default=1_000, help="requests left out of the 'steady' numbers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-tokens", type=int, default=512, help="memory lengths: uniform in [min, max]; the default")
    ap.add_argument("--max-tokens", type=int, default=2048, help="is the range ttft.py measures (no extrapolation)")
    ap.add_argument("--ttft", default=str(ROOT / "bench/results/ttft_cpu.json"))
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/zipf_trace_cpu.json)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 60 memories, 1,200 requests; writes nothing "
                                                         "unless --out is given")
    args = ap.parse_args(argv)
    if args.quick:
        args.memories, args.requests, args.warmup = 60, 1_200, 200
    out = args.out or (None if args.quick else _common.result_path("zipf_trace"))

    tokens = make_memories(args.memories, args.seed, args.min_tokens, args.max_tokens)
    sizes = {m: n * BYTES_PER_TOKEN for m, n in tokens.items()}
    total = sum(sizes.values())
    table, source, ttft_machine = load_ttft(Path(args.ttft))
    methods = tier_methods(table)
    print(f"{len(sizes)} memories, {total / 2**30:.2f} GiB of cubes; TTFT costs: {source}; tiers -> {methods}")
    if not Path(args.ttft).exists():
        print("WARNING: no measured TTFT file; the TTFT numbers below are PLACEHOLDERS, not measurements")

    policies = ("lru", "lfu", "lfu_no_aging", "static_oracle")
    headline = (0.05, 0.20)
    sweep = [(0.01, 0.04), (0.02, 0.08), (0.05, 0.20), (0.10, 0.40), (0.20, 0.80), (0.05, 0.0), (0.0, 0.20)]
    lo_len = min(n for v in table.values() for n, _ in v)
    hi_len = max(n for v in table.values() for n, _ in v)
    outside = sum(not lo_len <= n <= hi_len for n in tokens.values()) / len(tokens)
    rows = []
    for scenario, s, phases, budgets in (("static", 1.0, 1, [headline]), ("static", 1.1, 1, sweep),
                                         ("static", 1.2, 1, [headline]), ("drift", 1.1, 5, [headline])):
        probs = zipf_probs(list(sizes), s, args.seed)
        trace, drawn_from = make_trace(probs, args.requests, args.seed, phases=phases)
        for dev_frac, cpu_frac in budgets:
            dev_b, cpu_b = int(dev_frac * total), int(cpu_frac * total)
            for policy in policies:
                served, moved = replay(policy, trace, drawn_from, sizes, dev_b, cpu_b)
                summary = summarise(served, trace, tokens, table, methods, args.warmup)
                row = {"policy": policy, "scenario": scenario, "zipf_s": s, "phases": phases,
                       "device_budget_frac": dev_frac, "cpu_budget_frac": cpu_frac,
                       "device_capacity_bytes": dev_b, "cpu_capacity_bytes": cpu_b, "n_memories": len(sizes),
                       "n_requests": len(trace), "warmup_requests": args.warmup, "seed": args.seed,
                       "ttft_source": source, "tier_methods": methods,
                       **{k: v for k, v in summary["all"].items() if k != "n_requests"},
                       **{f"gb_per_1000_requests_{k[6:]}": v / 1e9 / len(trace) * 1000 for k, v in moved.items()},
                       "steady": summary["steady"],
                       "hit_rate_device_by_phase": [
                           sum(t == "device" for t in served[i * len(trace) // phases:(i + 1) * len(trace) // phases])
                           / (len(trace) // phases) for i in range(phases)]}
                rows.append(row)
                print(f"{scenario:6s} s={s:.1f} dev {dev_frac:4.0%} cpu {cpu_frac:4.0%} {policy:13s} "
                      f"device {row['hit_rate_device']:.3f} cpu {row['hit_rate_cpu']:.3f} "
                      f"disk {row['hit_rate_disk']:.3f}"
                      f"  mean TTFT {1e3 * row['mean_ttft_s']:7.1f} ms vs prefill {1e3 * row['mean_prefill_s']:7.1f} ms"
                      f" ({row['ttft_vs_prefill']:.2f}x); GB/1000 req: disk {row['gb_per_1000_requests_disk_read']:.1f}"
                      f" cpu->dev {row['gb_per_1000_requests_cpu_to_device']:.1f}"
                      + (f"; device hit rate by phase {[round(x, 2) for x in row['hit_rate_device_by_phase']]}"
                         if phases > 1 else ""), flush=True)

    if out is None:
        return 0
    doc = {"benchmark": "zipf_trace", "machine": _common.machine_facts(packages=("kvmem",)), "ttft_source": source,
           "ttft_machine": ttft_machine, "bytes_per_token": BYTES_PER_TOKEN, "total_cube_bytes": total,
           "token_range": [min(tokens.values()), max(tokens.values())],
           "memories_outside_measured_lengths": outside, "rows": rows}
    _common.write_results(doc, out, plot)
    return 0


# ---------------------------------------------------------------- plot
COLORS = {"device": "#2ca02c", "cpu": "#1f77b4", "disk": "#d62728"}
POLICY_COLORS = {"lru": "#9467bd", "lfu": "#17becf", "lfu_no_aging": "#8c564b",
                 "static_oracle": "#bcbd22"}


def plot(doc: dict, png: Path) -> None:
    plt = _common.pyplot()
    rows = doc["rows"]
    pols = ["lru", "lfu", "lfu_no_aging", "static_oracle"]
    head = [r for r in rows if r["device_budget_frac"] == 0.05 and r["cpu_budget_frac"] == 0.20]
    groups = sorted({(r["scenario"], r["zipf_s"]) for r in head}, key=lambda g: (g[0] != "static", g[1]))
    name = lambda g: f"zipf s={g[1]}" if g[0] == "static" else f"drift, s={g[1]}"  # noqa: E731
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 5.8), dpi=100, gridspec_kw={"width_ratios": [1.5, 1.1, 1]})
    # 1. hit rate per tier, stacked, per (scenario, policy), headline budgets
    xs, labels, x = [], [], 0.0
    for g in groups:
        for p in pols:
            r = next(r for r in head if (r["scenario"], r["zipf_s"]) == g and r["policy"] == p)
            bottom = 0
            for tier in TIERS:
                v = r[f"hit_rate_{tier}"]
                ax1.bar(x, v, bottom=bottom, color=COLORS[tier], label=tier if not xs else None, width=0.8)
                if v > 0.06:
                    ax1.text(x, bottom + v / 2, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white")
                bottom += v
            xs.append(x)
            labels.append(f"{p}\n{name(g)}")
            x += 1
        x += 0.6
    ax1.set_xticks(xs, labels, fontsize=6.5, rotation=60)
    ax1.set_ylabel("fraction of requests served from")
    ax1.set_title("hit rate per tier (device budget 5%, CPU 20% of all cube bytes)", fontsize=9)
    ax1.legend(fontsize=8, loc="lower right")
    # 2. implied mean TTFT vs always prefill, headline budgets
    width = 0.14
    for j, g in enumerate(groups):
        rs = {r["policy"]: r for r in head if (r["scenario"], r["zipf_s"]) == g}
        ax2.bar(j - 2 * width, 1e3 * rs["lru"]["mean_prefill_s"], width, color="#7f7f7f",
                label="always prefill" if j == 0 else None)
        for i, p in enumerate(pols):
            ax2.bar(j + (i - 1) * width, 1e3 * rs[p]["mean_ttft_s"], width, color=POLICY_COLORS[p],
                    label=f"kvmem tiers, {p}" if j == 0 else None)
            ax2.text(j + (i - 1) * width, 1e3 * rs[p]["mean_ttft_s"], f"{1e3 * rs[p]['mean_ttft_s']:.0f}",
                     ha="center", va="bottom", fontsize=5.5, rotation=90)
        ax2.text(j - 2 * width, 1e3 * rs["lru"]["mean_prefill_s"], f"{1e3 * rs['lru']['mean_prefill_s']:.0f}",
                 ha="center", va="bottom", fontsize=5.5, rotation=90)
    ax2.set_xticks(range(len(groups)), [name(g) for g in groups], fontsize=8)
    ax2.set_ylabel("implied mean TTFT per request, ms")
    ax2.set_ylim(0, 1.45 * max(1e3 * r["mean_prefill_s"] for r in head))
    ax2.set_title("implied mean TTFT (device 5%, CPU 20%)", fontsize=9)
    ax2.legend(fontsize=7, loc="upper center", ncol=2)
    # 3. budget sweep at s=1.1: memory-tier hit rate (device + cpu) vs device budget, cpu = 4x device
    sweep = [r for r in rows if r["scenario"] == "static" and r["zipf_s"] == 1.1 and r["cpu_budget_frac"] > 0
             and r["device_budget_frac"] > 0]
    for i, p in enumerate(pols):
        rs = sorted((r for r in sweep if r["policy"] == p), key=lambda r: r["device_budget_frac"])
        ax3.plot([100 * r["device_budget_frac"] for r in rs], [r["hit_rate_memory"] for r in rs],
                 marker="o", label=f"{p}: device + CPU", color=POLICY_COLORS[p])
        ax3.plot([100 * r["device_budget_frac"] for r in rs], [r["hit_rate_device"] for r in rs], marker="x",
                 linestyle=":", color=POLICY_COLORS[p], label=f"{p}: device")
    ax3.set_xscale("log")
    ax3.set_xticks([1, 2, 5, 10, 20], ["1/4", "2/8", "5/20", "10/40", "20/80"])
    ax3.set_xlabel("device / CPU budget, % of all cube bytes")
    ax3.set_ylabel("hit rate")
    ax3.set_title("budget sweep, zipf s=1.1", fontsize=9)
    ax3.legend(fontsize=6)
    ax3.grid(alpha=0.3)
    m = doc["machine"]
    fig.suptitle(f"MemScheduler on a Zipf trace: {rows[0]['n_requests']} requests over {rows[0]['n_memories']} "
                 f"memories ({doc['total_cube_bytes'] / 2**30:.1f} GiB of SmolLM2 KV, {doc['token_range'][0]}.."
                 f"{doc['token_range'][1]} tokens each)\nTTFT costs: {doc['ttft_source']}; tiers -> "
                 f"{rows[0]['tier_methods']}", fontsize=8.5)
    _common.save_figure(fig, png, m, top=0.93)


if __name__ == "__main__":
    sys.exit(main())
