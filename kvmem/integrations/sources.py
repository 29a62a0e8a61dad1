"""Where a serving engine's cubes come from (`CubeSource`: a kvmem store or a folder of cube files, per namespace),
and a plan's KV still in its cube (`FileKV`), read layer by layer as the engine writes it.

Engine-agnostic; `kvmem.integrations.serving` plans requests with it. A cube is opened for layer-by-layer
reading (`kvmem.cubes.cubefile.CubeFile`: header, metadata and ids verified when the request arrives, each
layer's KV verified as it is read) whenever its file allows it; otherwise it is read whole (`MemCube.load`).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..cubes.cubefile import CubeFile, NotLayered, Scratch
from ..cubes.memcube import MemCube
from ..errors import CubeError
from ..store.records import NAME, check_name, is_valid_blob
from ..store.redis_ranges import RangeReader, getrange_via
from ..store.stamp import mismatch, read_stamp
from .key_blocks import fetch_key_blocks, redis_key

logger = logging.getLogger("vllm.kvmem")  # the connector's logger (this module serves any engine; vLLM's is the one)


class Refused(CubeError):
    """A request's cubes cannot be served (missing, corrupt, foreign, not a prefix of the prompt, ...): the
    engine prefills the request as if kvmem were not there. The message says why."""


def check_request_name(value, what: str) -> str:
    """The store's name rule (`kvmem.store.records.check_name`), a refusal when broken."""
    try:
        return check_name(value, what)
    except CubeError as exc:
        raise Refused(str(exc)) from None


