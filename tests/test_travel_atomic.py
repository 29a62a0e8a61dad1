"""An install of a 1,000-memory bundle is all or nothing, for readers and under SIGKILL, on both store backends.

- A reader polling ``ls()`` (and loading a cube) in another process while a child installs sees the namespace as
  before or as installed, never a mix; the same reader does see mixes when the child commits row by row (the store
  before batches), so the check can fail.
- A child killed with SIGKILL at points spread over the install (staging its first and last cube, just before and
  just after the one commit, while deleting replaced cubes, and at a moment the parent picks) leaves a store whose
  next open (a fresh `CubeStore`, nothing else) shows exactly the old or the new namespace, with no journal, no
  reservation and no cube file left that no row names.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import kvmem
from helpers import random_ids, tiny_model
from travel_helpers import make_key

pytest.importorskip("cryptography")

N = 1000
CUBES = 20          # every 50th memory carries a MemCube
ROOT = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).resolve().parent / "travel_kill.py"
HAS_REDIS = shutil.which("redis-server") is not None and importlib.util.find_spec("redis") is not None


def _fill(store, namespace: str, version: int, model) -> None:
    from kvmem.store.batch import Batch

    batch = Batch(store)  # one commit (memory by memory, 1,000 fsynced transactions take a minute on a VM disk)
    for i in range(N):
        text = f"memory {i} of version {version}: " + "lorem ipsum " * (i % 7)
        if i % (N // CUBES) == 0:
            cube = kvmem.MemCube.from_ids(model, random_ids(4 + i % 5, seed=i + version), text=text)
            batch.put_cube(namespace, f"m{i:04d}", cube, text=text, meta={"turn": i})
        else:
            batch.add(namespace, f"m{i:04d}", text, {"turn": i, "v": version})
    batch.commit()


def _state(store, namespace: str = "bob") -> dict:
    """{id: (kind, text, meta without the install time, fingerprint, the bundle's digest)}."""
    from kvmem.travel.provenance import PROVENANCE

    out = {}
    for rec in store.view(namespace).ls():
        meta = dict(rec.meta)
        prov = meta.pop(PROVENANCE, None)
        out[rec.id] = (rec.kind, rec.text, json.dumps(meta, sort_keys=True), rec.fingerprint, prov and prov["digest"])
    return out


def _leftovers(store) -> list[str]:
    """What a finished or recovered install must not leave: journals, reservations, cube blobs no row names."""
    named, reserved, _ = store.catalog.references(expire_before=0.0)
    out = [f"journal {r.id}" for r in store.view("kvmem.batches").ls()]
    out += [f"reservation {b}" for b in reserved]
    out += [f"unnamed blob {b}" for b in set(store.blobs.names()) - named]
    out += [f"missing blob {b}" for b in named - set(store.blobs.names())]
    return out


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    from kvmem.travel import pack_namespace

    folder = tmp_path_factory.mktemp("bundles")
    model = tiny_model("llama")
    key = make_key(folder)
    src = kvmem.CubeStore(folder / "src")
    _fill(src, "alice", 1, model)
    v1 = pack_namespace(src, "alice", folder / "v1.kvmem", key=key, sequence=1)
    _fill(src, "alice", 2, model)
    v2 = pack_namespace(src, "alice", folder / "v2.kvmem", key=key, sequence=2)
    return v1.path, v2.path, key, folder / "alice.key.pub"


@pytest.fixture(scope="module", params=["folder", "redis"])
def backend(request, tmp_path_factory):
    """``new()`` -> the location of a fresh, empty store of this backend."""
    folder = Path(os.environ.get("KVMEM_FAST_TMP", "/dev/shm"))
    if not (folder.is_dir() and os.access(folder, os.W_OK)):
        folder = tmp_path_factory.mktemp("stores")  # tmpfs where there is one: SIGKILL is not a power cut
    if request.param == "folder":
        import tempfile

        with tempfile.TemporaryDirectory(dir=folder, prefix="kvmem-test-") as tmp:
            yield lambda: Path(tmp) / uuid.uuid4().hex[:8]
        return
    if not HAS_REDIS:
        pytest.skip("redis-server or the redis client is not installed (CI installs both)")
    from test_store_redis import redis_server, store_url

    tmp = tmp_path_factory.mktemp("redis")
    with redis_server(tmp) as url:
        yield lambda: store_url(url, tmp)


def _states(bundles, new):
    """(before, after): the namespace with v1 installed, and with v2 installed over it (a reference store)."""
    from kvmem.travel import TrustList, install_bundle

    v1, v2, key, _ = bundles
    reference = kvmem.CubeStore(new())
    install_bundle(v1, reference, "bob", trust=TrustList([key.public]))
    before = _state(reference)
    install_bundle(v2, reference, "bob", trust=TrustList([key.public]))
    after = _state(reference)
    assert len(before) == len(after) == N and before != after
    return before, after


def _with_v1(bundles, new):
    from kvmem.travel import TrustList, install_bundle

    location = new()
    install_bundle(bundles[0], location, "bob", trust=TrustList([bundles[2].public]))
    return location


def _child(bundles, location, points: str, log: Path | None = None, tmpdir: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(CHILD.parent), os.environ.get("PYTHONPATH", "")])}
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    args = [sys.executable, str(CHILD), str(bundles[1]), str(location), str(bundles[3]), "bob", points]
    return subprocess.Popen(args + ([str(log)] if log else []), env=env, cwd=ROOT, stderr=subprocess.PIPE)


