"""The cube bytes of a Redis store (``P:blob:<name>``, ``P:blobtime``; kvmem/store/redis_backend.py has the catalog
and the key layout), with a local folder of copies that `MemCube.load` validates on every load.

The folder is kvmem's own (a marker file says so): a ``?cache=`` naming any other non-empty folder is refused, so
a sweep never deletes files it does not own. A copy that fails validation is fetched again from Redis.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from pathlib import Path

from ..errors import CubeError
from .records import BLOB, KEY_BLOCKS_FILE, check_blob
from .redis_ranges import download_string, upload_string

_log = logging.getLogger("kvmem.store")

CACHE_MARKER = ".kvmem-redis-cache.json"  # marks a folder as a kvmem Redis cache (it holds copies only)
_COPY_GRACE_S = 60.0  # a local copy of a deleted blob outlives it this long: readers that just found it still load
_BLOB_IN_NAME = re.compile(r"[0-9a-f]{32}")


class RedisBlobs:
    """Cube bytes in Redis (``P:blob:<name>``), with a local folder of copies that `MemCube.load` validates."""

    def __init__(self, db, cache: Path, *, adopt: bool = False):
        self.db, self.cache = db, Path(cache)
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CubeError(f"cannot make the local cache folder {self.cache} of {db.url} ({exc.strerror}): give "
                            "one you may write with ?cache=DIR") from None
        _claim_cache(self.cache, adopt=adopt)
        self.root = self.cache  # a local folder for the store's caches (the index keeps embeddings there)
        self._deleted: set[str] = set()  # blobs this process deleted (their local copies wait for sweep)

    def describe(self) -> str:
        return f"cube blobs in redis {self.db.url} (local copies in {self.cache})"

    def _local(self, name: str) -> Path:
        return self.cache / f"{check_blob(name)}.safetensors"

    def stage(self, name):
        return self.cache / f".{check_blob(name)}.staged.safetensors"

    def put(self, name, staged):
        """Upload ``staged`` as blob ``name``: written range by range under a staging key (`upload_string`: never
        whole in memory, no command over Redis' ``proto-max-bulk-len``), then renamed to the blob's key and
        timed in one step, so no reader ever sees part of it; a writer that dies leaves a staging key that
        expires."""
        staging = staging_key(self.db, name)
        with self.db.errors():
            size = upload_string(self.db.client, staging, staged)
            if not self.db.client.eval(_PUBLISH, 3, staging, self.db.key("blob", name), self.db.key("blobtime"),
                                       name, time.time()):
                raise CubeError(f"blob {name}'s upload to {self.db.url} vanished before it was published (expired "
                                "or evicted): save the cube again")
        os.replace(staged, self._local(name))  # this machine's copy: the bytes it just put
        return size

    def copy_if_local(self, name):
        """This machine's copy of blob ``name`` if it has one now; None (and no fetch) if not."""
        local = self._local(name)
        return local if name not in self._deleted and local.is_file() else None

    def local_path(self, name):
        """This machine's copy of blob ``name``, fetched from Redis on first use. Blob names are never reused,
        so a copy stays true to its name; `MemCube.load` still validates every byte of it on every load."""
        local = self._local(name)
        if name in self._deleted:
            return None
        if local.is_file():
            return local
        tmp = self.cache / f".{name}.{uuid.uuid4().hex[:8]}.tmp"  # hidden: swept if left unfinished
        try:
            with self.db.errors():  # in ranges, never the whole blob in memory
                if not download_string(self.db.client, self.db.key("blob", name), tmp):
                    return None  # not in Redis (kvmem never writes an empty blob), or deleted while it was read
            os.replace(tmp, local)
        except FileNotFoundError:
            if not self.cache.is_dir():
                raise CubeError(f"the local cache folder {self.cache} of {self.db.url} was deleted while the store "
                                "was open: open the store again (it makes the folder) or give another with "
                                "?cache=DIR") from None
            return self.local_path(name)  # swept by a gc with no grace while downloading: fetch once more
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return local

    def refetch(self, name):
        """Drop this machine's copy of ``name`` (it failed validation) and fetch the bytes again from Redis."""
        self._local(name).unlink(missing_ok=True)
        return self.local_path(name)

    def delete(self, name):
        with self.db.errors():
            pipe = self.db.client.pipeline(transaction=True)
            pipe.delete(self.db.key("blob", check_blob(name)))
            pipe.delete(self.db.key("keyblocks", name))  # its key blocks, if a server wrote them (kvmem.integrations)
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
        return {n: times.get(n, 0.0) for n in found if BLOB.fullmatch(n)}

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
            if blob is None or blob.group(0) in reserved:  # not kvmem's (the folder's marker), or a live write
                continue
            try:
                # a file written in the last seconds belongs to a live writer on this machine, whatever the grace
                unfinished = f.name.startswith(".") and f.stat().st_mtime < min(older_than, time.time() - 10)
                stale_copy = (f.suffix == ".safetensors" and BLOB.fullmatch(f.stem) and f.stem not in present
                              and f.stat().st_mtime < copies_before)  # the local copy of a deleted blob
                side = KEY_BLOCKS_FILE.fullmatch(f.name)  # a copy's key blocks (fetched with it), its copy gone
                stale_copy = stale_copy or (side is not None and f.stat().st_mtime < copies_before and (
                    side.group(1) not in present or not (self.cache / f"{side.group(1)}.safetensors").exists()))
                if f.is_file() and (unfinished or stale_copy):
                    f.unlink()
                    removed.append(f.name)
            except FileNotFoundError:
                pass
            except OSError as exc:  # one file we may not remove (another user's, a read-only mount) stops nothing
                _log.warning("kvmem gc: cannot remove %s (%s); left in place, the sweep goes on", f,
                             exc.strerror or exc)
        # key blocks (kvmem.integrations.key_blocks) whose blob is gone by a path other than `delete`: each
        # removed in one step only while its blob is still absent (a save sets them only while it exists)
        with self.db.errors():
            pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.db.key("keyblocks", "")) + "*"  # the prefix taken literally
            for key in self.db.client.scan_iter(match=pattern, count=1000):
                blob = key.decode().rsplit(":", 1)[1]
                if key.decode() != self.db.key("keyblocks", blob):
                    continue  # not this store's own key (the pattern is escaped: belt and braces)
                if BLOB.fullmatch(blob) and self.db.client.eval(_DEL_IF_NO_BLOB, 2, self.db.key("blob", blob), key):
                    removed.append(key.decode())
        return removed


