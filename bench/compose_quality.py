"""Compose several cubes: answer quality and TTFT of each recompute mode vs full prefill (SmolLM2-135M or
Gemma 3, fp32).

Fact QA over invented people (memory_text.person_notes), spread over 2, 4 and 8 cubes of ~250 tokens
(3 people) each, every question's answer in exactly one cube, first names unique in a set. The prompt is what
`kvmem.wrap(model, tok)` builds (the chat template's system header as the anchor, the cubes' texts in order, the
user turn with the question "Where does <first name> live?" or "What does <first name> work as?"), followed by the
start of the answer ("<full name> lives in" / "<full name> works as a"): the 135M model then answers the fact
directly, and the first answer token's distribution is the fact's.

    .venv/bin/python bench/compose_quality.py            # the full run (~25 min on 2 idle CPU cores)
    .venv/bin/python bench/compose_quality.py --quick    # smoke run; writes nothing unless --out is given
    .venv/bin/python bench/compose_quality.py --model gemma3   # -> results/compose_quality_cpu_gemma3.json

Methods (the cached part is built once per cube set; every question then prefills only its own tokens):
    full               the reference: anchor + all cube texts prefilled together in one forward (every token
                       attends to all before it, as in a prefill of the whole prompt), then the question on top;
                       checked against a one-pass prefill of the whole prompt on each set's first question
    naive              MemOS-style concatenation: anchor once, then each cube's own KV as built, keys NOT
                       re-rotated (each cube's keys keep the positions it was built at)
    none               kvmem.prefill(recompute="none"): keys re-rotated to where they sit, no recompute
    leading@B          recompute="leading": the first B tokens of every later cube recomputed (EPIC)
    selective@F        recompute="selective": the fraction F of later cubes' tokens recomputed (CacheBlend)

Metrics per method and cube count: accuracy (greedy answer of up to 8 tokens contains the true value),
accuracy relative to full, mean KL(full || method) of the first answer token's distribution, agreement of the
whole answer with full's, and accuracy on questions whose answer sits in a later cube (the first cube is exact
for every method, so that is where composition can go wrong).

TTFT: 4 cubes x 1500 tokens in CPU memory, a ~30-token question; timed region = kvmem.prefill + forward of the
question + argmax (full: forward of the whole prompt + argmax); medians after warm-up, round robin, one process.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # bench/_common.py, also when imported from elsewhere

import kvmem  # noqa: E402
import _common  # noqa: E402
from transformers import Cache, DynamicCache  # noqa: E402

from kvmem.model.cache import cache_kwarg, new_cache, output_cache  # noqa: E402
from memory_text import text_of_tokens  # noqa: E402
from kvmem.inject.prefill import DEFAULT_RECOMPUTE, RECOMPUTE_MODES  # noqa: E402
from workloads import QUESTIONS, cube_set, questions_of  # noqa: E402


# ---------------------------------------------------------------- composed caches
def naive_kv(cubes) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """MemOS-style concatenation: anchor once (from the first cube), then each cube's own KV as built, no re-rotation."""
    a = cubes[0].anchor_len
    out = []
    for layer in range(len(cubes[0].kv)):
        k = torch.cat([cubes[0].kv[layer][0]] + [c.kv[layer][0][:, a:] for c in cubes[1:]], dim=1)
        v = torch.cat([cubes[0].kv[layer][1]] + [c.kv[layer][1][:, a:] for c in cubes[1:]], dim=1)
        out.append((k[None], v[None]))
    return out


def method_list(args) -> list[tuple[str, str, object]]:
    """(label, mode, budget); mode "full" and "naive" are not kvmem modes."""
    ms = [("full", "full", None), ("naive", "naive", None), ("none", "none", None)]
    ms += [(f"leading@{b}", "leading", b) for b in args.leading]
    ms += [(f"selective@{b:g}", "selective", b) for b in args.selective]
    return ms