def _wait(child: subprocess.Popen) -> int:
    _, err = child.communicate(timeout=300)  # reaps the child: a killed install's process is gone
    if child.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(err.decode()[-2000:])
    return child.returncode


@pytest.mark.parametrize("points", ["none", "rowwise"])
def test_a_reader_never_sees_a_partial_install(bundles, backend, points):
    before, after = _states(bundles, backend)
    location = _with_v1(bundles, backend)
    seen = {"before": 0, "after": 0, "mix": 0}
    child = _child(bundles, location, points)
    reader = kvmem.CubeStore(location)
    while True:
        done = child.poll() is not None
        state = _state(reader)
        kind = "before" if state == before else "after" if state == after else "mix"
        seen[kind] += 1
        # the row's own cube file (load_cube checks the file's stamp against the row it read), either version
        cube = reader.view("bob").load_cube("m0000")
        assert cube is not None and cube.text in (before["m0000"][1], after["m0000"][1])
        if done:
            break
        if kind == "mix" and points == "rowwise":  # the control has shown what it must: stop it there
            child.send_signal(signal.SIGKILL)
            assert _wait(child) == -signal.SIGKILL and seen["before"], seen
            return
        time.sleep(0.005)  # leave the child a core
    assert _wait(child) == 0 and _state(reader) == after
    assert seen["before"] and seen["after"], seen  # it read on both sides of the commit
    assert seen["mix"] == 0 and points == "none", seen  # the control (row by row) must have seen a mix


KILLS = ["put:1", f"put:{CUBES}", "commit:before", "commit:after", "delete:3", "parent"]


def test_sigkill_anywhere_leaves_the_old_or_the_new_namespace(bundles, backend):
    before, after = _states(bundles, backend)
    outcomes = {}
    for point in KILLS:
        location = _with_v1(bundles, backend)
        if point == "parent":  # killed from outside, at a moment the parent picks: once the install is staging
            child, store = _child(bundles, location, "ttl:2"), kvmem.CubeStore(location)
            while child.poll() is None and not store.view("kvmem.batches").ls():
                time.sleep(0.002)
            time.sleep(0.01)
            child.send_signal(signal.SIGKILL)
            killed = _wait(child) == -signal.SIGKILL
        else:
            # (ttl: a killed child's Redis lock expires 2 s after its last renewal, not 30 s: faster reinstalls)
            killed = _wait(_child(bundles, location, f"{point},ttl:2")) == -signal.SIGKILL
        store = kvmem.CubeStore(location)  # the next open: the only recovery step
        state = _state(store)
        assert state in (before, after), f"killed at {point}: the namespace is neither as before nor installed"
        assert _leftovers(store) == [], f"killed at {point}"
        outcomes[point] = ("killed" if killed else "finished", "after" if state == after else "before")
        if state == before and point == "commit:before":  # a later install of the same bundle completes
            from kvmem.travel import TrustList, install_bundle

            install_bundle(bundles[1], store, "bob", trust=TrustList([bundles[2].public]))
            assert _state(store) == after and _leftovers(store) == []
    assert all(how == "killed" for how, _ in list(outcomes.values())[:-1]), outcomes
    assert [outcomes[p][1] for p in KILLS[:3]] == ["before"] * 3, outcomes
    assert [outcomes[p][1] for p in KILLS[3:5]] == ["after"] * 2, outcomes


