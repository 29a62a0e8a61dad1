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


# ---------------------------------------------------------------------------------------------- accelerate offload
# layer 1 and (with ``embed``) the embeddings on disk, the rest in memory: both offload kinds in one model
OFFLOAD_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
               "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}


def _dispatched(how: str, folder, **overrides):
    from accelerate import cpu_offload, dispatch_model

    model = tiny_model("llama", **overrides)
    if how == "cpu":
        return cpu_offload(model, execution_device=torch.device("cpu"))
    device_map = dict(OFFLOAD_MAP, **({"model.embed_tokens": "disk"} if how == "disk+embed" else {}))
    return dispatch_model(model, device_map=device_map, offload_dir=str(folder))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("how", ["cpu", "disk", "disk+embed"])
def test_offloaded_weights_hash_as_the_plain_checkpoint(how, tied, tmp_path):
    """Offloaded weights are meta in the model: the digest reads them through accelerate's hooks, so it equals
    the same checkpoint's when not offloaded (tied embeddings, which offloading unties, counted once)."""
    from kvmem.cubes.fingerprint import fingerprint_fields, fingerprint_id, weights_digest

    model = _dispatched(how, tmp_path, tie_word_embeddings=tied)
    assert any(p.device.type == "meta" for p in model.parameters())
    plain = tiny_model("llama", tie_word_embeddings=tied)
    assert weights_digest(model) == weights_digest(plain)
    assert fingerprint_id(fingerprint_fields(model)) == fingerprint_id(fingerprint_fields(plain))
    other = tiny_model("llama", seed=1, tie_word_embeddings=tied)
    assert weights_digest(_dispatched(how, tmp_path / "other", seed=1, tie_word_embeddings=tied)) \
        == weights_digest(other) != weights_digest(plain)


def test_disk_offloaded_weights_are_read_once(tmp_path, monkeypatch):
    """The per-call check of a disk-offloaded weight is its file's stat: no byte of the offload folder is read
    again until a file changes, and then only that weight is hashed again."""
    import os

    import numpy as np
    from accelerate.utils.offload import OffloadedWeightsLoader

    from kvmem.cubes.fingerprint import forget_digests, weights_digest

    model = _dispatched("disk", tmp_path)
    reads = []
    loader_get = OffloadedWeightsLoader.__getitem__
    monkeypatch.setattr(OffloadedWeightsLoader, "__getitem__", lambda self, key: reads.append(key) or
                        loader_get(self, key))
    first = weights_digest(model)
    n_disk = len(reads)
    assert n_disk == 9  # layer 1: q, k, v, o, gate, up, down and two norms, each read once
    assert weights_digest(model) == first and len(reads) == n_disk  # the second call reads nothing
    name = "model.layers.1.mlp.down_proj.weight"
    data = np.memmap(tmp_path / f"{name}.dat", dtype=np.float32, mode="r+")
    data[7] += 1e-3  # one element of one offloaded matrix, edited in the offload folder
    data.flush()
    del data
    os.utime(tmp_path / f"{name}.dat", ns=(1, 1))  # a new modification time, even on a coarse-clock file system
    edited = weights_digest(model)
    assert edited != first and reads[n_disk:] == [name]
    forget_digests(model)
    assert weights_digest(model) == edited and len(reads) == n_disk + 1 + n_disk


def test_meta_weights_no_hook_holds_are_refused():
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from helpers import tiny_config

    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(CubeError, match=r"meta device and no accelerate offload hook holds its value.*load the "
                                        r"model's weights"):
        kvmem.MemCube.from_ids(empty, random_ids(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_full_digest_is_xxh3_of_every_element(dtype, monkeypatch):
    """The digest of a weight is xxh3-128 over its bytes as held and over its bytes rounded to each canonical
    dtype, in one piece or many, also where a rounding is the tensor's own dtype (its digest is then the exact
    one, not hashed twice)."""
    import xxhash

    from kvmem.cubes import weights

    monkeypatch.setattr(weights, "_CHUNK", 1000)  # 5 pieces, the last short
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(4500, generator=g) * 3).to(dtype) if dtype.is_floating_point else \
        torch.randint(-2**40, 2**40, (4500,), generator=g)

    def ref(x):
        return xxhash.xxh3_128(x.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()

    got = weights._full_digest(t.view(45, 100))
    assert got["exact"] == ref(t)
    assert got["fp16"] == ref(t.to(torch.float16) if dtype.is_floating_point else t)
    assert got["bf16"] == (None if dtype == torch.float16 else ref(t.to(torch.bfloat16) if dtype.is_floating_point
                                                                  else t))
    if dtype == torch.float32:
        assert len({got["exact"], got["fp16"], got["bf16"]}) == 3
