"""Is `generate(prompt, cubes="auto")` ever slower than prefilling the same prompt? (issue 11, finding 11)

A store of invented team notes: short memories (one fact each, ~20 tokens) and long ones (a person's whole
paragraph, ~75 tokens, several people per memory). Per question, in one process and round robin:

- ``auto``: `mm.generate(q, cubes="auto", max_new_tokens=1)`; its TTFT (mm.last.ttft_s) runs from the call with
  the prompt in hand, retrieval included, to the first token;
- ``full``: the same ids ``auto`` ended up with (memories + request), prefilled in full by the model's own
  generate: what a user without kvmem would run for that prompt;
- ``search``: the index search alone (the retrieval that ``auto`` may add on top of ``full``).

Phases: ``cold`` (a fresh attach: no cube resident; long memories have cubes on disk), ``warm`` (the same
questions again: cubes in the device tier), and ``text`` (no cube anywhere: every memory goes in as text, and
no cube is built on the request's path). The claim checked per row: auto <= full + search (+ noise).

    .venv/bin/python bench/auto_overhead.py            # ~5 min on a quiet 2-core CPU
    .venv/bin/python bench/auto_overhead.py --quick    # smoke run, results into a scratch folder
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, add_model_argument, load_model, machine_facts, pyplot, result_path, save_figure, \
    write_results  # noqa: E402

import kvmem  # noqa: E402
from memory_text import FIRST, LAST, person_notes  # noqa: E402

QUESTIONS = ["Where does {first} {last} live?", "What does {first} {last} do for a living?",
             "Which pet does {first} {last} have?", "What is the badge number of {first} {last}?"]


def build_store(root: Path, mm_factory, n_people: int, seed: int) -> tuple[list[str], dict]:
    """Memories: per person one long paragraph (with a cube) and two short facts (text only)."""
    rng = random.Random(seed)
    people = [(FIRST[i % len(FIRST)], LAST[(i * 7) % len(LAST)]) for i in range(n_people)]
    mm = mm_factory(root, promote_after=0)
    questions = []
    for i, (first, last) in enumerate(people):
        text, facts = person_notes(rng, first, last)
        mm.remember(text, f"p{i}", cube=True)
        mm.remember(f"{first} {last} prefers tea to coffee in the morning.", f"p{i}-tea")
        mm.remember(f"{first} {last} cycles to work when it does not rain.", f"p{i}-bike")
        questions.append(rng.choice(QUESTIONS).format(first=first, last=last))
    return questions, {"people": n_people, "memories": 3 * n_people}


def time_phase(mm, questions: list[str], *, k: int, reps: int) -> list[dict]:
    """Per question: auto TTFT, full prefill of the same ids, search alone; medians over ``reps`` rounds."""
    rows = []
    model, pad = mm.model, mm.tokenizer.eos_token_id
    for q in questions:
        auto, full, search = [], [], []
        for _ in range(reps):
            out = mm.generate(q, cubes="auto", k=k, max_new_tokens=1, do_sample=False)
            auto.append(mm.last.ttft_s)
            report = mm.last
            ids = out[:, :report.prompt_tokens]
            t0 = time.perf_counter()
            with torch.inference_mode():
                full_out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
                                          do_sample=False, pad_token_id=pad)
            full.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            mm.index.search(q, k=k)
            search.append(time.perf_counter() - t0)
        rows.append({"question": q, "prompt_tokens": report.prompt_tokens,
                     "prefilled_tokens": report.prefilled_tokens,
                     "sources": [m["source"] for m in report.memories],
                     "same_first_token": bool(full_out[0, -1] == out[0, -1]),
                     "auto_ms": 1e3 * statistics.median(auto), "full_ms": 1e3 * statistics.median(full),
                     "search_ms": 1e3 * statistics.median(search),
                     "auto_samples_ms": [1e3 * x for x in auto], "full_samples_ms": [1e3 * x for x in full]})
    return rows


def plot(doc: dict, png: str) -> None:
    plt = pyplot()
    phases = list(doc["phases"])
    fig, axes = plt.subplots(1, len(phases), figsize=(4.2 * len(phases), 3.6), sharey=True)
    for ax, phase in zip(axes if len(phases) > 1 else [axes], phases):
        rows = doc["phases"][phase]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["full_ms"] for r in rows], 0.4, label="full prefill, same ids")
        ax.bar([i + 0.2 for i in x], [r["auto_ms"] for r in rows], 0.4, label='cubes="auto" (retrieval incl.)')
        ax.set_title(f"{phase}")
        ax.set_xlabel("question")
        ax.set_xticks(list(x))
    axes[0].set_ylabel("TTFT (ms, median)")
    axes[0].legend(fontsize=7)
    save_figure(fig, png, doc["machine"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_argument(parser)
    parser.add_argument("--people", type=int, default=24)
    parser.add_argument("--questions", type=int, default=6)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run into a scratch folder")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.people, args.questions, args.reps = 4, 2, 1
    model, tok = load_model(args.model)
    scratch = Path(tempfile.mkdtemp(prefix="kvmem-bench-auto-"))
    try:
        def mm_factory(root, **kw):
            return kvmem.wrap(model, tok).attach(kvmem.CubeStore(root).view("bench"),
                                                 index=kvmem.MemoryIndex(dense=False), **kw)

        questions, store_facts = build_store(scratch / "store", mm_factory, args.people, seed=0)
        questions = questions[:args.questions]
        phases = {}
        mm = mm_factory(scratch / "store", promote_after=0)  # a fresh process: nothing resident
        phases["cold (cubes on disk)"] = time_phase(mm, questions, k=args.k, reps=1)
        phases["warm (cubes resident)"] = time_phase(mm, questions, k=args.k, reps=args.reps)
        text_store = scratch / "text"
        mm_text = mm_factory(text_store, promote_after=0)
        for rec in kvmem.CubeStore(scratch / "store").view("bench").ls():
            mm_text.remember(rec.text, rec.id)  # the same memories, no cubes
        phases["text (no cubes)"] = time_phase(mm_text, questions, k=args.k, reps=args.reps)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for name, rows in phases.items():
        print(f"\n{name}")
        print(f"{'prompt tok':>10} {'prefilled':>9} {'full ms':>9} {'auto ms':>9} {'search ms':>9}  ok  sources")
        for r in rows:
            ok = r["auto_ms"] <= r["full_ms"] + r["search_ms"] + 0.1 * r["full_ms"]
            r["within_full_plus_search_10pct"] = ok
            print(f"{r['prompt_tokens']:>10} {r['prefilled_tokens']:>9} {r['full_ms']:>9.0f} {r['auto_ms']:>9.0f} "
                  f"{r['search_ms']:>9.1f}  {'yes' if ok else 'NO '} {','.join(r['sources'])}")
    doc = {"bench": "auto_overhead", "machine": machine_facts(model=model, model_name=args.model),
           "settings": {**vars(args), "out": str(args.out) if args.out else None, **store_facts},
           "phases": phases}
    out = args.out or (scratch.parent / "kvmem-bench-auto.json" if args.quick
                       else result_path("auto_overhead", model=args.model))
    write_results(doc, out, plot)


if __name__ == "__main__":
    main()
