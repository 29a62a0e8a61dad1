"""`kvmem.store.redis_ranges.RangeReader`: GETRANGE replies received straight into buffers, checked against
redis-py's own GETRANGE on a real redis-server (TCP with a password and a database, a Unix socket), and what it does
with a refused reply, a dropped connection, a dead server and threads reading at once."""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import threading

import pytest
import torch

import kvmem
from kvmem.store.redis_ranges import RangeReader, RedisRangeError

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed (apt-get install redis-server); CI installs it")
redis = pytest.importorskip("redis", reason="the redis client is not installed (pip install 'kvmem[redis]')")
from test_store_redis import free_port, redis_server  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A password-protected redis-server: yields (URL of database 3, a redis-py client of it)."""
    with redis_server(tmp_path_factory.mktemp("redis"), password="s3cret*pw") as url:
        url = url.rsplit("/", 1)[0] + "/3"
        client = redis.Redis.from_url(url)
        yield url, client
        client.close()


def views_of(buf: torch.Tensor, cuts) -> list[memoryview]:
    edges = [0, *cuts, buf.numel()]
    return [memoryview(buf[a:b].numpy()) for a, b in zip(edges, edges[1:])]


def test_ranges_land_in_the_buffers_as_redis_py_reads_them(server):
    url, client = server
    data = os.urandom(3 << 20)
    client.set("blob", data)
    reader = RangeReader.of(redis.Redis.from_url(url))
    assert reader is not None and reader.kind == "tcp" and reader.db == 3
    gen = torch.Generator().manual_seed(0)
    for offset, length in ((0, len(data)), (12345, 1 << 20), (len(data) - 700, 700), (5, 1)):
        buf = torch.zeros(length, dtype=torch.uint8)
        cuts = sorted(set(torch.randint(1, length, (min(40, length - 1),), generator=gen).tolist())) if length > 1 \
            else []
        got = reader.getrange_into("blob", offset, views_of(buf, cuts))
        assert got == length
        assert bytes(buf.numpy()) == client.getrange("blob", offset, offset + length - 1) \
            == data[offset:offset + length]
    assert len(reader._idle) == 1  # one socket, kept and reused by every read


def test_a_short_or_missing_string_reads_short(server):
    url, client = server
    client.set("short", b"abcdef")
    reader = RangeReader.of(redis.Redis.from_url(url))
    buf = torch.full((10,), 7, dtype=torch.uint8)
    assert reader.getrange_into("short", 2, views_of(buf, [3])) == 4
    assert bytes(buf[:4].numpy()) == b"cdef" and buf[4:].eq(7).all()  # the rest untouched
    assert reader.getrange_into("no such key", 0, views_of(buf, [])) == 0
    assert reader.getrange_into("short", 0, []) == 0


def test_a_refused_reply_is_an_error_and_the_next_read_works(server):
    url, client = server
    client.delete("h")
    client.hset("h", "f", "v")
    client.set("s", b"0123456789")
    reader = RangeReader.of(redis.Redis.from_url(url))
    buf = torch.zeros(4, dtype=torch.uint8)
    with pytest.raises(RedisRangeError, match="WRONGTYPE"):
        reader.getrange_into("h", 0, views_of(buf, []))
    assert reader.getrange_into("s", 3, views_of(buf, [1])) == 4 and bytes(buf.numpy()) == b"3456"


def test_a_wrong_password_or_a_dead_server_is_an_oserror_a_cube_read_reports(server, tmp_path):
    url, client = server
    bad = RangeReader.of(redis.Redis.from_url(url.replace("s3cret*pw", "wrong")))
    with pytest.raises(RedisRangeError, match="set-up.*(WRONGPASS|invalid)"):
        bad.getrange_into("s", 0, [memoryview(bytearray(2))])
    dead = RangeReader.of(redis.Redis(port=free_port(), socket_connect_timeout=1))
    with pytest.raises(OSError):
        dead.getrange_into("s", 0, [memoryview(bytearray(2))])


@pytest.mark.parametrize("size", [0, 1, 9_999, 10_000, 25_001])
def test_upload_string_writes_a_file_range_by_range_under_an_expiring_key(server, tmp_path, size):
    from kvmem.store.redis_ranges import upload_string

    url, client = server
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    client.delete("up")
    assert upload_string(client, "up", tmp_path / "f", chunk=10_000, ttl=600) == size
    assert client.exists("up") and client.get("up") == data
    assert 0 < client.ttl("up") <= 600
    client.delete("up")
    with pytest.raises(FileNotFoundError):
        upload_string(client, "up", tmp_path / "missing")
    assert not client.exists("up")


def test_an_upload_that_fails_midway_leaves_no_key_and_a_vanished_key_stops_it(server, tmp_path, monkeypatch):
    from kvmem.errors import CubeError
    from kvmem.store import redis_ranges

    url, client = server
    (tmp_path / "f").write_bytes(os.urandom(50_000))
    real = redis_ranges.put_range
    calls = []

    def failing(c, key, offset, data, ttl):
        calls.append(offset)
        if len(calls) == 2:
            raise ConnectionError("the connection dropped")
        return real(c, key, offset, data, ttl)

    monkeypatch.setattr(redis_ranges, "put_range", failing)
    with pytest.raises(ConnectionError):
        redis_ranges.upload_string(client, "mid", tmp_path / "f", chunk=10_000)
    assert calls == [40_000, 30_000] and not client.exists("mid")  # last range first; deleted, not left to expire

    def evicted(c, key, offset, data, ttl):  # Redis drops the key between two ranges (maxmemory, or it expired)
        if offset == 20_000:
            c.delete(key)
        return real(c, key, offset, data, ttl)

    monkeypatch.setattr(redis_ranges, "put_range", evicted)
    with pytest.raises(CubeError, match="vanished after 20000 of its 50000 bytes"):
        redis_ranges.upload_string(client, "gone", tmp_path / "f", chunk=10_000)
    assert not client.exists("gone")  # the string made again from zeros by the next range: deleted, never published


def test_redis_py_ranges_fail_as_the_readers_do(server):
    """The redis-py fallback (`getrange_via`, for clients the reader does not follow) raises what the reader raises,
    OSErrors that a cube's reader reports as a `CubeError`, not redis-py's own exceptions."""
    from kvmem.store.redis_ranges import getrange_via

    url, client = server
    client.delete("h")
    client.hset("h", "f", "v")
    with pytest.raises(RedisRangeError, match="WRONGTYPE"):
        getrange_via(client, "h", 0, [memoryview(bytearray(2))])
    for other in (redis.Redis.from_url(url.replace("s3cret*pw", "wrong")),
                  redis.Redis(port=free_port(), socket_connect_timeout=1)):
        with pytest.raises(OSError):
            getrange_via(other, "h", 0, [memoryview(bytearray(2))])


def test_a_kept_socket_the_server_dropped_is_replaced(server):
    url, client = server
    client.set("s", b"0123456789")
    reader = RangeReader.of(redis.Redis.from_url(url))
    buf = torch.zeros(3, dtype=torch.uint8)
    assert reader.getrange_into("s", 0, views_of(buf, [])) == 3
    kept = reader._idle[0]
    client.client_kill_filter(_type="normal", skipme=True)  # Redis closes every other client: the kept one too
    assert reader.getrange_into("s", 7, views_of(buf, [])) == 3 and bytes(buf.numpy()) == b"789"
    assert reader._idle and reader._idle[0] is not kept and kept.fileno() == -1


def test_threads_reading_at_once_each_get_their_own_bytes(server):
    url, client = server
    data = os.urandom(1 << 20)
    client.set("t", data)
    reader = RangeReader.of(redis.Redis.from_url(url))
    out, errors = {}, []

    def read(i):
        try:
            buf = torch.zeros(100_000, dtype=torch.uint8)
            for _ in range(5):
                assert reader.getrange_into("t", i * 1000, views_of(buf, [333, 50_000])) == 100_000
            out[i] = bytes(buf.numpy())
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(out[i] == data[i * 1000:i * 1000 + 100_000] for i in range(4))


def test_a_unix_socket_is_followed():
    folder = tempfile.mkdtemp(prefix="kvr")  # a short path: a socket's path has ~100 bytes at most
    try:
        path = os.path.join(folder, "r.sock")
        with redis_server(folder, "--unixsocket", path, "--unixsocketperm", "700"):
            client = redis.Redis.from_url(f"unix://{path}?db=2")
            client.set("u", b"unix bytes")
            reader = RangeReader.of(client)
            assert reader.kind == "unix" and reader.db == 2
            buf = bytearray(5)
            assert reader.getrange_into("u", 5, [memoryview(buf)]) == 5 and bytes(buf) == b"bytes"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_clients_it_cannot_follow_are_left_to_redis_py_and_one_reader_serves_a_process(server):
    url, _ = server
    assert RangeReader.of(redis.Redis.from_url("rediss://127.0.0.1:1/0")) is None  # TLS
    creds = redis.UsernamePasswordCredentialProvider("u", "p")
    assert RangeReader.of(redis.Redis(port=1, credential_provider=creds)) is None
    reader = RangeReader.of(redis.Redis.from_url(url))
    assert RangeReader.of(redis.Redis.from_url(url)) is reader  # shared: its sockets serve every blob
    assert pickle.loads(pickle.dumps(reader)) is reader  # unpickled in this process: the same one


def test_a_replica_reads_a_cube_from_redis_through_the_reader(cube, tmp_path, server):
    """`CubeSource`'s Redis byte ranges (a replica with no local copy) come through the reader, verified."""
    from kvmem.cubes.cubefile import CubeFile
    from kvmem.integrations.serving import CubeSource

    url, _ = server
    prefix = f"{url}?prefix=rr{os.getpid()}"
    kvmem.CubeStore(f"{prefix}&cache={tmp_path / 'writer'}").view("ns").put_cube("m", cube, text="memory m")
    source = CubeSource(store=f"{prefix}&cache={tmp_path / 'replica'}", defer_fetches=True)
    got = source.load("ns", "m", layered=True)
    assert isinstance(got, CubeFile) and "blob" in str(got.path)
    assert got._source.ranges is not None
    for i, (k, v) in enumerate(cube.kv):
        gk, gv = got.read_layer(i)
        assert torch.equal(gk, k) and torch.equal(gv, v)
    assert pickle.loads(pickle.dumps(got._source)).ranges is got._source.ranges


