"""KvmemConnector in an offline vLLM engine (``LLM()``, one process, float32): exactness against vLLM's own full
prefill and kvmem's transformers splice, cached-token accounting, no prefix-cache leak, namespaces, bad cubes,
and cubes saved by the engine (equal to transformers-built ones, served back, refused saves).

One engine serves the whole module; every reference request carries its own cache salt so no test reads
another's prefix cache unless it means to.
"""

from __future__ import annotations

import gc

import pytest
import torch

# vllm.config, not vllm: without vLLM, this very folder would import as an empty namespace package "vllm"
pytest.importorskip("vllm.config", reason="vLLM is not installed here (it runs in .venv-vllm; see .ci/run)")
pytestmark = pytest.mark.vllm

import kvmem  # noqa: E402
from vllm_helpers import corrupt_bytes, offline_engine, run_request, wait_for  # noqa: E402
from kvmem.integrations.key_blocks import write_key_blocks  # noqa: E402
from kvmem.integrations.serving import precompose  # noqa: E402

MAX_NEW = 10


@pytest.fixture(scope="module")
def folder(tmp_path_factory, memory, hf):
    """A cube folder: default/{a,b,ab,corrupt,foreign}, other/secret."""
    model, tok = hf
    root = tmp_path_factory.mktemp("cubes")
    memory["a"].save(root / "default" / "a.safetensors")
    memory["b"].save(root / "default" / "b.safetensors")
    # a's cube with its keys in vLLM CPU's block layout (kvmem.integrations.key_blocks), and one whose sidecar is
    # damaged inside the loaded blocks (a namespace of their own: plain requests in "default" never match them)
    for name in ("akb", "akbdamaged"):
        memory["a"].save(root / "kb" / f"{name}.safetensors")
        write_key_blocks(root / "kb" / f"{name}.safetensors", block_size=128)
    side = root / "kb" / "akbdamaged.keys-b128"
    side.write_bytes(damage_keys(side.read_bytes(), part="kb.3"))
    precompose(model, [memory["a"], memory["b"]], recompute="leading", tokenizer=tok).save(
        root / "default" / "ab.safetensors")
    # corrupt: a's file with a few payload bytes flipped; foreign: a's ids through a fine-tuned copy of the model
    (root / "default" / "corrupt.safetensors").write_bytes(corrupt_bytes((root / "default" / "a.safetensors").read_bytes()))
    memory["foreign"].save(root / "default" / "foreign.safetensors")
    # damaged: a's file with layer 3's keys of its first tokens overwritten (inside the loaded blocks)
    (root / "default" / "damaged.safetensors").write_bytes(damage_keys((root / "default" / "a.safetensors").read_bytes()))
    # another namespace's memory, whose ids also start the test prompts
    memory["a"].to().save(root / "other" / "secret.safetensors")
    return root


@pytest.fixture(scope="module")
def llm(ckpt, folder):
    engine = offline_engine(ckpt, {"folder": str(folder), "namespaces": ["default", "other", "kb"]}, role="kv_both")
    yield engine
    del engine
    gc.collect()


def run(llm, ids, kvmem_params=None, *, salt: str | None = "fresh"):
    """(greedy token ids, logprobs of them, num_cached_tokens) of one request (`vllm_helpers.run_request`)."""
    return run_request(llm, ids, kvmem_params, salt=salt, max_new=MAX_NEW)


_FULL: dict = {}


def damage_keys(data: bytes, layer: int = 3, *, part: str | None = None) -> bytes:
    """A cube file's bytes with the first 4 KB of ``k.{layer}`` (its first tokens' keys; or of tensor ``part``) set
    to large values; header, metadata, ids and every checksum as they were."""
    import json
    import struct

    n = struct.unpack("<Q", data[:8])[0]
    begin = 8 + n + json.loads(data[8:8 + n])[part or f"k.{layer}"]["data_offsets"][0]
    raw = bytearray(data)
    raw[begin:begin + 4096] = struct.pack("<f", 300.0) * 1024
    return bytes(raw)


def full_prefill(llm, ids):
    """vLLM's own full prefill of ``ids`` (no cubes, a fresh salt), computed once per prompt."""
    key = tuple(ids)
    if key not in _FULL:
        _FULL[key] = run(llm, ids, NO_AUTO)
        assert _FULL[key][2] == 0
    return _FULL[key]


