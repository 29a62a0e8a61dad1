"""APE-style attention adjustment (kvmem.model.ape): a no-op that leaves the model untouched at T = S = 1, the
adjusted path equal to the stock attention when it adjusts nothing, the scale S equal to an additive bias of log S
on the composed span, only the query's rows adjusted, and the model restored after the request."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import kvmem
from helpers import random_ids, tiny_model
from kvmem.model import ape
from kvmem.model.cache import cache_kwarg


def _prefix(model, lengths=(12, 17, 9)):
    anchor = random_ids(3, seed=1)
    cubes = [kvmem.MemCube.from_ids(model, random_ids(n, seed=10 + i), anchor_ids=anchor, name=f"c{i}")
             for i, n in enumerate(lengths)]
    return kvmem.prefill(model, cubes, recompute="none")


def _logits(model, prefix, query, **kw):
    with torch.inference_mode():
        out = model(input_ids=query[None], use_cache=True, **{cache_kwarg(model): copy.deepcopy(prefix.cache)}, **kw)
    return out.logits[0]


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("qwen3", "sdpa"), ("llama", "eager"),
                                         ("llama", "kvmem_sdpa")])
def test_identity_is_bit_exact_and_the_adjusted_path_matches_stock(family, attn):
    if attn == "kvmem_sdpa":
        from kvmem.model.attention import register_gqa_attention

        register_gqa_attention()
    model = tiny_model(family, attn=attn)
    prefix, query = _prefix(model), random_ids(5, seed=99)
    stock = _logits(model, prefix, query)
    with prefix.adjusted(model, temperature=1.0, scale=1.0):
        assert model.config._attn_implementation == attn  # untouched
        assert torch.equal(_logits(model, prefix, query), stock)
    record: list = []  # forces the adjusted path with nothing to adjust: the same attention, another kernel
    with ape.adjusted(model, context=prefix.spans[0][:1] + prefix.spans[-1][1:], query_start=prefix.num_tokens,
                      record=record):
        assert model.config._attn_implementation == f"kvmem_ape_{attn}"
        torch.testing.assert_close(_logits(model, prefix, query), stock, rtol=1e-4, atol=1e-4)
    assert model.config._attn_implementation == attn  # restored
    assert len(record) == model.config.num_hidden_layers
    assert all(torch.allclose(r.sum(), torch.tensor(float(query.numel() * model.config.num_attention_heads)))
               for r in record)  # every query row's weights sum to one per head


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_scale_is_an_additive_log_bias_on_the_composed_span(family):
    model = tiny_model(family)
    prefix, query = _prefix(model), random_ids(4, seed=5)
    n, q, s = prefix.num_tokens, query.numel(), 0.6
    start, end = prefix.spans[0][0], prefix.spans[-1][1]
    rows, cols = torch.arange(n, n + q)[:, None], torch.arange(n + q)[None, :]
    bias = torch.zeros(q, n + q).masked_fill(cols > rows, torch.finfo(torch.float32).min)
    bias[:, start:end] += math.log(s)
    expected = _logits(model, prefix, query, attention_mask=bias[None, None],
                       position_ids=torch.arange(n, n + q)[None])
    with prefix.adjusted(model, temperature=1.0, scale=s):
        got = _logits(model, prefix, query)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, _logits(model, prefix, query), atol=1e-3)  # the adjustment did something


def test_temperature_adjusts_only_the_query_rows_and_decode_is_optional(llama):
    prefix, query = _prefix(llama), random_ids(5, seed=3)
    stock = _logits(llama, prefix, query)
    with prefix.adjusted(llama, temperature=0.5, scale=1.0):
        sharp = _logits(llama, prefix, query)
    assert not torch.allclose(sharp, stock, atol=1e-3)
    # the prefix's own tokens are never adjusted: recomputing a cube's tokens inside the context gives the same KV
    cache = copy.deepcopy(prefix.cache)
    with prefix.adjusted(llama, temperature=0.5, scale=0.7, decode=False, query_len=query.numel()), \
            torch.inference_mode():
        first = llama(input_ids=query[None], use_cache=True, **{cache_kwarg(llama): cache}).logits[0]
        step = llama(input_ids=query[-1:][None], use_cache=True, **{cache_kwarg(llama): copy.deepcopy(cache)}).logits
    with torch.inference_mode():
        plain = llama(input_ids=query[-1:][None], use_cache=True, **{cache_kwarg(llama): cache}).logits
    assert torch.equal(step, plain)  # decode=False: a generated token attends as it always does
    with prefix.adjusted(llama, temperature=0.5, scale=0.7):
        adjusted_query = _logits(llama, prefix, query)
    torch.testing.assert_close(first, adjusted_query)


def test_generate_inside_and_restore_after_errors(llama):
    prefix, query = _prefix(llama), random_ids(4, seed=8)
    ids = prefix.extend(query)
    with prefix.adjusted(llama, temperature=0.8, scale=0.9):
        out = llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             **{cache_kwarg(llama): copy.deepcopy(prefix.cache)})
    assert out.shape[1] == ids.shape[1] + 3
    with pytest.raises(RuntimeError, match="boom"), prefix.adjusted(llama, temperature=0.8, scale=0.9):
        raise RuntimeError("boom")
    assert llama.config._attn_implementation == "sdpa"
    with pytest.raises(kvmem.CubeError, match="must be > 0"), prefix.adjusted(llama, temperature=0.0, scale=1.0):
        pass
    with pytest.raises(kvmem.CubeError, match="span of positions before the query"):
        with ape.adjusted(llama, context=(5, 99), query_start=10, temperature=0.5):
            pass
    with pytest.raises(kvmem.CubeError, match="only once"), prefix.adjusted(llama, temperature=0.8, scale=0.9):
        with prefix.adjusted(llama, temperature=0.8, scale=0.9):
            pass
    assert llama.config._attn_implementation == "sdpa"
    single = kvmem.prefill(llama, [kvmem.MemCube.from_ids(llama, random_ids(6), name="one")])
    with single.adjusted(llama, temperature=0.5, scale=0.5):  # one cube is exact: nothing to adjust
        assert llama.config._attn_implementation == "sdpa"
