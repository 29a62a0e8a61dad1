"""Models dispatched with accelerate (device_map, CPU and disk offload hooks): kvmem fingerprints their real
weights, each layer's prefix KV lands where that layer runs, and generation from it is exact against the
offloaded model's own full prefill."""

from __future__ import annotations

import pytest
import torch
from accelerate import cpu_offload, dispatch_model

import kvmem
import kvmem.inject.prefill
from kvmem.model.attention import use_gqa_attention
from kvmem.model.devices import layer_devices
from kvmem.model.static_cache import static_prefix
from conftest import random_ids, tiny_model

DEVICE_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
              "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
# cpu_offload leaves every weight meta; kvmem/model/cache.py's kv_shapes probes the model with an input on its first
# weight's device (meta there) instead of modelinfo.model_device: until that one line is changed, fails so
HOWS = ["disk", "cpu"]
ANCHOR = random_ids(3, seed=9)


def _greedy(model, ids, n=6, **kw):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          pad_token_id=0, **kw)


def _offloaded(how: str, tmp_path, attn: str = "sdpa"):
    model = tiny_model("llama")  # same seed as the plain model the cubes come from: same weights
    if how == "disk":
        model = dispatch_model(model, device_map=DEVICE_MAP, offload_dir=str(tmp_path))
    else:
        model = cpu_offload(model, execution_device=torch.device("cpu"))
    assert any(p.device.type == "meta" for p in model.parameters())  # weights really are offloaded
    use_gqa_attention(model, enabled=attn == "kvmem_sdpa")
    return model


def _where(prefix) -> list[torch.device]:
    return [layer.keys.device for layer in prefix.cache.layers]


def _same_cube(a, b) -> bool:
    return a.fingerprint_fields == b.fingerprint_fields and torch.equal(a.all_ids, b.all_ids) and \
        all(torch.equal(k, k2) and torch.equal(v, v2) for (k, v), (k2, v2) in zip(a.kv, b.kv))


@pytest.mark.parametrize("how", ["disk", "cpu"])
def test_cubes_built_on_an_offloaded_model_are_the_plain_models(how, tmp_path, tokenizer_pair):
    """MemCube.from_ids / from_text on an offloaded model: the same fingerprint and the same KV, bit for bit."""
    model, plain, tokenizer = _offloaded(how, tmp_path), tiny_model("llama"), tokenizer_pair[0]
    assert _same_cube(kvmem.MemCube.from_ids(model, random_ids(25)), kvmem.MemCube.from_ids(plain, random_ids(25)))
    text, anchor = "Alice lives in Oslo.", "<|im_start|>system"
    assert _same_cube(kvmem.MemCube.from_text(model, tokenizer, text, anchor=anchor),
                      kvmem.MemCube.from_text(plain, tokenizer, text, anchor=anchor))


@pytest.mark.parametrize("attn", ["sdpa", "kvmem_sdpa"])
@pytest.mark.parametrize("how", HOWS)
def test_one_cube_on_an_offloaded_model_is_exact(how, attn, tmp_path):
    """A cube built on the plain model continues exactly as the offloaded model's own full prefill does, and one
    built on the offloaded model loads into the plain one."""
    model = _offloaded(how, tmp_path, attn)
    plain_cube = kvmem.MemCube.from_ids(tiny_model("llama"), random_ids(25))
    kvmem.prefill(tiny_model("llama"), kvmem.MemCube.from_ids(model, random_ids(25)))
    prefix = kvmem.prefill(model, plain_cube)
    assert _where(prefix) == layer_devices(model, 2)
    ids = prefix.extend(random_ids(6, seed=3))
    assert torch.equal(_greedy(model, ids, past_key_values=prefix.cache), _greedy(model, ids))
    with pytest.raises(kvmem.FingerprintMismatch, match="weights"):  # other weights are still refused
        kvmem.prefill(model, kvmem.MemCube.from_ids(tiny_model("llama", seed=1), random_ids(25)))


@pytest.mark.parametrize("attn", ["sdpa", "kvmem_sdpa"])
@pytest.mark.parametrize("how", HOWS)
def test_two_composed_cubes_with_full_recompute_are_exact(how, attn, tmp_path):
    """Two cubes after one anchor, the second recomputed in full ("leading" with a budget of its length): the
    composed buffer is built on the model's device, recomputed through the hooks, each layer moved where it runs."""
    model = _offloaded(how, tmp_path, attn)
    first = kvmem.MemCube.from_ids(tiny_model("llama"), random_ids(20, seed=5), anchor_ids=ANCHOR)
    second = kvmem.MemCube.from_ids(model, random_ids(17, seed=6), anchor_ids=ANCHOR)
    prefix = kvmem.prefill(model, [first, second], recompute="leading", budget=second.num_tokens)
    assert prefix.recomputed == second.num_tokens
    assert _where(prefix) == layer_devices(model, 2)
    ids = prefix.extend(random_ids(6, seed=3))
    assert torch.equal(_greedy(model, ids, past_key_values=prefix.cache), _greedy(model, ids))


