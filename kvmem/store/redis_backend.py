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
    P:blob:<name>      the cube file's bytes (uploaded under a staging key, then renamed here: all or nothing)
    P:blobtime         hash: blob -> time put (for gc)
    P:staging:<name>.<hex>[.keys]  an upload in progress (`kvmem.store.redis_ranges.upload_string`): it expires an
                       hour after its last range, so one a dead writer left needs no gc

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
from .records import Record, StoreVersion, check_blob, check_name, check_unique
from .redis_blobs import RedisBlobs
from .redis_ranges import RedisRangeError

_ROW_FIELDS = ("text", "kind", "meta", "fingerprint", "tokens", "bytes", "blob", "created", "last_used", "hits")


def _redis():
    try:
        import redis
    except ImportError:
        raise CubeError("a Redis store needs the redis client: pip install 'kvmem[redis]'") from None
    return redis


def _redacted(url: str) -> str:
    """``url`` without the user name and password it may hold (``redis://***@host``), for messages and logs."""
    return re.sub(r"^([a-z]+://)[^/]*@", r"\1***@", url)


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
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, ConnectionError, TimeoutError) as exc:
            # the builtin two: `kvmem.store.redis_ranges.RangeReader`'s sockets
            if "CERTIFICATE_VERIFY_FAILED" in str(exc) or "certificate verify failed" in str(exc):
                raise CubeError(f"the Redis store at {self.url} answered with a TLS certificate this machine does not "
                                f"trust or that names another host ({exc}): connect by a name the certificate holds "
                                "and give the certificate authority that signed it in the URL, "
                                "rediss://host:port/db?ssl_ca_certs=/path/to/ca.pem (redis-py's option)") from None
            raise CubeError(f"the Redis store at {self.url} is unreachable ({exc}): start Redis or fix the URL "
                            "(redis://host:port/db)") from None
        except (redis.exceptions.ResponseError, RedisRangeError) as exc:
            if "proto-max-bulk-len" in str(exc):
                raise CubeError(f"the Redis store at {self.url} refused a string this large ({exc}): raise the "
                                "server's limit (CONFIG SET proto-max-bulk-len 4gb, or in redis.conf), or keep cubes "
                                "this large in a folder store; nothing was stored") from None
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
        pipe.zadd(self.db.key("changes"), {json.dumps([seq, namespace, memory_id, op, time.time()]): seq})

    def _verify(self, found) -> None:
        """CubeError unless ``found`` (the value of the store's marker key) is this store's id. Every call checks
        it in the same round trip as its own reads: a database flushed (or restarted without persistence) under
        a running process is an error at its next request, never an empty store, and never written to."""
        if found is None:
            raise CubeError(f"{self.describe()}: the store's marker {self.db.key('store')} is gone: the database was "
                            "flushed, restarted without persistence, or this URL names another database. Restore "
                            "it from a Redis backup (RDB or AOF); nothing was written (gc refuses to run)")
        if found.decode() != self.store_id:
            raise CubeError(f"{self.describe()} now belongs to another store (id {found.decode()!r}, opened as "
                            f"{self.store_id!r}): it was flushed and recreated, or replaced. Reopen the store "
                            "(CubeStore(url)) to use the new one; nothing was written")

    def _read(self, *calls):
        """Results of ``calls`` (functions of a pipeline), run in one round trip after the marker check."""
        with self.db.errors():
            pipe = self.db.client.pipeline(transaction=False)
            pipe.get(self.db.key("store"))
            for call in calls:
                call(pipe)
            found, *results = pipe.execute()
        self._verify(found)
        return results

    def _watched(self, pipe) -> None:
        """Inside a transaction step (the marker key is watched): the marker check."""
        self._verify(pipe.get(self.db.key("store")))

    def _transaction(self, step, *keys):
        """An optimistic transaction that also watches the store's marker (see `_verify`)."""
        def checked(pipe):
            self._watched(pipe)
            return step(pipe)

        return self.db.transaction(checked, self.db.key("store"), *keys)

    def _next_seq(self, pipe) -> int:
        return int(pipe.get(self.db.key("seq")) or 0) + 1

    # ---------------------------------------------------------------- trust
    def check(self, *, thorough: bool = False) -> None:
        self._read()

    # ---------------------------------------------------------------- memories
    def reserve(self, blob, when):
        check_blob(blob)
        res = self.db.key("reservations")

        def step(pipe):
            pipe.multi()
            pipe.hset(res, blob, when)

        self._transaction(step)

    def release(self, blob):
        res = self.db.key("reservations")

        def step(pipe):
            pipe.multi()
            pipe.hdel(res, blob)

        self._transaction(step)

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

        old_blob = self._transaction(step, mem, res, seq_key)
        return old_blob if old_blob != rec.blob else None

    def upsert_many(self, records) -> list[str]:
        records = list(records)
        check_unique(records)
        blobs = [check_blob(rec.blob) for rec in records if rec.blob is not None]
        res, seq_key = self.db.key("reservations"), self.db.key("seq")
        by_ns: dict[str, list[Record]] = {}
        for rec in records:
            by_ns.setdefault(rec.namespace, []).append(rec)
        mems = {ns: self.db.key("mem", ns) for ns in by_ns}

        def step(pipe):
            # reads under WATCH: a reservation gc drops, or a row another writer changes, before EXEC makes
            # the transaction fail and run again (then the reservation check refuses it)
            if blobs:
                present = pipe.hmget(res, blobs)
                gone = [b for b, when in zip(blobs, present) if when is None]
                if gone:
                    rec = next(r for r in records if r.blob == gone[0])
                    raise CubeError(f"the write of {rec.namespace}/{rec.id} took so long that gc expired it (its "
                                    "cube file may be gone): write it again")
            replaced = []
            for ns, recs in by_ns.items():
                for rec, raw in zip(recs, pipe.hmget(mems[ns], [r.id for r in recs])):
                    old = self._record(ns, rec.id, raw) if raw is not None else None
                    if old is not None:
                        rec.created, rec.hits = old.created, old.hits
                        if old.blob and old.blob != rec.blob:
                            replaced.append(old.blob)
            seq = self._next_seq(pipe)
            pipe.multi()  # from here one MULTI/EXEC: every row, or none
            if blobs:
                pipe.hdel(res, *blobs)
            for ns, recs in by_ns.items():
                pipe.hset(mems[ns], mapping={rec.id: _row(rec) for rec in recs})
            pipe.sadd(self.db.key("namespaces"), *by_ns)
            for i, rec in enumerate(records):
                self._log(pipe, seq + i, rec.namespace, rec.id, "cube" if rec.blob else "add")
            return replaced

        return self._transaction(step, res, seq_key, *mems.values()) if records else []

    def lock(self, name: str, *, wait: float):
        """A context manager holding the store-wide lock ``name`` (e.g. a namespace being installed into): a
        key ``P:lock:<name>`` set with a random token and an expiry (kvmem/store/redis_lock.py), renewed by its
        holder every third of it; released only by its own token. A holder that dies stops renewing: its lock
        expires."""
        from .redis_lock import RedisLock

        return RedisLock(self.db, check_name(name, "lock name"), wait=wait)

    def get(self, namespaces, memory_id):
        found = self._read(*(lambda pipe, ns=ns: pipe.hget(self.db.key("mem", ns), memory_id) for ns in namespaces))
        for ns, raw in zip(namespaces, found):  # own namespace first, then the shared ones in the order given
            if raw is not None:
                return self._record(ns, memory_id, raw)
        return None

    def list(self, namespaces, kind=None):
        if namespaces is None:
            namespaces = sorted(n.decode() for n in self._read(lambda p: p.smembers(self.db.key("namespaces")))[0])
        found = self._read(*(lambda pipe, ns=ns: pipe.hgetall(self.db.key("mem", ns)) for ns in namespaces))
        rows = [self._record(ns, k.decode(), v) for ns, hits in zip(namespaces, found) for k, v in hits.items()]
        rows = [r for r in rows if not kind or r.kind == kind]
        return sorted(rows, key=lambda r: (r.namespace, r.created, r.id))

    def list_derived(self):
        namespaces = sorted(n.decode() for n in self._read(lambda p: p.smembers(self.db.key("namespaces")))[0])
        found = self._read(*(lambda pipe, ns=ns: pipe.hgetall(self.db.key("mem", ns)) for ns in namespaces))
        # only rows whose raw JSON names the key are decoded (lineage.dependants matches the entries)
        rows = [self._record(ns, k.decode(), v) for ns, hits in zip(namespaces, found) for k, v in hits.items()
                if b'"derived_from"' in v]
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

        return self._transaction(step, mem, self.db.key("seq"))

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

        self._transaction(step, mem)

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

        return self._transaction(step, mem, self.db.key("seq"))

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
            return named, set(reserved) - set(drop), set(drop)

        return self._transaction(step, res, spaces)

    # ---------------------------------------------------------------- grants
    def grant(self, owner, reader):
        grants = self.db.key("grants")

        def step(pipe):
            seq = self._next_seq(pipe)
            pipe.multi()
            pipe.hset(grants, json.dumps([owner, reader]), time.time())
            self._log(pipe, seq, owner, reader, "grant")

        self._transaction(step, grants, self.db.key("seq"))

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

        return self._transaction(step, grants, self.db.key("seq"))

    def grants(self):
        keys = self._read(lambda pipe: pipe.hkeys(self.db.key("grants")))[0]
        return sorted(tuple(json.loads(k)) for k in keys)

    # ---------------------------------------------------------------- change detection
    def version(self):
        # the epoch is the store id: a flushed database recreated by another process is another store
        return StoreVersion(int(self._read(lambda pipe: pipe.get(self.db.key("seq")))[0] or 0), self.store_id)

    def changed_at(self, namespace, memory_id):
        rows = self._read(lambda pipe: pipe.zrange(self.db.key("changes"), 0, -1))[0]
        times = [entry[4] for entry in map(json.loads, rows)
                 if len(entry) > 4 and entry[1:3] == [namespace, memory_id] and entry[3] in ("add", "rm")]
        return max(times) if times else None

    def changes_since(self, version):
        changes = self.db.key("changes")

        def step(pipe):
            now = StoreVersion(int(pipe.get(self.db.key("seq")) or 0), self.store_id)
            if version >= now:
                return now, []
            oldest = pipe.zrange(changes, 0, 0, withscores=True)
            if not oldest or oldest[0][1] > version + 1:
                return now, None  # trimmed past ``version``: the caller rereads everything
            rows = pipe.zrangebyscore(changes, f"({int(version)}", int(now))
            return now, [tuple(json.loads(r)[1:4]) for r in rows]

        return self._transaction(step, changes, self.db.key("seq"))

    def trim_changes(self, keep):
        changes = self.db.key("changes")

        def step(pipe):
            now = int(pipe.get(self.db.key("seq")) or 0)
            pipe.multi()
            pipe.zremrangebyscore(changes, "-inf", now - int(keep))

        self._transaction(step, self.db.key("seq"))


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
    try:
        parts = urlsplit(url)
        port = parts.port  # parsed lazily: a bad port raises here
    except ValueError as exc:
        raise CubeError(f"{_redacted(url)!r} is not a Redis URL ({exc}); use redis://host:port/db") from None
    query = dict(parse_qsl(parts.query))
    prefix = query.pop("prefix", "kvmem")
    if not prefix or ":" in prefix:
        raise CubeError(f"the Redis store prefix must be non-empty and without ':', got {prefix!r}")
    cache = query.pop("cache", None)
    client_url = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))
    host = parts.hostname or ""
    shown = urlunsplit((parts.scheme, f"{host}:{port}" if port else host, parts.path, "", ""))  # no password
    try:
        client = redis.Redis.from_url(client_url, socket_connect_timeout=3, socket_timeout=30)
    except ValueError as exc:
        raise CubeError(f"{_redacted(url)!r} is not a Redis URL ({exc}); use redis://host:port/db") from None
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
    cache_dir = Path(cache).expanduser() if cache else _default_cache(host, port, parts.path.strip("/"), prefix)
    catalog = RedisCatalog(db, found.decode())
    return catalog, RedisBlobs(db, cache_dir, adopt=not cache)