def prompt_of(memory, *names):
    ids = memory["a"].all_ids[0].tolist() if names[0] == "a" else memory[names[0]].all_ids[0].tolist()
    for n in names[1:]:
        ids += memory[n].input_ids[0].tolist()
    return ids + memory["query"]


NO_AUTO = {"auto": False}


def test_one_cube_equals_vllm_full_prefill_and_counts_as_cached(llm, memory):
    ids = prompt_of(memory, "a")
    full, full_lp, _ = full_prefill(llm, ids)
    got, got_lp, cached = run(llm, ids, {"cubes": ["a"]})
    assert cached == memory["a"].all_ids.shape[1] == 256  # the cube's tokens, block-aligned, reported as cached
    assert got == full
    torch.testing.assert_close(got_lp, full_lp, atol=1e-3, rtol=0)  # float32: the same logits up to rounding


def test_a_cube_read_through_its_key_blocks_equals_vllm_full_prefill(llm, memory, kvmem_log):
    """Keys read from the cube's key-blocks sidecar straight into vLLM's blocks: vLLM's own answer; a sidecar
    damaged inside the loaded blocks is a load error that vLLM recomputes (never served)."""
    ids = prompt_of(memory, "a")
    full, full_lp, _ = full_prefill(llm, ids)
    before = len(kvmem_log.lines)
    got, got_lp, cached = run(llm, ids, {"cubes": ["akb"], "namespace": "kb"})
    assert cached == 256 and got == full
    torch.testing.assert_close(got_lp, full_lp, atol=1e-3, rtol=0)
    logged = "\n".join(kvmem_log.lines[before:])
    assert "keys from its key blocks" in logged and "load errors" not in logged, logged
    before = len(kvmem_log.lines)
    got, got_lp, _ = run(llm, ids, {"cubes": ["akbdamaged"], "namespace": "kb"})
    assert got == full
    torch.testing.assert_close(got_lp, full_lp, atol=1e-3, rtol=0)
    logged = "\n".join(kvmem_log.lines[before:])
    assert "checksum mismatch of kb.3" in logged and "reported to vLLM as load errors" in logged, logged


def test_plain_request_gets_the_longest_exact_cube(llm, memory):
    ids = prompt_of(memory, "a", "b")  # starts with a's ids (and with ab's and secret's: neither may match)
    full, _, _ = full_prefill(llm, ids)
    got, _, cached = run(llm, ids)  # no kv_transfer_params at all
    assert cached == 256, "the plain request should get exact cube 'a' (not precomposed 'ab', not other/secret)"
    assert got == full


def test_two_cubes_equal_kvmem_pure_splice(llm, memory, hf):
    model, _ = hf
    ids = prompt_of(memory, "a", "b")
    prefix = kvmem.prefill(model, [memory["a"], memory["b"]], recompute="none")
    assert prefix.input_ids[0].tolist() == ids[:384]
    with torch.no_grad():
        ref = model.generate(prefix.extend(torch.tensor([memory["query"]])), past_key_values=prefix.cache,
                             max_new_tokens=MAX_NEW, do_sample=False)[0, len(ids):].tolist()
    got, _, cached = run(llm, ids, {"cubes": ["a", "b"]})
    assert cached == 384
    assert got == ref


def test_precomposed_cube_equals_kvmem_leading_recompute(llm, memory, hf):
    model, _ = hf
    ids = prompt_of(memory, "a", "b")
    prefix = kvmem.prefill(model, [memory["a"], memory["b"]], recompute="leading")
    with torch.no_grad():
        ref = model.generate(prefix.extend(torch.tensor([memory["query"]])), past_key_values=prefix.cache,
                             max_new_tokens=MAX_NEW, do_sample=False)[0, len(ids):].tolist()
    got, _, cached = run(llm, ids, {"cubes": ["ab"]})
    assert cached == 384
    assert got == ref


def test_composed_prefix_never_reaches_the_plain_prefix_cache(llm, memory, kvmem_log):
    ids = prompt_of(memory, "a", "b")
    full, full_lp, _ = full_prefill(llm, ids)
    # composed and precomposed requests without a salt of their own: kvmem salts them
    run(llm, ids, {"cubes": ["a", "b"]}, salt=None)
    run(llm, ids, {"cubes": ["ab"]}, salt=None)
    assert "cache salt kvmem-" in kvmem_log.text()
    # the same tokens, no cubes, no salt: vLLM's prefix cache must not hand back the approximate KV
    got, got_lp, cached = run(llm, ids, NO_AUTO, salt=None)
    assert cached == 0
    assert got == full
    torch.testing.assert_close(got_lp, full_lp, atol=1e-3, rtol=0)
    # an exact cube may share the prefix cache: a second plain request reuses the first one's blocks
    _, _, cached_again = run(llm, ids, NO_AUTO, salt=None)
    assert cached_again == 384


