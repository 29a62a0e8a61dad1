"""Fidelity of composed cubes per unit of TTFT, per setting, on a real model: what `kvmem.calibrate` measures, on
three kinds of text split where a user splits them, at 2, 4 and 8 cubes; and what the composition gate then chooses.

Texts and questions (bench/compose_cases.py; `kvmem.calibrate(cases=...)`):
    notes   invented team notes over several paragraphs, one document per cube; questions about a later cube's
            facts, every third across two cubes
    chat    a verbose user/assistant log (bench/datasets/assistant.py), one session per cube; the dataset's own
            questions about a later session, every third two of them at once from two sessions
    code    standard-library Python files read from disk, one file per cube; questions about a later file's
            functions, every third about functions of two files

Cubes are ``--tokens`` long (default 1,500) or shorter where the model's context cannot hold the set (``count x
tokens`` within 88% of max_position_embeddings: SmolLM2's 8,192 gives 8 cubes of ~900 tokens).

Per cube count and setting (kvmem.prefill recompute mode and budget, "query" reading each question; "+apeT/S":
the APE attention adjustment of `Prefix.adjusted`, "q" when only the question's tokens are adjusted), against a
full prefill of the same ids with the chat template's anchor (`kvmem.wrap(model, tok).anchor`): mean next-token
KL (nats) teacher-forced along the full prefill's 12-token greedy answer, the share of questions whose 12-token
greedy answer equals the full prefill's, and TTFT (kvmem.prefill + the question's forward vs the full prefill's
forward; medians).

    .venv/bin/python bench/compose_fidelity.py --model smollm2          # -> results/compose_fidelity_cpu.json/.png
    .venv/bin/python bench/compose_fidelity.py --model gemma3           # -> results/compose_fidelity_cpu_gemma3.*
    .venv/bin/python bench/compose_fidelity.py --quick                  # smoke run; writes nothing unless --out
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _common  # noqa: E402
import kvmem  # noqa: E402
from kvmem.inject.calibrate import APE_SETTINGS, DEFAULT_SETTINGS  # noqa: E402
from kvmem.inject.gate import Target  # noqa: E402
from compose_cases import BUILDERS  # noqa: E402

# the issue's targets (CPU, 4 cubes): KL <= 0.10, greedy answer >= 80%, TTFT >= 85% below a full prefill;
# 2 cubes: KL <= 0.05
ISSUE_TARGETS = {2: {"kl": 0.05, "agreement": 0.8, "ttft_saving": 0.85},
                 4: {"kl": 0.10, "agreement": 0.8, "ttft_saving": 0.85}}


def parse_setting(text: str) -> tuple:
    """``leading@32+ape1/0.6`` -> ("leading", 32, (1.0, 0.6, True)); ``none`` -> ("none", None); ``...q``: decode
    unadjusted."""
    m = re.fullmatch(r"(\w+)(?:@([\d.]+))?(?:\+ape([\d.]+)/([\d.]+)(q?))?", text)
    if not m:
        raise SystemExit(f"compose_fidelity: cannot read setting {text!r} (e.g. none, query@64, leading@32+ape1/0.6)")
    mode, budget, t, s, q = m.groups()
    budget = None if budget is None else (float(budget) if "." in budget else int(budget))
    return (mode, budget) if t is None else (mode, budget, (float(t), float(s), not q))


def cube_tokens(model, n: int, tokens: int) -> int:
    """``tokens``, or less where ``n`` cubes of it (and the question and answer) would not fit the model's context."""
    context = getattr(model.config, "max_position_embeddings", None) or 10 ** 9
    return min(tokens, int(0.88 * context / n))


def chat_sessions(tokenizer, n: int, max_tokens: int, *, seed: int = 0) -> list[str]:
    """``n`` chat sessions of the verbose assistant log, each as its lines ``speaker: text``, cut at ``max_tokens``."""
    from datasets import assistant

    data = assistant.generate(seed, n_sessions=max(n, 20), verbose=True)
    sessions: dict[int, list[str]] = {}
    for turn in data.turns:
        sessions.setdefault(turn.session, []).append(f"{turn.speaker}: {turn.text}")
    out = []
    for lines in list(sessions.values())[:n]:
        text = ""
        for line in lines:
            if len(tokenizer(text + line, add_special_tokens=False).input_ids) > max_tokens:
                break
            text += line + "\n"
        out.append(f"Chat session {len(out) + 1}.\n{text}")
    return out


