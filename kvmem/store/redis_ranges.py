"""Byte ranges of a Redis string read straight into the caller's buffers (`RangeReader`, `copy_string`, a file
fetched so: `download_string`), and a file written to one range by range (`upload_string`).

redis-py hands a ``GETRANGE`` reply back as a new ``bytes`` object, which the caller then copies where it is
needed: its parser's copies cost more CPU than the bytes' trip through the kernel. Measured on this machine (2-core
EPYC VM, redis-server 7.0 on loopback, 189 MB read as 1 MiB ranges into one buffer and hashed with xxh3, medians
of 4): redis-py 8.2 245 ms of wall time and 215 ms of the client's CPU (its own parser), 135 ms and 109 ms with
hiredis; `RangeReader` 56 ms and 39 ms. A vLLM replica reading a 4,096-token SmolLM2 cube it has no local copy of
(`kvmem.integrations.sources.RedisBlobBytes`, 189 MB into a paged cache's 4 KB pieces, on the request's critical
path): 108-115 ms of the loader's CPU through redis-py, 51-57 ms through `RangeReader` (the connector's log).

`RangeReader` speaks RESP2 on sockets of its own, for ``GETRANGE`` only: the reply's header is read, then its bytes
are received (``recv_into``) into the buffers in order, or, for many small buffers, into one reused buffer of the
thread's own and copied out from there (fewer system calls: 51-57 ms of CPU above against 58-74 ms with one
scattered ``recvmsg_into`` per reply). It connects as the redis-py client it is made from connects (TCP or a Unix
socket, its username, password and database, its timeouts); `RangeReader.of` returns None for a client it cannot
follow (TLS, a credential provider, a connection class of its own), whose reads then go through redis-py. A reply
Redis refuses (``-ERR``, e.g. a key of another type) raises `RedisRangeError`; a lost or timed-out connection
raises ``OSError`` (a socket kept from an earlier read that the server has closed since is replaced once,
silently); either way the socket is closed, never reused mid-reply. A process forked from one that has read opens
sockets of its own.
"""

from __future__ import annotations

import os
import socket
import threading
from functools import partial
from pathlib import Path

from ..errors import CubeError

_CRLF = b"\r\n"
_SHARED: dict[tuple, "RangeReader"] = {}
_SHARED_LOCK = threading.Lock()


class RedisRangeError(OSError):
    """Redis answered a GETRANGE with an error reply."""