def test_a_killed_installs_extracted_units_are_removed_by_the_next_install(bundles, tmp_path, monkeypatch):
    """A SIGKILLed install cannot remove the folder it extracted the bundle to (as large as the bundle): the next
    install by this user removes it, and leaves alone the folder of an install whose process still runs."""
    import tempfile

    from kvmem.store.batch import owner
    from kvmem.travel import TrustList, install_bundle

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    location = tmp_path / "store"
    install_bundle(bundles[0], location, "bob", trust=TrustList([bundles[2].public]))
    assert _wait(_child(bundles, location, "put:1", tmpdir=tmp)) == -signal.SIGKILL
    left = list(tmp.glob("kvmem-install-*"))
    assert len(left) == 1 and any(left[0].iterdir()), left  # what the killed install left (the control)
    me = owner()
    if not me["start"]:
        pytest.skip("no /proc here: kvmem cannot tell a dead install's folder from a live one and keeps both")
    alive = tmp / f"kvmem-install-{me['pid']}-{me['start']}-live"  # this process runs: its folder stays
    alive.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    install_bundle(bundles[1], location, "bob", trust=TrustList([bundles[2].public]))
    assert sorted(p.name for p in tmp.iterdir()) == [alive.name]


def _log(path: Path) -> list[tuple[str, int, float]]:
    if not path.exists():
        return []
    return [(what, int(pid), float(t)) for what, pid, t in (line.split() for line in path.read_text().splitlines())]


def test_two_installs_into_one_namespace_take_turns(bundles, backend, tmp_path):
    """Two processes install into one namespace at once: the second reaches the namespace's lock while the first
    holds it (the first pauses 5 s just before its commit) and waits; both land."""
    from kvmem.travel import TrustList, install_bundle, pack_namespace

    location = backend()
    source = kvmem.CubeStore(tmp_path / "src")
    source.view("carol").add("c1", "Carol's own memory.")
    other = pack_namespace(source, "carol", tmp_path / "carol.kvmem", key=bundles[2], sequence=1)
    log = tmp_path / "log"
    first = _child(bundles, location, "pause:5", log)
    while not any(what == "enter" for what, _, _ in _log(log)):
        assert first.poll() is None
        time.sleep(0.02)
    second = _child((bundles[0], other.path, *bundles[2:]), location, "pause:0.1", log)
    assert _wait(first) == 0 and _wait(second) == 0
    lines = _log(log)
    one, two = first.pid, second.pid
    events = [(what, pid) for what, pid, _ in lines if what != "start"]
    assert events == [("enter", one), ("exit", one), ("enter", two), ("exit", two)], lines  # never both inside
    started = next(t for what, pid, t in lines if (what, pid) == ("start", two))
    first_done = next(t for what, pid, t in lines if (what, pid) == ("exit", one))
    assert started < first_done  # the second was running while the first held the lock: it had to wait
    state = _state(kvmem.CubeStore(location))
    assert len(state) == N + 1 and "c1" in state
    assert install_bundle(other.path, location, "bob", trust=TrustList([bundles[2].public])).already


def test_a_dead_installers_lock_does_not_block(bundles, backend, tmp_path):
    """An installer SIGKILLed while it holds the namespace's lock: the next install goes ahead (a local lock dies
    with its process; a Redis lock expires, here 1 s after its last renewal, well within the 10 s waited)."""
    from kvmem.travel import TrustList, install_bundle

    location = backend()
    log = tmp_path / "log"
    child = _child(bundles, location, "pause:120,ttl:1", log)
    while not any(what == "enter" for what, _, _ in _log(log)):
        assert child.poll() is None
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    assert _wait(child) == -signal.SIGKILL
    install_bundle(bundles[0], location, "bob", trust=TrustList([bundles[2].public]), lock_wait=10)
    store = kvmem.CubeStore(location)
    assert len(_state(store)) == N and _leftovers(store) == []
