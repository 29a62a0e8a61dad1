"""recompute="query": exact with a full budget, its signal is the attention the query really pays (what the stock
eager attention reports), the budget is spent per later cube, and a missing query falls back to the last cube's
tail. And the RoPE refusal comes before the composition gate's notice."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import kvmem
from helpers import random_ids, tiny_model
from kvmem.inject import gate as gate_module
from kvmem.inject.prefill import compose_kv
from kvmem.inject.recompute import query_attention
from kvmem.model.cache import cache_kwarg, new_cache
from kvmem.model.rope import rope_facts


def _cubes(model, lengths=(12, 17, 9)):
    anchor = random_ids(3, seed=1)
    return [kvmem.MemCube.from_ids(model, random_ids(n, seed=10 + i), anchor_ids=anchor, name=f"c{i}")
            for i, n in enumerate(lengths)]


def _next_logits(model, cache, query):
    with torch.inference_mode():
        return model(input_ids=query[None], use_cache=True, **{cache_kwarg(model): cache}).logits[0, -1]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_query_mode_full_budget_is_exact(family):
    model = tiny_model(family)
    cubes, query = _cubes(model), random_ids(5, seed=99)
    prefix = kvmem.prefill(model, cubes, recompute="query", budget=17, query_ids=query)
    assert prefix.recomputed == 17 + 9
    with torch.inference_mode():
        full = model(input_ids=prefix.extend(query)).logits[0, -1]
    torch.testing.assert_close(_next_logits(model, prefix.cache, query), full, rtol=1e-4, atol=1e-4)
    partial = kvmem.prefill(model, cubes, recompute="query", budget=4, query_ids=query)
    assert partial.recomputed == 8  # 4 per later cube
    assert not torch.allclose(_next_logits(model, partial.cache, query), full, atol=1e-4)  # partial: not exact


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_query_attention_is_what_the_model_attends(family):
    model = tiny_model(family, attn="eager")
    cubes, query = _cubes(model), random_ids(4, seed=5)
    k, v, ids, spans = compose_kv(cubes, rope_facts(model), dtype=torch.float32)
    mass = query_attention(model, k, v, ids[None], spans, query)
    cache = new_cache(model, [(k[i][None].clone(), v[i][None].clone()) for i in range(k.shape[0])])
    with torch.inference_mode():
        out = model(input_ids=query[None], use_cache=True, output_attentions=True, **{cache_kwarg(model): cache})
    expected = sum(a[0].sum((0, 1)) for a in out.attentions)[:ids.numel()]  # layers, heads, query rows
    torch.testing.assert_close(mass, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(k, compose_kv(cubes, rope_facts(model), dtype=torch.float32)[0])  # the probe wrote nothing


def test_query_mode_spends_the_budget_per_cube_and_proxies_a_missing_query(llama):
    cubes = _cubes(llama, (10, 40, 40))
    query = random_ids(6, seed=2)
    with_query = kvmem.prefill(llama, cubes, recompute="query", budget=8, query_ids=query)
    proxy = kvmem.prefill(llama, cubes, recompute="query", budget=8)  # the last cube's tail stands in
    assert with_query.recomputed == proxy.recomputed == 16
    with pytest.raises(kvmem.CubeError, match="token count >= 0"):
        kvmem.prefill(llama, cubes, recompute="query", budget=0.5)


def test_length_dependent_rope_is_refused_before_the_gate_notice(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMEM_CACHE", str(tmp_path))
    gate_module._NOTICED.clear()
    model = tiny_model("llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    cubes = _cubes(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(kvmem.CubeError, match="dynamic"):
            kvmem.prefill(model, cubes)
    assert not [w for w in caught if "without a calibration" in str(w.message)]


def test_query_mode_and_ape_on_sliding_window_layers():
    """Gemma 3's mix of sliding-window and full layers: the query probe and the adjusted path follow each layer's
    own mask (cubes longer than the window), exact at full budget and equal to stock when nothing is adjusted."""
    from kvmem.model import ape

    model = tiny_model("gemma3_text", sliding_window=8,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                       num_hidden_layers=4)
    cubes, query = _cubes(model), random_ids(5, seed=4)
    prefix = kvmem.prefill(model, cubes, recompute="query", budget=17, query_ids=query)
    with torch.inference_mode():
        full = model(input_ids=prefix.extend(query)).logits[0, -1]
    stock = _next_logits(model, copy.deepcopy(prefix.cache), query)
    torch.testing.assert_close(stock, full, rtol=1e-4, atol=1e-4)
    with ape.adjusted(model, context=(prefix.spans[0][0], prefix.spans[-1][1]), query_start=prefix.num_tokens,
                      record=[]):
        torch.testing.assert_close(_next_logits(model, copy.deepcopy(prefix.cache), query), stock, rtol=1e-4, atol=1e-4)


def test_deviation_over_several_layers_is_each_layers_own_normalised():
    from kvmem.inject.recompute import deviation

    model = tiny_model("llama", num_hidden_layers=4)
    cubes = _cubes(model, (10, 30, 30))
    k, v, ids, spans = compose_kv(cubes, rope_facts(model), dtype=torch.float32)
    candidates = torch.arange(spans[1][0], spans[-1][1])
    one, three = (deviation(model, k, v, ids[None], candidates, layers=(i,)) for i in (1, 3))
    both = deviation(model, k, v, ids[None], candidates, layers=(1, 3))
    torch.testing.assert_close(both, one / one.mean() + three / three.mean())
    assert not torch.allclose(one / one.mean(), three / three.mean())  # the layers disagree: a deeper signal
    deep = kvmem.prefill(model, cubes, recompute="deep", budget=8)
    assert deep.recomputed == 16
    query = random_ids(4, seed=6)
    exact = kvmem.prefill(model, cubes, recompute="deep", budget=30)
    with torch.inference_mode():
        full = model(input_ids=exact.extend(query)).logits[0, -1]
    torch.testing.assert_close(_next_logits(model, exact.cache, query), full, rtol=1e-4, atol=1e-4)