def composed(model, cubes, mode: str, budget) -> tuple[Callable[[], Cache], torch.Tensor, int]:
    """(a maker of fresh caches holding the method's prefix, ids [1, n] the cache holds, tokens recomputed).

    "full": one forward over anchor + every cube's text, so every token attends to everything before it, the
    same computation as prefilling the whole prompt (the question's tokens then run on top of it). Each question
    gets a deep copy of the built cache (transformers' prefix-reuse recipe), which also keeps what sliding-window
    layers need (their caches hold only the window: the KV tensors alone cannot be put back).
    """
    if mode == "full":
        ids = torch.cat([cubes[0].anchor_ids[0]] + [c.input_ids[0] for c in cubes])[None]
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1,
                        **{cache_kwarg(model): DynamicCache(config=model.config)})
        cache = output_cache(out)
        return (lambda: copy.deepcopy(cache)), ids, 0
    if mode == "naive":
        ids = torch.cat([cubes[0].anchor_ids[0]] + [c.input_ids[0] for c in cubes])[None]
        kv = naive_kv(cubes)  # every layer's whole KV: new_cache gives sliding layers what they keep
        return (lambda: new_cache(model, kv)), ids, 0
    p = kvmem.prefill(model, cubes, recompute=mode, budget=budget)
    return (lambda: copy.deepcopy(p.cache)), p.input_ids, p.recomputed