def test_damaged_cube_kv_is_a_load_error_that_vllm_recomputes(llm, memory, kvmem_log):
    """Bytes damaged after a cube was saved are found when their layer is read, on the loader thread, after the
    request was planned: the layer is not written, its blocks go to vLLM as load errors, and vLLM drops the step's
    output and recomputes (kv_load_failure_policy "recompute"): the answer is vLLM's own. Served as read, the
    damaged keys would change the answer (checked below through transformers)."""
    ids = prompt_of(memory, "a")
    full, full_lp, _ = full_prefill(llm, ids)
    for name, part in (("damaged", "k.3"), ("corrupt", "v.")):
        before = len(kvmem_log.lines)
        # (vLLM still reports the tokens it planned to load as cached: its count is taken when the request is
        # scheduled, before the load fails)
        got, got_lp, _ = run(llm, ids, {"cubes": [name]})
        assert got == full
        torch.testing.assert_close(got_lp, full_lp, atol=1e-3, rtol=0)
        logged = "\n".join(kvmem_log.lines[before:])
        assert f"checksum mismatch of {part}" in logged and "reported to vLLM as load errors" in logged, logged


def test_damaged_keys_would_change_the_answer(hf, memory, folder):
    """The control of the test above: the damaged cube's KV, its checksums bypassed, gives another answer than
    the intact cube (through kvmem.prefill in transformers)."""
    import safetensors.torch

    model, _ = hf
    a = memory["a"]
    tensors = safetensors.torch.load((folder / "default" / "damaged.safetensors").read_bytes())
    damaged = kvmem.MemCube([(tensors[f"k.{i}"], tensors[f"v.{i}"]) for i in range(len(a.kv))], a.all_ids[0], a.meta)
    answers, n = [], len(prompt_of(memory, "a"))
    for cube in (a, damaged):
        prefix = kvmem.prefill(model, [cube])
        with torch.no_grad():
            out = model.generate(prefix.extend(torch.tensor([memory["query"]])), past_key_values=prefix.cache,
                                 max_new_tokens=MAX_NEW, do_sample=False)
        answers.append(out[0, n:].tolist())
    assert answers[0] != answers[1]


@pytest.mark.parametrize("name, why", [
    ("foreign", "weights"),
    ("missing", "no cube 'missing'"),
    ("secret", "no cube 'secret' in namespace 'default'"),  # it lives in namespace 'other'
])
def test_bad_cube_is_prefilled_normally_and_logged(llm, memory, kvmem_log, name, why):
    ids = prompt_of(memory, "a")
    full, full_lp, _ = full_prefill(llm, ids)
    before = len(kvmem_log.lines)
    got, got_lp, cached = run(llm, ids, {"cubes": [name]})
    assert cached == 0
    assert got == full
    torch.testing.assert_close(got_lp, full_lp, atol=1e-3, rtol=0)
    logged = "\n".join(kvmem_log.lines[before:])
    assert "prefilled without cubes" in logged and why in logged


def test_namespaces_hold(llm, memory, kvmem_log):
    ids = prompt_of(memory, "a")
    # namespace 'other' holds only 'secret' (a's ids): it matches there, and default's 'a' is never offered
    _, _, cached = run(llm, ids, {"namespace": "other", "cubes": ["a"]})
    assert cached == 0 and "no cube 'a' in namespace 'other'" in kvmem_log.text()
    _, _, cached = run(llm, ids, {"namespace": "other"})
    assert cached == 256  # other/secret, by automatic match inside 'other'
    before = len(kvmem_log.lines)
    _, _, cached = run(llm, ids, {"namespace": "nobody", "cubes": ["a"]})
    assert cached == 0 and "namespace 'nobody' is not served here" in "\n".join(kvmem_log.lines[before:])


