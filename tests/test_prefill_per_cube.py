"""What `kvmem.prefill` keeps per cube between requests (issue 20): a cube's KV shapes are checked once per model
generation and checked again after the model changes; its batch-axis views are kept only where no copy was made,
and a request over kept views still gives a full prefill's logits."""

from __future__ import annotations

import torch

import kvmem
from kvmem.inject import prefill as prefill_mod
from kvmem.model.watch import mark_changed

from helpers import random_ids, tiny_model

IDS = random_ids(30, seed=11, vocab=1000)
QUERY = random_ids(4, seed=12, vocab=1000)[None]


def _count_checks(monkeypatch) -> list:
    seen = []
    original = prefill_mod._check_kv_shapes

    def counted(model, cube):
        seen.append(cube.name)
        return original(model, cube)

    monkeypatch.setattr(prefill_mod, "_check_kv_shapes", counted)
    return seen


def test_shapes_checked_once_per_generation(monkeypatch):
    model = tiny_model("llama")
    cube = kvmem.MemCube.from_ids(model, IDS)
    checks = _count_checks(monkeypatch)
    for _ in range(3):
        kvmem.prefill(model, cube)
    assert len(checks) == 1
    mark_changed(model)  # a new generation: checked again
    kvmem.prefill(model, cube)
    assert len(checks) == 2
    other = kvmem.MemCube.from_ids(model, IDS)  # another cube: its own check
    kvmem.prefill(model, other)
    assert len(checks) == 3


def test_kept_views_are_the_cubes_tensors_and_stay_exact():
    model = tiny_model("llama")
    cube = kvmem.MemCube.from_ids(model, IDS)
    first, second = kvmem.prefill(model, cube), kvmem.prefill(model, cube)
    for (k, v), a, b in zip(cube.kv, first.cache.layers, second.cache.layers):
        assert a.keys.data_ptr() == b.keys.data_ptr() == k.data_ptr()  # views, never copies
        assert a.values.data_ptr() == v.data_ptr()
    ids = second.extend(QUERY)
    with torch.inference_mode():
        model(input_ids=QUERY, cache=first.cache)  # the first request grows its own storage...
        logits = model(input_ids=QUERY, cache=second.cache).logits[0, -1]  # ...the second starts from the cube
        full = model(input_ids=ids).logits[0, -1]
    torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(k, layer.keys[0, :, :k.shape[1]]) for (k, _), layer in zip(cube.kv, first.cache.layers))
