"""The family matrix: tiny random models of every decoder family with a standard KV cache (families_models.py),
eager and sdpa attention (where transformers has both), a few in bfloat16, sliding windows shorter than the
memories. Per case:

- one cube injected equals a full prefill (float32: a few ulps of the logit scale; bfloat16: transformers' own
  two-step prefill, bit for bit, since that is what a reused prefix is in bf16);
- a saved and loaded cube gives the same logits as the cube in memory, bit for bit;
- three cubes composed with a recompute budget covering every token (``leading`` and ``selective``) equal a full
  prefill of the same ids, or kvmem refuses with a CubeError that names why; a family kvmem is known to refuse
  (REFUSED) must be refused for that reason, and every other family must compose exactly;
- the default mode gives finite logits (or the same refusal);
- wrap's default fast path (``kvmem_sdpa`` where the model groups KV heads, a static prefix cache where every
  cache layer is one kvmem fills) generates the greedy tokens of transformers' own full prefill on stock sdpa,
  for one cube and for three composed with a full recompute budget (or refuses as above);
- moving a cube by ``delta`` with kvmem's rotation gives, in every layer, the keys transformers computes for the
  same tokens at positions shifted by ``delta`` (NoPE layers unrotated).

A case passes only when it is exact or refused with a kvmem error; a silent mismatch fails. With
KVMEM_FAMILY_RESULTS=path set, the results are written there as JSON; tests/family_table.py renders the README's
family table from it.
"""

from __future__ import annotations

import functools
import json
import os
import warnings

import pytest
import torch

import kvmem
from families_models import BASE, FAMILIES, VOCAB, WINDOW, family_model
from kvmem.model.cache import kv_from_cache, output_cache

# family -> what the refusal must say (the reason kvmem gives is part of the contract: a user reads it)
REFUSED = {
    "llama4_text": "attn_temperature_tuning",
    "ministral3": "llama_4_scaling_beta",
}
SDPA_UNSUPPORTED = {"gemma2", "gpt_oss"}  # transformers 5.24 has only eager attention for these
BF16 = ("llama", "qwen2", "gemma3_text", "smollm3")  # where pure splice is far from exact, so bf16 can tell

CASES = ([(f, "sdpa", "float32") for f in FAMILIES if f not in SDPA_UNSUPPORTED]
         + [(f, "eager", "float32") for f in FAMILIES]
         + [(f, "sdpa", "bfloat16") for f in BF16])
ANCHOR, MEMORY, COMPOSED, QUERY = 3, 40, (30, 28, 26), 7  # every memory longer than the window (24)
assert min(MEMORY, *COMPOSED) > WINDOW

RESULTS: dict = {}


def _ids(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g)


@functools.lru_cache(maxsize=None)
def _model(family: str, attn: str, dtype: str):
    from transformers.utils import logging

    logging.set_verbosity_error()
    return family_model(family, attn=attn, dtype=getattr(torch, dtype))


@functools.lru_cache(maxsize=None)
def _cubes(family: str, attn: str, dtype: str):
    model = _model(family, attn, dtype)
    anchor = _ids(ANCHOR, 1)
    single = kvmem.MemCube.from_ids(model, _ids(MEMORY, 3), anchor_ids=anchor)
    composed = [kvmem.MemCube.from_ids(model, _ids(n, 4 + i), anchor_ids=anchor) for i, n in enumerate(COMPOSED)]
    return single, composed


def _logits(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits[0, -1].float()


def _reference(model, prefix_ids, query, dtype: str) -> torch.Tensor:
    """What the injected cache must reproduce: a full prefill (float32), or transformers' own reuse of a prefilled
    prefix (bfloat16, where a one-pass and a two-step prefill round differently)."""
    if dtype == "float32":
        return _logits(model, torch.cat([prefix_ids, query[None]], -1))
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=prefix_ids, cache=cache)
    return _logits(model, query[None], cache=cache)


def _tol(dtype: str, scale: float) -> float:
    eps = torch.finfo(getattr(torch, dtype)).eps
    # float32: a few ulps per layer from another summation order; bf16: a few ulps of the logits (the recompute
    # forward runs a subset of the tokens, so its matmuls round differently from a whole-sequence prefill)
    return (64 if dtype == "float32" else 4) * eps * max(1.0, scale)


