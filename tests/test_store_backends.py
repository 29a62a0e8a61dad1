"""Conformance of store backends: every backend (local SQLite + folder here; Redis in its own test module adds
itself to STORE_BACKENDS) keeps the same promises through `CubeStore`: atomic visibility, namespaces, grants,
change detection and a gc that never deletes a live or committed cube."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import kvmem
from kvmem.store.records import check_blob, new_blob_name


def tiny_cube(text: str = "sixteen random tokens", seed: int = 0, *, tokens: int = 16,
              hidden: int = 32) -> kvmem.MemCube:
    """A real MemCube from a 2-layer random llama (no download, 2 KV heads of ``hidden`` / 4), cheap enough to build
    per test."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(128, tokens))
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (tokens,), generator=torch.Generator().manual_seed(seed))
    return kvmem.MemCube.from_ids(model, ids, text=text)


def _local(tmp_path):
    return lambda name="s": kvmem.CubeStore(tmp_path / name)


# name -> factory(tmp_path) returning make_store(name="s") -> a fresh CubeStore; backends add themselves here
STORE_BACKENDS = {"local": _local}


@pytest.fixture(params=sorted(STORE_BACKENDS))
def make_store(request, tmp_path):
    return STORE_BACKENDS[request.param](tmp_path)


@pytest.fixture(scope="module")
def cube():
    return tiny_cube()


# ---------------------------------------------------------------- atomic visibility
def test_a_row_is_visible_only_with_its_whole_cube(make_store, cube):
    store = make_store()
    view = store.view("me")
    rec = view.put_cube("m", cube)
    assert rec.kind == "memcube" and rec.bytes > 0 and check_blob(rec.blob) == rec.blob
    loaded = view.load_cube("m")
    assert torch.equal(loaded.input_ids, cube.input_ids) and loaded.fingerprint == cube.fingerprint
    # a replaced cube gets a new blob; the old one is gone
    again = view.put_cube("m", cube)
    assert again.blob != rec.blob and store.blobs.local_path(rec.blob) is None
    assert set(store.blobs.names()) == {again.blob}


def test_a_commit_needs_its_reservation(make_store, cube):
    store = make_store()
    name = new_blob_name()
    with pytest.raises(kvmem.CubeError, match="write it again"):  # never a row naming bytes nobody reserved
        store.catalog.upsert(kvmem.store.Record("me", "m", "text", "memcube", blob=name))
    assert store.view("me").get("m") is None
    store.catalog.reserve(name, time.time())
    store.catalog.release(name)
    with pytest.raises(kvmem.CubeError):
        store.catalog.upsert(kvmem.store.Record("me", "m", "text", "memcube", blob=name))


def test_readers_never_see_a_partial_cube(make_store, cube):
    store = make_store()
    view, stop, errors, reads = store.view("me"), threading.Event(), [], [0]

    def read():
        while not stop.is_set():
            try:
                if view.load_cube("m") is not None:
                    reads[0] += 1
            except Exception as exc:  # noqa: BLE001 - any error is the failure this test looks for
                errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(15):
            view.put_cube("m", cube)
    finally:
        stop.set()
        reader.join(timeout=60)
    assert not errors, errors[:1]
    assert view.load_cube("m") is not None


# ---------------------------------------------------------------- namespaces
def test_namespaces_and_qualified_ids(make_store):
    store = make_store()
    store.grant("public", "bob")
    alice, bob, public = store.view("alice"), store.view("bob", shared=["public"]), store.view("public")
    alice.add("pin", "Alice's PIN is 4417.")
    public.add("faq", "The office opens at nine.")
    bob.add("faq", "Bob's own faq.")
    assert bob.get("pin") is None and bob.get("alice/pin") is None and not bob.rm("pin")
    assert bob.get("faq").text == "Bob's own faq."                      # own first
    assert bob.get("public/faq").text == "The office opens at nine."    # the other one, by its qualified id
    assert sorted(r.qualified for r in bob.ls()) == ["bob/faq", "public/faq"]
    with pytest.raises(kvmem.CubeError, match="read-only"):
        bob.add("public/faq", "overwrite")
    assert bob.rm("bob/faq") and bob.get("faq").namespace == "public"


# ---------------------------------------------------------------- grants
def test_sharing_needs_a_grant_and_revoke_applies_at_once(make_store):
    store = make_store()
    store.view("alice").add("pin", "Alice's PIN is 4417.")
    with pytest.raises(kvmem.CubeError, match=r"store.grant\('alice', 'mallory'\)"):
        store.view("mallory", shared=["alice"])
    store.view("alice").share_with("bob")
    bob = store.view("bob", shared=["alice"])
    assert bob.get("pin").namespace == "alice" and ("alice", "bob") in store.grants()
    assert store.view("alice").unshare("bob")
    assert bob.get("pin") is None and bob.namespaces == ("bob",) and bob.ls() == []
    with pytest.raises(kvmem.CubeError, match="has not shared"):
        store.view("bob", shared=["alice"])
    store.grant("alice", "*")  # everyone
    assert store.view("carol", shared=["alice"]).get("pin") is not None
    with pytest.raises(kvmem.CubeError, match="list of namespaces"):
        store.view("carol", shared="alice")