# ---------------------------------------------------------------- answering
def answer(model, tok, ids: torch.Tensor, cache, max_new: int) -> tuple[str, torch.Tensor]:
    """(greedy answer text, logits [vocab] float64 of the first answer token). ``cache``: a fresh cache holding
    a prefix of ``ids`` (generation extends it); None: full prefill."""
    extra = {cache_kwarg(model): cache} if cache is not None else {}
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                         do_sample=False, return_dict_in_generate=True, output_logits=True,
                         pad_token_id=tok.eos_token_id, **extra)
    text = tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True).strip()
    return text, out.logits[0][0].double()


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(p || q) in nats of the softmax distributions of two logit vectors."""
    lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return float((lp.exp() * (lp - lq)).sum())


def correct(text: str, truth: str) -> bool:
    return truth.lower() in text.lower()


def run_accuracy(model, tok, mm, args) -> tuple[list[dict], list[dict]]:
    """(summary rows per method and cube count, one record per question and method, full-prefix checks)."""
    methods = method_list(args)
    records, checks = [], []
    for n_cubes in args.cube_counts:
        per_cube_set = n_cubes * args.people_per_cube * len(args.kinds)
        sets = max(args.min_sets, math.ceil(args.questions / per_cube_set))
        per_set = math.ceil(args.questions / sets)
        for s in range(sets):
            seed = 1000 * n_cubes + s
            texts, facts = cube_set(n_cubes, args.people_per_cube, seed)
            t0 = time.perf_counter()
            cubes = [mm.build_cube(t, name=f"s{seed}-c{i}") for i, t in enumerate(texts)]
            qs = questions_of(facts, args.kinds, per_set, seed)
            caches = {label: composed(model, cubes, mode, b) for label, mode, b in methods}
            tokens = [c.num_tokens for c in cubes]
            for i, q in enumerate(qs):
                cue = tok(q["cue"], add_special_tokens=False).input_ids
                ids = torch.cat([mm.prompt_ids(q["question"], cubes), torch.tensor([cue])], dim=-1)
                results = {}
                for label, mode, budget in methods:
                    fresh_cache, prefix_ids, rec = caches[label]
                    assert torch.equal(ids[:, :prefix_ids.shape[1]], prefix_ids), "prefix ids differ from prompt"
                    results[label] = (*answer(model, tok, ids, fresh_cache(), args.max_new_tokens), rec)
                ref_text, ref_logits, _ = results["full"]
                if i == 0:  # the cached full prefix against a one-pass prefill of the whole prompt
                    one_text, one_logits = answer(model, tok, ids, None, args.max_new_tokens)
                    checks.append({"n_cubes": n_cubes, "set_seed": seed, "same_answer": one_text == ref_text,
                                   "max_abs_logit_diff": float((one_logits - ref_logits).abs().max())})
                for label, mode, budget in methods:
                    text, logits, rec = results[label]
                    records.append({"n_cubes": n_cubes, "set_seed": seed, "method": label, "mode": mode,
                                    "budget": budget, "recomputed_tokens": rec, "cube_tokens": tokens, **q,
                                    "prompt_tokens": ids.shape[1], "output": text, "correct": correct(text, q["answer"]),
                                    "same_as_full": text == ref_text, "kl_vs_full": kl(ref_logits, logits)})
            acc = {m[0]: statistics.mean(r["correct"] for r in records if r["set_seed"] == seed and r["method"] == m[0])
                   for m in methods}
            print(f"{n_cubes} cubes, set {seed} ({sum(tokens)} cube tokens, {len(qs)} q, "
                  f"{time.perf_counter() - t0:.0f} s): " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()), flush=True)
    rows = []
    for n_cubes in args.cube_counts:
        full_acc = None
        for label, mode, budget in methods:
            rs = [r for r in records if r["n_cubes"] == n_cubes and r["method"] == label]
            later = [r for r in rs if r["cube"] > 0]
            acc = statistics.mean(r["correct"] for r in rs)
            full_acc = acc if mode == "full" else full_acc
            rows.append({
                "n_cubes": n_cubes, "method": label, "mode": mode, "budget": budget,
                "n_questions": len(rs), "n_sets": len({r["set_seed"] for r in rs}), "accuracy": acc,
                "rel_accuracy": acc / full_acc if full_acc else None,
                "accuracy_later_cubes": statistics.mean(r["correct"] for r in later) if later else None,
                "n_questions_later_cubes": len(later),
                "mean_kl": statistics.mean(r["kl_vs_full"] for r in rs),
                "median_kl": statistics.median(r["kl_vs_full"] for r in rs),
                "same_answer_as_full": statistics.mean(r["same_as_full"] for r in rs),
                "mean_recomputed_tokens": statistics.mean(r["recomputed_tokens"] for r in rs),
                "mean_prompt_tokens": statistics.mean(r["prompt_tokens"] for r in rs),
                "accuracy_ci95": _wilson(sum(r["correct"] for r in rs), len(rs)),
            })
    return rows, records, checks


def _wilson(k: int, n: int) -> list[float]:
    """95% Wilson score interval of a proportion k/n (scipy's)."""
    from scipy.stats import binomtest

    if n == 0:
        return [0.0, 1.0]
    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


# ---------------------------------------------------------------- TTFT
def ttft_question(tok, mm, n_tokens: int) -> str:
    """A question whose user turn (chat template tail included) is about ``n_tokens`` tokens."""
    q = "Where does Alice live, which floor does Alice sit on, and what is the badge number of Alice?"
    filler = " Please answer briefly and precisely."
    while len(mm.request_ids(q + filler)) <= n_tokens and len(q) < 2000:
        q += filler
        filler = " Thanks."
    return q


def run_ttft(model, tok, mm, args) -> list[dict]:
    kw = cache_kwarg(model)
    device = next(model.parameters()).device
    cubes = [mm.build_cube(text_of_tokens(tok, args.ttft_cube_tokens, seed=500 + 7 * i), name=f"ttft-{i}")
             for i in range(args.ttft_cubes)]
    q = ttft_question(tok, mm, args.ttft_question_tokens)
    full_ids = mm.prompt_ids(q, cubes).to(device)
    n_prefix = full_ids.shape[1] - len(mm.request_ids(q))
    tail = full_ids[:, n_prefix:]

    def forward(ids, cache=None):
        extra = {kw: cache} if cache is not None else {}
        return model(input_ids=ids, use_cache=True, logits_to_keep=1, **extra).logits[0, -1]

    fns, budgets = {}, {}
    for label, mode, budget in method_list(args):
        if mode == "full":
            fns[label] = lambda: int(forward(full_ids).argmax())  # the first new token id is on the host
        elif mode == "naive":
            fns[label] = lambda: int(forward(tail, new_cache(model, naive_kv(cubes))).argmax())
        else:
            fns[label] = lambda m=mode, b=budget: int(
                forward(tail, kvmem.prefill(model, cubes, recompute=m, budget=b).cache).argmax())
        budgets[label] = (mode, budget if budget is not None else RECOMPUTE_MODES.get(mode, (None,))[0])
    reps = {m: args.ttft_full_reps if m == "full" else args.ttft_reps for m in fns}
    with torch.inference_mode():  # warm-up (its token is the agreement check), then round robin
        series = _common.round_robin(fns, reps, warmup=args.ttft_warmup, device=device)
    first = {m: s.first for m, s in series.items()}
    rows = []
    for m, s in series.items():
        rows.append({"method": m, "mode": budgets[m][0], "budget": budgets[m][1],
                     "n_cubes": args.ttft_cubes, "cube_tokens": [c.num_tokens for c in cubes],
                     "prompt_tokens": full_ids.shape[1], "question_tokens": tail.shape[1],
                     "reps": len(s.seconds), "warmup": args.ttft_warmup, **_common.spread(s.seconds),
                     "first_token": first[m], "same_first_token_as_full": first[m] == first["full"]})
    full = next(r["median_s"] for r in rows if r["method"] == "full")
    for r in rows:
        r["reduction_vs_full"] = 1 - r["median_s"] / full
    return rows


# ---------------------------------------------------------------- report
def print_tables(rows: list[dict], ttft: list[dict]) -> None:
    if rows:
        head = (f"{'cubes':>5} {'method':<15} {'acc':>5} {'95% CI':>11} {'rel':>6} {'later':>6} {'=full':>6} "
                f"{'mean KL':>8} {'med KL':>8} {'recomp':>6} {'n':>4}")
        print(head + "\n" + "-" * len(head))
        for r in rows:
            rel = "-" if r["rel_accuracy"] is None else f"{r['rel_accuracy']:.3f}"
            later = "-" if r["accuracy_later_cubes"] is None else f"{r['accuracy_later_cubes']:.3f}"
            lo, hi = r["accuracy_ci95"]
            print(f"{r['n_cubes']:>5} {r['method']:<15} {r['accuracy']:>5.3f} {lo:>5.2f}-{hi:<5.2f} {rel:>6} "
                  f"{later:>6} {r['same_answer_as_full']:>6.3f} {r['mean_kl']:>8.4f} {r['median_kl']:>8.4f} "
                  f"{r['mean_recomputed_tokens']:>6.0f} {r['n_questions']:>4}")
    if ttft:
        head = f"{'method':<10} {'budget':>6} {'median ms':>10} {'p10..p90 ms':>19} {'n':>3} {'vs full':>8} {'same tok':>8}"
        print("\n" + head + "\n" + "-" * len(head))
        for r in ttft:
            print(f"{r['method']:<10} {str(r['budget']):>6} {1e3 * r['median_s']:>10.1f} "
                  f"{1e3 * r['p10_s']:>9.1f}..{1e3 * r['p90_s']:<9.1f} {r['reps']:>3} "
                  f"{100 * r['reduction_vs_full']:>7.1f}% {str(r['same_first_token_as_full']):>8}")


def targets(rows: list[dict], ttft: list[dict]) -> dict:
    """The issue's targets for each kvmem mode at its default budget: >= 95% of full's accuracy at every cube
    count measured, and >= 90% TTFT reduction at 4 cubes x 1.5k tokens."""
    out = {}
    for mode, (budget, _) in RECOMPUTE_MODES.items():
        label = mode if budget is None else f"{mode}@{budget:g}"
        rel = {r["n_cubes"]: r["rel_accuracy"] for r in rows if r["method"] == label and r["rel_accuracy"] is not None}
        red = next((r["reduction_vs_full"] for r in ttft if r["mode"] == mode and r["budget"] == budget), None)
        out[label] = {"rel_accuracy": rel, "min_rel_accuracy": min(rel.values()) if rel else None,
                      "accuracy_ge_95pct": bool(rel) and min(rel.values()) >= 0.95,
                      "ttft_reduction": red, "ttft_reduction_ge_90pct": red is not None and red >= 0.90}
    return out


def plot(doc: dict, png: str) -> None:
    """Accuracy and mean KL per method per cube count, and TTFT bars."""
    plt = _common.pyplot()
    rows, ttft, facts = doc["rows"], doc["ttft_rows"], doc["machine"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    counts = sorted({r["n_cubes"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2), dpi=110, gridspec_kw={"width_ratios": [1.3, 1.3, 1]})
    width = 0.8 / max(len(counts), 1)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"]
    by = {(r["method"], r["n_cubes"]): r for r in rows}
    for j, n in enumerate(counts):
        xs = [i + (j - (len(counts) - 1) / 2) * width for i in range(len(methods))]
        acc = [by[(m, n)]["accuracy"] for m in methods]
        err = [[by[(m, n)]["accuracy"] - by[(m, n)]["accuracy_ci95"][0] for m in methods],
               [by[(m, n)]["accuracy_ci95"][1] - by[(m, n)]["accuracy"] for m in methods]]
        axes[0].bar(xs, acc, width, yerr=err, capsize=2, color=colors[j % 4], label=f"{n} cubes",
                    error_kw={"elinewidth": 0.8, "alpha": 0.6})
        full = by[("full", n)]["accuracy"]
        axes[0].hlines(0.95 * full, -0.5, len(methods) - 0.5, colors=colors[j % 4], linestyles=":", linewidth=1)
        axes[1].bar(xs, [by[(m, n)]["mean_kl"] for m in methods], width, color=colors[j % 4], label=f"{n} cubes")
    nq = ", ".join(f"{n}: {by[('full', n)]['n_questions']}" for n in counts)
    for ax, title in ((axes[0], f"answer accuracy (95% Wilson CI; dotted: 95% of full)\nquestions per cube count {nq}"),
                      (axes[1], "mean KL(full || method), first answer token (nats; full is 0)")):
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=40, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
    axes[0].set_ylim(0, 1.15)
    if ttft:
        names = [r["method"] for r in ttft]
        med = [1e3 * r["median_s"] for r in ttft]
        err = [[1e3 * (r["median_s"] - r["p10_s"]) for r in ttft], [1e3 * (r["p90_s"] - r["median_s"]) for r in ttft]]
        bars = axes[2].bar(names, med, yerr=err, capsize=3,
                           color=["#d62728" if n == "full" else "#7f7f7f" if n == "naive" else "#2ca02c" for n in names])
        for b, r in zip(bars, ttft):
            label = "ref" if r["method"] == "full" else f"-{100 * r['reduction_vs_full']:.1f}%"
            axes[2].annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                             fontsize=8, xytext=(0, 2), textcoords="offset points")
        labels = [n.replace("@", "\n@") for n in names]
        axes[2].set_xticks(range(len(names)))
        axes[2].set_xticklabels(labels, fontsize=8)
        axes[2].set_yscale("log")
        t0 = ttft[0]
        axes[2].set_title(f"TTFT, {t0['n_cubes']} cubes x ~{t0['cube_tokens'][0]} tokens + {t0['question_tokens']}-token "
                          f"question\nmedian ms, p10..p90 (log)", fontsize=9)
        axes[2].grid(True, axis="y", which="both", alpha=0.3)
    model = str(facts.get("model", _common.MODEL_NAME)).split(" (")[0]
    fig.suptitle(f"kvmem: composing cubes, {model} {facts['dtype'].replace('torch.', '')} on "
                 f"{facts['device']} ({facts['cpu']}, {facts['torch_threads']} threads)", fontsize=10)
    _common.save_figure(fig, png, facts, top=0.96)


def redo_from_json(path: Path) -> int:
    """Tables, targets (for today's RECOMPUTE_MODES defaults) and plot of a saved run, without running it."""
    doc = json.loads(path.read_text())
    print_tables(doc["rows"], doc["ttft_rows"])
    tg = targets(doc["rows"], doc["ttft_rows"])
    if json.loads(json.dumps(tg)) != doc.get("targets"):
        doc["targets"] = tg
        doc["targets_note"] = (f"recomputed by --from-json on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d} "
                               f"for the defaults of that day (default recompute {DEFAULT_RECOMPUTE!r}); the "
                               "measurements are unchanged")
    print("\ntargets (default budgets):", json.dumps(tg, indent=1))
    _common.write_results(doc, path, plot)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_model_argument(p)
    p.add_argument("--cube-counts", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--questions", type=int, default=60, help="questions per cube count")
    p.add_argument("--min-sets", type=int, default=2,
                   help="cube sets (seeds) per cube count, at least; more when one set has too few questions")
    p.add_argument("--people-per-cube", type=int, default=3, help="~78 tokens a person, ~15 of header")
    p.add_argument("--kinds", nargs="+", default=["city", "job"], choices=list(QUESTIONS))
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--leading", type=int, nargs="+", default=[8, 16, 32], help="leading-recompute budgets (tokens)")
    p.add_argument("--selective", type=float, nargs="+", default=[0.1, 0.15, 0.3], help="selective budgets (fraction)")
    p.add_argument("--ttft-cubes", type=int, default=4)
    p.add_argument("--ttft-cube-tokens", type=int, default=1500)
    p.add_argument("--ttft-question-tokens", type=int, default=30)
    p.add_argument("--ttft-reps", type=int, default=7)
    p.add_argument("--ttft-full-reps", type=int, default=5)
    p.add_argument("--ttft-warmup", type=int, default=1)
    p.add_argument("--no-accuracy", dest="accuracy", action="store_false")
    p.add_argument("--no-ttft", dest="ttft", action="store_false")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/compose_quality_cpu.json; "
                                               "compose_quality_cpu_<model>.json for other models)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--show", type=int, default=0, help="print the first SHOW answers of every method")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes; writes nothing unless --out")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="no run: print the tables of a saved result, recompute its targets for the current "
                        "defaults, and redraw its plot (both written back to PATH)")
    args = p.parse_args(argv)
    if args.from_json:
        return redo_from_json(Path(args.from_json))
    if args.quick:
        args.cube_counts, args.min_sets, args.questions = [2, 4], 1, 3
        args.people_per_cube, args.leading, args.selective = 2, [8], [0.15]
        args.ttft_cube_tokens, args.ttft_reps, args.ttft_full_reps = 200, 2, 2

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = _common.load_model(args.model, verbose=True)
    mm = kvmem.wrap(model, tok)
    facts = _common.machine_facts(model=model, model_name=_common.MODELS[args.model][1],
                                  kvmem_default_recompute=DEFAULT_RECOMPUTE)
    print(json.dumps({k: v for k, v in facts.items() if k != "git_dirty_paths"}), flush=True)
    t0 = time.perf_counter()
    rows, records, checks = run_accuracy(model, tok, mm, args) if args.accuracy else ([], [], [])
    facts["accuracy_wall_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    ttft = run_ttft(model, tok, mm, args) if args.ttft else []
    facts["ttft_wall_s"] = time.perf_counter() - t1
    print()
    for label in dict.fromkeys(r["method"] for r in records):
        for r in [r for r in records if r["method"] == label][:args.show]:
            print(f"{label:<15} {r['n_cubes']} cubes, cube {r['cube']}: {r['question']!r} -> {r['output']!r} "
                  f"({'ok' if r['correct'] else 'WRONG, ' + r['answer']})")
    print_tables(rows, ttft)
    if checks:
        print(f"\ncached full prefix vs one-pass full prefill (first question of each set): same answer "
              f"{sum(c['same_answer'] for c in checks)}/{len(checks)}, max |dlogit| "
              f"{max(c['max_abs_logit_diff'] for c in checks):.2e}")
    tg = targets(rows, ttft)
    print("\ntargets (default budgets):", json.dumps(tg, indent=1))
    out = args.out or (None if args.quick else _common.result_path("compose_quality", model=args.model))
    if out:
        doc = {"machine": facts, "args": vars(args), "targets": tg, "rows": rows, "ttft_rows": ttft,
               "full_prefix_checks": checks, "questions": records}
        _common.write_results(doc, out, plot if rows else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
