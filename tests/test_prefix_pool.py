"""The prefix pool (issue 20): a repeated request on the same cube takes the storage the last request's cache grew
(the cube's KV already in place), so its query forward copies nothing; tokens stay those of a full prefill; a live
cache never shares its storage; another cube, a reassigned layer or a reset never reuses or corrupts it."""

from __future__ import annotations

import gc

import pytest
import torch

import kvmem
from kvmem.model.cache import GrowingLayer, free_prefix_pool, set_prefix_pool

from helpers import random_ids, tiny_model

IDS = random_ids(40, seed=4, vocab=1000)
GEN = dict(do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def cube(model):
    return kvmem.MemCube.from_ids(model, IDS)


@pytest.fixture(autouse=True)
def _empty_pool(model):
    free_prefix_pool(model)
    yield
    free_prefix_pool(model)


def _query(seed, n=5):
    return random_ids(n, seed=seed, vocab=1000)[None]


def _storage(cache):
    return [layer.keys.untyped_storage().data_ptr() for layer in cache.layers]


def _forward(model, prefix, query):
    with torch.inference_mode():
        return model(input_ids=query, cache=prefix.cache).logits[0, -1]


def _count_grows(monkeypatch) -> list:
    grows = []
    original = GrowingLayer._grow

    def counted(self, *args):
        grows.append(args[-1])
        return original(self, *args)

    monkeypatch.setattr(GrowingLayer, "_grow", counted)
    return grows


def test_a_repeated_request_writes_after_the_pooled_cube_and_copies_nothing(model, cube, monkeypatch):
    first = kvmem.prefill(model, cube)
    _forward(model, first, _query(1))
    pooled = _storage(first.cache)
    del first
    gc.collect()
    grows = _count_grows(monkeypatch)
    again = kvmem.prefill(model, cube)
    _forward(model, again, _query(2))
    assert grows == []  # no layer copied the memory
    assert _storage(again.cache) == pooled


def test_reused_storage_generates_what_a_full_prefill_does(model, cube):
    """Each request leaves its own tokens after the cube's in the pooled storage; the next, with another query (one
    longer than the room, which grows out of it), must still generate the full prefill's tokens."""
    for seed, n in ((1, 5), (2, 3), (3, 9), (4, 400), (5, 5)):
        query = _query(seed, n)
        prefix = kvmem.prefill(model, cube)
        ids = prefix.extend(query)
        out = model.generate(ids, cache=prefix.cache, max_new_tokens=12, min_new_tokens=12, **GEN)
        assert torch.equal(out, model.generate(ids, max_new_tokens=12, min_new_tokens=12, **GEN)), (seed, n)
        del prefix
        gc.collect()


def test_a_live_cache_never_shares_its_storage(model, cube):
    a = kvmem.prefill(model, cube)
    _forward(model, a, _query(1))
    b = kvmem.prefill(model, cube)  # a is alive: b grows its own storage
    logits_b = _forward(model, b, _query(2))
    assert set(_storage(a.cache)).isdisjoint(_storage(b.cache))
    logits_a = _forward(model, a, _query(3, 1))  # a continues from its own tokens, untouched by b
    with torch.inference_mode():
        full_a = model(input_ids=torch.cat([a.input_ids, _query(1), _query(3, 1)], -1)).logits[0, -1]
        full_b = model(input_ids=torch.cat([b.input_ids, _query(2)], -1)).logits[0, -1]
    torch.testing.assert_close(logits_a, full_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits_b, full_b, rtol=1e-4, atol=1e-4)


def test_another_cube_replaces_the_pooled_one(model, cube, monkeypatch):
    other = kvmem.MemCube.from_ids(model, random_ids(40, seed=9, vocab=1000))
    for c in (cube, other, cube):  # each request on a cube that is not the pooled one copies it, then is pooled
        prefix = kvmem.prefill(model, c)
        query = _query(7)
        logits = _forward(model, prefix, query)
        with torch.inference_mode():
            full = model(input_ids=prefix.extend(query)).logits[0, -1]
        torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
        del prefix
        gc.collect()
    grows = _count_grows(monkeypatch)
    prefix = kvmem.prefill(model, cube)
    _forward(model, prefix, _query(8))
    assert grows == []  # the last one pooled is reused


def test_a_layer_given_other_keys_before_its_first_update_does_not_adopt(model, cube):
    prefix = kvmem.prefill(model, cube)
    _forward(model, prefix, _query(1))
    del prefix
    gc.collect()
    prefix = kvmem.prefill(model, cube)
    prefix.cache.crop(-10)  # the layers now hold 30 of the cube's 40 entries: the pooled storage is not theirs
    query = _query(2)
    logits = _forward(model, prefix, query)
    with torch.inference_mode():
        full = model(input_ids=torch.cat([prefix.input_ids[:, :30], query], -1)).logits[0, -1]
    torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)


def test_reset_neither_zeroes_the_pool_nor_the_cube(model, cube):
    before = [(k.clone(), v.clone()) for k, v in cube.kv]
    used = kvmem.prefill(model, cube)
    _forward(model, used, _query(1))
    used.cache.reset()  # the pooled storage's holder resets: it drops the storage, the pool keeps it intact
    unused = kvmem.prefill(model, cube)
    unused.cache.reset()  # before its first update its layers hold the cube's own tensors: dropped, not zeroed
    del used, unused
    gc.collect()
    fresh = kvmem.prefill(model, cube)
    query = _query(2)
    logits = _forward(model, fresh, query)
    with torch.inference_mode():
        full = model(input_ids=fresh.extend(query)).logits[0, -1]
    torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(cube.kv, before))


def test_a_pool_turned_off_holds_nothing_and_every_request_copies(model, cube, monkeypatch):
    """For cubes too large to hold twice: off, the pool keeps no storage between requests (what it held is freed),
    every request grows its own (one copy a layer, as without the pool), tokens stay a full prefill's; on again,
    repeats reuse storage as before."""
    first = kvmem.prefill(model, cube)
    _forward(model, first, _query(1))
    del first
    gc.collect()
    set_prefix_pool(model, enabled=False)
    try:
        assert kvmem.model.resolve.resolve(model).memo.get("prefix_pool") is None  # what it held is freed
        for seed in (2, 3):
            grows = _count_grows(monkeypatch)
            again = kvmem.prefill(model, cube)
            got = _forward(model, again, _query(seed))
            assert len(grows) == model.config.num_hidden_layers  # every layer copied its cube
            ids = torch.cat([IDS[None], _query(seed)], -1)
            with torch.inference_mode():
                want = model(input_ids=ids).logits[0, -1]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            monkeypatch.undo()
            del again
            gc.collect()
        assert kvmem.model.resolve.resolve(model).memo.get("prefix_pool") is None  # and nothing was kept
    finally:
        set_prefix_pool(model, enabled=True)
    warm = kvmem.prefill(model, cube)
    _forward(model, warm, _query(4))
    del warm
    gc.collect()
    grows = _count_grows(monkeypatch)
    _forward(model, kvmem.prefill(model, cube), _query(5))
    assert grows == []  # on again: the repeat writes after the pooled cube
