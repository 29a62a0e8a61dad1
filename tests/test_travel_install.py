"""Packing a namespace and installing it elsewhere (kvmem/travel/pack.py, install.py): what arrives equals what left,
with its provenance; bad bundles (tampered, unsigned, untrusted, replayed, bound to another model, escaping names)
install nothing; an install is all units or none, even when killed."""

from __future__ import annotations

import json
import random

import pytest
import torch

import kvmem
from kvmem.errors import CubeError, FingerprintMismatch
from helpers import last_logits, logit_tol, random_ids, tiny_model
from travel_helpers import (fill_store, make_key, raw_bundle, record_bytes, regions, snapshot, text_entry,
                            trust_of)

pytest.importorskip("cryptography")


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture
def packed(tmp_path, llama):
    """(source store, its snapshot, bundle, key): namespace alice, 4 memories, 2 with cubes, signed by alice."""
    from kvmem.travel import pack_namespace

    source = kvmem.CubeStore(tmp_path / "src")
    fill_store(source, "alice", llama)
    key = make_key(tmp_path)
    bundle = pack_namespace(source, "alice", tmp_path / "alice.kvmem", key=key, author="Alice", license="CC-BY-4.0",
                            description="team facts", sequence=5)
    return source, snapshot(source, "alice"), bundle, key


def _install(bundle, store, namespace="bob", **kw):
    from kvmem.travel import install_bundle

    return install_bundle(bundle.path if hasattr(bundle, "path") else bundle, store, namespace, **kw)


def test_installed_memories_equal_the_packed_ones(packed, tmp_path, llama):
    from kvmem.travel import PROVENANCE

    source, before, bundle, key = packed
    store = kvmem.CubeStore(tmp_path / "dst")
    report = _install(bundle, store, trust=trust_of(key), label="https://example.org/alice.kvmem")
    assert sorted(report.installed) == ["m0", "m1", "m2", "m3"] and not report.replaced and not report.already
    after = snapshot(store, "bob")
    assert set(after) == set(before)
    for memory_id, (kind, text, meta, fingerprint, kv) in before.items():
        got = after[memory_id]
        assert got[:2] == (kind, text) and got[3:] == (fingerprint, kv)  # the same cube bytes, bound to one model
        got_meta = json.loads(got[2])
        prov = got_meta.pop(PROVENANCE)
        assert got_meta == json.loads(meta)
        assert prov["signer"] == key.public.key_id and prov["trusted"] and prov["sequence"] == 5
        assert prov["author"] == "Alice" and prov["license"] == "CC-BY-4.0" and prov["digest"] == bundle.digest
        assert prov["source"] == "https://example.org/alice.kvmem"
        assert (prov.get("fingerprint") is not None) == (kind == "memcube")
    # packed again by its new owner, each memory carries where it came from as lineage, not as its own provenance
    from kvmem.travel import pack_namespace

    again = pack_namespace(store, "bob", tmp_path / "bob.kvmem", key=make_key(tmp_path, "bob"))
    for unit in again.memories():
        assert unit.entry["lineage"][-1]["bundle"] == "alice" and unit.entry["lineage"][-1]["digest"] == bundle.digest
    # and the installed cube answers as a full prefill of the same ids does
    cube = store.view("bob").load_cube("m1")
    prefix = kvmem.prefill(llama, cube)
    query = random_ids(5, seed=7)
    full = last_logits(llama, prefix.extend(query))
    got = last_logits(llama, query[None], cache=prefix.cache)
    torch.testing.assert_close(got, full, rtol=0, atol=logit_tol(torch.float32, full.abs().max().item()))


def test_unsigned_and_untrusted_bundles_are_refused(packed, tmp_path):
    from kvmem.travel import PROVENANCE, pack_namespace

    source, _, bundle, key = packed
    store = kvmem.CubeStore(tmp_path / "dst")
    with pytest.raises(CubeError, match="not in"):
        _install(bundle, store, trust=trust_of())
    unsigned = pack_namespace(source, "alice", tmp_path / "u.kvmem", sequence=1)
    with pytest.raises(CubeError, match="not signed"):
        _install(unsigned, store, trust=trust_of(key))
    assert store.view("bob").ls() == []
    report = _install(unsigned, store, trust=trust_of(key), allow_unsigned=True)
    assert len(report.installed) == 4 and report.signer is None
    prov = store.view("bob").get("m0").meta[PROVENANCE]
    assert prov["signer"] is None and prov["unsigned_allowed"] and not prov["trusted"]


