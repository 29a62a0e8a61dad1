"""Distillation benchmark: does a distilled AdapterCube answer about memories with no memory in its context?

One process, SmolLM2-135M-Instruct (float32, CPU). A generated memory set: ``--facts`` invented people, one memory
each ("<name> lives in <city> and works as a <job>."), learned with `kvmem.distill`. Held-apart questions, two per
memory, paraphrases that the distillation's question generator never produces ("Which city is <name>'s home?",
"What does <name> do for a living?"), are asked four ways through ``mm.generate``:

    none            no memory (the base model, anchor | question)
    cube            the memory's cube injected (the activation-memory path)
    adapter         the distilled adapter, no memory in the context (PEFT's LoRA layers, hot-swappable)
    adapter_merged  the same adapter served merged (``wrap(..., merge_adapters=True)``: a copy of the weights
                    with the LoRA merged in), no memory in the context
    adapter_cube    the adapter and the memory's cube (built under the adapter)

Per method: answer accuracy (the expected city / job in the greedy answer, 24 tokens), next-token KL against a full
prefill with the memory (``inject=False``, transformers' own prefill; KL(full || method) of the first answer
token's distribution), and TTFT (``mm.last.ttft_s``: medians after a warm-up round, methods interleaved per
question). Damage: KL(base || adapter) over the base's own 12-token greedy answers to unrelated prompts (a fixed
set, apart from the prompts distillation keeps). Distillation runs under a time budget (``--time-budget``, default
480 s: the teacher's answers, then optimizer steps until ``--steps`` or the budget, whichever comes first); its wall
time, the steps it took, and the load other processes put on the machine while it ran are recorded.

    .venv/bin/python bench/distill.py                 # the full run (20 facts)
    .venv/bin/python bench/distill.py --quick         # smoke run (2 facts, 2 steps); writes nothing unless --out
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import kvmem  # noqa: E402
import _common  # noqa: E402
from memory_text import CITIES, FIRST, JOBS, LAST  # noqa: E402

HELD_APART = (("Which city is {name}'s home?", "city"), ("What does {name} do for a living?", "job"))
UNRELATED = (  # damage probes: none of these is among kvmem.evolve.questions.KEEP_PROMPTS
    "What is the capital of France?", "Write a short poem about the moon.", "How many legs does a spider have?",
    "Explain what a computer is in one sentence.", "What colour is the sky on a clear day?",
    "Give me a tip for sleeping better.", "What is 12 times 3?", "Who wrote Romeo and Juliet?",
    "What is the freezing point of water in Fahrenheit?", "Name a fruit that is yellow.",
    "Why is exercise good for you?", "Translate 'thank you' into Spanish.", "What do bees make?",
    "Describe a cat in five words.", "What is the main ingredient of guacamole?", "How do airplanes fly?",
    "What is the tallest mountain on Earth?", "Suggest a title for a mystery novel.",
    "What is the square root of 81?", "What season comes after winter?",
)
METHODS = ("none", "cube", "adapter", "adapter_merged", "adapter_cube")


def memory_set(n: int, *, seed: int = 0) -> list[dict]:
    """``n`` invented people (distinct names), each with a city and a job, and the memory text saying so."""
    rng = random.Random(seed)
    names = rng.sample([(f, l) for f in FIRST for l in LAST], n)
    out = []
    for first, last in names:
        city, job = rng.choice(CITIES), rng.choice(JOBS)
        name = f"{first} {last}"
        out.append({"name": name, "city": city, "job": job, "text": f"{name} lives in {city} and works as a {job}."})
    return out


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(p || q) in nats of two logit vectors [V]."""
    p, q = torch.log_softmax(p_logits.float(), -1), torch.log_softmax(q_logits.float(), -1)
    return float((p.exp() * (p - q)).sum())


def first_token(mm, question, *, cubes, adapter, inject=True):
    """(first-token logits [V], TTFT s) of ``mm.generate`` for one request."""
    out = mm.generate(question, cubes=cubes, adapter=adapter, inject=inject, max_new_tokens=1, do_sample=False,
                      output_logits=True, return_dict_in_generate=True)
    return out.logits[0][0], mm.last.ttft_s


