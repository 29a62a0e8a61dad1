"""Quantized cubes (issue 23) served by KvmemConnector in an offline vLLM engine (``LLM()``, one process, float32):
an int8 / int4 cube from a folder gives the answer transformers gives with the same quantized cube (kvmem.prefill:
the same dequantized KV), alone and composed; it is approximate, so it is salted (never reaches the plain prefix
cache), never auto-matched, and its measured error is in the log.
"""

from __future__ import annotations

import gc

import pytest
import torch

# vllm.config, not vllm: without vLLM, this very folder would import as an empty namespace package "vllm"
pytest.importorskip("vllm.config", reason="vLLM is not installed here (it runs in .venv-vllm; see .ci/run)")
pytestmark = pytest.mark.vllm

import kvmem  # noqa: E402
from vllm_helpers import offline_engine, run_request  # noqa: E402

MAX_NEW = 10
NO_AUTO = {"auto": False}
SCHEMES = ("int8", "int4")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, memory, hf):
    """default/a8, a4 (cube a quantized), b8 (cube b quantized): no full-width cube, so nothing exact can match."""
    model, _ = hf
    root = tmp_path_factory.mktemp("qcubes")
    for scheme in SCHEMES:
        memory["a"].save(root / "default" / f"a{scheme[3]}.safetensors", quantize=scheme, model=model)
    memory["b"].save(root / "default" / "b8.safetensors", quantize="int8", model=model)
    return root


@pytest.fixture(scope="module")
def llm(ckpt, folder):
    engine = offline_engine(ckpt, {"folder": str(folder)})
    yield engine
    del engine
    gc.collect()


def run(llm, ids, kvmem_params=None, *, salt: str | None = "fresh"):
    """(greedy token ids, logprobs of them, num_cached_tokens) of one request (`vllm_helpers.run_request`)."""
    return run_request(llm, ids, kvmem_params, salt=salt, max_new=MAX_NEW)


def transformers_answer(model, cubes, query):
    """(greedy token ids, their logprobs) of transformers with kvmem.prefill of ``cubes`` (recompute="none")."""
    prefix = kvmem.prefill(model, cubes, recompute="none")
    with torch.no_grad():
        out = model.generate(prefix.extend(torch.tensor([query])), past_key_values=prefix.cache,
                             max_new_tokens=MAX_NEW, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    tokens = out.sequences[0, prefix.num_tokens + len(query):].tolist()
    logprobs = [torch.log_softmax(step[0].double(), -1)[t].item() for step, t in zip(out.logits, tokens)]
    return tokens, torch.tensor(logprobs, dtype=torch.float32), prefix


def load(folder, name):
    return kvmem.MemCube.load(folder / "default" / f"{name}.safetensors")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_cube_answers_as_transformers_with_the_same_cube(llm, memory, hf, folder, caplog, scheme):
    model, _ = hf
    name = f"a{scheme[3]}"
    cube = load(folder, name)
    assert cube.quantization["scheme"] == scheme
    ids = memory["a"].all_ids[0].tolist() + memory["query"]
    want, want_lp, prefix = transformers_answer(model, [cube], memory["query"])
    assert prefix.quantized[0]["scheme"] == scheme
    got, got_lp, cached = run(llm, ids, {"cubes": [name]})
    assert cached == 256  # the quantized cube's tokens were loaded, not recomputed
    assert got == want
    # vLLM's CPU attention and transformers' sdpa, both float32, on the same dequantized KV
    torch.testing.assert_close(got_lp, want_lp, atol=2e-3, rtol=0)
    # the connector's log line for this request (pytest's caplog: it holds this test's records only)
    assert f"quantized {scheme} (measured next-token KL mean" in caplog.text and "cache salt kvmem-" in caplog.text


def test_composed_quantized_cubes_answer_as_kvmem_pure_splice(llm, memory, hf, folder):
    model, _ = hf
    cubes = [load(folder, "a8"), load(folder, "b8")]
    ids = memory["a"].all_ids[0].tolist() + memory["b"].input_ids[0].tolist() + memory["query"]
    want, want_lp, prefix = transformers_answer(model, cubes, memory["query"])
    assert prefix.input_ids[0].tolist() == ids[:384]
    got, got_lp, cached = run(llm, ids, {"cubes": ["a8", "b8"]})
    assert cached == 384
    assert got == want
    torch.testing.assert_close(got_lp, want_lp, atol=2e-3, rtol=0)


def test_quantized_cube_is_salted_and_never_auto_matched(llm, memory):
    ids = memory["a"].all_ids[0].tolist() + memory["query"]
    full, full_lp, cached = run(llm, ids, NO_AUTO)  # vLLM's own full prefill
    assert cached == 0
    # a plain request whose prompt starts with a quantized cube's ids: no automatic match (only approximate cubes)
    _, _, cached = run(llm, ids)
    assert cached == 0
    # a quantized request without a salt of its own: kvmem salts it, so the plain prefix cache never holds its KV
    run(llm, ids, {"cubes": ["a8"]}, salt=None)
    got, got_lp, cached = run(llm, ids, NO_AUTO, salt=None)
    assert cached == 0
    assert got == full
    torch.testing.assert_close(got_lp, full_lp, atol=1e-3, rtol=0)
