"""Store batches (kvmem/store/batch.py) on both backends: one atomic commit of many rows that checks every
reservation, a journal that the next open of the store rolls back (a dead batch before its commit) or finishes (after
it), and the per-name lock that serialises writers."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

import kvmem
from helpers import random_ids, tiny_model
from kvmem.errors import CubeError
from kvmem.store.batch import BATCHES, Batch, lock, owner, recover_batches
from kvmem.store.records import Record, new_blob_name

HAS_REDIS = shutil.which("redis-server") is not None and importlib.util.find_spec("redis") is not None


@pytest.fixture(scope="module", params=["folder", "redis"])
def new_store(request, tmp_path_factory):
    """``new()`` -> the location of a fresh store of this backend."""
    import uuid

    if request.param == "folder":
        base = tmp_path_factory.mktemp("stores")
        yield lambda: base / uuid.uuid4().hex[:8]
        return
    if not HAS_REDIS:
        pytest.skip("redis-server or the redis client is not installed (CI installs both)")
    from test_store_redis import redis_server, store_url

    tmp = tmp_path_factory.mktemp("redis")
    with redis_server(tmp) as url:
        yield lambda: store_url(url, tmp)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _cube(model, seed, text):
    return kvmem.MemCube.from_ids(model, random_ids(5, seed=seed), text=text)


def _rows(store, namespace="a"):
    return {r.id: (r.kind, r.text, r.blob) for r in store.view(namespace).ls()}


def _loose(store) -> set[str]:
    """Blobs no row names, and reservations left."""
    named, reserved, _ = store.catalog.references(expire_before=0.0)
    return (set(store.blobs.names()) - named) | reserved


def test_upsert_many_is_one_step_and_checks_every_reservation(new_store):
    store = kvmem.CubeStore(new_store())
    store.view("a").add("keep", "a memory that stays")
    before, version = _rows(store), store.version()
    blobs = [new_blob_name() for _ in range(3)]
    for blob in blobs[:2]:  # the third was never reserved (or gc expired it)
        store.catalog.reserve(blob, 0.0)
    records = [Record("a", f"m{i}", f"text {i}", "memcube", {}, "f", 1, 1, blob) for i, blob in enumerate(blobs)]
    with pytest.raises(CubeError, match="a/m2 took so long that gc expired it"):
        store.catalog.upsert_many(records + [Record("b", "x", "another namespace")])
    assert _rows(store) == before and store.view("b").ls() == [] and store.version() == version
    assert store.catalog.references(expire_before=0.0)[1] == set(blobs[:2])  # nothing consumed
    with pytest.raises(CubeError, match="writes a/m0 twice"):
        store.catalog.upsert_many([records[0], Record("a", "m0", "again")])
    store.catalog.reserve(blobs[2], 0.0)
    assert store.catalog.upsert_many(records + [Record("b", "x", "another namespace")]) == []
    assert {k: v[2] for k, v in _rows(store).items() if k != "keep"} == {f"m{i}": b for i, b in enumerate(blobs)}
    now, changes = store.view("a", shared=[]).changes_since(version)
    assert [c[1] for c in changes] == ["m0", "m1", "m2"] and now == version + 4  # one change per row
    # replacing: the old blob comes back for the caller to delete, created and hits are kept
    created = store.view("a").get("m0").created
    assert store.catalog.upsert_many([Record("a", "m0", "text only now", created=created + 100)]) == [blobs[0]]
    assert store.view("a").get("m0").created == created and store.catalog.references(expire_before=0.0)[1] == set()


def test_a_batch_writes_cubes_texts_and_files_at_once(new_store, model, tmp_path):
    store = kvmem.CubeStore(new_store())
    view = store.view("a")
    view.put_cube("old", _cube(model, 1, "the old cube's text"))
    view.add("plain", "plain before")
    old_blob = view.get("old").blob
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "f.bin").write_text("old file")
    batch = Batch(store, label="test")
    batch.put_cube("a", "old", lambda: _cube(model, 2, "a new text"), text="a new text", meta={"turn": 2})
    batch.add("a", "plain", "plain after", {"turn": 3})
    batch.put_file(tmp_path / "files" / "f.bin", lambda path: Path(path).write_text("new file"))
    with pytest.raises(CubeError, match="twice"):
        batch.add("a", "plain", "again")
    report = batch.commit()
    assert report.replaced == [old_blob] and len(report.records) == 2
    cube = view.load_cube("old")  # validated, and checked to be this memory's own file (its stamp)
    assert cube.text == "a new text" and view.get("old").meta == {"turn": 2}
    assert view.get("plain").text == "plain after" and (tmp_path / "files" / "f.bin").read_text() == "new file"
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == ["f.bin"]
    assert store.view(BATCHES).ls() == [] and _loose(store) == set()


def _dead(store, tx):
    """Make the journal of batch ``tx`` look like a dead process's (another host, silent for an hour)."""
    rec = store.catalog.get((BATCHES,), tx)
    journal = {**json.loads(rec.text), "host": "elsewhere", "boot": "", "heartbeat": 0}
    store.catalog.upsert(Record(BATCHES, tx, json.dumps(journal)))


