"""Several cubes in one prefix: shared anchor once, each cube's keys re-rotated to its new positions.

Layer 0's keys depend only on the token and its position, so after re-rotation they must equal the keys a full
prefill of the composed ids computes (deeper layers differ: the cubes never attended to each other)."""

from __future__ import annotations

import pytest
import torch

import kvmem
from helpers import FAMILIES, random_ids, tiny_model
from kvmem.model.cache import kv_from_cache

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
}


def _layer0_keys(model, ids):
    cache = kvmem.model.cache.output_cache(model(input_ids=ids, use_cache=True))
    return kv_from_cache(cache)[0][0][0]


@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_rerotated_keys_equal_transformers_rope(family, rope):
    model = tiny_model(family, rope_parameters=dict(ROPES[rope]))
    anchor = random_ids(4, seed=9)
    cubes = [kvmem.MemCube.from_ids(model, random_ids(n, seed=s), anchor_ids=anchor)
             for n, s in ((13, 1), (21, 2), (7, 3))]
    prefix = kvmem.prefill(model, cubes, recompute="none")
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


def _composed_logits(model, cubes, query, **kw):
    prefix = kvmem.prefill(model, cubes, **kw)
    with torch.no_grad():
        out = model(input_ids=query[None], cache=prefix.cache).logits[0, -1].float()
    return out, prefix


@pytest.mark.parametrize("mode,budget", [("leading", 10_000), ("selective", 1.0)])
@pytest.mark.parametrize("family", FAMILIES)
def test_full_recompute_budget_equals_full_prefill(family, mode, budget):
    """Recomputing every later-cube token with full context must give exactly the full prefill."""
    model = tiny_model(family)
    anchor, query = random_ids(3, seed=7), random_ids(6, seed=8)
    cubes = [kvmem.MemCube.from_ids(model, random_ids(n, seed=s), anchor_ids=anchor) for n, s in ((9, 1), (14, 2), (11, 3))]
    got, prefix = _composed_logits(model, cubes, query, recompute=mode, budget=budget)
    assert prefix.recomputed == 14 + 11
    with torch.no_grad():
        full = model(input_ids=prefix.extend(query)).logits[0, -1].float()
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)
    none, _ = _composed_logits(model, cubes, query, recompute="none")
    assert (none - full).abs().max() > 1e-3  # the pure splice really is approximate here: the test can tell


def test_default_recompute_is_the_documented_leading_budget(llama):
    from kvmem.inject.prefill import DEFAULT_RECOMPUTE, RECOMPUTE_MODES

    assert (DEFAULT_RECOMPUTE, RECOMPUTE_MODES[DEFAULT_RECOMPUTE][0]) == ("leading", 32)
    anchor = random_ids(2, seed=1)
    cubes = [kvmem.MemCube.from_ids(llama, random_ids(n, seed=s), anchor_ids=anchor) for n, s in ((40, 2), (50, 3), (20, 4))]
    default = kvmem.prefill(llama, cubes)
    explicit = kvmem.prefill(llama, cubes, recompute="leading", budget=32)
    assert default.recomputed == 32 + 20  # every later cube's first 32 tokens (all of a shorter one)
    for (k, v), (k2, v2) in zip(kv_from_cache(default.cache), kv_from_cache(explicit.cache)):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    assert kvmem.prefill(llama, cubes[:1]).recomputed == 0  # one cube is exact: nothing to recompute


def test_partial_recompute_touches_only_chosen_tokens(llama):
    anchor = random_ids(2, seed=1)
    cubes = [kvmem.MemCube.from_ids(llama, random_ids(10, seed=s), anchor_ids=anchor) for s in (2, 3, 4)]
    before = [[t.clone() for kv in c.kv for t in kv] for c in cubes]
    none = kvmem.prefill(llama, cubes, recompute="none")
    lead = kvmem.prefill(llama, cubes, recompute="leading", budget=3)
    sel = kvmem.prefill(llama, cubes, recompute="selective", budget=0.25)
    assert lead.recomputed == 6 and sel.recomputed == 5
    k_none, k_lead = kv_from_cache(none.cache)[1][0][0], kv_from_cache(lead.cache)[1][0][0]
    changed = (k_none - k_lead).abs().amax(dim=(0, 2)) > 0  # per position, layer 1
    expected = torch.zeros(32, dtype=torch.bool)
    expected[[12, 13, 14, 22, 23, 24]] = True
    assert torch.equal(changed, expected)
    # layer 0 sees only token and position: recomputing it reproduces the re-rotated splice
    torch.testing.assert_close(kv_from_cache(lead.cache)[0][0], kv_from_cache(none.cache)[0][0], rtol=1e-5, atol=1e-5)
    for c, b in zip(cubes, before):  # recompute writes into the composed buffer, never into a cube
        assert all(torch.equal(t, t0) for t, t0 in zip([t for kv in c.kv for t in kv], b))


