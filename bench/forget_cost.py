"""What forgetting that reaches derived units costs: `StoreView.forget` (delete the row and its cube file, find and
remove every stored unit derived from it, list stale adapters) vs what deleting cost before lineage (the catalog
row and its file only, `catalog.delete` + `blobs.delete`), on local SQLite stores of growing size.

Each store holds N text memories and N/100 derived units (each made from two memories). Timed: forgetting a
memory nothing derives from (the common case) and one that one unit derives from (the cascade removes it too);
the old delete of a memory, interleaved round robin. One process, medians after warm-up with p10..p90.

    .venv/bin/python bench/forget_cost.py            # ~3 min on 2 cores
    .venv/bin/python bench/forget_cost.py --quick    # smoke run; writes nothing unless --out
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _common  # noqa: E402

STYLE = {"forget": ("view.forget (nothing derives from it)", "#1f77b4"),
         "forget_dependant": ("view.forget (one unit derives from it)", "#ff7f0e"),
         "delete_row": ("delete row + file only (before lineage)", "#7f7f7f")}


def build(folder: Path, n: int):
    import kvmem
    from kvmem.store.lineage import source_entry

    view = kvmem.CubeStore(folder).view("me")
    for i in range(n):
        view.add(f"m{i}", f"memory number {i}: a short note about something that happened")
    for j in range(max(1, n // 100)):  # units derived from m{2j} and m{2j+1}
        a, b = view.get(f"m{2 * j}"), view.get(f"m{2 * j + 1}")
        view.add(f"d{j}", f"summary {j}", {"derived_from": [source_entry(a), source_entry(b)]})
    return view


def run(sizes, reps: int, warmup: int) -> list[dict]:
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            view = build(Path(tmp) / "s", n)
            units = max(1, n // 100)
            plain = iter(range(2 * units, n))            # memories nothing derives from
            sources = iter(range(0, 2 * units, 2))       # one source of each unit
            fns = {"forget": lambda: view.forget(f"m{next(plain)}"),
                   "forget_dependant": lambda: view.forget(f"m{next(sources)}"),
                   "delete_row": lambda: _delete_row(view, f"m{next(plain)}")}
            series = _common.round_robin(fns, {"forget": reps, "forget_dependant": min(reps, units),
                                               "delete_row": reps}, warmup={"forget": warmup, "delete_row": warmup,
                                                                          "forget_dependant": 0})
            for name, s in series.items():
                if not s.seconds:
                    continue
                rows.append({"memories": n, "derived_units": units, "method": name,
                             **_common.spread(s.seconds, unit="ms")})
                print(f"N={n:>5} {name:<17} median {rows[-1]['median_ms']:7.2f} ms", flush=True)
    return rows


def _delete_row(view, memory_id: str) -> None:
    rec = view.store.catalog.delete(view.namespace, memory_id)
    if rec is not None and rec.blob:
        view.store.blobs.delete(rec.blob)


def plot(doc: dict, png: str) -> None:
    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, (label, color) in STYLE.items():
        rows = [r for r in doc["rows"] if r["method"] == name]
        xs = [r["memories"] for r in rows]
        ax.errorbar(xs, [r["median_ms"] for r in rows], fmt="o-", color=color, label=label, capsize=3,
                    yerr=[[r["median_ms"] - r["p10_ms"] for r in rows], [r["p90_ms"] - r["median_ms"] for r in rows]])
    ax.set_xscale("log")
    ax.set_xlabel("memories in the store (1% of them derived units)")
    ax.set_ylabel("ms per delete (median, p10..p90)")
    ax.set_title("Forgetting with its cascade vs deleting the row only (local SQLite store, CPU)", fontsize=9)
    ax.legend(fontsize=8)
    _common.save_figure(fig, png, doc["machine"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    sizes, reps, warmup = ((200, 500), 5, 1) if args.quick else ((250, 1000, 3000), 15, 3)
    rows = run(sizes, reps, warmup)
    doc = {"bench": "forget_cost", "machine": _common.machine_facts(), "rows": rows}
    out = args.out or (None if args.quick else _common.result_path("forget_cost"))
    if out:
        _common.write_results(doc, out, plot)


if __name__ == "__main__":
    main()