class RangeReader:
    """GETRANGE into buffers over plain sockets (one per thread reading at once; kept for the next read).

    Args:
        kind: "tcp" or "unix"; connect: (host, port) or the socket's path; auth: (username or None, password)
        or None; db: the database number; timeout, connect_timeout: seconds (None: block)."""

    def __init__(self, kind: str, connect, *, auth=None, db: int = 0, timeout: float | None = 30.0,
                 connect_timeout: float | None = 3.0):
        if kind not in ("tcp", "unix"):
            raise ValueError(f"kind must be 'tcp' or 'unix', got {kind!r}")
        self.kind, self.connect, self.auth, self.db = kind, connect, auth, int(db)
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self._pid = os.getpid()  # a forked child never reads from its parent's sockets

    @classmethod
    def of(cls, client) -> "RangeReader | None":
        """The process's reader (`shared`) that connects as redis-py ``client`` does; None where it cannot (see the
        module docstring)."""
        try:
            from redis.connection import Connection, UnixDomainSocketConnection
        except ImportError:
            return None
        pool = getattr(client, "connection_pool", None)
        if pool is None:
            return None
        kwargs = pool.connection_kwargs
        if kwargs.get("credential_provider") is not None:
            return None
        auth = None
        if kwargs.get("password") is not None:
            auth = (kwargs.get("username"), kwargs["password"])
        common = {"auth": auth, "db": kwargs.get("db") or 0, "timeout": kwargs.get("socket_timeout"),
                  "connect_timeout": kwargs.get("socket_connect_timeout")}
        if pool.connection_class is Connection:  # exactly: TLS connections are a subclass
            return cls.shared("tcp", (kwargs.get("host", "localhost"), int(kwargs.get("port", 6379))), **common)
        if pool.connection_class is UnixDomainSocketConnection and kwargs.get("path"):
            return cls.shared("unix", kwargs["path"], **common)
        return None

    @classmethod
    def shared(cls, kind: str, connect, auth=None, db: int = 0, timeout: float | None = 30.0,
               connect_timeout: float | None = 3.0) -> "RangeReader":
        """The process's one reader for these settings (its idle sockets serve every blob read with them)."""
        key = (kind, tuple(connect) if isinstance(connect, list) else connect,
               tuple(auth) if auth is not None else None, int(db), timeout, connect_timeout)
        with _SHARED_LOCK:
            if key not in _SHARED:
                _SHARED[key] = cls(kind, key[1], auth=key[2], db=key[3], timeout=timeout,
                                   connect_timeout=connect_timeout)
            return _SHARED[key]

    def __reduce__(self):  # sent to another process (a vLLM worker): that process's shared reader, connected there
        return (RangeReader.shared, (self.kind, self.connect, self.auth, self.db, self.timeout, self.connect_timeout))

    def getrange_into(self, key: str | bytes, offset: int, views: list[memoryview]) -> int:
        """Bytes [offset, offset + total of ``views``) of string ``key`` into ``views`` in order, with one
        GETRANGE; how many bytes came (fewer where the string is shorter: none where the key does not exist).

        Raises:
            RedisRangeError: Redis answered with an error. OSError: the connection failed or timed out."""
        total = sum(len(v) for v in views)
        if total == 0:
            return 0
        key = key.encode() if isinstance(key, str) else bytes(key)
        command = _command(b"GETRANGE", key, b"%d" % offset, b"%d" % (offset + total - 1))
        for attempt in (0, 1):
            sock, kept = self._socket()
            try:
                sock.sendall(command)
                got = self._bulk_into(sock, views, total)
            except (ConnectionError, socket.timeout) as exc:
                sock.close()  # in an unknown place of a reply: never reused
                if kept and attempt == 0 and not isinstance(exc, socket.timeout):
                    continue  # a kept socket the server closed meanwhile (a restart, its idle timeout): once more
                raise
            except BaseException:
                sock.close()
                raise
            with self._lock:
                self._idle.append(sock)
            return got
        raise AssertionError("unreachable")

    def _socket(self) -> tuple[socket.socket, bool]:
        """(a socket, whether it was kept from an earlier read)."""
        with self._lock:
            if self._pid != os.getpid():  # forked since: the kept sockets are the parent's (left open for it)
                self._idle, self._pid = [], os.getpid()
            if self._idle:
                return self._idle.pop(), True
        if self.kind == "tcp":
            sock = socket.create_connection(self.connect, timeout=self.connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.connect_timeout)
            try:
                sock.connect(self.connect)
            except BaseException:
                sock.close()
                raise
        sock.settimeout(self.timeout)
        try:
            setup = []
            if self.auth is not None:
                user, password = self.auth
                setup.append(_command(b"AUTH", *([user.encode()] if user else []), password.encode()))
            if self.db:
                setup.append(_command(b"SELECT", b"%d" % self.db))
            if setup:
                sock.sendall(b"".join(setup))
                for _ in setup:  # one status line each
                    line = _line(sock)
                    if line.startswith(b"-"):
                        raise RedisRangeError("redis refused the connection's set-up: "
                                              f"{line[1:].decode(errors='replace')}")
        except BaseException:
            sock.close()
            raise
        return sock, False

    def _bounce(self, n: int) -> memoryview:
        """A buffer of at least ``n`` bytes of this thread's own, reused."""
        buf = getattr(self._local, "bounce", None)
        if buf is None or len(buf) < n:
            buf = self._local.bounce = memoryview(bytearray(max(n, 1 << 20)))
        return buf

    def _bulk_into(self, sock: socket.socket, views: list[memoryview], total: int) -> int:
        """Read one bulk-string reply into ``views`` (``total`` bytes, in order); its length."""
        line = _line(sock)
        if line.startswith(b"-"):
            raise RedisRangeError(f"redis answered GETRANGE with an error: {line[1:].decode(errors='replace')}")
        if not line.startswith(b"$"):
            raise RedisRangeError(f"redis answered GETRANGE with {line[:40]!r}, not a string")
        try:
            n = int(line[1:])
        except ValueError:
            raise RedisRangeError(f"redis answered GETRANGE with {line[:40]!r}, not a string") from None
        if n < 0:  # a nil reply (RESP2 never gives one for GETRANGE): no bytes
            return 0
        if n > total:
            raise RedisRangeError(f"redis sent {n} bytes for a range of {total}")
        pending, left = [], n  # the views the reply fills, the last one cut to the reply's end
        for v in views:
            if left == 0:
                break
            if len(v):
                pending.append(v[:min(len(v), left)])
                left -= len(pending[-1])
        if len(pending) > 8:  # many small views (a paged cache's blocks): into one buffer, then copied out
            bounce = self._bounce(n)
            pos = 0
            while pos < n:
                k = sock.recv_into(bounce[pos:n], n - pos)
                if k == 0:
                    raise ConnectionError("redis closed the connection in the middle of a reply")
                pos += k
            pos = 0
            for v in pending:
                v[:] = bounce[pos:pos + len(v)]
                pos += len(v)
        else:
            for v in pending:
                pos = 0
                while pos < len(v):
                    k = sock.recv_into(v[pos:], len(v) - pos)
                    if k == 0:
                        raise ConnectionError("redis closed the connection in the middle of a reply")
                    pos += k
        end = b""
        while len(end) < 2:
            more = sock.recv(2 - len(end))
            if not more:
                raise ConnectionError("redis closed the connection in the middle of a reply")
            end += more
        if end != _CRLF:
            raise RedisRangeError("a GETRANGE reply did not end where its header said")
        return n