def test_a_saved_cube_equals_the_transformers_cube_and_serves(llm, memory, hf, folder, kvmem_log):
    model, _ = hf
    a = memory["a"]
    ids = prompt_of(memory, "a")
    full, full_lp, _ = full_prefill(llm, ids)
    save = {"save": "saved", "tokens": a.all_ids.shape[1], "anchor": a.anchor_len, "auto": False}
    got, _, cached = run(llm, ids, save)
    assert got == full and cached == 0  # saving changes nothing about the request itself
    cube = wait_for(folder / "default" / "saved.safetensors")
    assert torch.equal(cube.all_ids, a.all_ids) and cube.anchor_len == a.anchor_len
    assert cube.fingerprint_fields == a.fingerprint_fields and cube.meta["built_by"].startswith("vllm ")
    for (k, v), (ak, av) in zip(cube.kv, a.kv, strict=True):  # vLLM's KV == transformers' KV, to float rounding
        torch.testing.assert_close(k, ak, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(v, av, atol=2e-4, rtol=1e-4)
    # the same greedy answer in transformers, through kvmem.prefill, as transformers' own full prefill
    prefix = kvmem.prefill(model, [cube])
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False)[0, len(ids):].tolist()
        via_cube = model.generate(prefix.extend(torch.tensor([memory["query"]])), past_key_values=prefix.cache,
                                  max_new_tokens=MAX_NEW, do_sample=False)[0, len(ids):].tolist()
    assert via_cube == ref
    # with its keys in this engine's block layout, written before the cube was published
    assert (folder / "default" / "saved.keys-b128").is_file()
    # and vLLM serves it back like any cube (its keys read through the key blocks)
    before = len(kvmem_log.lines)
    got, got_lp, cached = run(llm, ids, {"cubes": ["saved"]})
    assert cached == 256 and got == full
    assert "keys from its key blocks" in "\n".join(kvmem_log.lines[before:])
    torch.testing.assert_close(got_lp, full_lp, atol=1e-3, rtol=0)


def test_a_saved_cube_keeps_its_checked_text(llm, memory, hf, folder):
    _, tok = hf
    text = " Mira keeps the release notes; Tomas answers on-call pages at night."
    text_ids = tok(text, add_special_tokens=False).input_ids
    ids = memory["anchor"] + text_ids + memory["query"]
    tokens = len(memory["anchor"]) + len(text_ids)
    run(llm, ids, {"save": "noted", "tokens": tokens, "anchor": len(memory["anchor"]), "text": text})
    cube = wait_for(folder / "default" / "noted.safetensors")
    assert cube.text == text and cube.input_ids[0].tolist() == text_ids and cube.num_tokens == len(text_ids)


@pytest.mark.parametrize("save, why", [
    ({"save": "bad1", "text": "not the prompt's text"}, "not the memory's"),
    ({"save": "bad2", "tokens": 10 ** 6}, "must be an int in"),
    ({"save": "../up"}, "cube name"),
    ({"save": "bad3", "namespace": "nobody"}, "namespace 'nobody' is not served"),
    ({"save": "bad4", "cubes": ["a", "b"]}, "approximate"),
])
def test_a_refused_save_is_logged_and_the_request_answered(llm, memory, folder, kvmem_log, save, why):
    ids = prompt_of(memory, "a", "b")
    full, _, _ = full_prefill(llm, ids)
    before = len(kvmem_log.lines)
    got, _, _ = run(llm, ids, save)
    assert got == full or "cubes" in save  # two cubes: the composed answer, served; only the save is refused
    logged = "\n".join(kvmem_log.lines[before:])
    assert "its cube is not saved" in logged and why in logged, logged
    assert not list(folder.glob("*/bad*.safetensors")) and not list(folder.glob("*/.*"))


def test_layerwise_loads_are_awaited_before_each_layer_attends(llm, memory, monkeypatch):
    """A slow loader thread (20 ms per layer) must not change the answer: vLLM waits for each layer's KV just before
    that layer's attention (wait_for_layer_load), and every layer is waited for."""
    import time

    from kvmem.integrations.vllm_pages import LayerWriter

    write, wait, waited = LayerWriter._write, LayerWriter.wait, []

    def slow_write(self, loads, layers):
        for item in layers:
            time.sleep(0.02)
            write(self, loads, [item])

    def counting_wait(self, name):
        waited.append(name)
        wait(self, name)

    monkeypatch.setattr(LayerWriter, "_write", slow_write)
    monkeypatch.setattr(LayerWriter, "wait", counting_wait)
    ids = prompt_of(memory, "a")
    full, full_lp, _ = full_prefill(llm, ids)
    got, got_lp, cached = run(llm, ids, {"cubes": ["a"]})
    assert cached == 256 and got == full
    torch.testing.assert_close(got_lp, full_lp, atol=1e-3, rtol=0)
    assert len(set(waited)) == len(memory["a"].kv)  # one wait per attention layer