# ---------------------------------------------------------------- change detection
def test_change_detection(make_store, cube):
    store = make_store()
    store.grant("public", "me")
    me, other, public = store.view("me", shared=["public"]), store.view("other"), store.view("public")
    v0 = me.version()
    assert me.changes_since(v0) == (v0, [])
    me.add("a", "text a")
    other.add("x", "invisible to me")
    public.put_cube("p", cube)
    me.rm("a")
    store.revoke("public", "me")
    v1, changes = me.changes_since(v0)
    assert v1 > v0 and v1 == store.version()
    assert changes == [("me", "a", "add"), ("public", "p", "cube"), ("me", "a", "rm"), ("public", "me", "revoke")]
    assert me.changes_since(v1) == (v1, [])
    me.touch("a")  # a use is not a change
    assert me.version() == v1


def test_change_log_trimmed_past_a_reader_says_reread(make_store):
    store = make_store()
    view = store.view("me")
    v0 = view.version()
    for i in range(5):
        view.add(f"m{i}", f"text {i}")
    store.catalog.trim_changes(2)
    now, changes = view.changes_since(v0)
    assert now == view.version() and changes is None
    assert len(view.changes_since(now - 2)[1]) == 2


# ---------------------------------------------------------------- gc
def test_gc_removes_old_orphans_only(make_store, cube):
    store = make_store()
    view = store.view("me")
    kept = view.put_cube("m", cube)
    orphan = new_blob_name()  # bytes no row names and nobody reserved: a crashed writer's
    staged = store.blobs.stage(orphan)
    cube.save(staged)
    store.blobs.put(orphan, staged)
    assert orphan in store.blobs.names()
    report = store.gc()  # young: left to a writer that might still commit it
    assert report.removed == [] and orphan in store.blobs.names()
    report = store.gc(grace_s=0)
    assert report.removed == [f"cubes/{orphan}.safetensors"] and set(store.blobs.names()) == {kept.blob}
    assert view.load_cube("m") is not None


def test_gc_sweep_goes_on_past_a_file_it_may_not_remove(make_store, monkeypatch, caplog):
    """An unfinished file the sweep may not unlink (another user's, a read-only mount) is logged and left; the
    sweep still removes the others and gc finishes."""
    import os
    from pathlib import Path

    store = make_store()
    staged = [Path(store.blobs.stage(new_blob_name())) for _ in range(2)]
    old = time.time() - 3600
    for f in staged:
        f.write_bytes(b"half a cube")
        os.utime(f, (old, old))
    real_unlink = Path.unlink

    def unlink(self, *a, **kw):
        if self == staged[0]:
            raise PermissionError(13, "Permission denied", str(self))
        return real_unlink(self, *a, **kw)
    monkeypatch.setattr(Path, "unlink", unlink)
    with caplog.at_level("WARNING", logger="kvmem.store"):
        report = store.gc(grace_s=0)
    assert staged[1].name in report.swept and not staged[1].exists()
    assert staged[0].exists() and staged[0].name not in report.swept
    assert any("cannot remove" in r.getMessage() and staged[0].name in r.getMessage() for r in caplog.records)


def test_gc_repairs_rows_whose_cube_is_gone(make_store, cube):
    store = make_store()
    view = store.view("me")
    rec = view.put_cube("m", cube)
    view.put_cube("n", cube)
    store.blobs.delete(rec.blob)
    report = store.gc()
    assert report.repaired == ["me/m"]
    assert view.get("m").kind == "text" and view.get("m").text == cube.text and view.load_cube("m") is None
    assert view.load_cube("n") is not None and store.gc().repaired == []


def test_gc_beside_a_live_writer_never_deletes_a_committed_cube(make_store, cube):
    """The race of issue 11 #1: gc (even with no grace at all) between a writer's put and its commit."""
    store = make_store()
    view, stop, errors = store.view("me"), threading.Event(), []

    def write():
        i = 0
        while not stop.is_set():
            try:
                view.put_cube(f"m{i % 4}", cube)
            except kvmem.CubeError:  # gc with no grace expires unfinished writes: a clean error, nothing torn
                pass
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
            i += 1

    writer = threading.Thread(target=write)
    writer.start()
    try:
        deadline = time.time() + 3
        while time.time() < deadline:
            store.gc(grace_s=0)
            for rec in view.ls("memcube"):  # every committed row's cube is there and valid
                assert view.load_cube(rec.id) is not None
    finally:
        stop.set()
        writer.join(timeout=60)
    assert not errors, errors[:1]
    for rec in view.ls():
        assert rec.kind == "text" or view.load_cube(rec.id) is not None
    assert store.gc(grace_s=0).repaired == []


def test_list_derived_finds_every_unit_that_records_sources(make_store, cube):
    """A delete's cascade reads `list_derived` instead of every row: it must hold every row whose meta records
    `derived_from` (a unit made from other memories, in any namespace), and the cascade it feeds must still reach a
    dependant in this backend."""
    from kvmem.store.lineage import source_entry

    store = make_store()
    me, other = store.view("me"), store.view("other")
    me.add("plain", "a memory with no cube")
    me.add("src", '"derived_from" in a text is not lineage')
    me.put_cube("own", cube)
    other.put_cube("unit", cube, derived_from=[source_entry(me.get("src"))])
    found = {r.qualified for r in store.catalog.list_derived()}
    recorded = {r.qualified for r in store.catalog.list(None) if "derived_from" in r.meta}
    assert "other/unit" in recorded and recorded <= found
    assert "me/plain" not in found
    assert found <= {r.qualified for r in store.catalog.list(None)}
    me.add("src", "an edited text")  # the cascade, fed by list_derived, removes the unit in the other namespace
    assert other.get("unit") is None and "other/unit" not in {r.qualified for r in store.catalog.list_derived()}
    assert me.get("own") is not None
