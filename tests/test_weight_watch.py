"""The per-request weight check (issue 20): one pass over the watch's references, no weight read; every kind of
weight change the issue names is refused, and each test shows the change gets through when the check is skipped
(so the test exercises the watch, not luck). Writes through ``.data`` are the documented blind spot:
`kvmem.verify_weights` / `mark_changed` see them."""

from __future__ import annotations

import copy

import pytest
import torch

import kvmem
from kvmem.cubes import weights as fp
from kvmem.model import watch as watch_mod
from kvmem.model.resolve import resolve

from helpers import random_ids, tiny_model

peft = pytest.importorskip("peft")
IDS = random_ids(24, seed=3, vocab=1000)


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def cube(base):
    return kvmem.MemCube.from_ids(base, IDS)


def _lora():
    return peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def _optimizer_step(model):
    w = model.model.layers[0].mlp.down_proj.weight
    opt = torch.optim.SGD([w], lr=1e-2)
    (w ** 2).sum().backward()
    opt.step()
    return model


def _load_state_dict(model):
    other = tiny_model("llama", seed=7)
    model.load_state_dict(other.state_dict())
    return model


def _merge_and_unload(model):
    torch.manual_seed(1)
    return peft.get_peft_model(model, _lora()).merge_and_unload()


def _replaced_module(model):
    torch.manual_seed(5)
    old = model.model.layers[1].self_attn.o_proj
    model.model.layers[1].self_attn.o_proj = torch.nn.Linear(old.in_features, old.out_features, bias=False)
    return model


def _cast_round_trip(model):
    # float32 -> bfloat16 -> float32: the same dtype and shapes again, the values rounded; the new storage may even
    # sit at the old one's address (the watch holds storages by weak reference, not by address)
    return model.to(torch.bfloat16).to(torch.float32)


def _moved(model):
    # what a move does to a parameter (a copy in new storage, assigned through .data): on a CPU-only machine the
    # copy is on the same device; the GPU test below moves for real
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
        model.model.layers[0].self_attn.k_proj.weight.data[0, 0] += 1.0  # ... and differs, so the digest must move
    return model


CHANGES = {"optimizer step": _optimizer_step, "load_state_dict": _load_state_dict,
           "merge_and_unload": _merge_and_unload, "replaced module": _replaced_module,
           "cast": _cast_round_trip, "move": _moved}


def _skip_check(monkeypatch):
    """The check skipped: the watch says nothing changed, whatever happened."""
    monkeypatch.setattr(watch_mod.Watch, "unchanged", lambda self: True)


@pytest.mark.parametrize("change", CHANGES)
def test_weight_change_is_refused(base, cube, change):
    model = copy.deepcopy(base)
    kvmem.prefill(model, cube)  # the model's facts and digests resolved and cached
    model = CHANGES[change](model)
    with pytest.raises(kvmem.FingerprintMismatch) as e:
        kvmem.prefill(model, cube)
    assert "weights" in e.value.fields


@pytest.mark.parametrize("change", [c for c in CHANGES if c != "merge_and_unload"])
def test_weight_change_gets_through_when_the_check_is_skipped(base, cube, change, monkeypatch):
    """The mutation check for the test above: without the watch the stale digest is taken."""
    model = copy.deepcopy(base)
    kvmem.prefill(model, cube)
    _skip_check(monkeypatch)
    model = CHANGES[change](model)
    kvmem.prefill(model, cube)  # accepted: wrongly, which is what the watch prevents


def test_merge_and_unload_gets_through_when_the_check_is_skipped(base, cube, monkeypatch):
    model = copy.deepcopy(base)
    kvmem.prefill(model, cube)
    _skip_check(monkeypatch)
    merged = _merge_and_unload(model)
    assert merged is model  # the same model object, its weights merged in place through .data
    kvmem.prefill(merged, cube)


