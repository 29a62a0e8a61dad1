"""Parametric memory: AdapterCubes hot-swapped through PEFT, checked against freshly loaded PeftModels."""

from __future__ import annotations

import pytest
import torch

import kvmem
import kvmem.inject.adapters
from helpers import random_ids, tiny_model

peft = pytest.importorskip("peft")

SPECS = {  # name -> (seed, rank, target modules)
    "qv4": (1, 4, ["q_proj", "v_proj"]),
    "all16": (2, 16, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp8": (3, 8, ["gate_proj", "up_proj", "down_proj"]),
    "qv4b": (4, 4, ["q_proj", "v_proj"]),
}


def _train_like(family="llama", *, seed, rank, targets, **config):
    """A PeftModel whose LoRA weights are random and non-zero, as after training."""
    base = tiny_model(family, **config)
    torch.manual_seed(seed)  # after the base (which seeds itself): the LoRA weights follow this seed
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False))
    return model.eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """name -> (folder of a saved PEFT adapter, AdapterCube loaded back from its own file)."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, (seed, rank, targets) in SPECS.items():
        folder = root / name
        _train_like(seed=seed, rank=rank, targets=targets).save_pretrained(folder)
        cube = kvmem.AdapterCube.from_peft(folder, name=name, base_model=tiny_model("llama"))
        out[name] = (folder, kvmem.AdapterCube.load(cube.save(root / f"{name}.safetensors")))
    return out


@pytest.fixture(scope="module")
def fresh_logits(adapters):
    """name -> logits of a PeftModel freshly loaded from the adapter folder (the oracle)."""
    ids = random_ids(13)[None]
    out = {}
    with torch.no_grad():
        out[None] = tiny_model("llama")(input_ids=ids).logits
        for name, (folder, _) in adapters.items():
            out[name] = peft.PeftModel.from_pretrained(tiny_model("llama"), folder).eval()(input_ids=ids).logits
    return ids, out


def _logits(mm, ids):
    with torch.no_grad():
        return mm.model(input_ids=ids).logits


def test_every_swap_matches_a_fresh_peft_model(adapters, fresh_logits, tokenizer):
    ids, expected = fresh_logits
    mm = kvmem.wrap(tiny_model("llama"), tokenizer)
    order = ["qv4", "all16", None, "mlp8", "qv4", None, "qv4b", "all16"]
    for name in order:
        mm.use_adapter(adapters[name][1] if name else None)
        assert (mm.adapter.name if mm.adapter else None) == name
        if name is not None:  # PEFT's own view of which adapter is active agrees with the LoRA layers
            from peft.tuners.tuners_utils import BaseTunerLayer
            lora = next(m for m in mm.model.modules() if isinstance(m, BaseTunerLayer))
            assert mm.model.active_adapter == lora.active_adapters[0]
        got = _logits(mm, ids)
        if name is None:
            assert torch.equal(got, expected[None])  # the base model, bit for bit
        else:
            torch.testing.assert_close(got, expected[name], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected["qv4"], expected["qv4b"])  # two same-shaped adapters really differ


def test_hundred_swaps_no_drift_no_growth(adapters, fresh_logits, tokenizer):
    ids, expected = fresh_logits
    mm = kvmem.wrap(tiny_model("llama"), tokenizer)
    cubes = [adapters["qv4"][1], adapters["all16"][1]]
    mm.use_adapter(cubes[0])
    mm.use_adapter(cubes[1])
    n_params = sum(p.numel() for p in mm.model.parameters())
    for i in range(100):
        mm.use_adapter(cubes[i % 2])
    assert sum(p.numel() for p in mm.model.parameters()) == n_params
    assert mm.adapters.stats["loads"] == 2 and mm.adapters.stats["swaps"] == 102
    torch.testing.assert_close(_logits(mm, ids), expected["all16"], rtol=1e-5, atol=1e-5)
    mm.use_adapter(None)
    assert torch.equal(_logits(mm, ids), expected[None])


def test_lru_budget_evicts_and_reloads(adapters, fresh_logits, tokenizer):
    ids, expected = fresh_logits
    small = adapters["qv4"][1].nbytes + adapters["mlp8"][1].nbytes
    with pytest.warns(DeprecationWarning, match="adapter_capacity_bytes"):  # the old name still works
        mm = kvmem.wrap(tiny_model("llama"), tokenizer, adapter_budget_bytes=small)
    for name in ("qv4", "mlp8", "all16", "qv4", "mlp8"):
        mm.use_adapter(adapters[name][1])
        assert mm.adapters.resident_bytes <= max(small, adapters[name][1].nbytes)
        torch.testing.assert_close(_logits(mm, ids), expected[name], rtol=1e-5, atol=1e-5)
    assert mm.adapters.stats["evictions"] >= 2
    assert len(mm.model.peft_config) == len(mm.adapters.resident)  # evicted adapters left PEFT too


def test_hotswap_slot_keeps_parameters(adapters, fresh_logits, tokenizer):
    ids, expected = fresh_logits
    mm = kvmem.wrap(tiny_model("llama"), tokenizer, hotswap=True)
    mm.use_adapter(adapters["qv4"][1])
    params = {n: p for n, p in mm.model.named_parameters() if "lora_" in n}
    mm.use_adapter(adapters["qv4b"][1])
    torch.testing.assert_close(_logits(mm, ids), expected["qv4b"], rtol=1e-5, atol=1e-5)
    assert all(p is params[n] for n, p in mm.model.named_parameters() if "lora_" in n)  # swapped in place
    with pytest.raises(kvmem.CubeError, match="cannot be hot-swapped"):
        mm.use_adapter(adapters["mlp8"][1])


def test_per_request_adapter_and_kv_cubes_know_their_adapter(adapters, tokenizer):
    mm = kvmem.wrap(tiny_model("llama"), tokenizer)
    qv4, all16 = adapters["qv4"][1], adapters["all16"][1]
    mm.use_adapter(qv4)
    cube = mm.build_cube("Alice lives in Oslo.")
    mm.use_adapter(all16)
    with pytest.raises(kvmem.FingerprintMismatch) as err:
        mm.generate("Where does Alice live?", [cube], max_new_tokens=2)
    assert err.value.fields == ["adapter"]
    out = mm.generate("Where does Alice live?", [cube], adapter=qv4, max_new_tokens=3, do_sample=False)
    assert mm.adapter is all16  # restored after the request
    mm.use_adapter(qv4)
    assert torch.equal(mm.generate("Where does Alice live?", [cube], max_new_tokens=3, do_sample=False), out)
    mm.use_adapter(None)
    with pytest.raises(kvmem.FingerprintMismatch, match="adapter"):
        kvmem.prefill(mm.model, cube)


def test_same_adapter_under_another_name_is_the_same_adapter(adapters):
    """A KV cube built on a user's own PeftModel ('default') injects under kvmem's swap of the same weights."""
    folder, cube = adapters["qv4"]
    own = peft.PeftModel.from_pretrained(tiny_model("llama"), folder).eval()
    kv = kvmem.MemCube.from_ids(own, random_ids(9))
    bridge = kvmem.inject.adapters.AdapterBridge(tiny_model("llama"))
    bridge.use(cube)
    kvmem.prefill(bridge.model, kv)  # no FingerprintMismatch


def test_wrong_base_model_refused(adapters):
    cube = adapters["qv4"][1]
    with pytest.raises(kvmem.FingerprintMismatch, match="weights"):
        kvmem.inject.adapters.AdapterBridge(tiny_model("llama", seed=5)).use(cube)
    with pytest.raises(kvmem.CubeError, match="another model size|does not have"):
        kvmem.AdapterCube.from_peft(adapters["qv4"][0], base_model=tiny_model("llama", hidden_size=32, head_dim=8))
    with pytest.raises(kvmem.FingerprintMismatch, match="model"):
        kvmem.inject.adapters.AdapterBridge(tiny_model("llama", num_hidden_layers=3)).use(cube)


def test_bad_adapter_inputs(adapters, tmp_path):
    folder, cube = adapters["qv4"]
    with pytest.raises(kvmem.CubeError, match="base_model="):
        kvmem.AdapterCube.from_peft(folder)
    with pytest.raises(kvmem.CubeError, match="not a PEFT adapter folder"):
        kvmem.AdapterCube.from_peft(tmp_path, base_model=tiny_model("llama"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    torch.save({}, pickled / "adapter_model.bin")
    with pytest.raises(kvmem.CubeError, match="only safetensors"):
        kvmem.AdapterCube.from_peft(pickled, base_model=tiny_model("llama"))
    with pytest.raises(kvmem.CubeError, match="PeftModel or a PEFT adapter folder"):
        kvmem.AdapterCube.from_peft(42)
    with pytest.raises(kvmem.CubeError, match="AdapterCube or None"):
        kvmem.inject.adapters.AdapterBridge(tiny_model("llama")).use("qv4")
    ia3 = peft.get_peft_model(tiny_model("llama"), peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                                    feedforward_modules=["down_proj"]))
    with pytest.raises(kvmem.CubeError, match="only LoRA"):
        kvmem.AdapterCube.from_peft(ia3)


def test_corrupted_adapter_files(adapters, tmp_path):
    _, cube = adapters["all16"]
    path = tmp_path / "a.safetensors"
    good = open(cube.save(path), "rb").read()
    for i, mutate in enumerate([lambda b: b[: len(b) // 2], lambda b: b[:-1], lambda b: b"",
                                lambda b: b[:-40] + bytes([b[-40] ^ 1]) + b[-39:],
                                lambda b: b.replace(b'\\"rank\\": 16', b'\\"rank\\": 15')]):
        bad = tmp_path / f"bad{i}.safetensors"
        assert mutate(good) != good
        bad.write_bytes(mutate(good))
        with pytest.raises(kvmem.CubeError):
            kvmem.AdapterCube.load(bad)
    with pytest.raises(kvmem.CubeError, match="MemCube.load"):
        kvmem.AdapterCube.load(kvmem.MemCube.from_ids(tiny_model("llama"), random_ids(4)).save(tmp_path / "m.safetensors"))
    with pytest.raises(kvmem.CubeError, match="AdapterCube.load"):
        kvmem.MemCube.load(path)