def _command(*words: bytes) -> bytes:
    return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)


def _line(sock: socket.socket) -> bytes:
    """One reply line (without its CRLF), taken off the socket and no byte past it (peeked first)."""
    line = b""
    while True:
        ahead = sock.recv(256, socket.MSG_PEEK)
        if not ahead:
            raise ConnectionError("redis closed the connection")
        cut = (line[-1:] + ahead).find(_CRLF)
        if cut >= 0:
            take = cut + 2 - len(line[-1:])
            line += _recv_exactly(sock, take)
            return line[:-2]
        line += _recv_exactly(sock, len(ahead))
        if len(line) > 1024:
            raise RedisRangeError("a reply line from redis longer than 1,024 bytes: not a RESP2 server?")


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        more = sock.recv(n - len(out))
        if not more:
            raise ConnectionError("redis closed the connection in the middle of a reply")
        out += more
    return out


def copy_string(client, key: str, size: int, out, *, chunk: int = 4 << 20) -> bool:
    """Write the ``size`` bytes of Redis string ``key`` to binary file ``out``, ``chunk`` bytes at a time, through
    ``client``'s `RangeReader` (one reused buffer: the value is never held whole in memory, nor parsed by redis-py)
    or redis-py's GETRANGE where it has none; False if the string came out shorter (deleted meanwhile: blob names
    are never reused, so a string of the same name never grows), and nothing more is written then. A Redis
    store's local copies are fetched this way: 283 MB (a 4k SmolLM2 cube and its key blocks) took 0.31-0.46 s and
    0.12-0.16 s of CPU here, against 1.2-1.9 s and 0.9-1.5 s for one GET and a write (redis-py, no hiredis).

    Raises:
        `RedisRangeError` / ``ConnectionError`` / ``TimeoutError`` (OSErrors, from the reader or redis-py alike; a
        store's ``errors()`` reports them); the file's own ``OSError`` as it comes."""
    reader = RangeReader.of(client)
    read = reader.getrange_into if reader is not None else partial(getrange_via, client)
    buf = memoryview(bytearray(max(1, min(chunk, size))))
    for offset in range(0, size, chunk):
        m = min(chunk, size - offset)
        n = read(key, offset, [buf[:m]])
        if n != m:
            return False
        out.write(buf[:m])
    return True


def download_string(client, key: str, path) -> bool | None:
    """Write Redis string ``key`` to a new file ``path`` in ranges (`copy_string`: never whole in memory): True
    once it is there whole; None if Redis holds no such string (kvmem never stores an empty one), False if it came
    out shorter (deleted meanwhile). ``path`` is left only when True.

    Raises:
        as `copy_string`, ``path`` removed first."""
    size = int(client.strlen(key))
    if not size:
        return None
    path = Path(path)
    try:
        with open(path, "wb") as out:
            whole = copy_string(client, key, size, out)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if not whole:
        path.unlink(missing_ok=True)
    return whole