@pytest.mark.parametrize("url, kind", [("rediss://:pw@127.0.0.1:1/2", "tls"), ("unix:///tmp/kvmem-nowhere.sock?db=2",
                                                                            "unix")])
def test_a_blob_source_sent_to_another_process_connects_as_the_store_does(url, kind):
    """Unpickled in vLLM's worker, a Redis blob source (`RedisBlobBytes`) rebuilds a redis-py client for what the
    reader does not follow: over TLS for a rediss:// store, on the socket's path for a unix:// one (the pool's
    keyword arguments alone name neither). Built without connecting: nothing listens there."""
    from redis.connection import SSLConnection, UnixDomainSocketConnection

    from kvmem.integrations.sources import RedisBlobBytes

    src = RedisBlobBytes.__new__(RedisBlobBytes)  # __init__ would ask the server for the blob's size
    src.client, src.key, src.size = redis.Redis.from_url(url), "k", 0
    src.ranges = RangeReader.of(src.client)
    assert (src.ranges is None) == (kind == "tls")
    pool = pickle.loads(pickle.dumps(src))._connected().connection_pool
    assert pool.connection_kwargs["db"] == 2
    if kind == "tls":
        assert issubclass(pool.connection_class, SSLConnection) and pool.connection_kwargs["password"] == "pw"
    else:
        assert issubclass(pool.connection_class, UnixDomainSocketConnection)
        assert pool.connection_kwargs["path"] == "/tmp/kvmem-nowhere.sock"