def meets(row: dict) -> bool:
    t = ISSUE_TARGETS.get(row["cubes"])
    return bool(t) and row["kl_mean"] <= t["kl"] and row["agreement"] >= t["agreement"] and \
        row["ttft_saving"] >= t["ttft_saving"]


def plot(doc: dict, png: str) -> None:
    plt = _common.pyplot()
    runs = doc["runs"]
    counts = sorted({r["cubes"] for run in runs for r in run["rows"]})
    fig, axes = plt.subplots(len(runs), len(counts), figsize=(max(8, 6.5 * len(counts)), 4.3 * len(runs)),
                             squeeze=False)  # one column: wide enough for the title and labels
    for i, run in enumerate(runs):
        for j, n in enumerate(counts):
            ax = axes[i][j]
            rows = [r for r in run["rows"] if r["cubes"] == n]
            if not rows:  # a merged document: this kind of text was not run at this count
                ax.text(0.5, 0.5, f"{run['texts']}, {n} cubes: not measured", ha="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            for r in rows:
                ax.scatter(100 * r["ttft_saving"], max(r["kl_mean"], 1e-4), s=30 + 200 * r["agreement"])
                # answers as a count: with a handful of questions a percentage hides how coarse it is
                equal = round(r["agreement"] * r["questions"])
                ax.annotate(f"{r['label']} ({equal}/{r['questions']} answers)",
                            (100 * r["ttft_saving"], max(r["kl_mean"], 1e-4)), fontsize=7, xytext=(4, 4),
                            textcoords="offset points")
            reason = run["choices"].get(str(n), {}).get("reason", "")
            why = reason[reason.find("(best"):reason.rfind(")") + 1] if "(best" in reason else reason
            lines = textwrap.wrap(f"gate: {why}", 100 if len(counts) == 1 else 75)
            ax.text(0.5, -0.3, "\n".join(lines), transform=ax.transAxes, fontsize=7, ha="center", va="top",
                    color="#333")  # under the axis label: why the gate chose as it did
            target = ISSUE_TARGETS.get(n, {})
            if target:
                ax.axhline(target["kl"], color="#c33", ls="--", lw=0.8, label=f"issue target KL {target['kl']}")
                ax.axvline(100 * target["ttft_saving"], color="#999", ls=":", lw=0.8)
            ax.axhline(doc["gate_target"]["kl"], color="#36c", ls="-.", lw=0.8,
                       label=f"gate target KL {doc['gate_target']['kl']}")
            ax.set_yscale("log")
            ax.set_xlabel("TTFT saved vs full prefill (%)")
            ax.set_ylabel("mean next-token KL (nats)")
            ax.set_title(f"{str(doc['facts'].get('model')).split(' (')[0]}: {run['texts']}, {n} cubes "
                         f"(gate: {run['choices'].get(str(n), {}).get('mode')})", fontsize=9)
            ax.legend(fontsize=6, loc="upper left")
    fig.suptitle("Composed cubes vs full prefill: fidelity per TTFT (marker size: greedy 12-token agreement)",
                 fontsize=10)
    _common.save_figure(fig, png, doc["facts"], top=0.95)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common.add_model_argument(parser)
    parser.add_argument("--tokens", type=int, default=1500, help="tokens per cube (default 1500; less where the "
                        "model's context cannot hold the set)")
    parser.add_argument("--cubes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--sets", type=int, default=1, help="cube sets per count and kind of text")
    parser.add_argument("--questions", type=int, default=3, help="questions per set")
    parser.add_argument("--texts", nargs="+", default=["notes", "chat", "code"], choices=sorted(BUILDERS))
    parser.add_argument("--settings", nargs="+", default=None,
                        help="labels to measure, e.g. none leading@32 query@64 leading@32+ape1/0.6 (default: "
                        "kvmem.calibrate's DEFAULT_SETTINGS and APE_SETTINGS)")
    parser.add_argument("--no-ape", action="store_true", help="skip the APE-adjusted settings (APE_SETTINGS)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes; writes nothing unless --out")
    parser.add_argument("--out", default=None)
    parser.add_argument("--from-json", default=None, help="redraw the PNG of a saved run without running")
    parser.add_argument("--merge", nargs="+", default=None,
                        help="join saved runs of one model (e.g. one per cube count) into --out, rows by kind of text")
    args = parser.parse_args(argv)
    if args.merge:
        docs = [json.loads(Path(p).read_text()) for p in args.merge]
        out = dict(docs[0], runs=[], merged_from=[Path(p).name for p in args.merge])
        for d in docs:
            for run in d["runs"]:
                into = next((r for r in out["runs"] if r["texts"] == run["texts"]), None)
                if into is None:
                    out["runs"].append(copy.deepcopy(run))
                    continue
                for key in ("rows", "meets_issue_targets"):
                    into[key] += run[key]
                for key in ("choices", "cube_tokens", "questions"):
                    into.setdefault(key, {}).update(run.get(key, {}))
                into["seconds"] += run["seconds"]
                into["cpu_seconds"] += run["cpu_seconds"]
        out["cube_tokens_by_count"] = {k: v for d in docs for k, v in d.get("cube_tokens_by_count", {}).items()}
        _common.write_results(out, args.out or _common.result_path("compose_fidelity", model=args.model), plot=plot)
        return 0
    if args.from_json:
        plot(json.loads(Path(args.from_json).read_text()), str(Path(args.from_json).with_suffix(".png")))
        return 0
    if args.quick:
        args.tokens, args.cubes, args.sets, args.questions = 200, [2], 1, 2  # 200: code files need a function in view
    import torch

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)  # a shared CPU: more threads than free cores spin at every barrier
    model, tok = _common.load_model(args.model)
    anchor = kvmem.wrap(model, tok, attention="keep").anchor
    facts = _common.machine_facts(model=model, model_name=_common.MODELS[args.model][1])
    target = Target()
    if args.settings:
        settings = tuple(parse_setting(t) for t in args.settings)
    else:
        settings = tuple(DEFAULT_SETTINGS) + (() if args.no_ape else tuple(APE_SETTINGS))
    runs = []
    for kind in args.texts:
        cases = []
        for n in args.cubes:
            cases += BUILDERS[kind](tok, [n], cube_tokens(model, n, args.tokens), sets=args.sets,
                                    questions=args.questions)
        t0, cpu0 = time.perf_counter(), time.process_time()
        # every setting on every question (no early stop): the bench reports each cell in full
        doc = kvmem.calibrate(model, tok, cases=cases, anchor=anchor, target=target, save=False, settings=settings,
                              stop_early=False)
        sizes = {n: [len(tok(t, add_special_tokens=False).input_ids) for d, _ in cases if len(d) == n for t in d]
                 for n in args.cubes}
        runs.append({"texts": kind, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0,
                     "cube_tokens": {str(n): [min(v), round(sum(v) / len(v)), max(v)] for n, v in sizes.items()},
                     "questions": {str(n): [q for d, qs in cases if len(d) == n for q in qs] for n in args.cubes},
                     "rows": doc["rows"],
                     "choices": doc["choices"], "meets_issue_targets": [r["label"] + f"@{r['cubes']}"
                                                                        for r in doc["rows"] if meets(r)]})
        print(f"\n{kind}: {runs[-1]['seconds']:.0f} s, cube tokens (min, mean, max) {runs[-1]['cube_tokens']}")
        for r in doc["rows"]:
            print(f"  {r['cubes']} cubes {r['label']:<24} KL {r['kl_mean']:.3f}  agree {r['agreement']:.0%}  "
                  f"top-1 {r['top1_agreement']:.0%}  TTFT {r['ttft_s'] * 1e3:.0f} ms vs "
                  f"{r['full_ttft_s'] * 1e3:.0f} ms ({r['ttft_saving']:.0%} saved){'  MEETS' if meets(r) else ''}",
                  flush=True)
        for n, c in doc["choices"].items():
            print(f"  gate at {n} cubes -> {c['mode']}: {c['reason']}")
    facts["loadavg_end"] = _common.loadavg()
    out = {"facts": facts, "settings": [list(s) for s in settings], "tokens_per_cube": args.tokens,
           "cube_tokens_by_count": {str(n): cube_tokens(model, n, args.tokens) for n in args.cubes},
           "sets": args.sets, "questions_per_set": args.questions, "answer_tokens": 12,
           "gate_target": {"kl": target.kl, "agreement": target.agreement}, "issue_targets": ISSUE_TARGETS,
           "runs": runs}
    if args.quick and not args.out:
        return 0
    path = args.out or _common.result_path("compose_fidelity", model=args.model)
    _common.write_results(out, path, plot=plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
