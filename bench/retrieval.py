"""Cross-style retrieval benchmark: kvmem's MemoryIndex() against BM25 and dense baselines, per conversation style.

Four independent generators (bench/datasets/: casual two-friend chat, a team channel, terse notes, verbose
assistant logs) make dated sessions of turns and questions labelled with the turns that answer them. The
default recipe was tuned (bench/retrieval_tune.py) on the TUNED styles only; the others are reported as held out.
Every turn is added as MemoryIndex.add(id, text, meta={"session", "turn", "speaker", "date"}).

recall@k = mean over questions of the share of a question's answer turns in the top k (a two-turn question
with one turn found counts 0.5). All methods are scored from one `MemoryIndex.score_matrix` call per dataset:

    bm25            BM25 of the question as asked over the turn as said (bm25s scores)
    dense           cosine of all-MiniLM-L6-v2 embeddings, question as asked vs turn
    bm25 window     BM25 of the turn with its neighbours (one each side)
    kvmem lexical   the default recipe without the dense extra: what MemoryIndex() does when it is not installed
    kvmem           MemoryIndex() as shipped (the fused score; `search` ranks by it: checked on every dataset)

    .venv/bin/python bench/retrieval.py                  # ~5 min on 2 busy cores -> bench/results/retrieval_cpu.*
    .venv/bin/python bench/retrieval.py --show casual 1  # print a dataset
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is imported as a package, so bench/datasets never shadows HF `datasets`

import kvmem  # noqa: E402
from bench import _common  # noqa: E402
from bench.datasets import assistant, casual, notes, team  # noqa: E402
from kvmem.memory.fusion import fuse  # noqa: E402
from kvmem.memory.index import DEFAULT_WEIGHTS  # noqa: E402

RRF_K = kvmem.MemoryIndex.__init__.__kwdefaults__["rrf_k"]

STYLES = {"casual": casual.generate, "team": team.generate, "notes": notes.generate,
          "assistant": assistant.generate}
TUNED = ("notes", "assistant")  # the styles bench/retrieval_tune.py tuned on (seeds 0 and 1)
REPORT_SEEDS = (2, 3, 4)
KS = (1, 5, 10)
LEXICAL = ("lexical", "lexical_window", "date", "speaker")


CACHE = Path(tempfile.gettempdir()) / "kvmem_bench_embeddings.sqlite"  # the same turns are embedded once


def build(style: str, seed: int, *, plain: bool = False, **index_kwargs):
    """(dataset, index with every turn added, score matrices of all questions). ``plain``: meta without speaker
    and date (the baselines' view: the question as asked, the turn as said)."""
    ds = STYLES[style](seed)
    index = kvmem.MemoryIndex(device="cpu", embedding_cache=CACHE, **index_kwargs)
    for t in ds.turns:
        meta = t.meta()
        if plain:
            meta = {"session": meta["session"], "turn": meta["turn"]}
        index.add(t.id, t.text, meta)
    # one question at a time, as search() embeds it: a batch pads questions to one length, which moves cosines
    # by ~1e-6 and can swap near-tied ranks
    rows = [index.score_matrix([q.text]) for q in ds.questions]
    return ds, index, {name: torch.cat([r[name] for r in rows]) for name in rows[0]}


def gold_matrix(ds, index) -> torch.Tensor:
    """[questions, memories] 1 where the turn answers the question."""
    pos = {m: i for i, m in enumerate(index.ids)}
    gold = torch.zeros(len(ds.questions), len(pos))
    for i, q in enumerate(ds.questions):
        gold[i, [pos[a] for a in q.answers]] = 1
    return gold


def hits(scores: torch.Tensor, gold: torch.Tensor, k: int) -> torch.Tensor:
    """[questions] share of each question's answer turns in the top k of ``scores``."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return gold.gather(1, top).sum(1) / gold.sum(1)


def methods(S: dict, P: dict, weights=DEFAULT_WEIGHTS, **fuse_kwargs) -> dict[str, torch.Tensor]:
    """method name -> [questions, memories] scores, from the score matrices of kvmem's index (S) and of the
    plain one (P: no speaker or date meta)."""
    out = {"bm25": P["lexical"], "bm25 window": P["lexical_window"], "dense": P["dense"]}
    fuse_kwargs.setdefault("rrf_k", RRF_K)
    out["kvmem lexical"] = fuse(S, {c: w for c, w in weights.items() if c in LEXICAL}, **fuse_kwargs)
    if "dense" in S:
        out["kvmem"] = fuse(S, weights, **fuse_kwargs)
    return out


def evaluate(style: str, seed: int) -> list[dict]:
    ds, index, S = build(style, seed)
    _, plain, P = build(style, seed, plain=True)
    assert plain.ids == index.ids
    gold = gold_matrix(ds, index)
    # the benchmark's kvmem row is what search() returns: checked on a few questions
    pos = {m: j for j, m in enumerate(index.ids)}
    for i in range(0, len(ds.questions), max(1, len(ds.questions) // 5)):
        for m, score in index.search(ds.questions[i].text, k=10):
            assert abs(S["fused"][i, pos[m]].item() - score) < 1e-6, (style, seed, i, m)
    rows = []
    kinds = [q.kind for q in ds.questions]
    for name, scores in methods(S, P).items():
        row = {"style": style, "seed": seed, "method": name, "questions": len(ds.questions),
               "turns": len(ds.turns), "held_out": style not in TUNED}
        for k in KS:
            h = hits(scores, gold, k)
            row[f"recall@{k}"] = round(h.mean().item(), 4)
            if k == 10:
                row["recall@10_by_kind"] = {
                    kind: round(h[[j for j, x in enumerate(kinds) if x == kind]].mean().item(), 4)
                    for kind in sorted(set(kinds))}
                row["hits@10"] = [round(x, 3) for x in h.tolist()]
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per style and method: recall@k means over seeds, recall@10 by kind, and kvmem's margin over the best
    single baseline (bm25 or dense) with a paired bootstrap 95% interval over the questions."""
    out = []
    for style in STYLES:
        srows = [r for r in rows if r["style"] == style]
        if not srows:
            continue
        by = {m: [r for r in srows if r["method"] == m] for m in dict.fromkeys(r["method"] for r in srows)}
        hits10 = {m: torch.tensor([h for r in rs for h in r["hits@10"]]) for m, rs in by.items()}
        best = max((m for m in ("bm25", "dense") if m in hits10), key=lambda m: hits10[m].mean().item())
        for m, rs in by.items():
            s = {"style": style, "method": m, "held_out": rs[0]["held_out"], "questions": len(hits10[m]),
                 **{f"recall@{k}": round(sum(r[f"recall@{k}"] * r["questions"] for r in rs) /
                                         sum(r["questions"] for r in rs), 4) for k in KS},
                 "best_baseline": best}
            kinds = rs[0]["recall@10_by_kind"].keys()
            s["recall@10_by_kind"] = {k: round(sum(r["recall@10_by_kind"].get(k, 0) for r in rs) / len(rs), 3)
                                      for k in kinds}
            if m.startswith("kvmem"):
                s["margin_over_best_baseline"], s["margin_ci95"] = paired_ci(hits10[m], hits10[best])
            out.append(s)
    return out


def paired_ci(a: torch.Tensor, b: torch.Tensor, n: int = 4000, seed: int = 0) -> tuple[float, list]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(a), (n, len(a)), generator=g)
    d = (a[idx] - b[idx]).mean(1)
    return round((a - b).mean().item(), 4), [round(d.quantile(0.025).item(), 4), round(d.quantile(0.975).item(), 4)]


