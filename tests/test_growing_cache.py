"""The cache `kvmem.prefill` returns (issue 20): its full-attention layers copy the memory once, at their first
update, then write new tokens in place; greedy tokens equal a full prefill's; the cube is never written."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

import kvmem
from kvmem.model import cache as cache_mod
from kvmem.model.cache import GrowingCache, GrowingLayer

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