class CubeSource:
    """Where served cubes come from. Give exactly one of:

    Args:
        store: a kvmem store: a folder (``CubeStore(path)``) or a URL (``redis://host:port/db``); a namespace's
            cubes are its memories that have one (``kvmem add --cube``, ``view.put_cube``).
        folder: a folder of cube files laid out ``<folder>/<namespace>/<name>.safetensors`` (``kvmem build -o``).
        defer_fetches: hold a Redis store's background fetches of local copies back until `start_fetches` (a
            server calls it when a request finishes: the fetch of a 4k cube and its key blocks moves ~280 MB
            through Redis, and run beside the request's forward pass it made a cold 4k cube from Redis take 1,066
            ms instead of 446 ms, warm hit 130 ms: bench/vllm_ttft.py, the engine in the bench's process).
    """

    def __init__(self, *, store: str | None = None, folder: str | None = None, defer_fetches: bool = False):
        if (store is None) == (folder is None):
            raise CubeError("give the cube source one of store= (a kvmem store path or redis:// URL) or folder= "
                            "(a folder of <namespace>/<name>.safetensors files)")
        for what, value in (("store", store), ("folder", folder)):
            if value is not None and (not isinstance(value, (str, Path)) or not str(value).strip()):
                raise CubeError(f"the cube source's {what} must be a non-empty string (a path or URL), got "
                                f"{value!r:.60}")
        self._views = {}
        self.loads, self.bytes_read = 0, 0  # cubes read and validated, and their KV bytes (for the metrics)
        self.folder = Path(folder).expanduser() if folder is not None else None
        self.location = store
        self._store = None
        self._fetcher: ThreadPoolExecutor | None = None  # background fetches of Redis blobs to local copies
        self._fetching: set[str] = set()
        self._fetch_errors: set[str] = set()  # why background fetches failed, each logged once
        self._defer, self._deferred = defer_fetches, []  # blobs whose fetch waits for `start_fetches`
        # blob -> when its copy's key blocks were last looked for (`_fetch_later`): a load from a copy asks again
        # at most every `_KEY_BLOCKS_RECHECK_S` (a cube saved without them would otherwise cost a GET a request)
        self._key_blocks_checked: dict[str, float] = {}

    def __repr__(self) -> str:
        if self.folder is not None:
            return f"CubeSource(folder={str(self.folder)!r})"
        return f"CubeSource(store={self._store!r})" if self._store is not None else f"CubeSource(store={self.location!r})"

    @property
    def store(self):
        """The `CubeStore`, opened on first use (and again after a failure: a server starts, and answers without
        cubes, while its Redis is down; it serves cubes once Redis is back)."""
        if self._store is None:
            from ..store.cubestore import CubeStore

            self._store = CubeStore(self.location)
        return self._store

    def _view(self, namespace: str):
        if namespace not in self._views:
            self._views[namespace] = self.store.view(namespace)  # own namespace only: nothing shared
        return self._views[namespace]

    def versions(self, namespace: str) -> dict[str, object]:
        """{cube name: version key} of every cube ``namespace`` holds (the key changes when the cube does)."""
        check_request_name(namespace, "namespace")
        if self.folder is not None:
            out = {}
            for f in sorted((self.folder / namespace).glob("*.safetensors")):
                if NAME.fullmatch(f.stem):
                    st = f.stat()
                    out[f.stem] = (st.st_mtime_ns, st.st_size, st.st_ino)
            return out
        return {r.id: (r.path, r.created, r.bytes) for r in self._view(namespace).ls(kind="memcube")}

    def load(self, namespace: str, name: str, *, layered: bool = False) -> MemCube | CubeFile:
        """The validated cube ``name`` of ``namespace`` (format, checksum, shapes); Refused if it is not there.

        ``layered=True``: a `CubeFile` when the cube can be read layer by layer (header, metadata and ids read and
        verified now, each layer's KV when it is read, `kvmem.cubes.cubefile`), else the whole `MemCube`."""
        check_request_name(namespace, "namespace")
        check_request_name(name, "cube name")
        cube = None
        if self.folder is not None:
            path = self.folder / namespace / f"{name}.safetensors"
            if not path.is_file():
                raise Refused(f"no cube {name!r} in namespace {namespace!r} ({path} does not exist)")
            if layered:
                try:
                    cube = CubeFile.open(path)
                except NotLayered:
                    pass
            if cube is None:
                cube = MemCube.load(path)
        else:
            if layered:
                cube = self._open_stored(namespace, name)
            if cube is None:
                cube = self._view(namespace).load_cube(name)
            if cube is None:
                raise Refused(f"no cube {name!r} in namespace {namespace!r} of {self.store!r}")
        self.loads, self.bytes_read = self.loads + 1, self.bytes_read + cube.nbytes
        return cube

    def _open_stored(self, namespace: str, name: str) -> CubeFile | None:
        """The store's cube file of memory ``name`` opened layer by layer, checked to be that memory's own (its
        stamp, as `view.load_cube` checks it); None for anything else, which the whole load then handles (a
        missing or repaired row, an older cube, a damaged or foreign file: its error says why)."""
        view = self._view(namespace)
        rec = view.get(name)
        if rec is None or rec.blob is None or not is_valid_blob(rec.blob):
            return None
        blobs = self.store.blobs
        try:
            if hasattr(blobs, "copy_if_local") and blobs.copy_if_local(rec.blob) is None:
                # a Redis store, no local copy yet (a new replica): read the blob's byte ranges straight from Redis
                # (header now, each layer on the loader thread); a local copy is fetched in the background for the
                # requests after this one
                cube = CubeFile.over(RedisBlobBytes(blobs.db.client, blobs.db.key("blob", rec.blob)),
                                     where=f"{blobs.db.url} blob {rec.blob}")
                # its key blocks, where the server that saved it wrote them (`kvmem.integrations.key_blocks`)
                cube.key_blocks_source = RedisBlobBytes(blobs.db.client, redis_key(blobs.db, rec.blob))
                self._fetch_later(rec.blob)
            else:
                path = blobs.local_path(rec.blob)
                if path is None:
                    return None
                cube = CubeFile.open(path)
                checked = self._key_blocks_checked.get(rec.blob)
                if hasattr(blobs, "copy_if_local") and (
                        checked is None or time.monotonic() - checked > _KEY_BLOCKS_RECHECK_S):
                    # a Redis store's copy made another way (a load before its key blocks were stored, the saving
                    # server's own copy, a whole load): fetch its key blocks, if Redis has them and the copy has
                    # none beside it (looked for on the fetcher's thread, not the request's), for later loads
                    self._fetch_later(rec.blob)
        except Exception:  # anything unusual (a damaged header, Redis gone): the whole load says what and why
            return None
        why = mismatch(read_stamp(cube.meta, fallback_time=0.0), store=getattr(self.store.catalog, "store_id", None),
                       namespace=rec.namespace, memory_id=rec.id, text=rec.text, fingerprint=rec.fingerprint,
                       cube_fingerprint=cube.meta.get("fingerprint"))
        if why is not None:
            cube.close()
            return None
        return cube


    def _fetch_later(self, blob: str) -> None:
        """Fetch Redis blob ``blob`` into this machine's local copies, and its key blocks beside the copy
        (`fetch_key_blocks`, when none are there), on a background thread (one fetch of a blob at a time); with
        ``defer_fetches``, once `start_fetches` is called."""
        if blob in self._fetching:
            return
        if self._defer:
            if blob not in self._deferred:
                self._deferred.append(blob)
            return
        self._submit_fetch(blob)

    def start_fetches(self) -> int:
        """Start the background fetches held back (``defer_fetches``); how many were started."""
        due, self._deferred = self._deferred, []
        for blob in due:
            if blob not in self._fetching:
                self._submit_fetch(blob)
        return len(due)

    def _submit_fetch(self, blob: str) -> None:
        if self._fetcher is None:
            self._fetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvmem-fetch")
        self._fetching.add(blob)

        def fetch():
            try:
                copy = self.store.blobs.local_path(blob)
                if copy is not None and not _has_key_blocks(copy):  # and its key blocks, for the loads from it
                    fetch_key_blocks(self.store.blobs.db, blob, copy)
                self._key_blocks_checked[blob] = time.monotonic()
            except Exception as exc:  # the next request reads from Redis again, and tries again
                why = f"{type(exc).__name__}: {exc}"
                if why not in self._fetch_errors:  # once per reason: a fetch is tried again at every request
                    self._fetch_errors.add(why)
                    logger.warning("kvmem: fetching a local copy of blob %s from %s failed (%s); requests read it "
                                   "from Redis meanwhile (slower), and the fetch is tried again", blob,
                                   self.location, why)
            finally:
                self._fetching.discard(blob)

        self._fetcher.submit(fetch)


