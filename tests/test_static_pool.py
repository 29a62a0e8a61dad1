"""The pooled static prefix cache (issue 20): requests of one model reuse one storage, sized by the largest; a
cache still alive never shares it; the pooled layer is set up as transformers' own lazy initialisation sets it."""

from __future__ import annotations

import gc

import torch

import kvmem
from kvmem.model.static_cache import free_static_pool, static_prefix
from transformers import StaticCache

from helpers import random_ids, tiny_model


def _prefix(model, n, seed=0):
    return kvmem.prefill(model, kvmem.MemCube.from_ids(model, random_ids(n, seed=seed, vocab=1000)))


def _storage(cache):
    return cache.layers[0].keys.untyped_storage().data_ptr()


def test_storage_is_reused_once_the_cache_is_gone_and_never_shared_while_alive():
    model = tiny_model("llama")
    a = static_prefix(model, _prefix(model, 20), max_new_tokens=8, query_len=4).cache
    b = static_prefix(model, _prefix(model, 20), max_new_tokens=8, query_len=4).cache
    assert _storage(a) != _storage(b)  # a is alive: b got its own storage
    first = _storage(a)
    del a, b
    gc.collect()
    c = static_prefix(model, _prefix(model, 12, seed=1), max_new_tokens=8, query_len=4).cache
    assert _storage(c) == first  # a smaller request reuses the pooled storage
    del c
    gc.collect()
    d = static_prefix(model, _prefix(model, 40), max_new_tokens=8, query_len=4).cache
    assert d.layers[0].keys.shape[2] == 52  # a larger request grows the pool
    free_static_pool(model)


def test_pooled_cache_generates_what_a_fresh_one_does():
    model = tiny_model("llama")
    ids = random_ids(6, seed=5, vocab=1000)[None]
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    outs = []
    for _ in range(3):  # the second and third reuse the storage the first one left (dirty with its tokens)
        prefix = static_prefix(model, _prefix(model, 30), max_new_tokens=6, query_len=6)
        outs.append(model.generate(prefix.extend(ids), cache=prefix.cache, **gen))
        del prefix
        gc.collect()
    full = model.generate(_prefix(model, 30).extend(ids), **gen)
    assert all(torch.equal(o, full) for o in outs)


def test_pooled_layer_has_what_lazy_initialization_sets():
    model = tiny_model("llama")
    prefix = _prefix(model, 10)
    gc.collect()
    pooled = static_prefix(model, prefix, max_new_tokens=4, query_len=2).cache.layers[0]
    plain = StaticCache(config=model.config, max_cache_len=16).layers[0]
    k = prefix.cache.layers[0].keys
    plain.lazy_initialization(k[:, :, :0], k[:, :, :0])
    assert set(vars(pooled)) == set(vars(plain))
    for name in ("device", "batch_size", "num_heads", "k_head_dim", "v_head_dim", "is_initialized"):
        assert getattr(pooled, name) == getattr(plain, name), name
    assert pooled.keys.shape == plain.keys.shape and pooled.keys.dtype == plain.keys.dtype
