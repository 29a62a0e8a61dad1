"""An install of a 1,000-memory bundle is all or nothing under SIGKILL: a child process installs, the test kills it at
points spread over the install (while backing up, early and late in the writes, around the commit), and after
`recover_installs` the namespace is exactly as before or exactly as fully installed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kvmem
from helpers import random_ids, tiny_model
from travel_helpers import make_key

pytest.importorskip("cryptography")

N = 1000
ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import sys
from kvmem.travel import TrustList, install_bundle, read_public_key
install_bundle(sys.argv[1], sys.argv[2], sys.argv[4], trust=TrustList([read_public_key(sys.argv[3])]))
"""


def _fill(store, namespace: str, version: int, model) -> None:
    view = store.view(namespace)
    for i in range(N):
        text = f"memory {i} of version {version}: " + "lorem ipsum " * (i % 7)
        if i % 50 == 0:  # every 50th memory carries a MemCube
            cube = kvmem.MemCube.from_ids(model, random_ids(4 + i % 5, seed=i + version), text=text)
            view.put_cube(f"m{i:04d}", cube, text=text, meta={"turn": i})
        else:
            view.add(f"m{i:04d}", text, {"turn": i, "v": version})


def _state(store, namespace: str) -> dict:
    """{id: (kind, text, meta without the install time, fingerprint)} plus the install journals."""
    from kvmem.travel.provenance import PROVENANCE

    out = {}
    for rec in store.view(namespace).ls():
        meta = dict(rec.meta)
        prov = meta.pop(PROVENANCE, None)
        out[rec.id] = (rec.kind, rec.text, json.dumps(meta, sort_keys=True), rec.fingerprint,
                       prov and prov["digest"])
    return out


def _journal(store) -> dict | None:
    from kvmem.travel.journal import JOURNALS

    recs = store.view(JOURNALS).ls()
    return json.loads(recs[0].text) if recs else None


def _run_and_kill(bundle, location, pub, when, namespace="bob") -> bool:
    """Install in a child; SIGKILL it once ``when(store)`` is true. True if it was killed before finishing."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(bundle), str(location), str(pub), namespace], env=env, cwd=ROOT,
                             stderr=subprocess.PIPE)
    store = kvmem.CubeStore(location)
    try:
        while child.poll() is None:
            if when(store):
                child.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        _, err = child.communicate(timeout=300)  # reaps the child: a killed install's process is gone
    if child.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(err.decode()[-2000:])
    return child.returncode == -signal.SIGKILL


class _Writes:
    """Kill-point conditions read cheaply (the journal's state, the store's change counter), so polling does not
    slow the child down: ``writes(store)`` counts the changes since the journal entered ``state``."""

    def __init__(self, state: str, after: int):
        self.state, self.after, self.start = state, after, None

    def __call__(self, store) -> bool:
        if (_journal(store) or {}).get("state") != self.state:
            return False
        if self.start is None:
            self.start = store.version()
        return store.version() - self.start >= self.after


@pytest.fixture
def fast_tmp(tmp_path):
    """A folder on tmpfs where there is one: each catalog write of the store fsyncs, ~20 ms on a VM disk, and a
    SIGKILL (unlike a power cut) loses nothing the kernel already has, so durability is not what is tested here."""
    import tempfile

    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir=shm, prefix="kvmem-test-") as folder:
        yield Path(folder)


def test_install_of_1000_memories_is_atomic_under_sigkill(tmp_path, fast_tmp):
    from kvmem.travel import TrustList, install_bundle, pack_namespace, recover_installs

    tmp_path = fast_tmp
    model = tiny_model("llama")
    key = make_key(tmp_path)
    src = kvmem.CubeStore(tmp_path / "src")
    _fill(src, "alice", 1, model)
    v1 = pack_namespace(src, "alice", tmp_path / "v1.kvmem", key=key, sequence=1)
    _fill(src, "alice", 2, model)
    v2 = pack_namespace(src, "alice", tmp_path / "v2.kvmem", key=key, sequence=2)
    trust = TrustList([key.public])

    # the two states the namespace may be in after a kill: v1 installed (before) or v2 installed (after)
    reference = kvmem.CubeStore(tmp_path / "ref")
    install_bundle(v1.path, reference, "bob", trust=trust)
    before = _state(reference, "bob")
    install_bundle(v2.path, reference, "bob", trust=trust)
    after = _state(reference, "bob")
    assert len(before) == len(after) == N and before != after

    dst = tmp_path / "dst"
    install_bundle(v1.path, dst, "bob", trust=trust)
    store = kvmem.CubeStore(dst)
    assert _state(store, "bob") == before
    pub = tmp_path / "alice.key.pub"
    kill_points = {  # fresh conditions each: they remember when their state began
        "backing up": _Writes("backup", 5),
        "writing, early": _Writes("write", 20),
        "writing, late": _Writes("write", 900),
        "committed": _Writes("commit", 1),
    }
    outcomes = {}
    for name, when in kill_points.items():
        killed = _run_and_kill(v2.path, dst, pub, when)
        recovered = recover_installs(store)
        state = _state(store, "bob")
        assert state in (before, after), f"killed while {name}: the namespace is neither as before nor installed"
        assert _journal(store) is None and store.view("kvmem.rollback").ls() == []
        outcomes[name] = ("killed" if killed else "finished", "after" if state == after else "before", recovered)
        if state == after:  # put v1 back for the next kill point (a fresh store: the ledger refuses a downgrade)
            import shutil

            shutil.rmtree(dst)
            install_bundle(v1.path, dst, "bob", trust=trust)
            store = kvmem.CubeStore(dst)
    # into an empty namespace: a killed install's new memories are removed again
    assert _run_and_kill(v1.path, dst, pub, _Writes("write", 300), namespace="carol")
    assert _state(store, "carol") != {}  # the kill left part of it
    recover_installs(store)
    assert _state(store, "carol") == {} and _journal(store) is None
    killed = [name for name, (how, _, _) in outcomes.items() if how == "killed"]
    assert len(killed) >= 3, outcomes  # the kills landed inside the install, not after it
    assert outcomes["backing up"][1] == outcomes["writing, early"][1] == "before", outcomes
    # and a later install of the same bundle completes
    install_bundle(v2.path, store, "bob", trust=trust)
    assert _state(store, "bob") == after
