"""The recall evidence gate (kvmem.memory.recall.relevant): what it keeps of the index's top 10, on- and off-topic.

On the cross-style conversation sets (bench/datasets, seed 5), per style and per MIN_DENSE_SIMILARITY: how many
gold answer turns the index ranked in its top 10 the gate would drop (should be none), and how many top-10 hits
it keeps for questions the conversations say nothing about (should be few). Lexical index (no dense extra) too.

    .venv/bin/python bench/recall_gate.py        # ~3 min on 2 cores; bench/results/recall_gate_cpu.json
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_facts, result_path, write_results  # noqa: E402

import kvmem  # noqa: E402
import kvmem.memory.recall as recall  # noqa: E402

STYLES = ("casual", "team", "notes", "assistant")
OFF_TOPIC = ["What is the capital of Peru?", "How many moons does Jupiter have?", "Explain the rules of cricket.",
             "What is the boiling point of mercury?", "Who wrote War and Peace?", "How do I compile a Linux kernel?"]
THRESHOLDS = (0.15, 0.2, 0.25, 0.3)


def _kept(matrix: dict, qi: int, k: int = 10) -> list[tuple[int, bool]]:
    row = {name: s[qi] for name, s in matrix.items()}
    return [(i, recall.relevant(row, i)) for i in row["fused"].topk(k).indices.tolist()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--out", type=Path, default=result_path("recall_gate"))
    ap.add_argument("--quick", action="store_true", help="one style, lexical index only, results to a scratch file")
    args = ap.parse_args(argv)
    styles, denses = (STYLES[:1], (False,)) if args.quick else (STYLES, (True, False))
    if args.quick and args.out == result_path("recall_gate"):
        args.out = Path("/tmp/kvmem-bench-recall-gate.json")
    rows = []
    default = recall.MIN_DENSE_SIMILARITY
    for style in styles:
        ds = importlib.import_module(f"datasets.{style}").generate(seed=args.seed)
        for dense in denses:
            index = kvmem.MemoryIndex(dense=dense, device="cpu")
            for t in ds.turns:
                index.add(t.id, t.text, t.meta())
            ids, on = index.ids, index.score_matrix([q.text for q in ds.questions])
            off = index.score_matrix(OFF_TOPIC)
            for thr in THRESHOLDS if dense else (None,):
                recall.MIN_DENSE_SIMILARITY = default if thr is None else thr
                gold = [ok for qi, q in enumerate(ds.questions) for i, ok in _kept(on, qi) if ids[i] in q.answers]
                off_kept = [ok for qi in range(len(OFF_TOPIC)) for _, ok in _kept(off, qi)]
                rows.append({"style": style, "dense": dense, "min_dense_similarity": thr,
                             "gold_in_top10": len(gold), "gold_dropped": gold.count(False),
                             "off_topic_kept": sum(off_kept) / len(off_kept)})
                r = rows[-1]
                print(f"{style:9s} dense={dense!s:5s} thr={thr}: gold dropped {r['gold_dropped']}/"
                      f"{r['gold_in_top10']}, off-topic top-10 kept {r['off_topic_kept']:.0%}", flush=True)
    recall.MIN_DENSE_SIMILARITY = default
    write_results({"bench": "recall_gate", "machine": machine_facts(), "default": default, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
