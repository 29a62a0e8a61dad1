"""The cache `kvmem.prefill` returns (issue 20): its full-attention layers copy the memory once, at their first
update, then write new tokens in place; greedy tokens equal a full prefill's; the cube is never written. Each test
starts with the model's prefix pool empty (tests/test_prefix_pool.py covers the pooled, copy-free first update)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

import kvmem
from kvmem.model import cache as cache_mod
from kvmem.model.cache import GrowingCache, GrowingLayer, free_prefix_pool

from helpers import random_ids, tiny_model

IDS = random_ids(40, seed=4, vocab=1000)
QUERY = random_ids(5, seed=6, vocab=1000)[None]
GEN = dict(do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def cube(model):
    return kvmem.MemCube.from_ids(model, IDS)


@pytest.fixture(autouse=True)
def _empty_pool(model):
    free_prefix_pool(model)  # the growth path, not the pool's storage an earlier test left


def _count_grows(monkeypatch) -> list:
    grows = []
    original = GrowingLayer._grow

    def counted(self, *args):
        grows.append(args[-1])
        return original(self, *args)

    monkeypatch.setattr(GrowingLayer, "_grow", counted)
    return grows


def test_prefill_returns_a_growing_dynamic_cache(model, cube):
    cache = kvmem.prefill(model, cube).cache
    assert isinstance(cache, GrowingCache) and isinstance(cache, DynamicCache)
    assert all(type(layer) is GrowingLayer for layer in cache.layers)


def test_decode_never_copies_the_memory_again(model, cube, monkeypatch):
    """One growth per layer for the query forward and 20 decode steps: a DynamicLayer would copy at every step."""
    grows = _count_grows(monkeypatch)
    prefix = kvmem.prefill(model, cube)
    model.generate(prefix.extend(QUERY), cache=prefix.cache, max_new_tokens=20, min_new_tokens=20, **GEN)
    assert len(grows) == len(prefix.cache.layers)


def test_greedy_tokens_equal_a_full_prefill_across_many_growths(model, cube, monkeypatch):
    monkeypatch.setattr(cache_mod, "_ROOM_MIN", 3)  # grow every few tokens
    monkeypatch.setattr(cache_mod, "_ROOM_FRACTION", 1000)
    grows = _count_grows(monkeypatch)
    prefix = kvmem.prefill(model, cube)
    ids = prefix.extend(QUERY)
    out = model.generate(ids, cache=prefix.cache, max_new_tokens=24, min_new_tokens=24, **GEN)
    full = model.generate(ids, max_new_tokens=24, min_new_tokens=24, **GEN)
    assert torch.equal(out, full)
    assert len(grows) > 4 * len(prefix.cache.layers)  # the growth path was taken again and again


def test_cube_is_never_written(model, cube):
    before = [(k.clone(), v.clone()) for k, v in cube.kv]
    for _ in range(3):
        prefix = kvmem.prefill(model, cube)
        model.generate(prefix.extend(QUERY), cache=prefix.cache, max_new_tokens=8, **GEN)
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(cube.kv, before))


def test_a_deepcopied_cache_is_independent(model, cube):
    ids = kvmem.prefill(model, cube).extend(QUERY)
    prefix = kvmem.prefill(model, cube)
    copied = copy.deepcopy(prefix.cache)
    full = model.generate(ids, max_new_tokens=6, **GEN)
    assert torch.equal(model.generate(ids, cache=prefix.cache, max_new_tokens=6, **GEN), full)
    assert torch.equal(model.generate(ids, cache=copied, max_new_tokens=6, **GEN), full)


def test_cropped_layer_takes_what_it_is_given(model, cube):
    """``crop`` assigns a shorter view: the next update continues from it (as a DynamicLayer would)."""
    prefix = kvmem.prefill(model, cube)
    ids = prefix.extend(QUERY)
    with torch.inference_mode():
        model(input_ids=QUERY, cache=prefix.cache)
        n = prefix.cache.get_seq_length()
        prefix.cache.crop(-2)
        assert prefix.cache.get_seq_length() == n - 2
        logits = model(input_ids=QUERY[:, -2:], cache=prefix.cache).logits[0, -1]
        full = model(input_ids=ids).logits[0, -1]
    torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)


def test_first_update_reserves_every_layers_storage_before_the_forward_reaches_it(model, cube, monkeypatch):
    """The query forward's first update allocates every layer's grown storage up front (no allocation lands between
    the forward's temporaries: bench/host_overhead.py measured the page faults that caused), and each layer then
    grows into exactly that storage."""
    prefix = kvmem.prefill(model, cube)
    seen = []
    original = GrowingCache.update

    def spy(self, key_states, value_states, layer_idx, *args, **kwargs):
        out = original(self, key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == 0 and not seen:  # every other layer has not been updated yet
            seen.extend(layer._spare for layer in self.layers[1:])
        return out

    monkeypatch.setattr(GrowingCache, "update", spy)
    with torch.inference_mode():
        model(input_ids=QUERY, cache=prefix.cache)
    need = IDS.numel() + QUERY.shape[1]
    assert len(seen) == len(prefix.cache.layers) - 1
    for (spare_k, spare_v), layer in zip(seen, prefix.cache.layers[1:]):
        assert spare_k.shape[-2] >= need and spare_v.shape[-2] >= need
        assert layer.keys.untyped_storage().data_ptr() == spare_k.untyped_storage().data_ptr()
        assert layer.values.untyped_storage().data_ptr() == spare_v.untyped_storage().data_ptr()


def test_a_reservation_that_does_not_fit_is_not_used(monkeypatch):
    """Reserved for 1 new token (no room beyond), updated with 5: the layer grows into fresh storage with the right
    contents."""
    monkeypatch.setattr(cache_mod, "_ROOM_MIN", 0)
    monkeypatch.setattr(cache_mod, "_ROOM_FRACTION", 1000)
    keys, values = torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4)
    layer = GrowingLayer()
    layer.is_initialized, layer.device, layer.keys, layer.values = True, keys.device, keys, values
    layer.reserve(1)
    spare = layer._spare[0]
    assert spare.shape[-2] == 8
    new_k, new_v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    out_k, out_v = layer.update(new_k, new_v)
    assert out_k.untyped_storage().data_ptr() != spare.untyped_storage().data_ptr()
    assert torch.equal(out_k, torch.cat([keys, new_k], -2)) and torch.equal(out_v, torch.cat([values, new_v], -2))