def print_table(summary: list[dict]) -> None:
    print(f"\n{'style':10} {'method':14} {'r@1':>6} {'r@5':>6} {'r@10':>6}  margin@10 over best baseline  by kind")
    for s in summary:
        margin = (f"{s['margin_over_best_baseline']:+.3f} [{s['margin_ci95'][0]:+.3f}, {s['margin_ci95'][1]:+.3f}]"
                  if "margin_ci95" in s else "")
        tag = "" if s["held_out"] else " (tuned)"
        kinds = " ".join(f"{k} {v:.2f}" for k, v in s["recall@10_by_kind"].items())
        print(f"{s['style'] + tag:18} {s['method']:14} {s['recall@1']:6.3f} {s['recall@5']:6.3f} "
              f"{s['recall@10']:6.3f}  {margin:28} {kinds}")


def plot(doc: dict, png: str) -> None:
    plt = _common.pyplot()
    summary = doc["summary"]
    styles = list(dict.fromkeys(s["style"] for s in summary))
    names = list(dict.fromkeys(s["method"] for s in summary))
    fig, ax = plt.subplots(figsize=(10, 4.8))
    width = 0.8 / len(names)
    for j, m in enumerate(names):
        vals = [next((s["recall@10"] for s in summary if s["style"] == st and s["method"] == m), 0) for st in styles]
        ax.bar([i + j * width for i in range(len(styles))], vals, width, label=m)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(styles))])
    ax.set_xticklabels([st + ("\n(held out)" if next(s for s in summary if s["style"] == st)["held_out"] else
                              "\n(tuned on)") for st in styles])
    ax.set_ylabel("recall@10")
    ax.set_ylim(0, 1)
    ax.set_title(f"MemoryIndex() vs baselines per conversation style (seeds {doc['seeds']}; recipe tuned on "
                 f"{' + '.join(TUNED)}, seeds 0-1)", fontsize=10)
    ax.legend(fontsize=8, ncol=5, loc="upper center")
    _common.save_figure(fig, png, doc["machine"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--styles", nargs="+", default=list(STYLES))
    ap.add_argument("--seeds", nargs="+", type=int, default=list(REPORT_SEEDS))
    ap.add_argument("--show", nargs=2, metavar=("STYLE", "SEED"))
    ap.add_argument("--quick", action="store_true", help="smoke run: casual, one seed; writes only with --out")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/retrieval_cpu.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.styles, args.seeds = ["casual"], args.seeds[:1]
    elif args.out is None:
        args.out = str(ROOT / "bench" / "results" / "retrieval_cpu.json")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.show:
        ds = STYLES[args.show[0]](int(args.show[1]))
        for t in ds.turns:
            print(f"{t.id} {t.date} {t.speaker}: {t.text}")
        for q in ds.questions:
            print(f"Q [{q.kind}] {q.text} -> {q.answers}")
        return
    rows = []
    for style in args.styles:
        for seed in args.seeds:
            load = os.getloadavg()[0]
            rows += evaluate(style, seed)
            print(f"{style} seed {seed}: done (load average {load:.2f})", flush=True)
    summary = summarize(rows)
    print_table(summary)
    doc = {"machine": _common.machine_facts(packages=("torch", "transformers", "kvmem", "bm25s",
                                                      "sentence_transformers")),
           "recipe": {"weights": DEFAULT_WEIGHTS, "fusion": "rrf", "rrf_k": RRF_K, "window": 1},
           "tuned_on": list(TUNED), "seeds": args.seeds, "summary": summary, "rows": rows}
    if args.out:
        _common.write_results(doc, args.out, plot=plot)


if __name__ == "__main__":
    main()