def _record(family: str, attn: str, dtype: str, check: str, outcome: str) -> None:
    RESULTS.setdefault(family, {}).setdefault(f"{attn}/{dtype}", {})[check] = outcome


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    path = os.environ.get("KVMEM_FAMILY_RESULTS")
    if path and RESULTS:
        facts = {f: _facts(f) for f in RESULTS}
        import transformers

        with open(path, "w") as fh:
            json.dump({"transformers": transformers.__version__, "window": WINDOW, "families": RESULTS,
                       "facts": facts}, fh, indent=1, sort_keys=True)


def _facts(family: str) -> dict:
    """Per-family layer facts for the table: attention kinds, NoPE layers, layout (or why kvmem cannot move)."""
    from kvmem.model.rope import attention_kinds, rope_facts

    attn = "eager" if family in SDPA_UNSUPPORTED else "sdpa"
    model = _model(family, attn, "float32")
    kinds = [k for k, _ in attention_kinds(model)]
    out = {"layers": kinds, "model_type": model.config.model_type}
    try:
        rope = rope_facts(model)
        out.update(nope=[i for i, layer in enumerate(rope.layers) if not layer.rotated],
                   layout="interleaved" if rope.interleaved else "neox", rotary_dim=rope.rotary_dim,
                   rotated_slot=rope.rotated_slot,
                   head_dim=int(kv_from_cache(output_cache(model(input_ids=torch.ones(1, 1, dtype=torch.long),
                                                                  use_cache=True)))[0][0].shape[-1]))
    except kvmem.CubeError as exc:
        out["refused"] = str(exc)
    return out


@pytest.mark.parametrize("family,attn,dtype", CASES)
def test_single_cube_and_round_trip(family, attn, dtype, tmp_path):
    model = _model(family, attn, dtype)
    cube, _ = _cubes(family, attn, dtype)
    query = _ids(QUERY, 2)
    prefix = kvmem.prefill(model, cube)
    assert prefix.spans == [(ANCHOR, ANCHOR + MEMORY)]
    got = _logits(model, query[None], cache=prefix.cache)
    want = _reference(model, prefix.input_ids, query, dtype)
    diff = (got - want).abs().max().item()
    _record(family, attn, dtype, "single", f"exact ({diff:.1e})")
    assert diff <= _tol(dtype, want.abs().max().item()), f"{family}: one cube differs from the reference by {diff}"

    loaded = kvmem.MemCube.load(cube.save(tmp_path / "cube.safetensors"))
    assert [tuple(k.shape) + tuple(v.shape) for k, v in loaded.kv] == [tuple(k.shape) + tuple(v.shape)
                                                                       for k, v in cube.kv]
    again = _logits(model, query[None], cache=kvmem.prefill(model, loaded).cache)
    _record(family, attn, dtype, "round_trip", "identical" if torch.equal(again, got) else "differs")
    assert torch.equal(again, got), f"{family}: a saved and loaded cube gives other logits"