def upload_string(client, key: str, path, *, chunk: int = 1 << 20, ttl: int = 3600) -> int:
    """Write file ``path``'s bytes to a new Redis string ``key``, ``chunk`` bytes at a time, from the last range to
    the first (`put_range`: ``SETRANGE`` and a renewed expiry of ``ttl`` seconds, one round trip; from one reused
    buffer: the file is never held whole in memory, and no command carries more than ``chunk`` bytes, 1 MiB, the
    smallest ``proto-max-bulk-len`` a server may set). The first range makes the string at its full size, so a size
    over the server's limit is refused before the rest goes up, and every later range finds it at that size: one
    that finds it shorter (the key expired or was evicted meanwhile, and ``SETRANGE`` made it again from zeros)
    stops the upload. Growing the string by ``APPEND`` instead reallocates it as it grows: 165-808 ms for 189 MB on
    this machine against 180-219 ms for ``SETRANGE`` into the full-size string, and 111-145 ms for one ``SET`` of
    the whole. ``key`` is a staging key: the caller renames it where readers look, in one step, and ``PERSIST`` s
    it; one left by a writer that died expires ``ttl`` seconds after its last range. On any failure ``key`` is
    deleted (if the server can still be reached) and the error raised. Returns the number of bytes.

    Raises:
        CubeError: the staging key vanished mid-upload (expired or evicted). redis-py's errors (a
        ``ResponseError`` naming ``proto-max-bulk-len`` for a string over the server's limit); the file's own
        ``OSError`` (also if it shrank meanwhile)."""
    buf = memoryview(bytearray(chunk))
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if not size:
                client.set(key, b"", ex=ttl)
                return 0
            for at in range((size - 1) // chunk * chunk, -1, -chunk):
                n = min(chunk, size - at)
                if os.preadv(f.fileno(), [buf[:n]], at) != n:
                    raise OSError(f"{path} is shorter than its {size} bytes: it changed while it was uploaded")
                if put_range(client, key, at, buf[:n], ttl) != size:
                    raise CubeError(f"the staging key {key} of an upload vanished after {size - at - n} of its "
                                    f"{size} bytes (it expired, {ttl} s after its last range, or Redis evicted it: "
                                    "a store's Redis should run with maxmemory-policy noeviction); nothing was "
                                    "stored: save it again")
        return size
    except BaseException:
        try:
            client.delete(key)
        except Exception:  # the server is gone: the staging key expires on its own
            pass
        raise


def put_range(client, key: str, offset: int, data, ttl: int) -> int:
    """``SETRANGE key offset data`` and renew its expiry to ``ttl`` seconds, in one round trip (`upload_string`);
    the string's length after it."""
    pipe = client.pipeline(transaction=True)
    pipe.setrange(key, offset, data)
    pipe.expire(key, ttl)
    return pipe.execute()[0]


def getrange_via(client, key: str, offset: int, views: list[memoryview]) -> int:
    """`RangeReader.getrange_into` through redis-py ``client`` (one GETRANGE, its reply copied into ``views`` in
    order), for a client the reader does not follow; how many bytes came. Fails as the reader does: an error reply
    (or any other redis-py error) raises `RedisRangeError`, a lost or refused connection `ConnectionError` (both
    OSErrors)."""
    total = sum(len(v) for v in views)
    if total == 0:  # GETRANGE key 0 -1 would be the whole string
        return 0
    import redis

    try:
        data = memoryview(client.getrange(key, offset, offset + total - 1))
    except redis.exceptions.ResponseError as exc:
        raise RedisRangeError(f"GETRANGE {key}: {exc}") from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        # as the reader's own sockets fail: an OSError, which a cube's reader reports as a CubeError
        raise ConnectionError(f"GETRANGE {key}: {exc}") from None
    except redis.exceptions.RedisError as exc:  # a reply redis-py could not parse, and the rest of its kind
        raise RedisRangeError(f"GETRANGE {key}: {type(exc).__name__}: {exc}") from None
    done = 0
    for v in views:
        n = min(len(v), len(data) - done)
        if n <= 0:
            break
        v[:n] = data[done:done + n]
        done += n
    return done
