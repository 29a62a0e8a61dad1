"""Issue 27, a Redis store under a running process: a FLUSHALL (or a restart without persistence) is noticed at the
next request, never an empty store nor a write that locks every other process out; a reader's change-log position
from before is recognised as meaningless; a local copy that fails validation is fetched again; ``?cache=DIR`` never
sweeps a folder that is not kvmem's own cache. Real redis-server processes, started on a free loopback port and
stopped by pid (as in test_store_redis.py)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

import kvmem
from test_store_backends import tiny_cube
from test_store_redis import REDIS_SERVER, free_port

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install "
                                "redis-server); CI installs it")
redis = pytest.importorskip("redis", reason="the redis client is not installed (pip install 'kvmem[redis]')")


@pytest.fixture(scope="module")
def cube():
    return tiny_cube()


class Server:
    """redis-server on one loopback port, without persistence; `restart` brings up a fresh, empty one there."""

    def __init__(self, folder):
        self.folder, self.port, self.proc = folder, free_port(), None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        self.proc = subprocess.Popen([REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.folder)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client, deadline = redis.Redis(port=self.port), time.time() + 20
        while True:
            try:
                client.ping()
                return client
            except redis.exceptions.ConnectionError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}")
                time.sleep(0.05)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self):
        self.stop()
        return self.start()


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    s.start()
    yield s
    s.stop()


def _url(server, tmp_path, machine="m1", prefix="kvmem"):
    return f"{server.url}?prefix={prefix}&cache={tmp_path / ('cache-' + machine)}"


# ---------------------------------------------------------------- 4. a lost database under a running process
@pytest.mark.parametrize("how", ["flushall", "restart without persistence"])
def test_a_running_process_notices_a_lost_database(server, tmp_path, cube, how):
    url = _url(server, tmp_path)
    store = kvmem.CubeStore(url)
    view = store.view("me")
    view.put_cube("a", cube)
    view.add("t", "text")
    client = redis.Redis(port=server.port)
    if how == "flushall":
        client.flushall()
    else:
        client = server.restart()
    calls = {"ls": view.ls, "get": lambda: view.get("a"), "load_cube": lambda: view.load_cube("a"),
             "version": view.version, "changes_since": lambda: view.changes_since(0),
             "add": lambda: view.add("n", "new"), "put_cube": lambda: view.put_cube("n", cube),
             "rm": lambda: view.rm("a"), "grant": lambda: store.grant("me", "x"), "grants": store.grants,
             "touch": lambda: view.touch("a"), "gc": lambda: store.gc(grace_s=0)}
    for name, call in calls.items():
        with pytest.raises(kvmem.CubeError, match="marker .* is gone") as info:
            call()
        assert "flushed, restarted without persistence" in str(info.value), name
    assert client.keys("*") == []  # nothing was written: no half store that locks the other processes out
    fresh = kvmem.CubeStore(url)    # a new process may create a new store there, as before
    fresh.view("me").add("x", "y")
    with pytest.raises(kvmem.CubeError, match="belongs to another store"):
        view.ls()  # the old process never silently joins (or writes into) the new one
    assert [r.id for r in kvmem.CubeStore(url, create=False).view("me").ls()] == ["x"]


# ---------------------------------------------------------------- 5. a reset change log is detected
def test_a_reader_position_from_before_a_reset_is_not_trusted(server, tmp_path):
    url = _url(server, tmp_path)
    view = kvmem.CubeStore(url).view("me")
    for i in range(5):
        view.add(f"x{i}", "t")
    seen = view.version()
    redis.Redis(port=server.port).flushall()
    new = kvmem.CubeStore(url).view("me")
    for i in range(7):  # the new store's counter passes the old position
        new.add(f"y{i}", "t")
    now, changes = new.changes_since(seen)
    assert int(now) == 7 and changes is None  # another epoch: reread everything (not the 2 newest changes)
    assert new.changes_since(new.version())[1] == []


# ---------------------------------------------------------------- 6. a machine's copy is checked and refetched
def test_a_tampered_or_swapped_local_copy_is_fetched_again(server, tmp_path, cube):
    url = _url(server, tmp_path)
    store = kvmem.CubeStore(url)
    alice = store.view("alice").put_cube("m", tiny_cube("Alice lives in Oslo"))
    carol = store.view("carol").put_cube("pin", tiny_cube("Carol's PIN is 4321", seed=1))
    cache = tmp_path / "cache-m1"
    mine = cache / f"{alice.blob}.safetensors"
    data = bytearray(mine.read_bytes())
    data[-8] ^= 0xFF
    mine.write_bytes(bytes(data))  # a flipped byte in this machine's copy
    assert store.view("alice").load_cube("m").text == "Alice lives in Oslo"
    (cache / f"{carol.blob}.safetensors").replace(mine)  # Carol's copy put in Alice's place
    assert store.view("alice").load_cube("m").text == "Alice lives in Oslo"
    assert store.view("carol").load_cube("pin").text == "Carol's PIN is 4321"  # fetched again too


def test_a_swapped_blob_in_redis_is_refused_not_served(server, tmp_path, cube):
    store = kvmem.CubeStore(_url(server, tmp_path))
    alice = store.view("alice").put_cube("m", tiny_cube("Alice lives in Oslo"))
    carol = store.view("carol").put_cube("pin", tiny_cube("Carol's PIN is 4321", seed=1))
    client = redis.Redis(port=server.port)
    client.set(f"kvmem:blob:{alice.blob}", client.get(f"kvmem:blob:{carol.blob}"))
    reader = kvmem.CubeStore(_url(server, tmp_path, machine="m2"))
    with pytest.raises(kvmem.CubeError, match="records memory carol/pin"):
        reader.view("alice").load_cube("m")


# ---------------------------------------------------------------- 7. ?cache=DIR is never another folder
def test_a_cache_that_is_a_folder_store_is_refused_and_never_swept(server, tmp_path, cube):
    folder = tmp_path / "folder-store"
    rec = kvmem.CubeStore(folder).view("me").put_cube("a", cube)
    os.utime(folder / rec.path, (1, 1))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / ("e" * 32 + ".safetensors")).write_bytes(b"mine")
    for cache in (folder / "cubes", tmp_path / "notes"):
        with pytest.raises(kvmem.CubeError, match="not a kvmem Redis cache"):
            kvmem.CubeStore(f"{server.url}?cache={cache}")
    assert (folder / rec.path).is_file() and kvmem.CubeStore(folder).view("me").load_cube("a") is not None
    ok = kvmem.CubeStore(f"{server.url}?cache={tmp_path / 'new-cache'}")  # an empty or new folder is fine
    ok.view("me").put_cube("a", cube)
    assert kvmem.CubeStore(f"{server.url}?cache={tmp_path / 'new-cache'}").gc(grace_s=0).removed == []


@pytest.mark.parametrize("url", ["redis://127.0.0.1:notaport/0", "redis://[::1/0", "redis://127.0.0.1:99999/0"])
def test_bad_redis_urls_are_cube_errors(url, tmp_path):
    with pytest.raises(kvmem.CubeError, match="not a Redis URL|unreachable"):
        kvmem.CubeStore(f"{url}?cache={tmp_path}")
