"""`kvmem distill`: learn a namespace's memories into a LoRA AdapterCube (parametric memory)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import CubeError
from .app import NamespaceOpt, StoreOpt, _friendly, _load_model, app, open_view, writing


def adapter_folder(view) -> Path:
    """Where a store keeps its distilled adapters: ``<store>/adapters`` (a local store only)."""
    root = view.store.root
    if root is None:
        raise CubeError("this store has no local folder (Redis): give -o PATH for the adapter file")
    return Path(root) / "adapters"


@app.command()
@_friendly
def distill(
    namespace: str = NamespaceOpt,
    store: Optional[str] = StoreOpt,
    ids: Optional[list[str]] = typer.Option(None, "--ids", help="Memory ids to learn (repeatable; default: all of "
                                            "the namespace's own memories)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="AdapterCube file to write (default: "
                                       "<store>/adapters/<namespace>.safetensors)."),
    model: str = typer.Option("smollm2", help="Local checkpoint folder, or 'smollm2' for the bundled model."),
    dtype: str = typer.Option("float32", help="Model dtype: float32, bfloat16 or float16."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (default 200 unless --time-budget is given)."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help="Seconds for the whole run."),
    rank: int = typer.Option(8, help="LoRA rank."),
    seed: int = typer.Option(0, help="Seed (questions, LoRA init, batch order)."),
    lr: float = typer.Option(2e-3, help="Peak learning rate (AdamW)."),
    lr_schedule: str = typer.Option("wsd", "--lr-schedule", help="constant, cosine (warm-up, then decay "
                                    "to lr/10) or wsd (warm-up, the peak, a linear decay to lr/10 over the last "
                                    "fifth)."),
    warmup: float = typer.Option(0.05, help="Share of the run spent warming the learning rate up."),
    batch_size: int = typer.Option(8, "--batch-size", help="Examples per optimizer step."),
    questions: int = typer.Option(16, help="Questions generated per memory (the teacher answers each)."),
    answer_tokens: int = typer.Option(24, "--answer-tokens", help="Teacher answer tokens learned per question."),
    content_weight: float = typer.Option(3.0, "--content-weight", help="Loss weight of answer tokens that state "
                                         "the memory (its names and values), relative to the rest."),
    keep_share: float = typer.Option(0.2, "--keep-share", help="Least share of unrelated prompts whose base "
                                     "answers are kept (0: no repeats)."),
    keep_answers: str = typer.Option("sampled", "--keep-answers", help="The unrelated prompts' repeats: sampled "
                                     "(answers drawn from the base model) or greedy (copies of its greedy answers)."),
    sampled_share: float = typer.Option(0.0, "--sampled-share", help="Share of each memory's questions whose "
                                        "teacher answer is sampled rather than greedy (0: all greedy)."),
    content_temperature: float = typer.Option(0.5, "--content-temperature", help="Temperature of the teacher's "
                                              "distributions at answer tokens that state the memory (below 1: "
                                              "sharper)."),
    grounded: bool = typer.Option(False, "--grounded/--no-grounded", help="Leave out teacher answers that state "
                                  "nothing of their memory."),
    weight_average: float = typer.Option(0.0, "--weight-average", help="0: the adapter is the last step's weights; "
                                         "a decay in (0, 1): their moving average over the steps (e.g. 0.98)."),
    precision: str = typer.Option("auto", help="Training matmuls: float32, bfloat16 (faster where the CPU or GPU "
                                  "multiplies it natively) or auto (bfloat16 where it does, else float32)."),
    checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir", help="Save resumable checkpoints here."),
    resume: bool = typer.Option(False, help="Continue from the checkpoint in --checkpoint-dir."),
):
    """Distil memories into a LoRA AdapterCube: the model answers about them with no memory in its context."""
    from ..evolve.distill import distill as run

    view = open_view(store, namespace, [])
    records = [r for r in view.ls() if r.namespace == namespace]
    if ids:
        known = {r.id: r for r in records}
        missing = [i for i in ids if i not in known]
        if missing:
            raise CubeError(f"no memory {missing[0]!r} in namespace {namespace!r} (kvmem ls -n {namespace})")
        records = [known[i] for i in dict.fromkeys(ids)]
    if not records:
        raise CubeError(f"namespace {namespace!r} has no memories to distil (kvmem add ... -n {namespace})")
    out = out if out is not None else adapter_folder(view) / f"{namespace}.safetensors"
    m, tok = _load_model(model, dtype)
    cube = run(m, tok, records, steps=steps if steps is not None or time_budget is not None else 200,
               time_budget=time_budget, rank=rank, seed=seed, lr=lr, lr_schedule=lr_schedule, warmup=warmup,
               batch_size=batch_size, questions_per_memory=questions, max_answer_tokens=answer_tokens,
               content_weight=content_weight, keep_share=keep_share, keep_answers=keep_answers,
               sampled_share=sampled_share,
               content_temperature=content_temperature, grounded=grounded, weight_average=weight_average,
               precision=precision, checkpoint_dir=checkpoint_dir, resume=resume, name=f"{namespace}-distilled")
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        path = cube.save(out)
    run_facts = cube.meta["distill"]
    typer.echo(f"wrote {path}: {len(records)} memories learned in {run_facts['steps']} steps "
               f"({run_facts['seconds']:.0f} s, {run_facts['precision']} matmuls, loss {run_facts['losses'][0]:.3f} -> "
               f"{run_facts['losses'][-1]:.3f}), "
               f"LoRA rank {cube.rank}, base fingerprint {cube.fingerprint}")
