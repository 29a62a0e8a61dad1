"""What MemoryIndex() costs on a 6k-turn conversation index: build throughput, add-then-search, search.

Turns come from the "casual" generator (seeds 100.., until 6,000 turns), added with their full meta. Measured
in one process, other processes' CPU use recorded with every timing (the machine is shared):

    build          add() every turn, then the first search (which embeds them all in batches): turns/s
    add + search   add() one new turn and search() at once, the new turn found (embeds it alone: no rebuild)
    search         one search() on the 6k-turn index (questions of the same conversations)

for the default index (dense extra installed) and MemoryIndex(dense=False). Targets (issue 14, 2 cores):
build < 60 s, add + search < 50 ms, search < 50 ms.

    .venv/bin/python bench/retrieval_cost.py     # ~3 min on 2 quiet cores -> bench/results/retrieval_cost_cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kvmem  # noqa: E402
from bench import _common  # noqa: E402
from bench.datasets import casual  # noqa: E402

TARGETS = {"build_s": 60.0, "add_search_ms": 50.0, "search_ms": 50.0}


def conversation(n_turns: int):
    """(turns as (id, text, meta), questions) from casual seeds 100, 101, ... until ``n_turns`` turns."""
    turns, questions, seed = [], [], 100
    while len(turns) < n_turns:
        ds = casual.generate(seed)
        for t in ds.turns:
            meta = t.meta()
            meta["session"] = f"{seed}-{t.session}"
            turns.append((f"c{seed}-{t.id}", t.text, meta))
        questions += [q.text for q in ds.questions]
        seed += 1
    return turns[:n_turns], questions


def run(dense: bool, turns, questions, reps: int) -> dict:
    row = {"index": "MemoryIndex()" if dense else "MemoryIndex(dense=False)", "turns": len(turns),
           "loadavg_before": _common.loadavg()}
    index = kvmem.MemoryIndex(device="cpu", dense=dense)
    index.search("warm up the model")
    with _common.OtherLoad() as load:
        c0, t0 = time.process_time(), time.perf_counter()
        for memory_id, text, meta in turns:
            index.add(memory_id, text, meta)
        t_add = time.perf_counter() - t0
        index.search(questions[0])
        t_build, c_build = time.perf_counter() - t0, time.process_time() - c0
    # on a shared machine wall time says more about the neighbours than about kvmem: this process's own CPU
    # seconds over the cores it may use estimate the wall time on a quiet machine
    row.update(build_s=round(t_build, 2), build_cpu_s=round(c_build, 2),
               build_quiet_estimate_s=round(c_build / torch.get_num_threads(), 1), add_all_s=round(t_add, 2),
               turns_per_s=round(len(turns) / t_build, 1), build_other_cores=load.cores,
               loadavg_after_build=_common.loadavg())

    def search(i):
        return index.search(questions[i % len(questions)], k=10)

    s = _common.repeat(search, reps, warmup=2)
    row.update(_common.spread(s.seconds, unit="ms", prefix="search_"), search_other_cores=s.other,
               **_common.spread(s.cpu_seconds, unit="ms", prefix="search_cpu_", keep=False))

    def add_then_search(i):
        memory_id = f"new-{i}"
        index.add(memory_id, f"Note {i}: the spare key to the shed is under the blue flowerpot number {i}.",
                  {"session": "new", "turn": i, "speaker": "Maya", "date": "2024-06-01"})
        hits = index.search(f"Where is the spare key to the shed, flowerpot number {i}?", k=10)
        assert memory_id in [m for m, _ in hits], "the added turn must be found at once"

    s = _common.repeat(add_then_search, reps, warmup=1)
    row.update(_common.spread(s.seconds, unit="ms", prefix="add_search_"), add_search_other_cores=s.other,
               **_common.spread(s.cpu_seconds, unit="ms", prefix="add_search_cpu_", keep=False),
               loadavg_after=_common.loadavg())
    row["targets_met"] = {"build": row["build_s"] < TARGETS["build_s"],
                          "add_search": row["add_search_median_ms"] < TARGETS["add_search_ms"],
                          "search": row["search_median_ms"] < TARGETS["search_ms"]}
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, default=6000)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="smoke run: 600 turns, 5 reps; writes only with --out")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/retrieval_cost_cpu.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.turns, args.reps = 600, 5
    elif args.out is None:
        args.out = str(ROOT / "bench" / "results" / "retrieval_cost_cpu.json")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    turns, questions = conversation(args.turns)
    rows = [run(dense, turns, questions, args.reps) for dense in (True, False)]
    for r in rows:
        print(f"{r['index']:26} build {r['build_s']:6.1f} s (own CPU {r['build_cpu_s']:.0f} s; {r['turns_per_s']:.0f} "
              f"turns/s, other cores "
              f"{r['build_other_cores']})  search {r['search_median_ms']:.1f} ms  add+search "
              f"{r['add_search_median_ms']:.1f} ms  load {r['loadavg_before']} -> {r['loadavg_after']}")
    doc = {"machine": _common.machine_facts(packages=("torch", "kvmem", "bm25s", "sentence_transformers")),
           "targets": TARGETS, "rows": rows}
    if args.out:
        _common.write_results(doc, args.out)


if __name__ == "__main__":
    main()