def _two_adapters(base):
    config = _lora()
    torch.manual_seed(1)
    model = peft.get_peft_model(copy.deepcopy(base), config, adapter_name="a")
    torch.manual_seed(9)  # adapter b's weights differ from a's
    model.add_adapter("b", _lora())
    model.set_adapter("a")
    return model


def test_swapped_adapter_is_refused(base):
    model = _two_adapters(base)
    under_a = kvmem.MemCube.from_ids(model, IDS)
    kvmem.prefill(model, under_a)
    model.set_adapter("b")
    with pytest.raises(kvmem.FingerprintMismatch) as e:
        kvmem.prefill(model, under_a)
    assert e.value.fields == ["adapter"]


def test_swapped_adapter_gets_through_when_the_check_is_skipped(base, monkeypatch):
    model = _two_adapters(base)
    under_a = kvmem.MemCube.from_ids(model, IDS)
    kvmem.prefill(model, under_a)
    _skip_check(monkeypatch)
    model.set_adapter("b")
    kvmem.prefill(model, under_a)


@pytest.mark.parametrize("skip", [False, True])
def test_disabled_adapter_is_refused(base, monkeypatch, skip):
    """``with model.disable_adapter():`` changes no weight, only the tuner layers' state: the watch reads that state,
    so a cube built under the adapter is refused while it is disabled; skipped, the stale adapter field gets through."""
    model = _two_adapters(base)
    under_a = kvmem.MemCube.from_ids(model, IDS)
    kvmem.prefill(model, under_a)
    if skip:
        _skip_check(monkeypatch)
    with model.disable_adapter():
        if skip:
            kvmem.prefill(model, under_a)  # wrongly accepted without the watch
            return
        with pytest.raises(kvmem.FingerprintMismatch) as e:
            kvmem.prefill(model, under_a)
    assert e.value.fields == ["adapter"]
    kvmem.prefill(model, under_a)  # enabled again: the cube fits again


@pytest.mark.parametrize("skip", [False, True])
def test_injected_adapter_is_refused(base, cube, monkeypatch, skip):
    """PEFT's injection replaces modules of the model in place (``get_peft_model``): the next request on that same
    model object sees the registrations and refuses a cube built without the adapter; skipped, it gets through."""
    model = copy.deepcopy(base)
    kvmem.prefill(model, cube)
    if skip:
        _skip_check(monkeypatch)
    torch.manual_seed(1)
    peft.get_peft_model(model, _lora())  # LoRA layers now sit inside ``model`` itself
    if skip:
        kvmem.prefill(model, cube)  # wrongly accepted without the watch
        return
    with pytest.raises(kvmem.FingerprintMismatch) as e:
        kvmem.prefill(model, cube)
    assert e.value.fields == ["adapter"]


def test_unchanged_model_reads_no_weight(base, cube, monkeypatch):
    """Once resolved, a request neither samples nor hashes a weight: one pass over references."""
    model = copy.deepcopy(base)
    kvmem.prefill(model, cube)

    def forbidden(*args, **kwargs):
        raise AssertionError("a weight was read on the per-request path")

    for name in ("_sample_views", "_gather", "_full_digests", "weights_digest"):
        monkeypatch.setattr(fp, name, forbidden)
    kvmem.prefill(model, cube)
    kvmem.prefill(model, [cube, cube], recompute="none")


def test_facts_follow_the_model(base):
    model = copy.deepcopy(base)
    a = resolve(model)
    assert resolve(model) is a  # nothing changed: the same facts
    model.to(torch.bfloat16)
    b = resolve(model)
    assert b is not a and b.dtype == torch.bfloat16 and b.generation == a.generation + 1


