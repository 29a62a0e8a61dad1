"""One cube injected as a prefix gives what a full prefill of the same ids gives: same greedy tokens,
last-position logits within the dtype's rounding. Tiny random models of several families, then the real model."""

from __future__ import annotations

import pytest
import torch

import kvmem
from memory_text import team_notes
from helpers import FAMILIES, greedy, last_logits, logit_tol, random_ids, tiny_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_single_cube_matches_full_prefill(family, attn, dtype):
    model = tiny_model(family, attn=attn, dtype=dtype)
    memory, anchor, query = random_ids(37), random_ids(3, seed=1), random_ids(11, seed=2)
    cube = kvmem.MemCube.from_ids(model, memory, anchor_ids=anchor)
    prefix = kvmem.prefill(model, cube)
    ids = prefix.extend(query)
    assert prefix.spans == [(3, 40)] and ids.shape == (1, 51)
    assert torch.equal(prefix.input_ids[0], torch.cat([anchor, memory]))

    full = last_logits(model, ids)
    injected = last_logits(model, query[None], cache=prefix.cache)
    torch.testing.assert_close(injected, full, rtol=0, atol=logit_tol(dtype, full.abs().max().item()))

    expected = greedy(model, ids)
    assert torch.equal(greedy(model, ids, cache=kvmem.prefill(model, cube).cache), expected)


def test_both_cache_kwargs_work(llama):
    """transformers 5 renamed past_key_values to cache; a user's generate() may use either."""
    cube = kvmem.MemCube.from_ids(llama, random_ids(20))
    ids = kvmem.prefill(llama, cube).extend(random_ids(5, seed=3))
    expected = greedy(llama, ids)
    with pytest.warns(Warning):  # transformers' own deprecation notice for the old name
        old = greedy(llama, ids, past_key_values=kvmem.prefill(llama, cube).cache)
    assert torch.equal(old, expected)
    assert torch.equal(greedy(llama, ids, cache=kvmem.prefill(llama, cube).cache), expected)


def test_chunked_build_equals_one_pass(llama):
    ids = random_ids(45)
    one = kvmem.MemCube.from_ids(llama, ids, chunk_size=4096)
    chunked = kvmem.MemCube.from_ids(llama, ids, chunk_size=16)
    for (k1, v1), (k2, v2) in zip(one.kv, chunked.kv):
        torch.testing.assert_close(k2, k1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v2, v1, rtol=1e-5, atol=1e-5)


def test_sliding_window_model_is_exact():
    """Mistral-style sliding-window layers keep only their window; the injected cache must still be exact."""
    model = tiny_model("mistral", sliding_window=16)
    memory, query = random_ids(40), random_ids(9, seed=4)
    prefix = kvmem.prefill(model, kvmem.MemCube.from_ids(model, memory))
    ids = prefix.extend(query)
    full = last_logits(model, ids)
    torch.testing.assert_close(last_logits(model, query[None], cache=prefix.cache), full,
                               rtol=0, atol=logit_tol(torch.float32, full.abs().max().item()))
    assert torch.equal(greedy(model, ids, cache=kvmem.prefill(model, kvmem.MemCube.from_ids(model, memory)).cache),
                       greedy(model, ids))


def test_reuse_1000_times_without_drift(llama):
    cube = kvmem.MemCube.from_ids(llama, random_ids(30), anchor_ids=random_ids(2, seed=5))
    before = [(k.clone(), v.clone()) for k, v in cube.kv]
    query = random_ids(7, seed=6)[None]
    first = last_logits(llama, query, cache=kvmem.prefill(llama, cube).cache)
    for _ in range(1000):
        assert torch.equal(last_logits(llama, query, cache=kvmem.prefill(llama, cube).cache), first)
    ids = kvmem.prefill(llama, cube).extend(query)
    tokens = greedy(llama, ids, n=6, cache=kvmem.prefill(llama, cube).cache)
    for _ in range(20):  # generation appends to the cache: still never into the cube
        assert torch.equal(greedy(llama, ids, n=6, cache=kvmem.prefill(llama, cube).cache), tokens)
    for (k, v), (k0, v0) in zip(cube.kv, before):
        assert torch.equal(k, k0) and torch.equal(v, v0)


def test_prefix_cache_is_fresh_each_call(llama):
    cube = kvmem.MemCube.from_ids(llama, random_ids(12))
    a, b = kvmem.prefill(llama, cube), kvmem.prefill(llama, cube)
    assert a.cache is not b.cache
    greedy(llama, a.extend(random_ids(3)), cache=a.cache)
    assert a.cache.get_seq_length() > b.cache.get_seq_length() == 12


@pytest.mark.slow
def test_real_model_exact(smollm2, tmp_path):
    model, tok = smollm2
    mm = kvmem.wrap(model, tok)
    notes = team_notes(5, seed=3)[0]
    cube = kvmem.MemCube.load(mm.build_cube(notes, name="five").save(tmp_path / "five.safetensors"))
    question = "Where does " + team_notes(5, seed=3)[1][0]["first"] + " live?"
    ids = mm.prompt_ids(question, [cube])
    prefix = kvmem.prefill(model, cube, tokenizer=tok)
    assert torch.equal(prefix.input_ids, ids[:, :prefix.num_tokens])
    full = last_logits(model, ids)
    injected = last_logits(model, ids[:, prefix.num_tokens:], cache=prefix.cache)
    torch.testing.assert_close(injected, full, rtol=0, atol=logit_tol(torch.float32, full.abs().max().item()))

    with_cube = mm.generate(question, [cube], max_new_tokens=16, do_sample=False)
    assert mm.last.injected and mm.last.prefilled_tokens == ids.shape[1] - prefix.num_tokens
    without = mm.generate(question, [cube], inject=False, max_new_tokens=16, do_sample=False)
    assert not mm.last.injected and mm.last.prefilled_tokens == ids.shape[1]
    assert torch.equal(with_cube, without)


def _gpu_attns():
    import importlib.util
    return ["eager", "sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


@pytest.mark.gpu
@pytest.mark.parametrize("attn", _gpu_attns())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_exact(dtype, attn, tmp_path):
    if attn == "flash_attention_2" and dtype == torch.float32:
        pytest.skip("flash-attention runs in half precision only")
    model = tiny_model("llama", dtype=dtype, attn=attn).cuda()
    memory, query = random_ids(37), random_ids(11, seed=2)
    path = kvmem.MemCube.from_ids(model, memory).save(tmp_path / "c.safetensors")
    for device in (None, "cuda"):  # from CPU memory (moved by prefill) and already on the device
        prefix = kvmem.prefill(model, kvmem.MemCube.load(path, device=device))
        ids = prefix.extend(query.cuda())
        full = last_logits(model, ids)
        torch.testing.assert_close(last_logits(model, query[None].cuda(), cache=prefix.cache), full,
                                   rtol=0, atol=logit_tol(dtype, full.abs().max().item()))
