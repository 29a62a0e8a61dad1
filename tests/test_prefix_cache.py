"""static_prefix: a kvmem Prefix moved once into a StaticCache with room for the request. Exact against a full
prefill (transformers' own), sliding windows included; the cube never changes however often it is reused."""

from __future__ import annotations

import pytest
import torch
from transformers import StaticCache

import kvmem
from kvmem.model.attention import use_gqa_attention
from memory_text import team_notes
from kvmem.model.static_cache import fill_static_cache, static_prefix
from conftest import random_ids, tiny_model


def _tol(dtype, scale):
    return 64 * torch.finfo(dtype).eps * max(1.0, scale)


def _last_logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits[0, -1].float()


def _greedy(model, ids, n=8, **kw):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          pad_token_id=0, **kw)


CASES = {"llama": {}, "qwen2": {}, "mistral": {}, "mistral-window16": {"sliding_window": 16},
         "qwen2-window8": {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}}


@pytest.mark.parametrize("case,dtype,attn", [
    *[(case, torch.float32, "kvmem_sdpa") for case in CASES],
    ("llama", torch.float32, "sdpa"), ("mistral-window16", torch.float32, "sdpa"),
    ("llama", torch.bfloat16, "kvmem_sdpa"), ("qwen2-window8", torch.bfloat16, "kvmem_sdpa")], ids=str)
def test_static_prefix_matches_full_prefill(case, dtype, attn):
    model = tiny_model(case.split("-")[0], dtype=dtype, **CASES[case])
    if attn != "sdpa":
        use_gqa_attention(model)
    memory, anchor, query = random_ids(37), random_ids(3, seed=1), random_ids(11, seed=2)
    cube = kvmem.MemCube.from_ids(model, memory, anchor_ids=anchor)
    prefix = static_prefix(model, kvmem.prefill(model, cube), max_new_tokens=8, query_len=11)
    assert isinstance(prefix.cache, StaticCache) and prefix.cache.get_seq_length() == 40
    assert prefix.spans == [(3, 40)]
    ids = prefix.extend(query)
    full = _last_logits(model, ids)
    torch.testing.assert_close(_last_logits(model, query[None], cache=prefix.cache), full,
                               rtol=0, atol=_tol(dtype, full.abs().max().item()))
    fresh = static_prefix(model, kvmem.prefill(model, cube), max_new_tokens=8, query_len=11)
    assert torch.equal(_greedy(model, ids, cache=fresh.cache), _greedy(model, ids))


def test_composed_prefix_keeps_its_kv(llama):
    """Several cubes: the static cache holds exactly what kvmem.prefill spliced (same logits, same tokens)."""
    anchor = random_ids(2, seed=9)
    cubes = [kvmem.MemCube.from_ids(llama, random_ids(n, seed=n), anchor_ids=anchor) for n in (13, 21, 7)]
    query = random_ids(5, seed=3)[None]
    dynamic = kvmem.prefill(llama, cubes, recompute="leading", budget=4)
    static = static_prefix(llama, kvmem.prefill(llama, cubes, recompute="leading", budget=4), max_new_tokens=6,
                           query_len=5)
    assert static.spans == dynamic.spans and torch.equal(static.input_ids, dynamic.input_ids)
    ids = dynamic.extend(query)
    torch.testing.assert_close(_last_logits(llama, query, cache=static.cache),
                               _last_logits(llama, query, cache=kvmem.prefill(llama, cubes, budget=4).cache),
                               rtol=0, atol=1e-5)
    static = static_prefix(llama, kvmem.prefill(llama, cubes, budget=4), max_new_tokens=6, query_len=5)
    assert torch.equal(_greedy(llama, ids, n=6, cache=static.cache), _greedy(llama, ids, n=6, cache=dynamic.cache))


def test_reuse_100_times_cube_and_outputs_unchanged(llama):
    use_gqa_attention(llama)
    cube = kvmem.MemCube.from_ids(llama, random_ids(30), anchor_ids=random_ids(2, seed=5))
    before = [(k.clone(), v.clone()) for k, v in cube.kv]
    query = random_ids(7, seed=6)
    ids = kvmem.prefill(llama, cube).extend(query)
    fresh = lambda: static_prefix(llama, kvmem.prefill(llama, cube), max_new_tokens=3, query_len=7).cache  # noqa: E731
    first = _last_logits(llama, query[None], cache=fresh())
    for _ in range(100):  # the query is written into the cache in place: never into the cube
        assert torch.equal(_last_logits(llama, query[None], cache=fresh()), first)
    tokens = _greedy(llama, ids, n=3, cache=fresh())
    for _ in range(10):  # so are generated tokens
        assert torch.equal(_greedy(llama, ids, n=3, cache=fresh()), tokens)
    for (k, v), (k0, v0) in zip(cube.kv, before):
        assert torch.equal(k, k0) and torch.equal(v, v0)


def test_prefix_is_not_changed(llama):
    cube = kvmem.MemCube.from_ids(llama, random_ids(12))
    prefix = kvmem.prefill(llama, cube)
    static = static_prefix(llama, prefix, max_new_tokens=4, query_len=3)
    _greedy(llama, static.extend(random_ids(3)), n=4, cache=static.cache)
    assert prefix.cache.get_seq_length() == 12 and static.cache is not prefix.cache


def test_bad_sizes_are_refused(llama):
    prefix = kvmem.prefill(llama, kvmem.MemCube.from_ids(llama, random_ids(12)))
    with pytest.raises(kvmem.CubeError, match="max_new_tokens must be an int"):
        static_prefix(llama, prefix, max_new_tokens=-1, query_len=3)
    with pytest.raises(kvmem.CubeError, match="query_len must be an int"):
        static_prefix(llama, prefix, max_new_tokens=2, query_len=2.5)
    from kvmem.model.cache import kv_from_cache
    with pytest.raises(kvmem.CubeError, match="cannot hold a 12-token prefix"):
        fill_static_cache(llama, [kv_from_cache(prefix.cache)], [12], max_cache_len=11)
    with pytest.raises(kvmem.CubeError, match="holds 12 entries for 13 tokens"):
        fill_static_cache(llama, [kv_from_cache(prefix.cache)], [13], max_cache_len=20)


@pytest.mark.slow
def test_real_model_exact(smollm2, tmp_path):
    model, tok = smollm2
    mm = kvmem.wrap(model, tok)
    notes, people = team_notes(5, seed=3)
    cube = mm.build_cube(notes, name="five")
    question = "Where does " + people[0]["first"] + " live?"
    ids = mm.prompt_ids(question, [cube])
    prefix = kvmem.prefill(model, cube, tokenizer=tok)
    query = ids[:, prefix.num_tokens:]
    full = _last_logits(model, ids)
    expected = _greedy(model, ids, n=8)
    try:  # the fast path whole: static cache and kvmem_sdpa (each alone is covered on the tiny models)
        use_gqa_attention(model)
        static = static_prefix(model, kvmem.prefill(model, cube), max_new_tokens=8, query_len=query.shape[1])
        torch.testing.assert_close(_last_logits(model, query, cache=static.cache), full,
                                   rtol=0, atol=_tol(torch.float32, full.abs().max().item()))
        static = static_prefix(model, kvmem.prefill(model, cube), max_new_tokens=8, query_len=query.shape[1])
        assert torch.equal(_greedy(model, ids, n=8, cache=static.cache), expected)
    finally:
        use_gqa_attention(model, enabled=False)