def test_fuzzed_bundles_install_nothing(packed, tmp_path):
    """N = 520 mutations spread over every byte region of a signed bundle: 0 installed, the store untouched."""
    source, _, bundle, key = packed
    store = kvmem.CubeStore(tmp_path / "dst")
    store.view("bob").add("keep", "a memory that was here before")
    before, version = snapshot(store, "bob"), store.version()
    data = bundle.path.read_bytes()
    parts = regions(bundle)
    rng = random.Random(2025)
    installed = tried = 0
    for trial in range(520):
        what, start, end = parts[trial % len(parts)]
        bad = bytearray(data)
        i = rng.randrange(start, end)
        if trial % 3 == 0:
            bad[i] ^= 1 << rng.randrange(8)
        elif trial % 3 == 1:
            bad[i:i + 8] = rng.randbytes(8)
        else:
            bad = bad[:i]
        if bytes(bad) == data:
            continue
        tried += 1
        path = tmp_path / "bad.kvmem"
        path.write_bytes(bytes(bad))
        try:
            _install(path, store, trust=trust_of(key))
            installed += 1
        except CubeError:
            pass
    assert tried >= 500 and installed == 0
    assert snapshot(store, "bob") == before and store.version() == version


def test_replayed_older_bundle_is_refused(packed, tmp_path):
    from kvmem.travel import pack_namespace

    source, _, bundle, key = packed
    store = kvmem.CubeStore(tmp_path / "dst")
    trust = trust_of(key)
    source.view("alice").add("m0", "Alice moved to Bergen.", {"turn": 9})
    newer = pack_namespace(source, "alice", tmp_path / "v6.kvmem", key=key, sequence=6)
    _install(newer, store, trust=trust)
    assert store.view("bob").get("m0").text == "Alice moved to Bergen."
    with pytest.raises(CubeError, match="older bundle never replaces a newer"):
        _install(bundle, store, trust=trust)
    assert store.view("bob").get("m0").text == "Alice moved to Bergen."
    assert _install(newer, store, trust=trust).already  # the same bundle again: nothing to do
    source.view("alice").add("m9", "a new memory")
    clash = pack_namespace(source, "alice", tmp_path / "v6b.kvmem", key=key, sequence=6)
    with pytest.raises(CubeError, match="same sequence"):
        _install(clash, store, trust=trust)
    # another namespace has its own ledger: the older bundle installs there
    assert len(_install(bundle, store, "carol", trust=trust).installed) == 4


def test_units_bound_to_another_model_are_refused(packed, tmp_path, llama):
    source, _, bundle, key = packed
    store = kvmem.CubeStore(tmp_path / "dst")
    other = tiny_model("qwen2")
    with pytest.raises(FingerprintMismatch):
        _install(bundle, store, trust=trust_of(key), model=other)
    # a namespace whose cubes belong to another model
    store.view("bob").put_cube("x", kvmem.MemCube.from_ids(other, random_ids(5)), text="x")
    with pytest.raises(CubeError, match="migrate"):
        _install(bundle, store, trust=trust_of(key))
    assert [r.id for r in store.view("bob").ls()] == ["x"]
    assert len(_install(bundle, store, trust=trust_of(key), model=llama).installed) == 4


def test_escaping_names_and_forged_provenance_are_refused(tmp_path):
    """Signed by a trusted key, still refused: names that would escape, a record that is not its unit's, provenance
    the bundle wrote itself, a reserved namespace."""
    key = make_key(tmp_path)
    store = kvmem.CubeStore(tmp_path / "dst")
    cases = {
        "id": ({**text_entry("../../x", "hi")}, record_bytes("../../x", "hi")),
        "malformed": (text_entry("m0", "hi"), record_bytes("m1", "hi")),
        "text_sha256": (text_entry("m0", "hi"), record_bytes("m0", "hello")),
        "provenance": (text_entry("m0", "hi"), record_bytes("m0", "hi", {"kvmem:provenance": {"signer": "x"}})),
        "meta": (text_entry("m0", "hi"), record_bytes("m0", "hi", {"turn": "first"})),
    }
    for match, (entry, data) in cases.items():
        path = raw_bundle(tmp_path / "x.kvmem", {"name": "x", "units": [entry]}, [data], key=key)
        with pytest.raises(CubeError, match=match):
            _install(path, store, trust=trust_of(key))
    ok = raw_bundle(tmp_path / "ok.kvmem", {"name": "x", "units": [text_entry("m0", "hi")]},
                    [record_bytes("m0", "hi")], key=key)
    for namespace in ("kvmem.installs", "../up", "a/b"):
        with pytest.raises(CubeError):
            _install(ok, store, namespace, trust=trust_of(key))
    assert store.view("bob").ls() == []
    assert _install(ok, store, trust=trust_of(key)).installed == ["m0"]


def test_a_cube_of_another_memory_or_model_than_declared(packed, tmp_path, llama):
    """The cube file itself must be bound to the fingerprint its unit declares."""
    import tarfile

    source, _, bundle, key = packed
    manifest = json.loads(bundle.manifest_bytes)
    with tarfile.open(bundle.path) as tar:
        units = [tar.extractfile(u["file"]).read() for u in manifest["units"]]
    for u in manifest["units"]:
        if u["kind"] == "memcube":
            u["fingerprint"] = "f" * 16
    manifest["model"]["fingerprint"] = "f" * 16
    for u in manifest["units"]:
        u.pop("file"), u.pop("bytes"), u.pop("sha256")
    for key_ in ("format", "format_version", "created", "created_unix"):
        manifest.pop(key_)
    path = raw_bundle(tmp_path / "x.kvmem", manifest, units, key=key)
    with pytest.raises(CubeError, match="bound to model"):
        _install(path, kvmem.CubeStore(tmp_path / "dst"), trust=trust_of(key))


