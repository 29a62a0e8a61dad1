"""`MemoryModel.generate` on a list of prompts: each row with its own cubes (or "auto"), one ``model.generate``
call. Rows with cubes go through `kvmem.batch.prefill_batch` (each row equals its request alone); a batch with a
row without cubes, or ``inject=False``, is prefilled in full, left-padded as transformers pads a batch."""

from __future__ import annotations

import torch

from .batch import prefill_batch
from .cache import cache_kwarg
from .errors import CubeError
from .modelinfo import model_device
from .prefix_cache import sequences_per_prompt, static_capable, static_room
from .report import GenerationReport
from .timing import FirstTokenClock


def generate_batch(mm, prompts: list[str], cubes, *, inject: bool, recompute, budget, adapter, recall_options: dict,
                   **kwargs):
    """`MemoryModel.generate` for a list of prompts: one ``model.generate`` call (see `prefill_batch`)."""
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise CubeError("a batch is a non-empty list of prompt strings")
    rows = [None] * len(prompts) if cubes is None else ["auto"] * len(prompts) if cubes == "auto" else cubes
    if isinstance(rows, str) or not isinstance(rows, (list, tuple)) or len(rows) != len(prompts):
        raise CubeError(f"with {len(prompts)} prompts, cubes is None, 'auto' or a list of {len(prompts)} entries "
                        "(each a MemCube, a list of MemCubes or None)")
    with mm.adapters.using(adapter):
        clock = FirstTokenClock().start()
        recalled = [mm._require_store().recall(p, **recall_options) if isinstance(r, str) and r == "auto"
                    else None for p, r in zip(prompts, rows)]
        rows = [r.cubes if r is not None else mm.layout.fit(c) for r, c in zip(recalled, rows)]
        texts = [r.texts if r is not None else [] for r in recalled]
        queries = [torch.cat([mm.layout.memory_ids(t) for t in ts] + [mm.request_ids(p)])
                   for p, ts in zip(prompts, texts)]
        pad = mm._pad_id(kwargs)
        reports = [GenerationReport(cube_names=[c.name for c in cubes], memories=r.memories if r else [],
                                    dropped=r.dropped if r else []) for cubes, r in zip(rows, recalled)]
        if inject and all(rows):
            knobs = {name: v for name, v in (("recompute", recompute), ("budget", budget)) if v is not None}
            width = (max(r[0].anchor_len + sum(c.num_tokens for c in r) for r in rows)
                     + max(q.numel() for q in queries))  # the padded prompt generate starts from
            room = static_room(mm.model, width, kwargs) if mm.cache == "auto" else None
            static = room is not None and static_capable(mm.model)
            batch = prefill_batch(mm.model, rows, queries, max_new_tokens=room if static else 1, static=static,
                                  pad_token_id=pad, tokenizer=mm.tokenizer, **knobs)
            if static:
                kwargs["disable_compile"] = kwargs.pop("disable_compile", "compile_config" not in kwargs)
            elif sequences_per_prompt(mm.model, kwargs) > 1:  # beams / several sequences: one copy per row
                batch.cache.batch_repeat_interleave(sequences_per_prompt(mm.model, kwargs))
            ids, mask, cache = batch.input_ids, batch.attention_mask, {cache_kwarg(mm.model): batch.cache}
            for b, report in enumerate(reports):
                report.injected, report.spans = True, batch.spans[b]
                report.prefilled_tokens = queries[b].numel()
                report.prompt_tokens = int(mask[b].sum())
        else:  # a row without cubes (or inject=False): every row prefilled in full, left-padded
            full = [mm.layout.prompt_ids(p, c, t)[0] for p, c, t in zip(prompts, rows, texts)]
            ids = torch.full((len(full), max(map(len, full))), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, row in enumerate(full):
                ids[b, ids.shape[1] - len(row):], mask[b, ids.shape[1] - len(row):] = row, 1
                reports[b].prompt_tokens = reports[b].prefilled_tokens = len(row)
            device = model_device(mm.model)
            ids, mask, cache = ids.to(device), mask.to(device), {}
        kwargs["logits_processor"] = list(kwargs.get("logits_processor") or []) + [clock]
        out = mm.model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad, **cache, **kwargs)
        mm.last = GenerationReport(ttft_s=clock.ttft_s, injected=all(r.injected for r in reports),
                                     prompt_tokens=ids.shape[1], rows=reports)
    for r in recalled:
        if r is not None:
            mm.recall.after_answer(r)
    return out
