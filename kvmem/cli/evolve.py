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
               time_budget=time_budget, rank=rank, seed=seed, checkpoint_dir=checkpoint_dir, resume=resume,
               name=f"{namespace}-distilled")
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        path = cube.save(out)
    run_facts = cube.meta["distill"]
    typer.echo(f"wrote {path}: {len(records)} memories learned in {run_facts['steps']} steps "
               f"({run_facts['seconds']:.0f} s, loss {run_facts['losses'][0]:.3f} -> {run_facts['losses'][-1]:.3f}), "
               f"LoRA rank {cube.rank}, base fingerprint {cube.fingerprint}")