def test_a_forked_process_reads_on_sockets_of_its_own(server):
    """A child forked after the parent has read (its socket kept) reads the right bytes without touching the
    parent's socket, which still serves the parent afterwards."""
    import multiprocessing

    url, client = server
    client.set("f", b"forked bytes")
    reader = RangeReader.of(redis.Redis.from_url(url))
    buf = bytearray(6)
    assert reader.getrange_into("f", 0, [memoryview(buf)]) == 6
    kept = reader._idle[0]

    def child(q):
        out = bytearray(5)
        n = RangeReader.of(redis.Redis.from_url(url)).getrange_into("f", 7, [memoryview(out)])
        q.put((n, bytes(out), kept.fileno() in [s.fileno() for s in reader._idle]))

    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(q,))
    p.start()
    n, got, reused = q.get(timeout=30)
    p.join(30)
    assert (n, got) == (5, b"bytes") and not reused
    assert reader.getrange_into("f", 0, [memoryview(buf)]) == 6 and bytes(buf) == b"forked"
    assert reader._idle[0] is kept


@pytest.mark.parametrize("through", ["reader", "redis-py"])
def test_copy_string_writes_a_value_in_ranges(server, tmp_path, through, monkeypatch):
    from kvmem.store import redis_ranges

    url, client = server
    data = os.urandom(100_003)
    client.set("c", data)
    if through == "redis-py":  # a client the reader does not follow (TLS): redis-py's GETRANGE, range by range
        monkeypatch.setattr(redis_ranges.RangeReader, "of", classmethod(lambda cls, c: None))
    with open(tmp_path / "out", "wb") as out:
        assert redis_ranges.copy_string(redis.Redis.from_url(url), "c", len(data), out, chunk=10_000)
    assert (tmp_path / "out").read_bytes() == data
    with open(tmp_path / "short", "wb") as out:  # shorter than announced: deleted while it was read
        assert not redis_ranges.copy_string(redis.Redis.from_url(url), "c", len(data) + 5, out, chunk=10_000)
    assert (tmp_path / "short").read_bytes() == data[:100_000]  # the whole ranges before it, nothing after