@pytest.mark.parametrize("family,attn,dtype", CASES)
def test_composition_full_budget_equals_full_prefill(family, attn, dtype):
    model = _model(family, attn, dtype)
    _, cubes = _cubes(family, attn, dtype)
    query = _ids(QUERY, 2)
    later = sum(COMPOSED[1:])
    if family in REFUSED:
        for mode, budget in (("leading", 10_000), ("selective", 1.0), ("none", None), ("leading", None)):
            with pytest.raises(kvmem.CubeError, match=REFUSED[family]) as info:
                kvmem.prefill(model, cubes, recompute=mode, budget=budget)
        _record(family, attn, dtype, "compose", "refused: " + str(info.value))
        return
    diffs = []
    for mode, budget in (("leading", 10_000), ("selective", 1.0)):
        prefix = kvmem.prefill(model, cubes, recompute=mode, budget=budget)
        assert prefix.recomputed == later
        got = _logits(model, query[None], cache=prefix.cache)
        want = _reference(model, prefix.input_ids, query, dtype)
        diffs.append((got - want).abs().max().item())
        assert diffs[-1] <= _tol(dtype, want.abs().max().item()), \
            f"{family}: recompute={mode} over every token differs from a full prefill by {diffs[-1]} (silently wrong)"
    splice = _logits(model, query[None], cache=kvmem.prefill(model, cubes, recompute="none").cache)
    none_diff = (splice - want).abs().max().item()
    assert none_diff > _tol(dtype, want.abs().max().item()), "the pure splice is exact here: the test cannot tell"
    default = _logits(model, query[None], cache=kvmem.prefill(model, cubes).cache)
    assert torch.isfinite(default).all()
    _record(family, attn, dtype, "compose", f"exact ({max(diffs):.1e}; pure splice {none_diff:.1e})")


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in REFUSED])
def test_rerotation_matches_transformers_in_every_layer(family):
    """kvmem's rotation of a cube's keys by ``delta`` equals transformers' own RoPE at the shifted positions in
    every layer, NoPE layers included (left as they are)."""
    from kvmem.kernels.splice import splice_reference
    from kvmem.model.rope import rope_facts

    attn = "eager" if family in SDPA_UNSUPPORTED else "sdpa"
    model = _model(family, attn, "float32")
    ids, delta, n = _ids(19, 9), 37, 19
    cube = kvmem.MemCube.from_ids(model, ids)
    rope = rope_facts(model)
    with torch.no_grad():
        out = model(input_ids=ids[None], position_ids=torch.arange(delta, delta + n)[None], use_cache=True)
    expected = kv_from_cache(output_cache(out))
    rot, copy = (1, 0) if rope.rotated_slot == "values" else (0, 1)  # MLA keeps its rotated part as values
    src = [[kv[rot] for kv in cube.kv]], [[kv[copy] for kv in cube.kv]]
    dst = [torch.empty(len(cube.kv), *t[0].shape[:1], n, t[0].shape[-1]) for t in (src[0][0], src[1][0])]
    splice_reference(dst[0], dst[1], src[0], src[1], src_start=[0], dst_start=[0], length=[n], delta=[delta],
                     inv_freq=rope.inv_freq, interleaved=rope.interleaved)
    dst_k, dst_v = (dst[1], dst[0]) if rot else (dst[0], dst[1])
    for layer, (k, v) in enumerate(expected):
        torch.testing.assert_close(dst_k[layer], k[0, :, -n:], rtol=1e-4, atol=1e-4, msg=f"{family} layer {layer}")
        torch.testing.assert_close(dst_v[layer], v[0, :, -n:], rtol=1e-4, atol=1e-4, msg=f"{family} layer {layer}")


def test_layer_facts_read_from_the_model():
    """Per-layer facts where families differ: NoPE layers, per-layer-type RoPE, interleaved pairs, partial rotary."""
    from kvmem.model.rope import rope_facts

    smollm3 = rope_facts(_model("smollm3", "sdpa", "float32"))
    assert [layer.rotated for layer in smollm3.layers] == [True, True, True, False]
    assert not smollm3.inv_freq[3].any()
    gemma3 = rope_facts(_model("gemma3_text", "sdpa", "float32"))
    assert [layer.attention for layer in gemma3.layers] == ["sliding_attention", "full_attention"] * 2
    assert [layer.window for layer in gemma3.layers] == [WINDOW, None] * 2
    assert not torch.equal(gemma3.inv_freq[0], gemma3.inv_freq[1])  # local and global RoPE thetas differ
    assert rope_facts(_model("cohere", "sdpa", "float32")).interleaved
    assert not rope_facts(_model("llama", "sdpa", "float32")).interleaved
    assert rope_facts(_model("gpt_neox", "sdpa", "float32")).rotary_dim < 16  # partial rotary
    assert rope_facts(_model("deepseek_v3", "sdpa", "float32")).rotated_slot == "values"  # MLA: latent as keys
    cohere2 = rope_facts(_model("cohere2", "sdpa", "float32"))
    assert [layer.rotated for layer in cohere2.layers] == [True, False, True, False]  # full layers are NoPE


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
                                  {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                                   "long_factor": [2.0] * 8, "original_max_position_embeddings": 64}],
                         ids=["dynamic", "longrope"])