def test_adapters_travel_with_their_bundle(packed, tmp_path, llama):
    """AdapterCubes of the namespace's adapter folder are packed, installed into the new store's folder with their
    provenance, replaced only by a later sequence of the same bundle, and refused for another base model."""
    peft = pytest.importorskip("peft")
    from kvmem.travel import PROVENANCE, pack_namespace

    source, _, _, key = packed
    torch.manual_seed(3)
    lora = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                      init_lora_weights=False))
    original = kvmem.AdapterCube.from_peft(lora, name="style")
    original.save(source.root / "adapters" / "alice" / "style.safetensors")
    bundle = pack_namespace(source, "alice", tmp_path / "a.kvmem", key=key, sequence=5)
    assert [u.id for u in bundle.units if u.kind == "adaptercube"] == ["style"]
    store = kvmem.CubeStore(tmp_path / "dst")
    report = _install(bundle, store, trust=trust_of(key))
    path = tmp_path / "dst" / "adapters" / "bob" / "style.safetensors"
    assert report.adapters == [str(path)]
    installed = kvmem.AdapterCube.load(path)
    assert installed.digest == original.digest and installed.fingerprint == original.fingerprint
    assert installed.meta[PROVENANCE]["bundle"] == "alice" and installed.meta[PROVENANCE]["sequence"] == 5
    installed.check_base(llama)
    newer = pack_namespace(source, "alice", tmp_path / "b.kvmem", key=key, sequence=6)
    _install(newer, store, trust=trust_of(key))
    assert kvmem.AdapterCube.load(path).meta[PROVENANCE]["sequence"] == 6
    # a file of the same name that did not come from this bundle is never overwritten
    other = kvmem.CubeStore(tmp_path / "other")
    original.save(tmp_path / "other" / "adapters" / "bob" / "style.safetensors")
    with pytest.raises(CubeError, match="did not come from bundle"):
        _install(bundle, other, trust=trust_of(key))
    with pytest.raises(FingerprintMismatch):
        _install(bundle, kvmem.CubeStore(tmp_path / "third"), trust=trust_of(key), model=tiny_model("qwen2"))


@pytest.mark.parametrize("where", ["staging a cube", "the commit"])
def test_an_error_mid_install_undoes_what_was_written(packed, tmp_path, monkeypatch, where):
    """A write that fails halfway (disk full, a store gone) leaves the namespace as it was, with no journal, no
    staged cube file and no reservation left, without waiting for a recovery."""
    import sqlite3

    from kvmem.store.folder import LocalBlobs
    from kvmem.store.local import SQLiteCatalog

    source, _, bundle, key = packed
    store = kvmem.CubeStore(tmp_path / "dst")
    store.view("bob").add("m2", "an older text of m2", {"turn": 1})
    before, files = snapshot(store, "bob"), sorted((tmp_path / "dst" / "cubes").iterdir())
    calls = []
    if where == "staging a cube":
        real_put = LocalBlobs.put

        def failing(self, name, staged):
            calls.append(name)
            if len(calls) == 2:
                raise CubeError("writing failed: disk full (simulated)")
            return real_put(self, name, staged)

        monkeypatch.setattr(LocalBlobs, "put", failing)
    else:
        def failing(self, records):
            calls.append(len(records))
            raise CubeError("writing failed: disk full (simulated)")

        monkeypatch.setattr(SQLiteCatalog, "upsert_many", failing)
    with pytest.raises(CubeError, match="disk full"):
        _install(bundle, store, trust=trust_of(key))
    monkeypatch.undo()
    assert calls  # the failure was reached
    assert snapshot(store, "bob") == before
    assert sorted((tmp_path / "dst" / "cubes").iterdir()) == files  # staged cubes removed again
    assert store.view("kvmem.batches").ls() == []
    with sqlite3.connect(tmp_path / "dst" / "catalog.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM reservations").fetchone()[0] == 0
    assert len(_install(bundle, store, trust=trust_of(key)).installed) == 3


def test_pack_reads_a_namespace_between_installs(packed, tmp_path):
    """Packing holds the namespace's lock, so it never pairs a memory's old text with the cube an install just
    committed (or old memories with new adapter files)."""
    from kvmem.store.batch import lock
    from kvmem.travel import pack_namespace

    source, _, _, key = packed
    with lock(source, "alice", wait=1):  # an install into alice is running
        with pytest.raises(CubeError, match="'alice' is locked by pid"):
            pack_namespace(source, "alice", tmp_path / "x.kvmem", key=key, lock_wait=0.2)
    assert not (tmp_path / "x.kvmem").exists()
    assert pack_namespace(source, "alice", tmp_path / "x.kvmem", key=key, lock_wait=0.2).units
