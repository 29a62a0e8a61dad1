"""`capture_query`: the query forward after `kvmem.prefill`, compiled per query-length bucket over a kept static
cache, gives the uncompiled path's tokens and logits, reuses one graph for every request of a bucket (other
cubes, other query lengths), and leaves a cache that decodes on exactly. A counting eager backend stands in for
inductor in the fast tests (what is checked is dynamo's graph and kvmem's padding/rewind, not inductor's code)."""

from __future__ import annotations

import pytest
import torch

import kvmem
from kvmem.errors import CubeError
from kvmem.inject.capture import capture_query
from kvmem.model.attention import use_gqa_attention
from kvmem.model.cache import cache_kwarg
from helpers import logit_tol, random_ids, tiny_model


def _counting():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return graphs, backend


def _truth(model, ids, n):
    """Full prefill (no kvmem, no compile): last logits and ``n`` greedy tokens after ``ids``."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].float()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return logits, out[:, ids.shape[-1]:]


def _decode(model, prefix, first, n):
    """``n - 1`` eager decode steps after ``first`` on the captured call's cache."""
    kw, tokens = cache_kwarg(model), [first]
    for _ in range(n - 1):
        out = model(input_ids=tokens[-1], logits_to_keep=1, **{kw: prefix.cache})
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, -1)


@pytest.mark.parametrize("attn", ["kvmem_sdpa", "sdpa"])
def test_buckets_share_graphs_and_match_a_full_prefill(attn):
    torch._dynamo.reset()
    model = tiny_model("llama")
    use_gqa_attention(model, enabled=attn == "kvmem_sdpa")
    graphs, backend = _counting()
    captured = capture_query(model, buckets=(8, 16), backend=backend, cache_step=64)
    cubes = [kvmem.MemCube.from_ids(model, random_ids(n, seed=n)) for n in (20, 33)]
    # two cubes of other lengths, queries of 5 and 7 tokens (bucket 8), then 12 (bucket 16)
    for i, (cube, q_len) in enumerate([(cubes[0], 5), (cubes[1], 7), (cubes[0], 12)]):
        query = random_ids(q_len, seed=100 + i)
        with torch.inference_mode():
            logits, prefix = captured(kvmem.prefill(model, cube), query, max_new_tokens=4)
            first = logits.argmax(-1, keepdim=True)
            tokens = _decode(model, prefix, first, 4)
        ids = torch.cat([cube.all_ids.reshape(1, -1), query[None]], -1)
        want_logits, want_tokens = _truth(model, ids, 4)
        assert torch.equal(prefix.input_ids, ids)
        assert (logits[0].float() - want_logits).abs().max() <= logit_tol(torch.float32, want_logits.abs().max())
        assert torch.equal(tokens, want_tokens)
        assert len(graphs) == (1 if i < 2 else 2), f"request {i}: {len(graphs)} graphs"


def test_refusals_are_clear():
    model = tiny_model("llama")
    with pytest.raises(CubeError, match="CUDA graphs"):
        capture_query(model, mode="reduce-overhead")
    with pytest.raises(CubeError, match="buckets"):
        capture_query(model, buckets=(0, 8))
    captured = capture_query(model, buckets=(4,), backend="eager")
    cube = kvmem.MemCube.from_ids(model, random_ids(20))
    with pytest.raises(CubeError, match="no bucket"):
        captured(kvmem.prefill(model, cube), random_ids(5))
    with pytest.raises(CubeError, match="sliding-window"):
        sliding = tiny_model("mistral", sliding_window=8)
        capture_query(sliding, buckets=(8,), backend="eager")(
            kvmem.prefill(sliding, kvmem.MemCube.from_ids(sliding, random_ids(20))), random_ids(3))


@pytest.mark.slow
def test_inductor_compile_is_exact():
    """The real compiler (inductor, on the CPU: plain compile), two requests of one bucket."""
    torch._dynamo.reset()
    model = tiny_model("llama")
    use_gqa_attention(model)
    captured = capture_query(model, buckets=(8,))
    assert captured.mode is None  # CPU: no CUDA graphs
    for seed in (1, 2):
        cube = kvmem.MemCube.from_ids(model, random_ids(24, seed=seed))
        query = random_ids(6, seed=10 + seed)
        with torch.inference_mode():
            logits, prefix = captured(kvmem.prefill(model, cube), query, max_new_tokens=3)
            tokens = _decode(model, prefix, logits.argmax(-1, keepdim=True), 3)
        ids = torch.cat([cube.all_ids.reshape(1, -1), query[None]], -1)
        want_logits, want_tokens = _truth(model, ids, 3)
        assert (logits[0].float() - want_logits).abs().max() <= logit_tol(torch.float32, want_logits.abs().max())
        assert torch.equal(tokens, want_tokens)


def test_generate_continues_the_captured_cache():
    """The documented loop: the captured call's first token appended, `model.generate` on its cache."""
    torch._dynamo.reset()
    model = tiny_model("llama")
    use_gqa_attention(model)
    captured = capture_query(model, buckets=(8,), backend="eager", cache_step=64)
    cube = kvmem.MemCube.from_ids(model, random_ids(30))
    query = random_ids(5, seed=3)
    with torch.inference_mode():
        logits, prefix = captured(kvmem.prefill(model, cube), query, max_new_tokens=6)
        ids = torch.cat([prefix.input_ids, logits.argmax(-1, keepdim=True)], -1)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), cache=prefix.cache, max_new_tokens=5,
                             do_sample=False, pad_token_id=0)
    _, want = _truth(model, prefix.input_ids, 6)
    assert torch.equal(out[:, prefix.num_tokens:], want)


@pytest.mark.gpu
def test_cuda_graphs_are_exact():
    """On a GPU, the default mode (CUDA graphs through "reduce-overhead"): two requests of one bucket, each equal
    to the uncompiled kvmem path (greedy tokens; logits to float rounding)."""
    torch._dynamo.reset()
    model = tiny_model("llama").cuda()
    use_gqa_attention(model)
    captured = capture_query(model, buckets=(8,))
    assert captured.mode == "reduce-overhead"
    kw = cache_kwarg(model)
    for seed in (1, 2, 3):
        cube = kvmem.MemCube.from_ids(model, random_ids(24, seed=seed)).to("cuda")
        query = random_ids(6, seed=10 + seed)[None].cuda()
        with torch.inference_mode():
            logits, prefix = captured(kvmem.prefill(model, cube), query, max_new_tokens=3)
            tokens = _decode(model, prefix, logits.argmax(-1, keepdim=True), 3)
            plain = kvmem.prefill(model, cube)
            want_logits = model(input_ids=query, **{kw: plain.cache}).logits[0, -1].float()
            want = _decode(model, plain, want_logits.argmax(-1).reshape(1, 1), 3)
        assert (logits[0].float() - want_logits).abs().max() <= logit_tol(torch.float32, want_logits.abs().max())
        assert torch.equal(tokens, want)
