"""prefill_batch: B requests with their own cubes in one generate call; each row's greedy tokens equal the same
request run alone (kvmem.prefill + generate, itself exact against a full prefill in test_exactness.py)."""

from __future__ import annotations

import pytest
import torch

import kvmem
from kvmem.model.attention import use_gqa_attention
from kvmem.inject.batch import prefill_batch
from memory_text import team_notes
from conftest import random_ids, tiny_model


def _alone(model, cubes, query, n):
    prefix = kvmem.prefill(model, cubes)
    ids = prefix.extend(query)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=0, cache=prefix.cache)
    return out[0, ids.shape[1]:]


def _batched(model, rows, queries, n, **kw):
    batch = prefill_batch(model, rows, queries, max_new_tokens=n, **kw)
    out = model.generate(**batch.generate_kwargs(model), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return batch, batch.new_tokens(out)


@pytest.mark.parametrize("static,attn", [(True, "kvmem_sdpa"), (True, "sdpa"), (False, "sdpa")])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_each_row_equals_its_request_alone(family, static, attn):
    model = tiny_model(family)
    use_gqa_attention(model, enabled=attn == "kvmem_sdpa")
    anchor = random_ids(2, seed=9)
    cubes = [kvmem.MemCube.from_ids(model, random_ids(n, seed=n), anchor_ids=anchor) for n in (13, 21, 7, 30)]
    rows = [[cubes[0]], [cubes[1], cubes[2]], [cubes[3]]]  # prefixes of 15, 30 and 32 tokens
    queries = [random_ids(5, seed=1), random_ids(9, seed=2), random_ids(3, seed=3)]
    batch, tokens = _batched(model, rows, queries, 6, static=static)
    assert batch.prefix_len == 32 and batch.input_ids.shape == (3, 41)
    assert batch.attention_mask.sum(1).tolist() == [15 + 5, 30 + 9, 32 + 3]
    assert batch.spans[0] == [(19, 32)]  # row 0's cube after 17 pads and the 2-token anchor
    for cubes_b, q, got in zip(rows, queries, tokens):
        assert torch.equal(got, _alone(model, cubes_b, q, 6))


def test_sliding_window_rows(family="mistral"):
    """Queries of one length: exact under a window. Different lengths would pad inside the window: refused."""
    model = tiny_model(family, sliding_window=12)
    cubes = [kvmem.MemCube.from_ids(model, random_ids(n, seed=n)) for n in (20, 9)]
    queries = [random_ids(4, seed=1), random_ids(4, seed=2)]
    _, tokens = _batched(model, [[c] for c in cubes], queries, 5)
    for c, q, got in zip(cubes, queries, tokens):
        assert torch.equal(got, _alone(model, [c], q, 5))
    with pytest.raises(kvmem.CubeError, match="sliding window of 12 positions"):
        prefill_batch(model, [[c] for c in cubes], [random_ids(4), random_ids(6)], max_new_tokens=5)


def test_bad_batches_are_refused(llama):
    cube = kvmem.MemCube.from_ids(llama, random_ids(8))
    with pytest.raises(kvmem.CubeError, match="one query per row"):
        prefill_batch(llama, [[cube], [cube]], [random_ids(3)], max_new_tokens=2)
    with pytest.raises(kvmem.CubeError, match="at least one token"):
        prefill_batch(llama, [[cube]], [[]], max_new_tokens=2)
    with pytest.raises(kvmem.CubeError, match="max_new_tokens must be an int >= 1"):
        prefill_batch(llama, [[cube]], [random_ids(3)], max_new_tokens=0)
    with pytest.raises(kvmem.CubeError, match="no cubes to inject"):
        prefill_batch(llama, [[]], [random_ids(3)], max_new_tokens=2)


@pytest.mark.slow
def test_real_model_rows(smollm2):
    model, tok = smollm2
    mm = kvmem.wrap(model, tok)
    rows, queries, alone = [], [], []
    for seed, n in ((1, 2), (2, 4)):
        notes, people = team_notes(n, seed=seed)
        cube = mm.build_cube(notes, name=f"team{seed}")
        ids = mm.prompt_ids(f"Where does {people[-1]['first']} live?", [cube])
        prefix = kvmem.prefill(model, cube, tokenizer=tok)
        rows.append([cube])
        queries.append(ids[0, prefix.num_tokens:])
        full = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              pad_token_id=tok.eos_token_id)
        alone.append(full[0, ids.shape[1]:])  # the truth: a full prefill of the row's own prompt
    try:
        use_gqa_attention(model)
        _, tokens = _batched(model, rows, queries, 8, pad_token_id=tok.eos_token_id)
    finally:
        use_gqa_attention(model, enabled=False)
    for got, want in zip(tokens, alone):
        assert torch.equal(got, want)
