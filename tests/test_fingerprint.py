"""Fingerprints: a cube is refused by a model with other weights, config, tokenizer, LoRA adapter or dtype, with a
kvmem.FingerprintMismatch that names the differing field."""

from __future__ import annotations

import pytest
import torch

import kvmem
from kvmem import CubeError, FingerprintMismatch, MemCube

from helpers import ANCHOR_LEN, NUM_TOKENS, random_ids, tiny_model


TOKENIZER_MISMATCH = r"built for another tokenizer:\n  - tokenizer: the tokenizer differs"
ADAPTER_MISMATCH = r"built for another adapter:\n  - adapter: the active LoRA adapter"


def test_nudged_weights(cube, model):
    fresh = tiny_model("llama")  # same seed: the same weights as the cube's model
    kvmem.prefill(fresh, cube)  # control: an identical copy is accepted
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1e-3)
    with pytest.raises(FingerprintMismatch, match=r"built for another weights:\n  - weights: the weights differ") as e:
        kvmem.prefill(fresh, cube)
    assert e.value.fields == ["weights"]
    assert isinstance(e.value, CubeError) and isinstance(e.value, ValueError)


def test_one_nudged_matrix(cube):
    """A fine-tune of a single matrix still changes the digest."""
    fresh = tiny_model("llama")
    with torch.no_grad():
        fresh.model.layers[1].mlp.down_proj.weight.add_(1e-3)
    with pytest.raises(FingerprintMismatch, match=r"weights") as e:
        kvmem.prefill(fresh, cube)
    assert "weights" in e.value.fields


@pytest.mark.parametrize("family, overrides, key", [
    ("llama", {"num_hidden_layers": 3}, "num_hidden_layers"),
    ("llama", {"num_key_value_heads": 4}, "num_key_value_heads"),
    ("llama", {"rope_theta": 1234.0}, "rope"),
    ("qwen2", {}, "model_type"),
    ("mistral", {}, "model_type"),
])
def test_other_model(cube, family, overrides, key):
    other = tiny_model(family, **overrides)
    with pytest.raises(FingerprintMismatch, match=rf"(?s)built for another model.*- model: .*{key}") as e:
        kvmem.prefill(other, cube)
    assert "model" in e.value.fields


def test_tokenizer_mismatch(model, tokenizer_pair):
    plain, extended, _ = tokenizer_pair
    cube = MemCube.from_text(model, plain, "Alice lives in Oslo.")
    kvmem.prefill(model, cube, tokenizer=plain)  # control
    kvmem.prefill(model, cube)  # no tokenizer given: not checked
    with pytest.raises(FingerprintMismatch, match=TOKENIZER_MISMATCH) as e:
        kvmem.prefill(model, cube, tokenizer=extended)
    assert e.value.fields == ["tokenizer"]


def test_tokenizer_changed_after_use(model, tokenizer_pair):
    """A tokenizer object that gains a token after a cube was checked against it is a different tokenizer: the
    digest must not be served stale from a cache on the object."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_pair[2])
    cube = MemCube.from_text(model, tok, "Alice lives in Oslo.")
    kvmem.prefill(model, cube, tokenizer=tok)
    tok.add_tokens(["<kvmem-validation-late>"])
    with pytest.raises(FingerprintMismatch, match=r"tokenizer") as e:
        kvmem.prefill(model, cube, tokenizer=tok)
    assert e.value.fields == ["tokenizer"]


def _lora(seed: int):
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama")  # seeds the RNG itself, so seed the LoRA init after it
    torch.manual_seed(seed)
    return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


@pytest.fixture(scope="module")
def lora_model():
    return _lora(seed=1)


@pytest.fixture(scope="module")
def lora_cube(lora_model):
    return MemCube.from_ids(lora_model, random_ids(NUM_TOKENS), anchor_ids=random_ids(ANCHOR_LEN, seed=1))


def test_adapter_cube_on_adapter_model(lora_model, lora_cube, cube):
    """Controls: the same adapter is accepted, and the adapter really changes the KV."""
    kvmem.prefill(lora_model, lora_cube)
    assert not torch.equal(lora_cube.kv[0][1], cube.kv[0][1])  # layer-0 values go through the LoRA'd v_proj


def test_adapter_cube_on_bare_model(model, lora_cube):
    with pytest.raises(FingerprintMismatch, match=ADAPTER_MISMATCH) as e:
        kvmem.prefill(model, lora_cube)
    assert e.value.fields == ["adapter"]


def test_bare_cube_on_adapter_model(lora_model, cube):
    with pytest.raises(FingerprintMismatch, match=ADAPTER_MISMATCH) as e:
        kvmem.prefill(lora_model, cube)
    assert e.value.fields == ["adapter"]


def test_bare_cube_on_adapter_model_with_adapter_disabled(lora_model, cube):
    with lora_model.disable_adapter():
        kvmem.prefill(lora_model, cube)


def test_other_adapter(lora_cube):
    with pytest.raises(FingerprintMismatch, match=r"- adapter: ") as e:
        kvmem.prefill(_lora(seed=2), lora_cube)
    assert e.value.fields == ["adapter"]


def test_cast_cube_on_fp32_model(cube_path, model):
    """Same model and weights, KV cast to bf16 at load: refused for the dtype, not for the fingerprint."""
    cast = MemCube.load(cube_path, dtype=torch.bfloat16)
    with pytest.raises(CubeError, match=r"holds torch\.bfloat16 KV but the model runs in torch\.float32") as e:
        kvmem.prefill(model, cast)
    assert not isinstance(e.value, FingerprintMismatch)


def test_fp32_cube_on_bf16_model(cube):
    bf16 = tiny_model("llama", dtype=torch.bfloat16)
    with pytest.raises(CubeError, match=r"dtype"):
        kvmem.prefill(bf16, cube)
