"""What `kvmem.wrap` does by default to be fast, and when it does not: kvmem_sdpa for a GQA model on stock sdpa,
a static prefix cache when generation has a length bound and one sequence; every path's tokens equal a full
prefill's (``inject=False``)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, StaticCache

import kvmem
from kvmem.model.attention import NAME
from kvmem.model.static_cache import static_capable, static_room

from helpers import tiny_model

NOTE = "Marta keeps her bicycle in the cellar of the blue house on Weaver Street, next to the old piano."


def _run(mm, cube, **kw):
    out = mm.generate("Where is the bicycle?", cubes=[cube], return_dict_in_generate=True, do_sample=False, **kw)
    return out.sequences, out.past_key_values


@pytest.mark.parametrize("family,groups", [("llama", True), ("qwen2", True), ("gpt2", False)])
def test_wrap_switches_grouped_sdpa_models_only(family, groups, tokenizer):
    model = tiny_model(family)
    kvmem.wrap(model, tokenizer)
    assert model.config._attn_implementation == (NAME if groups else "sdpa")
    kept = tiny_model(family)
    kvmem.wrap(kept, tokenizer, attention="keep")
    assert kept.config._attn_implementation == "sdpa"
    eager = tiny_model(family, attn="eager")
    kvmem.wrap(eager, tokenizer)
    assert eager.config._attn_implementation == "eager"  # a choice of the user's is never overridden


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_generate_uses_a_static_prefix_and_matches_a_full_prefill(family, tokenizer):
    overrides = {"sliding_window": 8} if family == "mistral" else {}
    mm = kvmem.wrap(tiny_model(family, **overrides), tokenizer)
    cube = mm.build_cube(NOTE)
    got, cache = _run(mm, cube, max_new_tokens=6)
    assert isinstance(cache, StaticCache) and mm.last.injected
    want, _ = _run(mm, cube, max_new_tokens=6, inject=False)
    assert torch.equal(got, want)
    # the reference kvmem did not touch: the same weights on stock sdpa, transformers' own full prefill
    stock = tiny_model(family, **overrides)
    assert stock.config._attn_implementation == "sdpa"
    ids = mm.prompt_ids("Where is the bicycle?", [cube])
    with torch.no_grad():
        plain = stock.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert torch.equal(got, plain)
    if family == "llama":  # full attention: room for exactly the request and its new tokens
        assert cache.layers[0].max_cache_len == got.shape[1]


@pytest.mark.parametrize("options", [dict(num_beams=2), dict(num_return_sequences=2, do_sample=True, top_k=1)],
                         ids=["beams", "sequences"])
def test_generate_keeps_a_dynamic_cache_where_a_static_one_does_not_fit(options, tokenizer):
    mm = kvmem.wrap(tiny_model("llama"), tokenizer)
    cube = mm.build_cube(NOTE)
    kw = dict(max_new_tokens=4, **options)
    do_sample = kw.pop("do_sample", False)
    out = mm.generate("Where is the bicycle?", cubes=[cube], do_sample=do_sample, return_dict_in_generate=True, **kw)
    assert not isinstance(out.past_key_values, StaticCache)
    torch.manual_seed(0)
    want = mm.generate("Where is the bicycle?", cubes=[cube], inject=False, do_sample=do_sample, **kw)
    assert torch.equal(out.sequences, want)


def test_cache_dynamic_and_attention_keep_restore_the_plain_path(tokenizer):
    mm = kvmem.wrap(tiny_model("llama"), tokenizer, attention="keep", cache="dynamic")
    cube = mm.build_cube(NOTE)
    got, cache = _run(mm, cube, max_new_tokens=5)
    assert isinstance(cache, DynamicCache) and mm.model.config._attn_implementation == "sdpa"
    assert torch.equal(got, _run(mm, cube, max_new_tokens=5, inject=False)[0])
    with pytest.raises(kvmem.CubeError, match="cache 'auto' or 'dynamic'"):
        kvmem.wrap(tiny_model("llama"), tokenizer, cache="static")
    with pytest.raises(kvmem.CubeError, match="cache_implementation="):  # transformers refuses it beside a cache
        mm.generate("Where is the bicycle?", cubes=[cube], cache_implementation="static")


def test_static_decoding_is_not_compiled_unless_asked(tokenizer, monkeypatch):
    """transformers compiles static-cache decoding on CUDA by itself; kvmem's default cache must not turn that on."""
    mm = kvmem.wrap(tiny_model("llama"), tokenizer)
    cube = mm.build_cube(NOTE)
    seen = []
    real = type(mm.model).generate
    monkeypatch.setattr(type(mm.model), "generate", lambda self, *a, **kw: seen.append(kw) or real(self, *a, **kw))
    mm.generate("Where is the bicycle?", cubes=[cube], max_new_tokens=2)
    mm.generate("Where is the bicycle?", cubes=[cube], max_new_tokens=2, disable_compile=False)
    assert [kw["disable_compile"] for kw in seen] == [True, False]


def test_static_room_reads_generate_options():
    model = tiny_model("llama")
    model.generation_config.max_new_tokens = None
    model.generation_config.max_length = 20
    assert static_room(model, 10, {"max_new_tokens": 7}) == 7
    assert static_room(model, 10, {"max_length": 16}) == 6
    assert static_room(model, 10, {}) == 10  # generation_config.max_length - prompt
    assert static_room(model, 25, {}) is None  # the prompt already passes max_length: nothing to size
    for options in ({"num_beams": 3}, {"num_return_sequences": 2}, {"assistant_model": model},
                    {"prompt_lookup_num_tokens": 3}, {"cache_implementation": "static"},
                    {"generation_config": model.generation_config}):
        assert static_room(model, 10, {"max_new_tokens": 5, **options}) is None, options
    model.generation_config.num_beams = 4  # from the model's own config too
    assert static_room(model, 10, {"max_new_tokens": 5}) is None
    assert static_capable(model)
