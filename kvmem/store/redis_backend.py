"""The Redis store backends: catalog and cube bytes in one Redis database, shared by every machine that reaches it.

Selected by ``CubeStore("redis://host:port/db")`` (the ``kvmem[redis]`` extra); the protocols and the commit order
are in kvmem/store_backend.py. URL options (query string): ``prefix`` (key prefix, default ``kvmem``: several
stores can share a database), ``cache`` (the local folder where this machine keeps validated copies of the
blobs it reads, default ``$KVMEM_CACHE/redis/...``). Other query options go to redis-py.

Keys (``P`` = the prefix)::

    P:store            the store id (written when the store is created: a flushed database is an error, not empty)
    P:mem:<namespace>  hash: memory id -> JSON row
    P:namespaces       set of namespaces that have rows
    P:reservations     hash: blob -> time reserved
    P:grants           hash: JSON [owner, reader] -> time granted
    P:seq, P:changes   the change counter, and a sorted set of JSON [seq, namespace, id, op] scored by seq
    P:blob:<name>      the cube file's bytes (one SET: all or nothing)
    P:blobtime         hash: blob -> time put (for gc)

Every catalog step that reads then writes is one optimistic transaction (WATCH / MULTI, retried on conflict), so
it is atomic across processes and hosts. Reads are validated as everywhere: ``local_path`` gives a local copy of
the blob's bytes and `MemCube.load` checks it (format, checksum, shapes) on every load. An unreachable Redis is a
`CubeError` naming the URL.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import CubeError
from .records import BLOB, Record, check_blob

_COPY_GRACE_S = 60.0  # a local copy of a deleted blob outlives it this long: readers that just found it still load
_BLOB_IN_NAME = re.compile(r"[0-9a-f]{32}")
_ROW_FIELDS = ("text", "kind", "meta", "fingerprint", "tokens", "bytes", "blob", "created", "last_used", "hits")


def _redis():
    try:
        import redis
    except ImportError:
        raise CubeError("a Redis store needs the redis client: pip install 'kvmem[redis]'") from None
    return redis


class _Redis:
    """A redis-py client whose failures are CubeErrors naming the URL, and its optimistic transactions."""

    def __init__(self, url: str, client, prefix: str):
        self.url, self.client, self.prefix = url, client, prefix

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @contextmanager
    def errors(self):
        redis = _redis()
        try:
            yield
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise CubeError(f"the Redis store at {self.url} is unreachable ({exc}): start Redis or fix the URL "
                            "(redis://host:port/db)") from None
        except redis.exceptions.ResponseError as exc:
            raise CubeError(f"the Redis store at {self.url} refused a command ({exc})") from None

    def transaction(self, fn, *keys):
        """Run ``fn(pipe)`` under WATCH ``keys``: reads before ``pipe.multi()``, writes after; retried on conflict.
        Returns fn's value."""
        with self.errors():
            return self.client.transaction(fn, *keys, value_from_callable=True)


def _row(rec: Record) -> str:
    return json.dumps({"text": rec.text, "kind": rec.kind, "meta": rec.meta, "fingerprint": rec.fingerprint,
                       "tokens": rec.tokens, "bytes": rec.bytes, "blob": rec.blob, "created": rec.created,
                       "last_used": rec.last_used, "hits": rec.hits})