@pytest.mark.parametrize("dies", ["before its commit", "after its commit"])
def test_the_next_open_recovers_a_dead_batch(new_store, model, tmp_path, monkeypatch, dies):
    location = new_store()
    store = kvmem.CubeStore(location)
    store.view("a").put_cube("m", _cube(model, 1, "first"))
    before = _rows(store)
    target = tmp_path / "adapter.bin"
    batch = Batch(store, label="dying")
    batch.put_cube("a", "m", _cube(model, 2, "second"), text="second")
    batch.add("a", "n", "new memory")
    batch.put_file(target, lambda path: Path(path).write_text("new"))
    real = store.catalog.upsert_many

    def killed(records):  # the process "dies" here: nothing after this line of commit() runs
        if dies == "after its commit":
            real(records)
        raise SystemExit("killed")

    monkeypatch.setattr(store.catalog, "upsert_many", killed)
    monkeypatch.setattr("kvmem.store.batch._settle", lambda store, tx: None)  # a dead process undoes nothing
    with pytest.raises(SystemExit):
        batch.commit()
    monkeypatch.undo()
    _dead(store, batch.tx)
    staged = list(tmp_path.glob(".adapter.bin.*.staged"))
    assert len(staged) == 1 and _loose(store)  # what it left: a staged file, a staged blob or an old one
    reopened = kvmem.CubeStore(location)  # opening the store is the only recovery step
    after = _rows(reopened)
    if dies == "before its commit":
        assert after == before and not target.exists()
    else:
        assert after["m"][1] == "second" and after["n"][1] == "new memory" and target.read_text() == "new"
        assert reopened.view("a").load_cube("m").text == "second"
    assert reopened.view(BATCHES).ls() == [] and _loose(reopened) == set() and not list(tmp_path.glob(".*staged"))


def test_a_live_batch_is_left_alone_and_a_damaged_journal_does_not_stop_an_open(new_store, model):
    location = new_store()
    store = kvmem.CubeStore(location)
    batch = Batch(store, label="alive")
    batch.add("a", "x", "text")
    store.catalog.upsert(Record(BATCHES, batch.tx, json.dumps({"tx": batch.tx, "label": "alive", "state": "staging",
                                                               "blobs": [], "files": [], "replaces": [],
                                                               **owner()})))
    kvmem.CubeStore(location)
    assert [r.id for r in store.view(BATCHES).ls()] == [batch.tx]  # its process (this one) is alive
    assert recover_batches(store, force=True) == ["alive: rolled back (it stopped before its commit)"]
    store.catalog.upsert(Record(BATCHES, "junk", "{not json"))
    kvmem.CubeStore(location)  # a warning, not a failed open
    with pytest.raises(CubeError, match="batch journal kvmem.batches/junk is damaged"):
        recover_batches(store)
    store.view(BATCHES).rm("junk")


@pytest.mark.parametrize("forged", [{"files": [["/tmp/.victim", "/tmp/victim"]]},
                                    {"files": [["/tmp/x/.b.t.staged", "/tmp/y/b"]]},
                                    {"blobs": ["../../etc/passwd"]}, {"replaces": ["not-a-blob"]}])
def test_a_forged_journal_touches_nothing(new_store, tmp_path, forged):
    """Recovery renames, deletes and unlinks only what a batch itself names: the hidden staged file beside each
    target (named with the batch's id), and blobs by their checked names."""
    location = new_store()
    store = kvmem.CubeStore(location)
    victim = tmp_path / ".victim"
    victim.write_text("keep me")
    journal = {"tx": "t", "label": "forged", "state": "commit", "blobs": [], "files": [], "replaces": [],
               "host": "elsewhere", "boot": "", "pid": 1, "start": "", "heartbeat": 0, **forged}
    journal["files"] = [[a.replace("/tmp/.victim", str(victim)), b] for a, b in journal["files"]]
    store.catalog.upsert(Record(BATCHES, "t", json.dumps(journal)))
    with pytest.raises(CubeError, match="batch journal kvmem.batches/t is damaged"):
        recover_batches(store)
    assert victim.read_text() == "keep me" and store.view(BATCHES).get("t") is not None


def test_a_lock_is_held_against_every_other_holder(new_store):
    store = kvmem.CubeStore(new_store())
    with lock(store, "team", wait=1):
        with pytest.raises(CubeError, match=r"'team' is locked by pid \d+"):
            with lock(kvmem.CubeStore(store.location), "team", wait=0.2):
                pass
        with lock(store, "other", wait=0.2):  # another name is another lock
            pass
    with lock(store, "team", wait=0.2):  # released
        pass
    with pytest.raises(CubeError, match="lock name"):
        lock(store, "../x", wait=0)
