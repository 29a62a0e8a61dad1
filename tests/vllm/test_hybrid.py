"""A hybrid model (Gemma 3: sliding-window and full-attention layers) served by KvmemConnector in an offline vLLM
engine (``LLM()``, one process, float32): a cube longer than the window equals vLLM's own full prefill, is matched
automatically, and a cube the engine saves equals the transformers-built one; answers are checked against
transformers' own full prefill (see the note above the first test).

Why this works (docs/serving-vllm.md, "Hybrid models"): vLLM runs without its hybrid KV cache manager on CPU, and
turns it off on every platform for a connector that does not declare ``SupportsHMA`` (KvmemConnector does not).
Without it, vLLM keeps every token's KV on the sliding-window layers too, in the one block table all layers share
(its attention reads only the window): one KV cache group, which a cube fills as on any model, since kvmem's cubes
hold every position of every layer. The model is a tiny random Gemma 3 (window 64 tokens, the memory 256) with
SmolLM2's tokenizer, so the test needs no download.
"""

from __future__ import annotations

import gc

import pytest
import torch

# vllm.config, not vllm: without vLLM, this very folder would import as an empty namespace package "vllm"
pytest.importorskip("vllm.config", reason="vLLM is not installed here (it runs in .venv-vllm; see .ci/run)")
pytestmark = pytest.mark.vllm

import kvmem  # noqa: E402
from vllm_helpers import offline_engine, run_request, wait_for  # noqa: E402

WINDOW, MEMORY = 64, 256  # the memory is four windows long: the sliding layers must read only its last window
NO_AUTO = {"auto": False}


@pytest.fixture(scope="module")
def gemma(tmp_path_factory, ckpt):
    """(checkpoint folder, model, tokenizer) of a tiny random Gemma 3: sliding, full, sliding, full layers."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    config = AutoConfig.for_model(
        "gemma3_text", hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, vocab_size=len(tok), max_position_embeddings=1024,
        sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"] * 2,
        initializer_range=0.2,  # logits far apart: greedy tokens that rounding cannot flip
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    folder = tmp_path_factory.mktemp("gemma3")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), tok


@pytest.fixture(scope="module")
def cube(gemma, memory):
    _, model, tok = gemma
    ids = memory["a"].all_ids[0].tolist()
    assert len(ids) == MEMORY
    return kvmem.MemCube.from_ids(model, ids[4:], name="g", anchor_ids=ids[:4], tokenizer=tok)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, cube):
    root = tmp_path_factory.mktemp("gemma-cubes")
    cube.save(root / "default" / "g.safetensors")
    return root


@pytest.fixture(scope="module")
def llm(gemma, folder):
    engine = offline_engine(gemma[0], {"folder": str(folder)}, role="kv_both")
    yield engine
    del engine
    gc.collect()


def hf_greedy(model, ids, n: int = 10):
    """(greedy token ids, their logprobs) of transformers' own full prefill and decode of ``ids``."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=model.config.pad_token_id)
    tokens = out.sequences[0, len(ids):].tolist()
    logprobs = [torch.log_softmax(score[0].float(), -1)[t] for score, t in zip(out.scores, tokens)]
    return tokens, torch.stack(logprobs)


# The whole answer is checked against transformers' own full prefill and decode: vLLM 0.32's CPU build decodes NaN
# logits (token 0) after a full prefill of this model in some engine processes and not in others (4 of 4 prompt
# lengths from 64 to 300 tokens in one process, none in the next; its first token always right but at 65 tokens),
# so its own full prefill is the reference for the first token only, the token that prefill computes.
def test_a_cube_longer_than_the_window_equals_the_full_prefill(llm, cube, memory, gemma):
    ids = cube.all_ids[0].tolist() + memory["query"]
    want, want_lp = hf_greedy(gemma[1], ids)
    full, _, cached = run_request(llm, ids, NO_AUTO)
    assert cached == 0 and full[0] == want[0]  # vLLM's own prefill: the same first token
    got, got_lp, cached = run_request(llm, ids, {"cubes": ["g"]})
    assert cached == MEMORY  # every cube token loaded, none recomputed
    assert got == want
    torch.testing.assert_close(got_lp, want_lp, atol=1e-3, rtol=0)  # float32: the same logits up to rounding
    got, _, cached = run_request(llm, ids)  # a plain request whose prompt starts with the cube's ids
    assert cached == MEMORY and got == want


def test_a_cube_saved_by_the_engine_equals_the_transformers_cube(llm, cube, memory, folder, gemma):
    ids = cube.all_ids[0].tolist() + memory["query"]
    want, want_lp = hf_greedy(gemma[1], ids)
    save = {"save": "saved", "tokens": MEMORY, "anchor": cube.anchor_len, "auto": False}
    got, _, _ = run_request(llm, ids, save)  # vLLM's own full prefill, its KV kept as a cube
    assert got[0] == want[0]
    saved = wait_for(folder / "default" / "saved.safetensors")
    assert torch.equal(saved.all_ids, cube.all_ids) and saved.fingerprint_fields == cube.fingerprint_fields
    for (k, v), (ck, cv) in zip(saved.kv, cube.kv, strict=True):  # sliding layers included, every position
        torch.testing.assert_close(k, ck, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(v, cv, atol=2e-4, rtol=1e-4)
    got, got_lp, cached = run_request(llm, ids, {"cubes": ["saved"]})
    assert cached == MEMORY and got == want
    torch.testing.assert_close(got_lp, want_lp, atol=1e-3, rtol=0)