def staging_key(db, blob: str, what: str = "") -> str:
    """A new key to upload blob ``blob`` (or, ``what`` ``".keys"``, its key blocks) to before it is renamed where
    readers look: ``P:staging:<blob>.<8 hex digits><what>``, one per upload (`upload_string` lets it expire)."""
    return db.key("staging", f"{check_blob(blob)}.{uuid.uuid4().hex[:8]}{what}")


# KEYS[1]: an uploaded blob's staging key, KEYS[2]: the blob's key, KEYS[3]: the blob times; ARGV: its name, time
# (again, as redis-py retries a call whose reply was lost: published already where the blob is there, its name new)
_PUBLISH = ("if redis.call('EXISTS', KEYS[1]) == 0 then return redis.call('EXISTS', KEYS[2]) end "
            "redis.call('RENAME', KEYS[1], KEYS[2]) redis.call('PERSIST', KEYS[2]) "
            "redis.call('HSET', KEYS[3], ARGV[1], ARGV[2]) return 1")

# KEYS[1]: a blob's key, KEYS[2]: its key blocks' key
_DEL_IF_NO_BLOB = "if redis.call('EXISTS', KEYS[1]) == 0 then return redis.call('DEL', KEYS[2]) end return 0"


def _claim_cache(cache: Path, *, adopt: bool) -> None:
    """Make sure ``cache`` is a kvmem Redis cache folder before anything in it is swept.

    The folder carries a marker; a folder without one is claimed only when it is empty (or, for the default
    folder an older kvmem filled, when it holds nothing but cube copies). So a ``?cache=`` that points at a folder
    store's ``cubes/`` (or any folder of other files) is refused, never swept. Stores may share a cache folder:
    it only holds copies, each validated on every load and fetched again when it fails."""
    marker = cache / CACHE_MARKER
    if marker.is_file():
        return
    entries = [f.name for f in cache.iterdir()]
    copies = all(n.endswith(".safetensors") and BLOB.fullmatch(n[:-len(".safetensors")])
                 or n.startswith(".") and _BLOB_IN_NAME.search(n) for n in entries)
    if entries and not (adopt and copies and not (cache.parent / "kvmem-store.json").exists()):
        raise CubeError(f"{cache} is not empty and is not a kvmem Redis cache (no {CACHE_MARKER}): pick an empty "
                        "or new folder for ?cache=DIR (kvmem deletes stale files in its cache folder; a cache an older "
                        "kvmem filled holds only copies: empty it and it is used again)")
    tmp = cache / f".{CACHE_MARKER}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps({"format": "kvmem.redis-cache"}) + "\n")
    os.replace(tmp, marker)