@pytest.mark.parametrize("attn", ["sdpa", "kvmem_sdpa"])
@pytest.mark.parametrize("how", HOWS)
def test_offloaded_model_generates_exactly_from_a_static_prefix(how, attn, tmp_path):
    model = _offloaded(how, tmp_path, attn)
    cube = kvmem.MemCube.from_ids(tiny_model("llama"), random_ids(25))
    prefix = static_prefix(model, kvmem.prefill(model, cube), max_new_tokens=6, query_len=6)
    ids = prefix.extend(random_ids(6, seed=3))
    want = _greedy(model, ids)  # the offloaded model's own full prefill
    assert torch.equal(want, _greedy(tiny_model("llama"), ids))
    assert torch.equal(_greedy(model, ids, cache=prefix.cache), want)
    assert [layer.keys.device for layer in prefix.cache.layers] == layer_devices(model, 2)


@pytest.mark.parametrize("how", HOWS)
def test_wrapped_offloaded_model_generates_exactly(how, tmp_path, tokenizer_pair):
    """kvmem.wrap(...).generate with cubes on an offloaded model: the same tokens as prefilling the same prompt in
    full on that model (inject=False)."""
    tokenizer = tokenizer_pair[0]
    mm = kvmem.wrap(_offloaded(how, tmp_path, "kvmem_sdpa"), tokenizer)
    alice = mm.build_cube("Alice lives in Oslo and works at the harbour as a crane operator, every day.")
    bob = kvmem.wrap(tiny_model("llama"), tokenizer).build_cube("Bob sells fish on the market in Bergen.")
    for cubes in ([alice], [alice, bob]):
        kw = dict(cubes=cubes, max_new_tokens=6, do_sample=False, recompute="leading", budget=64)
        out = mm.generate("Where does Alice live?", **kw)
        assert mm.last.injected and mm.last.prefilled_tokens < mm.last.prompt_tokens
        assert torch.equal(out, mm.generate("Where does Alice live?", inject=False, **kw))


def test_prefill_puts_each_layer_where_layer_devices_says(tmp_path, monkeypatch):
    """Each cache layer goes to its own device (a CPU-only machine has one: the second layer's is faked as meta,
    where tensors have a device but no data). Recompute, which runs every layer over one buffer, refuses."""
    model = _offloaded("disk", tmp_path)
    assert kvmem.inject.prefill._kv_devices(model, 2, torch.device("cpu")) == layer_devices(model, 2)
    # layer_devices' own meta (a layer it cannot place on a fully offloaded model) would be read as the model's
    # device, so the fake goes one step later
    monkeypatch.setattr(kvmem.inject.prefill, "_kv_devices", lambda m, n, d: [torch.device("cpu"), torch.device("meta")])
    cubes = [kvmem.MemCube.from_ids(model, random_ids(9, seed=s), anchor_ids=ANCHOR) for s in (5, 6)]
    for prefix in (kvmem.prefill(model, cubes[0]), kvmem.prefill(model, cubes, recompute="none")):
        assert _where(prefix) == [torch.device("cpu"), torch.device("meta")]
        assert prefix.input_ids.device == torch.device("cpu")
    with pytest.raises(kvmem.CubeError, match=r"layers run on several devices.*recompute='none'"):
        kvmem.prefill(model, cubes, recompute="leading")


def test_plain_models_skip_the_hook_walk(monkeypatch):
    """A model kvmem finds in one place never pays layer_devices' module walk."""
    monkeypatch.setattr(kvmem.inject.prefill, "layer_devices", lambda m, n: pytest.fail("walked a plain model"))
    model = tiny_model("llama")
    assert _where(kvmem.prefill(model, kvmem.MemCube.from_ids(model, random_ids(9)))) == [torch.device("cpu")] * 2


def test_execution_device_of_a_fully_offloaded_model():
    """cpu_offload leaves every weight meta: the model's device is its hook's execution device."""
    from kvmem.model.devices import dtype_device

    model = cpu_offload(tiny_model("llama"), execution_device=torch.device("cpu"))
    assert next(model.parameters()).device.type == "meta"
    assert dtype_device(model) == (torch.float32, torch.device("cpu"))


def test_layer_devices_read_the_hooks(tmp_path):
    """The execution device comes from accelerate's hook, not from the (meta) weights."""
    model = _offloaded("disk", tmp_path)
    assert model.model.layers[1].self_attn.k_proj.weight.device.type == "meta"
    hooks = [m._hf_hook for m in model.model.layers[1].modules() if hasattr(m, "_hf_hook")]
    assert hooks
    for hook in hooks:
        hook.execution_device = torch.device("meta")  # a marker: no weight lives there
    assert layer_devices(model, 2) == [torch.device("cpu"), torch.device("meta")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_split_across_gpu_and_cpu_offload(tmp_path):
    """Layer 0 on the GPU, layer 1 offloaded to the CPU with the GPU as its execution device."""
    device_map = dict(DEVICE_MAP, **{"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0,
                                     "model.layers.1": "cpu", "model.norm": 0, "lm_head": 0})
    model = dispatch_model(tiny_model("llama"), device_map=device_map, main_device=0)
    use_gqa_attention(model)
    cube = kvmem.MemCube.from_ids(tiny_model("llama"), random_ids(25))  # built on the CPU, plain
    plain = kvmem.prefill(model, cube)
    assert all(layer.keys.device.type == "cuda" for layer in plain.cache.layers)
    ids = plain.extend(random_ids(6, seed=3).cuda())
    want = _greedy(model, ids)
    assert torch.equal(_greedy(model, ids, past_key_values=plain.cache), want)
    prefix = static_prefix(model, kvmem.prefill(model, cube), max_new_tokens=6, query_len=6)
    assert all(layer.keys.device.type == "cuda" for layer in prefix.cache.layers)
    assert torch.equal(_greedy(model, ids, cache=prefix.cache), want)