def test_data_writes_are_the_documented_blind_spot(base, cube):
    """A dense write through ``.data`` bumps no version counter and keeps the storage: the per-request watch does
    not see it (as documented); `mark_changed` or `verify_weights` does."""
    model = copy.deepcopy(base)
    kvmem.prefill(model, cube)
    w = model.model.layers[0].self_attn.v_proj.weight
    w.data += 1e-3 * torch.randn_like(w)
    kvmem.prefill(model, cube)  # not seen: the blind spot
    watch_mod.mark_changed(model)
    with pytest.raises(kvmem.FingerprintMismatch):  # a dense edit moves the sampled values
        kvmem.prefill(model, cube)


def test_inference_tensor_weights_edited_in_place_are_the_second_blind_spot():
    """A model built (or loaded) under ``torch.inference_mode()`` holds inference tensors, which keep no version
    counter: an in-place edit inside inference mode is not seen per request (as documented); `mark_changed` is."""
    with torch.inference_mode():
        model = tiny_model("llama")
    assert next(model.parameters()).is_inference()
    cube = kvmem.MemCube.from_ids(model, IDS)
    kvmem.prefill(model, cube)
    w = model.model.layers[0].self_attn.v_proj.weight
    with torch.inference_mode():
        w.add_(1e-3 * torch.randn_like(w))
    kvmem.prefill(model, cube)  # not seen: the blind spot
    watch_mod.mark_changed(model)
    with pytest.raises(kvmem.FingerprintMismatch):
        kvmem.prefill(model, cube)


def test_verify_weights_sees_a_sparse_data_write(base, cube):
    model = copy.deepcopy(base)
    kvmem.prefill(model, cube)
    w = model.model.layers[1].mlp.up_proj.weight
    w.data.view(-1)[w.numel() // 2 + 1] += 1.0  # one element, through .data: no sample sees it
    watch_mod.mark_changed(model)
    kvmem.prefill(model, cube)  # marked, re-checked by sample: still missed (documented)
    kvmem.verify_weights(model)  # hashes every weight
    with pytest.raises(kvmem.FingerprintMismatch):
        kvmem.prefill(model, cube)


@pytest.mark.gpu
def test_move_to_gpu_and_back_is_seen(base, cube):
    model = copy.deepcopy(base)
    kvmem.prefill(model, cube)
    model.to("cuda")
    assert resolve(model).device.type == "cuda"
    prefix = kvmem.prefill(model, cube.to("cuda"))
    assert prefix.cache.layers[0].keys.device.type == "cuda"
    model.to("cpu")
    assert resolve(model).device.type == "cpu"


def _adapter_cube(tmp_path, name, seed):
    base = tiny_model("llama")
    torch.manual_seed(seed)
    peft.get_peft_model(base, _lora()).save_pretrained(tmp_path / name)
    return kvmem.AdapterCube.from_peft(tmp_path / name, name=name, base_model=tiny_model("llama"))


@pytest.mark.parametrize("skip", [False, True])
def test_hot_swapped_adapter_is_refused(tmp_path, tokenizer, monkeypatch, skip):
    """kvmem's hot swap overwrites the adapter slot through .data (peft's hotswap_adapter): the bridge marks the
    model changed. Skipping that mark lets a cube built under the old adapter through."""
    a, b = _adapter_cube(tmp_path, "a", 1), _adapter_cube(tmp_path, "b", 2)
    mm = kvmem.wrap(tiny_model("llama"), tokenizer, hotswap=True)
    mm.use_adapter(a)
    cube = mm.build_cube("Alice lives in Oslo.")
    mm.generate("Where does Alice live?", [cube], max_new_tokens=1)
    if skip:
        from kvmem.inject import adapters

        monkeypatch.setattr(adapters, "mark_changed", lambda model: None)
    mm.use_adapter(b)
    if skip:
        mm.generate("Where does Alice live?", [cube], max_new_tokens=1)  # wrongly accepted without the mark
        return
    with pytest.raises(kvmem.FingerprintMismatch) as e:
        mm.generate("Where does Alice live?", [cube], max_new_tokens=1)
    assert e.value.fields == ["adapter"]