class RedisCatalog:
    """The catalog in Redis (see the module docstring for the keys)."""

    def __init__(self, db: _Redis, store_id: str):
        self.db, self.store_id = db, store_id

    def describe(self) -> str:
        return f"catalog redis {self.db.url} (prefix {self.db.prefix!r})"

    def _record(self, namespace: str, memory_id: str, raw) -> Record:
        try:
            row = json.loads(raw)
            values = {k: row[k] for k in _ROW_FIELDS}
            if not isinstance(values["meta"], dict):
                raise ValueError("meta is not a JSON object")
        except (TypeError, ValueError, KeyError) as exc:
            raise CubeError(f"{self.describe()}: memory {namespace}/{memory_id} has a damaged row ({exc}); rewrite "
                            "it (view.add) or restore the database") from None
        return Record(namespace, memory_id, **values)

    def _log(self, pipe, seq: int, namespace: str, memory_id: str, op: str) -> None:
        pipe.set(self.db.key("seq"), seq)
        pipe.zadd(self.db.key("changes"), {json.dumps([seq, namespace, memory_id, op]): seq})

    def _next_seq(self, pipe) -> int:
        return int(pipe.get(self.db.key("seq")) or 0) + 1

    # ---------------------------------------------------------------- trust
    def check(self, *, thorough: bool = False) -> None:
        with self.db.errors():
            found = self.db.client.get(self.db.key("store"))
        if found is None:
            raise CubeError(f"{self.describe()}: the store's marker {self.db.key('store')} is gone: the database was "
                            "flushed or this URL names another database. Restore it (nothing was deleted; gc "
                            "refuses to run)")
        if found.decode() != self.store_id:
            raise CubeError(f"{self.describe()} now belongs to another store (id {found.decode()!r}, opened as "
                            f"{self.store_id!r}): it was replaced. Reopen the store (gc refuses to run)")

    # ---------------------------------------------------------------- memories
    def reserve(self, blob, when):
        check_blob(blob)
        with self.db.errors():
            self.db.client.hset(self.db.key("reservations"), blob, when)

    def release(self, blob):
        with self.db.errors():
            self.db.client.hdel(self.db.key("reservations"), blob)

    def upsert(self, rec: Record) -> str | None:
        if rec.blob is not None:
            check_blob(rec.blob)
        mem, res, seq_key = self.db.key("mem", rec.namespace), self.db.key("reservations"), self.db.key("seq")

        def step(pipe):
            if rec.blob is not None and not pipe.hexists(res, rec.blob):
                raise CubeError(f"the write of {rec.namespace}/{rec.id} took so long that gc expired it (its cube "
                                "file may be gone): write it again")
            old_raw = pipe.hget(mem, rec.id)
            old = self._record(rec.namespace, rec.id, old_raw) if old_raw is not None else None
            seq = self._next_seq(pipe)
            if old is not None:
                rec.created, rec.hits = old.created, old.hits
            pipe.multi()
            if rec.blob is not None:
                pipe.hdel(res, rec.blob)
            pipe.hset(mem, rec.id, _row(rec))
            pipe.sadd(self.db.key("namespaces"), rec.namespace)
            self._log(pipe, seq, rec.namespace, rec.id, "cube" if rec.blob else "add")
            return old.blob if old is not None else None

        old_blob = self.db.transaction(step, mem, res, seq_key)
        return old_blob if old_blob != rec.blob else None

    def get(self, namespaces, memory_id):
        with self.db.errors():
            for ns in namespaces:  # own namespace first, then the shared ones in the order given
                raw = self.db.client.hget(self.db.key("mem", ns), memory_id)
                if raw is not None:
                    return self._record(ns, memory_id, raw)
        return None

    def list(self, namespaces, kind=None):
        with self.db.errors():
            if namespaces is None:
                namespaces = sorted(n.decode() for n in self.db.client.smembers(self.db.key("namespaces")))
            rows = [self._record(ns, k.decode(), v) for ns in namespaces
                    for k, v in self.db.client.hgetall(self.db.key("mem", ns)).items()]
        rows = [r for r in rows if not kind or r.kind == kind]
        return sorted(rows, key=lambda r: (r.namespace, r.created, r.id))

    def delete(self, namespace, memory_id):
        mem = self.db.key("mem", namespace)

        def step(pipe):
            raw = pipe.hget(mem, memory_id)
            if raw is None:
                return None
            rec = self._record(namespace, memory_id, raw)
            seq = self._next_seq(pipe)
            pipe.multi()
            pipe.hdel(mem, memory_id)
            self._log(pipe, seq, namespace, memory_id, "rm")
            return rec

        return self.db.transaction(step, mem, self.db.key("seq"))

    def touch(self, namespace, memory_id, when):
        mem = self.db.key("mem", namespace)

        def step(pipe):
            raw = pipe.hget(mem, memory_id)
            if raw is None:
                return
            rec = self._record(namespace, memory_id, raw)
            rec.last_used, rec.hits = when, rec.hits + 1
            pipe.multi()
            pipe.hset(mem, memory_id, _row(rec))

        self.db.transaction(step, mem)

    def drop_blob(self, namespace, memory_id, blob):
        mem = self.db.key("mem", namespace)

        def step(pipe):
            raw = pipe.hget(mem, memory_id)
            if raw is None:
                return False
            rec = self._record(namespace, memory_id, raw)
            if rec.blob != blob:
                return False
            rec.blob, rec.kind, rec.fingerprint, rec.tokens, rec.bytes = None, "text", None, 0, 0
            seq = self._next_seq(pipe)
            pipe.multi()
            pipe.hset(mem, memory_id, _row(rec))
            self._log(pipe, seq, namespace, memory_id, "repair")
            return True

        return self.db.transaction(step, mem, self.db.key("seq"))

    def references(self, *, expire_before, expire=()):
        expire = set(expire)
        res, spaces = self.db.key("reservations"), self.db.key("namespaces")

        def step(pipe):
            # watch the namespace set first, then every namespace's rows: a row committed anywhere while this
            # step reads fails the transaction (and it runs again), so no committed blob is ever missed
            namespaces = sorted(n.decode() for n in pipe.smembers(spaces))
            mems = [self.db.key("mem", ns) for ns in namespaces]
            if mems:
                pipe.watch(res, spaces, *mems)
            reserved = {k.decode(): float(v) for k, v in pipe.hgetall(res).items()}
            named = set()
            for ns, mem in zip(namespaces, mems):
                for k, v in pipe.hgetall(mem).items():
                    blob = self._record(ns, k.decode(), v).blob
                    if blob is not None:
                        named.add(blob)
            drop = [b for b, when in reserved.items() if when < expire_before or b in expire]
            pipe.multi()
            if drop:
                pipe.hdel(res, *drop)
            return named, set(reserved) - set(drop)

        return self.db.transaction(step, res, spaces)

    # ---------------------------------------------------------------- grants
    def grant(self, owner, reader):
        grants = self.db.key("grants")

        def step(pipe):
            seq = self._next_seq(pipe)
            pipe.multi()
            pipe.hset(grants, json.dumps([owner, reader]), time.time())
            self._log(pipe, seq, owner, reader, "grant")

        self.db.transaction(step, grants, self.db.key("seq"))

    def revoke(self, owner, reader):
        grants, field = self.db.key("grants"), json.dumps([owner, reader])

        def step(pipe):
            if not pipe.hexists(grants, field):
                return False
            seq = self._next_seq(pipe)
            pipe.multi()
            pipe.hdel(grants, field)
            self._log(pipe, seq, owner, reader, "revoke")
            return True

        return self.db.transaction(step, grants, self.db.key("seq"))

    def grants(self):
        with self.db.errors():
            pairs = [tuple(json.loads(k)) for k in self.db.client.hkeys(self.db.key("grants"))]
        return sorted(pairs)

    # ---------------------------------------------------------------- change detection
    def version(self):
        with self.db.errors():
            return int(self.db.client.get(self.db.key("seq")) or 0)

    def changes_since(self, version):
        changes = self.db.key("changes")

        def step(pipe):
            now = int(pipe.get(self.db.key("seq")) or 0)
            if version >= now:
                return now, []
            oldest = pipe.zrange(changes, 0, 0, withscores=True)
            if not oldest or oldest[0][1] > version + 1:
                return now, None  # trimmed past ``version``: the caller rereads everything
            rows = pipe.zrangebyscore(changes, f"({version}", now)
            return now, [tuple(json.loads(r)[1:]) for r in rows]

        return self.db.transaction(step, changes, self.db.key("seq"))

    def trim_changes(self, keep):
        with self.db.errors():
            now = int(self.db.client.get(self.db.key("seq")) or 0)
            self.db.client.zremrangebyscore(self.db.key("changes"), "-inf", now - int(keep))