def test_download_string_leaves_a_file_only_when_the_string_came_whole(server, tmp_path, monkeypatch):
    """`download_string` (a Redis store's local copies and key blocks): the bytes when the string is there, None
    for a missing one, False for one deleted while it was read, the error for a server lost meanwhile; no file is
    left but the whole one."""
    from kvmem.store import redis_ranges

    url, client = server
    data = os.urandom(9_000_001)  # over copy_string's 4 MiB ranges: three of them
    client.set("d", data)
    assert redis_ranges.download_string(client, "d", tmp_path / "whole") is True
    assert (tmp_path / "whole").read_bytes() == data
    assert redis_ranges.download_string(client, "nothing", tmp_path / "none") is None
    real = redis_ranges.copy_string

    def deleted_midway(c, key, size, out, **kw):
        c.delete(key)  # as a delete of the blob between STRLEN and the ranges
        return real(c, key, size, out, **kw)

    monkeypatch.setattr(redis_ranges, "copy_string", deleted_midway)
    assert redis_ranges.download_string(client, "d", tmp_path / "short") is False
    client.set("d", data)

    def lost(c, key, size, out, **kw):
        out.write(b"part of it")
        raise ConnectionError("the server went away")

    monkeypatch.setattr(redis_ranges, "copy_string", lost)
    with pytest.raises(ConnectionError):
        redis_ranges.download_string(client, "d", tmp_path / "lost")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["whole"]
    client.delete("d")


def test_a_replica_fetches_its_local_copy_in_ranges_not_with_one_get(cube, tmp_path, server, monkeypatch):
    """A replica's local copy of a blob (and its key blocks) is written from ranges, never from one GET of the whole
    value (redis-py holds and parses all of it: ~280 MB for a 4k cube with its key blocks); a Redis that dies
    meanwhile is the store's "unreachable" CubeError, and no partial copy is left."""
    url, _ = server
    prefix = f"{url}?prefix=fr{os.getpid()}"
    writer = kvmem.CubeStore(f"{prefix}&cache={tmp_path / 'writer'}")
    rec = writer.view("ns").put_cube("m", cube, text="memory m")
    replica = kvmem.CubeStore(f"{prefix}&cache={tmp_path / 'replica'}")
    monkeypatch.setattr(type(replica.blobs.db.client), "get",
                        lambda self, key: pytest.fail(f"GET of {key}: the whole value at once"))
    copy = replica.blobs.local_path(rec.blob)
    assert copy.read_bytes() == (tmp_path / "writer" / f"{rec.blob}.safetensors").read_bytes()
    assert torch.equal(kvmem.MemCube.load(copy).kv[0][0], cube.kv[0][0])
    copy.unlink()
    from kvmem.store import redis_ranges

    def dead(self, *a, **k):
        raise ConnectionRefusedError("connection refused")

    monkeypatch.setattr(redis_ranges.RangeReader, "getrange_into", dead)
    with pytest.raises(kvmem.CubeError, match="unreachable"):
        replica.blobs.local_path(rec.blob)
    assert not list((tmp_path / "replica").glob(f".{rec.blob}*"))  # no partial copy left