@pytest.mark.parametrize("mode,budget", [("leading", -1), ("leading", 0.5), ("selective", 0), ("selective", 1.5),
                                         ("selective", True)])
def test_bad_budgets_refused(llama, mode, budget):
    cubes = [kvmem.MemCube.from_ids(llama, random_ids(5, seed=s)) for s in (1, 2)]
    with pytest.raises(kvmem.CubeError, match="budget"):
        kvmem.prefill(llama, cubes, recompute=mode, budget=budget)


@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_rerotation_exact_in_every_layer(family, rope):
    """RoPE attention only sees relative positions, so the same tokens run at positions shifted by d give the
    same hidden states: their keys, in every layer, are the cube's keys rotated by d. kvmem's rotation must
    reproduce transformers' own RoPE at the new positions in all layers."""
    from kvmem.kernels.splice import splice_reference
    from kvmem.model.rope import rope_facts

    model = tiny_model(family, rope_parameters=dict(ROPES[rope]))
    ids = random_ids(19, seed=4)
    cube = kvmem.MemCube.from_ids(model, ids)
    rope_info = rope_facts(model)
    for delta in (7, 300):
        with torch.no_grad():
            out = model(input_ids=ids[None], position_ids=torch.arange(delta, delta + 19)[None], use_cache=True)
        expected = kv_from_cache(kvmem.model.cache.output_cache(out))
        n_layers, (heads, _, dim) = len(cube.kv), cube.kv[0][0].shape
        dst_k, dst_v = torch.empty(n_layers, heads, 19, dim), torch.empty(n_layers, heads, 19, dim)
        splice_reference(dst_k, dst_v, [[k for k, _ in cube.kv]], [[v for _, v in cube.kv]], src_start=[0],
                         dst_start=[0], length=[19], delta=[delta], inv_freq=rope_info.inv_freq,
                         interleaved=rope_info.interleaved)
        for layer, (k, v) in enumerate(expected):
            torch.testing.assert_close(dst_k[layer], k[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(dst_v[layer], v[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode,budget", [("leading", 10_000), ("selective", 1.0)])
@pytest.mark.parametrize("family,overrides", [
    ("mistral", {"sliding_window": 16}),
    ("qwen2", {"sliding_window": 16, "use_sliding_window": True, "max_window_layers": 1}),  # sliding + full layers
])
def test_sliding_window_composition_equals_full_prefill(family, overrides, mode, budget):
    """Cubes longer than the window: the recompute forward must give each layer its own mask, and the composed
    cache must hold, in every layer, what a full prefill of the same ids leaves there (sliding layers: the last
    window - 1 tokens)."""
    from transformers import DynamicCache

    model = tiny_model(family, **overrides)
    anchor, query = random_ids(3, seed=7), random_ids(6, seed=8)
    cubes = [kvmem.MemCube.from_ids(model, random_ids(n, seed=s), anchor_ids=anchor) for n, s in ((21, 1), (19, 2), (23, 3))]
    got, prefix = _composed_logits(model, cubes, query, recompute=mode, budget=budget)
    full_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        full = model(input_ids=prefix.extend(query)).logits[0, -1].float()
        model(input_ids=prefix.input_ids, cache=full_cache)
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)
    fresh = kvmem.prefill(model, cubes, recompute=mode, budget=budget)
    for layer, ((k, v), (k_full, v_full)) in enumerate(zip(kv_from_cache(fresh.cache), kv_from_cache(full_cache))):
        assert k.shape == k_full.shape, f"layer {layer} holds {tuple(k.shape)}, a full prefill {tuple(k_full.shape)}"
        torch.testing.assert_close(k, k_full, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(v, v_full, rtol=1e-4, atol=1e-4)
    assert any(k.shape[2] == 15 for k, _ in kv_from_cache(fresh.cache))  # a sliding layer really kept window - 1