class RedisBlobs:
    """Cube bytes in Redis (``P:blob:<name>``), with a local folder of copies that `MemCube.load` validates."""

    def __init__(self, db: _Redis, cache: Path):
        self.db, self.cache = db, Path(cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.root = self.cache  # a local folder for the store's caches (the index keeps embeddings there)
        self._deleted: set[str] = set()  # blobs this process deleted (their local copies wait for sweep)

    def describe(self) -> str:
        return f"cube blobs in redis {self.db.url} (local copies in {self.cache})"

    def _local(self, name: str) -> Path:
        return self.cache / f"{check_blob(name)}.safetensors"

    def stage(self, name):
        return self.cache / f".{check_blob(name)}.staged.safetensors"

    def put(self, name, staged):
        check_blob(name)
        data = Path(staged).read_bytes()
        with self.db.errors():
            pipe = self.db.client.pipeline(transaction=True)
            pipe.set(self.db.key("blob", name), data)
            pipe.hset(self.db.key("blobtime"), name, time.time())
            pipe.execute()
        os.replace(staged, self._local(name))  # this machine's copy: the bytes it just put
        return len(data)

    def local_path(self, name):
        """This machine's copy of blob ``name``, fetched from Redis on first use. Blob names are never reused,
        so a copy stays true to its name; `MemCube.load` still validates every byte of it on every load."""
        local = self._local(name)
        if name in self._deleted:
            return None
        if local.is_file():
            return local
        with self.db.errors():
            data = self.db.client.get(self.db.key("blob", name))
        if not data:  # not in Redis (kvmem never writes an empty blob): gone
            return None
        tmp = self.cache / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, local)
        except FileNotFoundError:  # swept by a gc with no grace while downloading: fetch once more
            return self.local_path(name)
        return local

    def delete(self, name):
        with self.db.errors():
            pipe = self.db.client.pipeline(transaction=True)
            pipe.delete(self.db.key("blob", check_blob(name)))
            pipe.hdel(self.db.key("blobtime"), name)
            pipe.execute()
        # the local copy itself goes at the next sweep, so a reader on this machine that found it a moment ago
        # still loads the bytes it was promised; from now on this process no longer offers it
        self._deleted.add(name)

    def names(self):
        with self.db.errors():
            times = {k.decode(): float(v) for k, v in self.db.client.hgetall(self.db.key("blobtime")).items()}
            found = [k.decode().rsplit(":", 1)[1] for k in self.db.client.scan_iter(match=self.db.key("blob", "*"),
                                                                                   count=1000)]
        return {n: times.get(n, 0.0) for n in found if BLOB.match(n)}

    def sweep(self, older_than):
        """Remove this machine's unfinished files (staged saves, partial downloads) older than ``older_than``,
        except those of blobs still reserved: their writer is alive (gc expires stalled reservations itself)."""
        with self.db.errors():
            reserved = {k.decode() for k in self.db.client.hkeys(self.db.key("reservations"))}
            present = set(self.names())
        removed = []
        copies_before = min(older_than, time.time() - _COPY_GRACE_S)
        for f in self.cache.iterdir():
            blob = _BLOB_IN_NAME.search(f.name)
            if blob is not None and blob.group(0) in reserved:
                continue
            try:
                # a file written in the last seconds belongs to a live writer on this machine, whatever the grace
                unfinished = f.name.startswith(".") and f.stat().st_mtime < min(older_than, time.time() - 10)
                stale_copy = (f.suffix == ".safetensors" and BLOB.match(f.stem) and f.stem not in present
                              and f.stat().st_mtime < copies_before)  # the local copy of a deleted blob
                if f.is_file() and (unfinished or stale_copy):
                    f.unlink()
                    removed.append(f.name)
            except FileNotFoundError:
                pass
        return removed


