"""The inputs the benchmarks measure on, apart from the scripts that measure them.

- ttft.py: a memory of exactly n tokens and a query of exactly n tokens (`memory_ids`, `query_ids`);
- compose_quality.py: fact QA over invented people spread over cubes (`cube_set`, `questions_of`);
- zipf_trace.py: memory lengths and a Zipf request trace, optionally drifting (`make_memories`, `zipf_probs`,
  `make_trace`);
- adapter_swap.py: random, trained-looking LoRA adapters of a few shapes saved as PEFT folders
  (`ADAPTER_SPECS`, `make_adapter`).

Everything is seeded: the same arguments give the same workload.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import torch

from memory_text import FIRST, LAST, person_notes, text_of_tokens

# ---------------------------------------------------------------- TTFT: memory + query of exact lengths
QUESTION = "\n\nQuestion: Where does Alice live, and what is the badge number of Alice? Answer:"


def memory_ids(tok, n: int) -> torch.Tensor:
    """LongTensor [1, n]: a memory text of exactly n tokens."""
    ids = tok(text_of_tokens(tok, n), add_special_tokens=False).input_ids
    if len(ids) != n:  # decode/encode round trips can merge tokens; keep the length exact
        print(f"note: memory text re-encodes to {len(ids)} tokens, using the first {n}", flush=True)
    return torch.tensor([ids[:n]])


def query_ids(tok, n: int) -> torch.Tensor:
    """LongTensor [1, n]: other notes (another seed), trimmed, then a question; exactly n tokens."""
    q = tok(QUESTION, add_special_tokens=False).input_ids
    filler = tok(text_of_tokens(tok, max(n - len(q), 1), seed=101), add_special_tokens=False).input_ids
    ids = (filler[: max(n - len(q), 0)] + q)[-n:]
    assert len(ids) == n
    return torch.tensor([ids])


# ---------------------------------------------------------------- compose: fact QA over cubes
QUESTIONS = {  # kind: (question, start of the assistant's answer, fact key)
    "city": ("Where does {first} live?", "{name} lives in", "city"),
    "job": ("What does {first} work as?", "{name} works as a", "job"),
}


def cube_set(n_cubes: int, people_per_cube: int, seed: int) -> tuple[list[str], list[dict]]:
    """(cube texts, facts): ``n_cubes`` texts of ``people_per_cube`` paragraphs; first names unique in the set.

    Each fact dict gets ``cube``: the index of the cube that holds it.
    """
    rng = random.Random(seed)
    if n_cubes * people_per_cube > len(FIRST):
        raise SystemExit(f"{n_cubes} cubes x {people_per_cube} people needs more than {len(FIRST)} first names")
    firsts = rng.sample(FIRST, n_cubes * people_per_cube)
    texts, facts = [], []
    for c in range(n_cubes):
        parts = [f"Team notes, part {c + 1}. Each paragraph describes one colleague.\n"]
        for first in firsts[c * people_per_cube:(c + 1) * people_per_cube]:
            text, fact = person_notes(rng, first, rng.choice(LAST))
            parts.append(text)
            facts.append({**fact, "cube": c})
        texts.append("".join(parts))
    return texts, facts


def questions_of(facts: list[dict], kinds: list[str], n: int, seed: int) -> list[dict]:
    """Up to ``n`` questions (all kinds about all people, then a seeded sample)."""
    qs = [{"kind": k, "question": QUESTIONS[k][0].format(first=f["first"]), "cue": QUESTIONS[k][1].format(name=f["name"]),
           "answer": str(f[QUESTIONS[k][2]]), "cube": f["cube"], "person": f["name"]} for f in facts for k in kinds]
    if n and len(qs) > n:
        qs = random.Random(seed).sample(qs, n)
    return qs


# ---------------------------------------------------------------- Zipf: memories and a request trace
def make_memories(n: int, seed: int, lo: int, hi: int) -> dict:
    """id -> tokens: ``n`` memories of uniform lengths in [lo, hi]."""
    rng = random.Random(seed)
    return {f"m{i:03d}": rng.randint(lo, hi) for i in range(n)}


def zipf_probs(ids: list, s: float, seed: int) -> dict:
    """id -> request probability; ranks are a seeded shuffle of the ids (popularity unrelated to size)."""
    rng = random.Random(seed + 1)
    order = ids[:]
    rng.shuffle(order)
    w = [1 / (r + 1) ** s for r in range(len(order))]
    total = sum(w)
    return {m: x / total for m, x in zip(order, w)}


def make_trace(probs: dict, n: int, seed: int, *, phases: int = 1) -> tuple[list, list]:
    """n requests drawn from ``probs``; with phases > 1 the popularity ranks are reshuffled at the start of each
    phase (the hot set drifts). Returns the trace and, per request, the probabilities it was drawn from."""
    rng = random.Random(seed + 2)
    ids, weights = list(probs), sorted(probs.values(), reverse=True)
    trace, drawn_from = [], []
    for p in range(phases):
        if p == 0:
            current = probs
        else:
            order = ids[:]
            rng.shuffle(order)
            current = dict(zip(order, weights))
        k = n // phases + (p < n % phases)
        trace += rng.choices(ids, weights=[current[m] for m in ids], k=k)
        drawn_from += [current] * k
    return trace, drawn_from


# ---------------------------------------------------------------- adapters
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
ADAPTER_SPECS = {  # name -> (rank, target modules)
    "attn_r4": (4, ATTN),
    "attn_r16": (16, ATTN),
    "attn_r64": (64, ATTN),
    "attn_mlp_r16": (16, ATTN + MLP),
}


def make_adapter(base, folder: Path, *, seed: int, rank: int, targets: list[str]) -> None:
    """Save a PEFT LoRA folder with random, non-zero A and B (as after training), made on a copy of ``base``."""
    import peft

    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False))
    model.save_pretrained(folder)