def damage(mm, adapter, prompts, *, tokens: int = 12) -> list[dict]:
    """Per unrelated prompt: KL(base || adapter) averaged over the base's greedy answer tokens (teacher-forced),
    and whether the adapter's greedy answer is the base's. Generation is batched (rows equal requests alone)."""
    out = mm.generate(list(prompts), adapter=None, max_new_tokens=tokens, do_sample=False)  # [B, W + tokens]
    width = out.shape[1] - tokens
    eos = mm.tokenizer.eos_token_id
    base_answers = mm.answer(list(prompts), max_new_tokens=tokens, adapter=None)
    lora_answers = mm.answer(list(prompts), max_new_tokens=tokens, adapter=adapter)
    rows = []
    for b, prompt in enumerate(prompts):
        n_prompt = len(mm.prompt_ids(prompt, [])[0])
        new = out[b, width:].tolist()
        new = new[:new.index(eos) + 1] if eos in new else new
        ids = torch.cat([out[b, width - n_prompt:width], torch.tensor(new)])[None]
        with torch.no_grad():
            base = mm.model(input_ids=ids).logits[0]
            with mm.adapters.using(adapter):
                lora = mm.model(input_ids=ids).logits[0]
        kls = [kl(base[i], lora[i]) for i in range(n_prompt - 1, ids.shape[1] - 1)]
        rows.append({"prompt": prompt, "kl_mean": statistics.mean(kls), "kl_max": max(kls),
                     "base_answer": base_answers[b], "adapter_answer": lora_answers[b],
                     "same_answer": base_answers[b] == lora_answers[b]})
    return rows


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = _common.load_model("smollm2")
    facts = _common.machine_facts(model=model, packages=("torch", "transformers", "peft", "kvmem"),
                                  facts=args.facts, steps=args.steps, time_budget=args.time_budget, rank=args.rank,
                                  lr=args.lr, lr_schedule=args.lr_schedule, warmup=args.warmup,
                                  answer_tokens=args.answer_tokens, questions=args.questions,
                                  content_weight=args.content_weight, keep_share=args.keep_share,
                                  keep_answers=args.keep_answers, sampled_share=args.sampled_share,
                                  content_temperature=args.content_temperature,
                                  grounded=args.grounded, seed=args.seed,
                                  weight_average=args.weight_average, precision=args.precision)
    mm = kvmem.wrap(model, tok)
    merged = kvmem.wrap(model, tok, merge_adapters=True)  # same base model, adapters served merged
    people = memory_set(args.facts, seed=args.seed)
    texts = [p["text"] for p in people]

    with tempfile.TemporaryDirectory() as tmp, _common.OtherLoad() as load:
        t0 = time.perf_counter()
        adapter = kvmem.distill(mm.adapters.base, tok, texts, steps=args.steps, time_budget=args.time_budget,
                                rank=args.rank, lr=args.lr, lr_schedule=args.lr_schedule, warmup=args.warmup,
                                max_answer_tokens=args.answer_tokens,
                                questions_per_memory=args.questions, content_weight=args.content_weight,
                                keep_share=args.keep_share, keep_answers=args.keep_answers,
                                sampled_share=args.sampled_share,
                                content_temperature=args.content_temperature, grounded=args.grounded,
                                seed=args.seed, weight_average=args.weight_average, precision=args.precision,
                                checkpoint_dir=Path(tmp) / "ckpt",
                                progress=True)
        distill_s = time.perf_counter() - t0
    run_facts = adapter.meta["distill"]
    distill_row = {"kind": "distill", "facts": args.facts, "wall_s": distill_s, "steps": run_facts["steps"],
                   "stopped": run_facts["stopped"], "teacher_s": run_facts["teacher_seconds"],
                   "train_s": run_facts["train_seconds"], "steps_per_s": run_facts["steps_per_s"],
                   "precision": run_facts["precision"], "attention": run_facts["attention"],
                   "examples": run_facts["examples"], "keep_examples": run_facts["keep_examples"],
                   "loss_first": run_facts["losses"][0], "loss_last": run_facts["losses"][-1],
                   "losses": run_facts["losses"], "other_cores": load.cores, "loadavg_after": _common.loadavg(),
                   "target_s": 600, "met": distill_s < 600}
    print(f"distilled {args.facts} facts in {distill_s:.0f} s (teacher {run_facts['teacher_seconds']:.0f} s, "
          f"{run_facts['steps']} steps at {run_facts['steps_per_s']} steps/s, loss "
          f"{run_facts['losses'][0]:.3f} -> {run_facts['losses'][-1]:.3f}; other processes used "
          f"{load.cores} cores)", flush=True)

    cubes = [mm.build_cube(t) for t in texts]
    with mm.adapters.using(adapter):  # a cube records the adapter it was built under
        adapter_cubes = [mm.build_cube(t) for t in texts]
    setups = {"none": lambda i: dict(cubes=None, adapter=None), "cube": lambda i: dict(cubes=[cubes[i]], adapter=None),
              "adapter": lambda i: dict(cubes=None, adapter=adapter),
              "adapter_merged": lambda i: dict(cubes=None, adapter=adapter),
              "adapter_cube": lambda i: dict(cubes=[adapter_cubes[i]], adapter=adapter)}
    served = {m: merged if m == "adapter_merged" else mm for m in METHODS}
    questions = [(i, q.format(name=p["name"]), p[key]) for i, p in enumerate(people) for q, key in HELD_APART]
    per_q = [{"question": q, "expected": e, "memory": i} for i, q, e in questions]
    ttft = {m: [] for m in METHODS}
    for round_ in range(args.rounds + 1):  # round 0 warms up (and gives the first-token distributions)
        for n, (i, question, expected) in enumerate(questions):
            if round_ == 0:
                ref, _ = first_token(mm, question, cubes=[cubes[i]], adapter=None, inject=False)
            k = n % len(METHODS)
            for method in METHODS[k:] + METHODS[:k]:  # rotate which method goes first
                logits, seconds = first_token(served[method], question, **setups[method](i))
                if round_ == 0:
                    per_q[n][method] = {"kl": kl(ref, logits)}
                else:
                    ttft[method].append(seconds)
        print(f"round {round_} done", flush=True)
    prompts = [q for _, q, _ in questions]
    for method in METHODS:  # answers: one batched generate per method (each row equals its request alone)
        setup = [setups[method](i) for i, _, _ in questions]
        rows_cubes = None if setup[0]["cubes"] is None else [s["cubes"] for s in setup]
        answers = served[method].answer(prompts, cubes=rows_cubes, adapter=setup[0]["adapter"], max_new_tokens=24)
        for row, answer in zip(per_q, answers):
            row[method].update(answer=answer, correct=row["expected"].lower() in answer.lower())

    cube_right = [r for r in per_q if r["cube"]["correct"]]
    rows = []
    for method in METHODS:
        kls = [r[method]["kl"] for r in per_q]
        rows.append({"kind": "method", "method": method,
                     "accuracy": statistics.mean(r[method]["correct"] for r in per_q),
                     "accuracy_where_cube_right": (statistics.mean(r[method]["correct"] for r in cube_right)
                                                   if cube_right else None),
                     "kl_mean": statistics.mean(kls), "kl_median": statistics.median(kls),
                     **_common.spread(ttft[method], unit="ms", prefix="ttft_")})
    harm = damage(mm, adapter, UNRELATED)
    damage_row = {"kind": "damage", "prompts": len(harm), "kl_mean": statistics.mean(h["kl_mean"] for h in harm),
                  "kl_max": max(h["kl_max"] for h in harm),
                  "same_answer": statistics.mean(h["same_answer"] for h in harm), "target_kl_mean": 0.05,
                  "per_prompt": harm}
    damage_row["met"] = damage_row["kl_mean"] <= 0.05
    adapter_rate = rows[2]["accuracy_where_cube_right"]
    ttft = {r["method"]: r["ttft_median_ms"] for r in rows}
    ttft_row = {"kind": "ttft_vs_none", **{m: ttft[m] / ttft["none"] for m in METHODS}}
    facts["loadavg_end"] = _common.loadavg()
    return {"bench": "distill", "machine": facts, "rows": [distill_row, *rows, damage_row, ttft_row],
            "target": {"adapter_vs_cube": 0.8, "adapter_where_cube_right": adapter_rate,
                       "met": adapter_rate is not None and adapter_rate >= 0.8},
            "questions": per_q}


