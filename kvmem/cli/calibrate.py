"""`kvmem calibrate`: measure how far composed cubes drift from a full prefill on one model (the composition gate)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import _friendly, _load_model, _read_text, app


@app.command()
@_friendly
def calibrate(
    model: str = typer.Option("smollm2", help="Local checkpoint folder, 'smollm2' or 'gemma3' (the bundled models)."),
    dtype: str = typer.Option("float32", help="Model dtype, as you serve it: float32, bfloat16 or float16."),
    cubes: list[int] = typer.Option([2, 4, 8], "--cubes", help="Cube counts to measure (repeatable)."),
    text: list[Path] = typer.Option([], "--text", help="A document of yours, one cube each (repeatable); default: "
                                    "invented multi-paragraph notes."),
    cases: Optional[Path] = typer.Option(None, "--cases", help='A JSON file of your cube sets with questions: '
                                         '[{"documents": [...], "questions": [...]}, ...]; one cube per document, '
                                         'the counts measured are the sets\' sizes (instead of --text and --cubes).'),
    tokens_per_cube: int = typer.Option(384, help="Tokens per invented cube."),
    sets: int = typer.Option(2, help="Cube sets per count."),
    questions: int = typer.Option(3, help="Questions per set."),
    kl: float = typer.Option(0.05, help="Target: mean next-token KL (nats) at most this."),
    agreement: float = typer.Option(0.9, help="Target: greedy answers equal to a full prefill's, at least this share."),
    folder: Optional[Path] = typer.Option(None, help="Where calibration/ goes (default $KVMEM_CACHE or ~/.cache/kvmem)."),
    chat: bool = typer.Option(True, help="Cubes after the chat template's system header, as kvmem.wrap builds them."),
):
    """Measure composed vs full prefill (KL, greedy agreement, TTFT) per mode and cube count; save it for the gate."""
    from ..errors import CubeError
    from ..inject.calibrate import calibrate as run
    from ..inject.calibrate import read_cases
    from ..inject.gate import Target
    from ..memory_model import wrap

    if cases is not None and text:
        raise CubeError("pass --cases or --text, not both: --cases holds its own documents")
    given = read_cases(cases) if cases is not None else None  # checked before the model loads: fail fast
    if model == "gemma3":
        import torch

        from ..demo.models import load_gemma3

        m, tok = load_gemma3(dtype=getattr(torch, dtype))
    else:
        m, tok = _load_model(model, dtype)
    texts = [_read_text(p) for p in text] or None
    anchor = wrap(m, tok, attention="keep").anchor if chat else None
    doc = run(m, tok, texts=texts, cubes=tuple(cubes), tokens_per_cube=tokens_per_cube, sets=sets,
              questions=questions, anchor=anchor, folder=folder, target=Target(kl=kl, agreement=agreement), cases=given)
    typer.echo(f"{'cubes':>5}  {'setting':<16}{'KL':>8}{'agree':>8}{'TTFT saved':>12}  questions")
    for row in doc["rows"]:
        # a setting stopped early missed the target on the questions it was measured on
        stopped = "  (stopped early: misses the target)" if row.get("stopped_early") else ""
        typer.echo(f"{row['cubes']:>5}  {row['label']:<16}{row['kl_mean']:>8.3f}{row['agreement']:>8.0%}"
                   f"{row['ttft_saving']:>12.0%}  {row['questions']:>9}{stopped}")
    for n, choice in doc["choices"].items():
        typer.echo(f"{n} cubes -> {choice['mode']}: {choice['reason']}")
    typer.echo(f"wrote {doc['path']}")
