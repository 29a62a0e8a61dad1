"""Several cubes in one prefix: shared anchor once, each cube's keys re-rotated to its new positions.

Layer 0's keys depend only on the token and its position, so after re-rotation they must equal the keys a full
prefill of the composed ids computes (deeper layers differ: the cubes never attended to each other)."""

from __future__ import annotations

import pytest
import torch

import kvmem
from conftest import FAMILIES, random_ids, tiny_model
from kvmem.cache import kv_from_cache

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
}


def _layer0_keys(model, ids):
    cache = kvmem.cache.output_cache(model(input_ids=ids, use_cache=True))
    return kv_from_cache(cache)[0][0][0]


@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_rerotated_keys_equal_transformers_rope(family, rope):
    model = tiny_model(family, rope_parameters=dict(ROPES[rope]))
    anchor = random_ids(4, seed=9)
    cubes = [kvmem.MemCube.from_ids(model, random_ids(n, seed=s), anchor_ids=anchor)
             for n, s in ((13, 1), (21, 2), (7, 3))]
    prefix = kvmem.prefill(model, cubes)
    assert prefix.spans == [(4, 17), (17, 38), (38, 45)]
    with torch.no_grad():
        expected = _layer0_keys(model, prefix.input_ids)
    got = kv_from_cache(prefix.cache)[0][0][0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_first_cube_is_exact_and_cubes_unchanged(llama):
    anchor = random_ids(3, seed=1)
    a = kvmem.MemCube.from_ids(llama, random_ids(10, seed=2), anchor_ids=anchor)
    b = kvmem.MemCube.from_ids(llama, random_ids(10, seed=3), anchor_ids=anchor)
    keys_b = [k.clone() for k, _ in b.kv]
    prefix = kvmem.prefill(llama, [a, b])
    for layer, ((k, v), (ka, va)) in enumerate(zip(kv_from_cache(prefix.cache), a.kv)):
        assert torch.equal(k[0, :, :13], ka) and torch.equal(v[0, :, :13], va)
        assert torch.equal(b.kv[layer][0], keys_b[layer])


def test_different_anchors_refused(llama):
    a = kvmem.MemCube.from_ids(llama, random_ids(5), anchor_ids=random_ids(2, seed=1))
    b = kvmem.MemCube.from_ids(llama, random_ids(5), anchor_ids=random_ids(3, seed=2))
    with pytest.raises(kvmem.CubeError, match="different anchors"):
        kvmem.prefill(llama, [a, b])


def test_dynamic_rope_refused():
    model = tiny_model("llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    cubes = [kvmem.MemCube.from_ids(model, random_ids(5, seed=s)) for s in (1, 2)]
    with pytest.raises(kvmem.CubeError, match="not linear in the position"):
        kvmem.prefill(model, cubes)
    kvmem.prefill(model, cubes[:1])  # one cube needs no re-rotation: still fine


def test_wrap_composes_cubes(smollm2):
    model, tok = smollm2
    mm = kvmem.wrap(model, tok)
    cubes = [mm.build_cube("Alice lives in Oslo.", name="alice"), mm.build_cube("Bob lives in Lisbon.", name="bob")]
    out = mm.generate("Where does Bob live?", cubes, max_new_tokens=8, do_sample=False)
    assert mm.last.injected and mm.last.cube_names == ["alice", "bob"]
    (s1, e1), (s2, e2) = mm.last.spans
    ids = mm.prompt_ids("Where does Bob live?", cubes)
    assert torch.equal(out[0, :ids.shape[1]], ids[0])
    assert torch.equal(ids[0, s1:e1], cubes[0].input_ids[0]) and torch.equal(ids[0, s2:e2], cubes[1].input_ids[0])
