"""What one distillation step costs in float32 and in bfloat16 (``kvmem.distill(..., precision=)``), and with the
model's own sdpa attention instead of the eager attention the student trains with on a CPU
(`kvmem.evolve.distill.training_attention`), in one process.

SmolLM2-135M-Instruct (float32 weights, CPU). The teacher's examples of ``--facts`` invented people
(bench/distill.py's memory set, 16 questions each, the keep prompts) are made once; then one LoRA student per
variant (`kvmem.evolve.distill.make_student`, the same seed, so the same initial weights; a bfloat16 student's LM
head stays float32): float32 and bfloat16 with the attention `kvmem.distill` trains with, and bfloat16 with the
model's own attention (sdpa). Each takes optimizer steps through `kvmem.evolve.distill.train_step`, the step
`kvmem.distill` runs, on the same batches (`batch_indices`, seed 0): warm-ups, then the timed steps of the variants
interleaved round robin. Per variant: median seconds a step (p10..p90), steps/s, the speed-up over float32 (and of
the training attention over sdpa), and the losses of the first steps (before any update they differ by rounding
only).

    .venv/bin/python bench/distill_step.py            # writes results/distill_step_cpu.{json,png}
    .venv/bin/python bench/distill_step.py --quick    # smoke run (2 facts, 1 step each); writes nothing unless --out
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _common  # noqa: E402
from distill import memory_set  # noqa: E402

# (label, precision, attention: None = what kvmem.distill trains with, `training_attention`)
VARIANTS = (("float32", "float32", None), ("bfloat16", "bfloat16", None), ("bfloat16 sdpa", "bfloat16", "sdpa"))


def run(args) -> dict:
    from kvmem.evolve import distill as d
    from kvmem.prompt import ChatLayout

    torch.set_num_threads(args.threads)
    model, tok = _common.load_model("smollm2")
    facts = _common.machine_facts(model=model, packages=("torch", "transformers", "peft", "kvmem"),
                                  facts=args.facts, batch_size=args.batch_size, rank=args.rank,
                                  auto=d.train_precision(model, "auto"), attention=d.training_attention(model),
                                  avx512_bf16=torch.cpu._is_avx512_bf16_supported(),
                                  amx=torch.cpu._is_amx_tile_supported())
    texts = [p["text"] for p in memory_set(args.facts, seed=0)]
    base = d.bare_copy(model)
    examples = d.make_examples(base, tok, texts, layout=ChatLayout(tok), questions_per_memory=16, seed=0,
                               max_answer_tokens=24, keep_prompts=d.KEEP_PROMPTS, content_weight=3.0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    students, steps, losses = {}, {}, {}
    for label, precision, attention in VARIANTS:
        torch.manual_seed(0)
        student = d.make_student(d.bare_copy(model), rank=args.rank, targets=d._targets(base, None),
                                 precision=precision, attention=attention)
        optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=2e-3)
        students[label], steps[label], losses[label] = (student, optimizer, precision), 0, []

    def step(label):
        student, optimizer, precision = students[label]
        batch = [examples[i] for i in d.batch_indices(len(examples), step=steps[label],
                                                        batch_size=args.batch_size, seed=0)]
        losses[label].append(d.train_step(student, optimizer, batch, pad=pad, precision=precision))
        steps[label] += 1

    series = _common.round_robin({v[0]: (lambda v=v: step(v[0])) for v in VARIANTS}, args.reps, warmup=args.warmup)
    rows = []
    for label, precision, _ in VARIANTS:
        row = {"kind": "variant", "variant": label, "precision": precision,
               "attention": students[label][0].config._attn_implementation, "steps": steps[label],
               "losses": losses[label], **_common.spread(series[label].seconds, unit="s", prefix="step_")}
        row["steps_per_s"] = 1 / row["step_median_s"]
        rows.append(row)
    full, half, sdpa = (r["step_median_s"] for r in rows)
    first = [r["losses"][0] for r in rows]
    print(f"step: float32 {full:.3f} s, bfloat16 {half:.3f} s ({full / half:.2f}x), bfloat16 with sdpa {sdpa:.3f} s "
          f"({rows[1]['attention']} {sdpa / half:.2f}x faster); first losses "
          + " / ".join(f"{x:.4f}" for x in first), flush=True)
    return {"bench": "distill_step", "machine": facts, "rows": rows,
            "summary": {"bfloat16_speedup": full / half, "attention_speedup": sdpa / half,
                        "first_loss_float32": first[0], "first_loss_bfloat16": first[1],
                        "first_loss_bfloat16_sdpa": first[2], "examples": len(examples), "facts": args.facts}}


def plot(doc: dict, png: str) -> None:
    plt = _common.pyplot()
    rows = doc["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].bar([f"{r['variant']}\n({r['attention']})" for r in rows], [r["step_median_s"] for r in rows],
                color="#1f77b4",
                yerr=[[r["step_median_s"] - r["step_p10_s"] for r in rows],
                      [r["step_p90_s"] - r["step_median_s"] for r in rows]])
    axes[0].set_title("seconds per distillation step (median, p10-p90)")
    for r in rows:
        axes[1].plot(range(1, len(r["losses"]) + 1), r["losses"], marker="o", label=r["variant"])
    axes[1].set_title("loss of each step (same batches)")
    axes[1].set_xlabel("step")
    axes[1].legend()
    fig.suptitle(f"kvmem distill: bfloat16 steps {doc['summary']['bfloat16_speedup']:.2f}x faster than float32, "
                 f"{rows[1]['attention']} attention {doc['summary']['attention_speedup']:.2f}x faster than sdpa "
                 f"({doc['summary']['facts']} facts, {doc['summary']['examples']} examples)", fontsize=9)
    _common.save_figure(fig, png, doc["machine"], top=0.88)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--facts", type=int, default=4, help="invented people whose examples the steps train on")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--reps", type=int, default=12, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 facts, 1 timed step each")
    parser.add_argument("--out", default=None, help="JSON to write (default results/distill_step_cpu.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.facts, args.reps, args.warmup = 2, 1, 0
    doc = run(args)
    out = args.out or (None if args.quick else str(_common.result_path("distill_step")))
    if out is not None:
        _common.write_results(doc, out, plot=plot)


if __name__ == "__main__":
    main()