def plot(doc: dict, png: str) -> None:
    plt = _common.pyplot()
    methods = [r for r in doc["rows"] if r["kind"] == "method"]
    names = {"adapter_merged": "adapter\n(merged)", "adapter_cube": "adapter\n+ cube"}
    labels = [names.get(r["method"], r["method"]) for r in methods]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].bar(labels, [r["accuracy"] for r in methods], color="#1f77b4", label="all held-apart questions")
    axes[0].bar(labels, [r["accuracy_where_cube_right"] or 0 for r in methods], color="none", edgecolor="k",
                hatch="//", label="where the cube answers")
    axes[0].set_ylim(0, 1.05)
    axes[0].set_title("answer accuracy")
    axes[0].legend(fontsize=7)
    axes[1].bar(labels, [max(r["kl_mean"], 1e-6) for r in methods], color="#ff7f0e")
    axes[1].set_yscale("log")
    axes[1].set_title("next-token KL vs full prefill with memory (nats)")
    axes[2].bar(labels, [r["ttft_median_ms"] for r in methods], color="#2ca02c",
                yerr=[[r["ttft_median_ms"] - r["ttft_p10_ms"] for r in methods],
                      [r["ttft_p90_ms"] - r["ttft_median_ms"] for r in methods]])
    axes[2].set_title("TTFT median, p10-p90 (ms)")
    d = next(r for r in doc["rows"] if r["kind"] == "distill")
    h = next(r for r in doc["rows"] if r["kind"] == "damage")
    fig.suptitle(f"kvmem distill, {d['facts']} facts: {d['wall_s']:.0f} s to distil ({d['steps']} steps); damage on "
                 f"unrelated prompts KL {h['kl_mean']:.3f} nats mean", fontsize=9)
    _common.save_figure(fig, png, doc["machine"], top=0.92)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--facts", type=int, default=20)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps at most (--time-budget may stop first)")
    parser.add_argument("--time-budget", type=float, default=480, help="seconds for the whole distillation")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--lr-schedule", default="wsd", choices=("constant", "cosine", "wsd"))
    parser.add_argument("--warmup", type=float, default=0.05, help="share of the run warming the lr up")
    parser.add_argument("--questions", type=int, default=16, help="generated questions per memory")
    parser.add_argument("--content-weight", type=float, default=3.0, help="loss weight of the memory's tokens")
    parser.add_argument("--keep-share", type=float, default=0.2, help="share of unrelated (keep) prompts")
    parser.add_argument("--keep-answers", default="sampled", choices=("greedy", "sampled"),
                        help="the keep prompts' repeats: copies of the base's greedy answers or sampled answers")
    parser.add_argument("--sampled-share", type=float, default=0.0, help="share of questions with a sampled "
                        "teacher answer")
    parser.add_argument("--content-temperature", type=float, default=0.5, help="temperature of the teacher's "
                        "distributions at answer tokens that state the memory (below 1: sharper)")
    parser.add_argument("--grounded", action=argparse.BooleanOptionalAction, default=False,
                        help="leave out teacher answers that state nothing of their memory")
    parser.add_argument("--answer-tokens", type=int, default=24, help="teacher answer tokens learned per question")
    parser.add_argument("--weight-average", type=float, default=0.0, help="EMA decay of the adapter's weights "
                        "(0: the last step's, kvmem's default)")
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="training matmuls (kvmem's default: auto)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds of TTFT after the warm-up round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 facts, 2 steps, 1 timed round; writes "
                        "nothing unless --out is given")
    parser.add_argument("--out", default=None, help="JSON to write (default results/distill_cpu.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.facts, args.steps, args.rounds, args.questions = 2, 2, 1, 4
    doc = run(args)
    out = args.out or (None if args.quick else str(_common.result_path("distill")))
    if out is not None:
        _common.write_results(doc, out, plot=plot)


if __name__ == "__main__":
    main()