def _default_cache(host: str, port, db: str, prefix: str) -> Path:
    base = Path(os.environ.get("KVMEM_CACHE") or Path.home() / ".cache" / "kvmem")
    return base / "redis" / f"{host}-{port}-{db or 0}-{prefix}"


def open_redis_backends(url: str, *, create: bool = False) -> tuple[RedisCatalog, RedisBlobs]:
    """The catalog and blobs of the Redis store at ``url`` (``redis://host:port/db?prefix=...&cache=...``).

    Args:
        create: make the store if the database has none under the prefix; without it, a missing store is a
            CubeError (a mistyped URL never silently becomes a new, empty store).

    Raises:
        CubeError: Redis is unreachable, or the database holds no (or a damaged) store.
    """
    redis = _redis()
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    prefix = query.pop("prefix", "kvmem")
    if not prefix or ":" in prefix:
        raise CubeError(f"the Redis store prefix must be non-empty and without ':', got {prefix!r}")
    cache = query.pop("cache", None)
    client_url = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))
    host = parts.hostname or ""
    shown = urlunsplit((parts.scheme, f"{host}:{parts.port}" if parts.port else host, parts.path, "", ""))  # no password
    try:
        client = redis.Redis.from_url(client_url, socket_connect_timeout=3, socket_timeout=30)
    except ValueError as exc:
        raise CubeError(f"{url!r} is not a Redis URL ({exc}); use redis://host:port/db") from None
    db = _Redis(shown + (f"?prefix={prefix}" if prefix != "kvmem" else ""), client, prefix)
    with db.errors():
        found = client.get(db.key("store"))
        if found is None:
            if not create:
                raise CubeError(f"no kvmem store at {db.url}: check the URL; create one with CubeStore(url) "
                                "(create=True)")
            if client.exists(db.key("namespaces"), db.key("seq")):
                raise CubeError(f"{db.url} holds kvmem rows but not the store's marker: the store was damaged. "
                                "Restore it from a backup; nothing was deleted")
            client.set(db.key("store"), uuid.uuid4().hex, nx=True)
            found = client.get(db.key("store"))
    cache_dir = Path(cache).expanduser() if cache else _default_cache(parts.hostname or "", parts.port,
                                                                       parts.path.strip("/"), prefix)
    catalog = RedisCatalog(db, found.decode())
    return catalog, RedisBlobs(db, cache_dir)