def test_length_dependent_rope_warns_and_refuses_moving(rope):
    """Frequencies that change with the sequence length: one cube is not called exact (a warning, once), and
    moving cubes is refused with the reason."""
    import importlib

    from transformers import AutoConfig, AutoModelForCausalLM

    prefill_module = importlib.import_module("kvmem.inject.prefill")

    torch.manual_seed(0)
    config = AutoConfig.for_model("phi3" if rope["rope_type"] == "longrope" else "llama",
                                  **{**BASE, "rope_parameters": rope})
    model = AutoModelForCausalLM.from_config(config).eval()
    cubes = [kvmem.MemCube.from_ids(model, _ids(9, s), anchor_ids=_ids(2, 1)) for s in (1, 2)]
    prefill_module._WARNED.clear()
    with pytest.warns(UserWarning, match=f"kvmem: .*{rope['rope_type']} RoPE.*not exact"):
        kvmem.prefill(model, cubes[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kvmem.prefill(model, cubes[0])  # once per family and RoPE type, not on every call
    with pytest.raises(kvmem.CubeError, match="not linear in the position"):
        kvmem.prefill(model, cubes)


@pytest.mark.parametrize("field,value,message", [
    ("num_layers", 10 ** 12, r"declares 1000000000000 KV layers but the file holds only 5 tensors"),
    ("num_tokens", 10 ** 12, r"input_ids is torch\.int64 \(43,\), metadata says int64"),
    ("anchor_len", 10 ** 12, r"input_ids is torch\.int64 \(43,\), metadata says int64"),
])
def test_forged_sizes_fail_before_anything_is_built(tmp_path, field, value, message):
    """A header declaring absurd sizes, checksum recomputed: refused from what the file holds, not allocated."""
    from helpers import forge, read_parts
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **{**BASE, "num_hidden_layers": 2})
    model = AutoModelForCausalLM.from_config(config).eval()
    path = kvmem.MemCube.from_ids(model, _ids(MEMORY, 3), anchor_ids=_ids(ANCHOR, 1)).save(tmp_path / "c.safetensors")
    meta, tensors = read_parts(tmp_path / "c.safetensors")
    meta[field] = value
    with pytest.raises(kvmem.CubeError, match=message):
        kvmem.MemCube.load(forge(tmp_path / "forged.safetensors", meta, tensors))


NEW = 5  # greedy tokens generated on the fast path


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in SDPA_UNSUPPORTED])
def test_fast_path_generates_the_tokens_of_stock_sdpa(family):
    from kvmem.model.attention import grouped_sdpa, use_gqa_attention
    from kvmem.model.static_cache import static_capable, static_prefix

    stock = _model(family, "sdpa", "float32")
    fast = family_model(family, attn="sdpa")  # the same seeded weights, switched the way wrap switches them
    grouped = grouped_sdpa(fast)
    if grouped:
        use_gqa_attention(fast)
    static = static_capable(fast)
    single, composed = _cubes(family, "sdpa", "float32")  # built on the stock model: the same weights
    query = _ids(QUERY, 2)
    outcomes = []
    for name, cubes, options in (("single", [single], {}),
                                 ("composed", composed, dict(recompute="leading", budget=10 ** 6))):
        try:
            prefix = kvmem.prefill(fast, cubes, **options)
        except kvmem.CubeError as exc:
            assert family in REFUSED and REFUSED[family] in str(exc), f"{family}: unexpected refusal: {exc}"
            outcomes.append(f"{name}: refused")
            continue
        ids = prefix.extend(query)
        with torch.no_grad():
            want = stock.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                                  min_new_tokens=NEW)
        if static:
            prefix = static_prefix(fast, prefix, max_new_tokens=NEW, query_len=QUERY)
        with torch.no_grad():
            got = fast.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=prefix.cache,
                                max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW)
        assert torch.equal(got, want), f"{family} ({name}, kvmem_sdpa={grouped}, static={static}): other tokens"
        outcomes.append(f"{name}: equal")
    _record(family, "sdpa", "float32", "fast_path",
            f"{'kvmem_sdpa' if grouped else 'sdpa'}+{'static' if static else 'dynamic'}: {', '.join(outcomes)}")