_KEY_BLOCKS_RECHECK_S = 60.0  # how often a copy without key blocks looks for them in Redis again


def _has_key_blocks(copy: Path) -> bool:
    """Whether key blocks (for any block size: Redis holds one set a blob) lie beside the local copy ``copy``."""
    return any(copy.parent.glob(f"{copy.stem}.keys-b*"))


class RedisBlobBytes:
    """A Redis blob read by byte ranges (GETRANGE), for `CubeFile.over`: a replica reads a cube it has no local
    copy of layer by layer, straight from Redis. Blob names are never reused, so every range is of one blob; a
    blob deleted meanwhile reads short, which `CubeFile` reports as an error.

    The ranges are received straight into the reader's buffers (a paged cache's blocks) where the client's
    connection allows (`kvmem.store.redis_ranges.RangeReader`: a fifth of redis-py's CPU per byte, a third of
    hiredis's, measured there); else through redis-py."""

    chunk = 1 << 20  # bytes per GETRANGE (a round trip each: more than a local file's preadv)

    def __init__(self, client, key: str):
        self.client, self.key = client, key
        self.size = int(client.strlen(key))
        self.ranges = RangeReader.of(client)  # None: redis-py reads them

    def _connected(self):
        if self.client is None:  # unpickled in an engine's worker process: connect there
            import inspect

            import redis

            known = inspect.signature(redis.Redis.__init__).parameters
            self.client = redis.Redis(**{k: v for k, v in self._connection.items() if k in known})
        return self.client

    def read_into(self, view: memoryview, offset: int) -> int:
        return self.read_into_many([view], offset)

    def read_into_many(self, views: list[memoryview], offset: int) -> int:
        """Consecutive bytes at ``offset`` into ``views`` in order, with one GETRANGE (not one per view: a part read
        into a paged cache's blocks comes as a hundred views); how many came."""
        if self.ranges is not None:
            return self.ranges.getrange_into(self.key, offset, views)
        return getrange_via(self._connected(), self.key, offset, views)

    def close(self) -> None:
        pass  # the reader's sockets are kept for the next cube's reads (one per thread reading at once)

    def __getstate__(self):
        if self.client is None:
            simple = self._connection
        else:
            pool = self.client.connection_pool
            simple = {k: v for k, v in pool.connection_kwargs.items()
                      if isinstance(v, (str, int, float, bool, type(None)))}
            # what the connection class says and its keyword arguments do not: TLS, a Unix socket's path
            from redis.connection import SSLConnection, UnixDomainSocketConnection

            if issubclass(pool.connection_class, SSLConnection):
                simple["ssl"] = True
            elif issubclass(pool.connection_class, UnixDomainSocketConnection):
                simple["unix_socket_path"] = simple.pop("path", None)
        return {"client": None, "_connection": simple, "key": self.key, "size": self.size, "ranges": self.ranges}


class FileKV:
    """A plan's KV still in its cube file: each layer's keys and values [kv_heads, end - start, head_dim] are read
    and verified (`CubeFile.read_layer`) only when the engine writes that layer, so a server reads a cube while
    its model computes. ``kv[i]`` reads layer i into fresh tensors; `layer` reads into reusable buffers."""

    def __init__(self, cube: CubeFile, start: int, end: int, *, key_blocks=None):
        self.cube, self.start, self.end = cube, start, end
        self.key_blocks = key_blocks  # the cube's keys in the cache's block layout, or None
        # (`kvmem.integrations.key_blocks`: read straight into the blocks where the cache keeps keys that way)

    def __len__(self) -> int:
        return self.cube.num_layers

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.layer(index)

    def window(self, start: int, end: int) -> "FileKV":
        """Positions [start, end) of this KV."""
        return FileKV(self.cube, self.start + start, self.start + end, key_blocks=self.key_blocks)

    def layer(self, index: int, *, scratch: Scratch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s (keys, values) of this window; views of ``scratch``'s buffers when given.

        Raises:
            CubeError: the layer's bytes do not match their checksum, or cannot be read."""
        k, v = self.cube.read_layer(index, scratch=scratch)
        return k[:, self.start:self.end], v[:, self.start:self.end]
