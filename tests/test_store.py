"""The cube store: namespaces and isolation, bad names, concurrent writers, a writer killed mid-write."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import kvmem

from helpers import random_ids, tiny_model


@pytest.fixture(scope="module")
def cube_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cube") / "c.safetensors"
    kvmem.MemCube.from_ids(tiny_model("llama"), random_ids(16), text="sixteen random tokens").save(path)
    return path


def test_store_round_trip_and_namespaces(tmp_path, cube_file):
    store = kvmem.CubeStore(tmp_path / "s")
    store.grant("public", "bob")  # reading another namespace needs its owner's grant (issue 11 #8)
    alice, bob = store.view("alice"), store.view("bob", shared=["public"])
    public = store.view("public")
    cube = kvmem.MemCube.load(cube_file)
    alice.add("secret", "Alice's PIN is 4417.")
    alice.put_cube("secret", cube, text="Alice's PIN is 4417.")
    bob.add("note", "Bob likes tea.")
    public.add("faq", "The office opens at nine.")

    assert alice.get("secret").kind == "memcube" and alice.load_cube("secret").fingerprint == cube.fingerprint
    # isolation at the store API: bob cannot see, load, list, search or delete alice's memory
    assert bob.get("secret") is None and bob.load_cube("secret") is None
    assert {r.id for r in bob.ls()} == {"note", "faq"} and bob.rm("secret") is False
    assert alice.get("secret") is not None
    index = kvmem.MemoryIndex.from_store(bob, dense=False)
    assert "secret" not in index and [m for m, _ in index.search("PIN 4417 Alice", k=5)] != ["secret"]
    assert all(m != "secret" for m, _ in index.search("PIN 4417 Alice", k=5))
    # shared namespaces are read-only through another view
    assert bob.get("faq").namespace == "public" and bob.rm("faq") is False and public.get("faq") is not None
    # same id in two namespaces: each view sees its own first
    bob.add("faq", "Bob's own faq.")
    assert bob.get("faq").text == "Bob's own faq." and public.get("faq").text == "The office opens at nine."
    assert alice.rm("secret") and alice.get("secret") is None
    assert not any((tmp_path / "s" / "cubes").glob("*.safetensors"))  # its cube file went with it


def test_store_rejects_bad_names(tmp_path):
    store = kvmem.CubeStore(tmp_path / "s")
    for bad in ("", "../x", "a/b", "x" * 200, None):
        with pytest.raises(kvmem.CubeError, match="namespace"):
            store.view(bad)
        with pytest.raises(kvmem.CubeError, match="memory id"):
            store.view("ok").add(bad, "text")
    with pytest.raises(kvmem.CubeError, match="non-empty"):
        store.view("ok").add("m", "   ")


def _writer(root, cube_file, worker, n):
    store = kvmem.CubeStore(root)
    view = store.view(f"w{worker % 2}")
    cube = kvmem.MemCube.load(cube_file)
    for i in range(n):
        view.add(f"m{worker}-{i}", f"memory {i} of worker {worker}")
        view.put_cube(f"m{worker}-{i}", cube)
        view.put_cube("shared-id", cube)  # everyone rewrites one id too: last writer wins, nothing torn


def test_concurrent_writers_lose_nothing(tmp_path, cube_file):
    root = tmp_path / "s"
    kvmem.CubeStore(root)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(root, cube_file, w, 6)) for w in range(4)]
    for p in procs:
        p.start()
    store = kvmem.CubeStore(root)
    reads = 0
    while any(p.is_alive() for p in procs):  # read while they write: never a partial or invalid cube
        for ns in ("w0", "w1"):
            for rec in store.view(ns).ls():
                if store.view(ns).load_cube(rec.id) is not None:
                    reads += 1
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    for ns, workers in (("w0", (0, 2)), ("w1", (1, 3))):
        ids = {r.id for r in store.view(ns).ls()}
        assert ids == {f"m{w}-{i}" for w in workers for i in range(6)} | {"shared-id"}
        for memory_id in ids:
            assert store.view(ns).load_cube(memory_id) is not None
    files = {p.name for p in (root / "cubes").glob("*.safetensors")}
    assert len(files) == len(store.catalog.paths()) == 2 * 13  # replaced versions were removed


def test_killed_writer_leaves_store_consistent(tmp_path, cube_file):
    root = tmp_path / "s"
    script = textwrap.dedent(f"""
        import kvmem
        view = kvmem.CubeStore({str(root)!r}).view("k")
        cube = kvmem.MemCube.load({str(cube_file)!r})
        i = 0
        while True:
            view.put_cube(f"m{{i % 5}}", cube, text=f"memory {{i}}")
            i += 1
            print(i, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for _ in range(8):  # wait until it is writing in earnest (imports take a while), then kill it mid-loop
        assert proc.stdout.readline(), "the writer died on its own"
    time.sleep(0.137)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = kvmem.CubeStore(root)
    recs = store.view("k").ls()
    assert recs, "the writer never got going"
    for rec in recs:
        assert store.view("k").load_cube(rec.id) is not None  # every row's file is whole and valid
    named = store.catalog.paths()
    for f in (root / "cubes").iterdir():  # anything else is an orphan or temp file that gc may remove
        os.utime(f, (0, 0))
    store.gc()
    assert {f"cubes/{f.name}" for f in (root / "cubes").iterdir()} == named


@pytest.mark.parametrize("meta, match", [({"date": "last Tuesday"}, r"meta\['date'\]"), ({"date": 20230508}, "ISO"),
                                         ({"speaker": ""}, r"meta\['speaker'\]"), ({"speaker": 7}, "speaker")])
def test_store_refuses_meta_the_index_cannot_read(tmp_path, meta, match):
    """A record the index would refuse at search time is refused at write time, so it never breaks a request."""
    view = kvmem.CubeStore(tmp_path / "s").view("me")
    with pytest.raises(kvmem.CubeError, match=match):
        view.add("m", "Caroline went to the support group.", meta)
    assert view.get("m") is None
    view.add("m", "Caroline went to the support group.", {"date": "2023-05-08", "speaker": "Caroline"})


def test_an_index_over_a_view_keeps_the_same_id_in_two_namespaces_apart(tmp_path):
    store = kvmem.CubeStore(tmp_path / "s")
    store.view("public").add("faq", "The office opens at nine.")
    store.grant("public", "bob")
    bob = store.view("bob", shared=["public"])
    bob.add("faq", "Bob's own faq: the kettle is broken.")
    index = kvmem.MemoryIndex.from_store(bob, dense=False)
    assert set(index.ids) == {"bob/faq", "public/faq"}
    (top, _), = index.search("When does the office open?", k=1)
    assert top == "public/faq" and bob.get(top).text == "The office opens at nine."
