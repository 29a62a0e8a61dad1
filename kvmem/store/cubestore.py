"""CubeStore: memories kept for many processes. A catalog (rows, grants, a change log) plus cube blobs.

``CubeStore(location)`` picks the backends (kvmem/store/records.py has their protocols):
    a folder path           -> SQLite catalog + cube files in ``<folder>/cubes`` (kvmem/store/local.py)
    ``redis://host:port/db`` -> Redis (kvmem/store/redis_backend.py, the ``kvmem[redis]`` extra)

Safe to share: writes are atomic and ordered (reserve the blob name, put the bytes, commit the row) so a reader
never sees a partial cube, a killed writer leaves the store consistent, and `gc` can never delete a live or
committed cube. Cube files are found by names the store derives and checks, never by paths the catalog holds.
A lost, emptied or replaced catalog is an error, not an empty store; `CubeStore.rebuild_catalog` (`kvmem repair`)
rebuilds it from the cube files, each of which records its memory.

Namespaces and grants: every read goes through a `StoreView` of one namespace plus the namespaces that granted
it read access (``store.grant(owner, reader)``, revocable); rows of any other namespace are invisible to it,
whatever their ids. Writes go to its own namespace. Grants keep honest callers apart; they are not a security
boundary against anyone who can write the store's files (same OS user, same store credentials).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..cubes.memcube import MemCube
from ..errors import CubeError
from .records import (
    EVERYONE,
    BlobBackend,
    CatalogBackend,
    Record,
    check_blob,
    check_meta,
    check_name,
    new_blob_name,
    split_id,
)

__all__ = ["CubeStore", "StoreView", "Record", "CatalogBackend", "BlobBackend", "GCReport", "RebuildReport",
           "check_meta", "split_id"]

KINDS = ("text", "memcube")
GC_GRACE_S = 600.0          # unreferenced files and unfinished writes younger than this are left to their writer
CHANGES_KEPT = 100_000      # change-log entries gc keeps (a reader further behind rereads everything)
_log = logging.getLogger("kvmem.store")
MEMORY_KEY = "memory"       # cube meta written by put_cube: the memory the file belongs to (namespace, id, meta)
RECOVERED = "recovered"     # namespace of cubes rebuilt from files that do not record their memory
LOST = ("text-only memories (no cube file), grants, use counts and the change log lived only in the catalog: they "
        "are gone unless the old catalog is restored from a backup")


@dataclass
class GCReport:
    """What `CubeStore.gc` did: files removed, memories made text-only because their cube file was missing or
    misnamed (``"namespace/id"``), expired reservations of writers that never committed."""

    removed: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    swept: list[str] = field(default_factory=list)

    def __iter__(self):  # older callers treated the result as the list of removed files
        return iter(self.removed)

    def __len__(self):
        return len(self.removed)


@dataclass
class RebuildReport:
    """What `CubeStore.rebuild_catalog` did: memories back in the catalog (``"namespace/id"``; those from cube
    files that do not record their memory are ``recovered/<blob>``), files it could not use (``"cubes/<file>:
    why"``; left in place, and the next gc removes them as files no memory names), the old catalog files it moved
    aside, and what no cube file holds."""

    rebuilt: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    moved_aside: list[str] = field(default_factory=list)
    lost: str = LOST


def open_backends(location, *, create: bool) -> tuple[CatalogBackend, BlobBackend]:
    """(catalog, blobs) for a store location (a folder or a ``redis://`` URL)."""
    if isinstance(location, str) and location.startswith(("redis://", "rediss://", "unix://")):
        try:
            from .redis_backend import open_redis_backends
        except ImportError as exc:
            raise CubeError(f"a Redis store ({location}) needs the redis extra: pip install 'kvmem[redis]' "
                            f"({exc})") from None
        return open_redis_backends(location, create=create)
    if not isinstance(location, (str, os.PathLike)):
        raise CubeError(f"a store location is a folder path or a redis:// URL, got {type(location).__name__}")
    from .local import open_local_backends

    return open_local_backends(location, create=create)


class CubeStore:
    """A store of memories. Use `view(namespace, shared=...)` to read and write them.

    Args:
        location: a store folder, or ``redis://host:port/db`` for a store several machines share.
        create: create the store if it does not exist (default). ``False``: a missing store is a CubeError
            (the CLI's read commands use it, so a mistyped ``--store`` never becomes a new empty store).
        catalog, blobs: backends to use instead of the ones ``location`` names (tests, custom deployments).

    Example:
        >>> store = kvmem.CubeStore("~/.kvmem/store")
        >>> store.grant("public", "alice")                 # public's memories become readable by alice
        >>> alice = store.view("alice", shared=["public"])
        >>> alice.add("m1", "Alice lives in Oslo.")
        >>> alice.put_cube("m1", cube)
    """

    def __init__(self, location, *, create: bool = True, catalog: CatalogBackend | None = None,
                 blobs: BlobBackend | None = None):
        if catalog is None or blobs is None:
            found_catalog, found_blobs = open_backends(location, create=create)
            catalog, blobs = catalog or found_catalog, blobs or found_blobs
        self.location = location
        self.catalog, self.blobs = catalog, blobs
        self.root: Path | None = getattr(blobs, "root", None)  # a local folder (embedding cache), if any

    def __repr__(self) -> str:
        return f"CubeStore({self.catalog.describe()}, {self.blobs.describe()})"

    # ---------------------------------------------------------------- views and grants
    def view(self, namespace: str, shared: Iterable[str] = ()) -> "StoreView":
        """Everything ``namespace`` may see: its own memories, then those of the ``shared`` namespaces, each of
        which must have granted ``namespace`` read access (`grant`)."""
        own = check_name(namespace, "namespace")
        if isinstance(shared, str) or not isinstance(shared, Iterable):
            raise CubeError(f"shared must be a list of namespaces, e.g. shared=['public'], got {shared!r:.60}")
        others = tuple(dict.fromkeys(check_name(s, "shared namespace") for s in shared if s != own))
        granted = self._granted(own)
        refused = [s for s in others if s not in granted]
        if refused:
            raise CubeError(f"namespace {refused[0]!r} has not shared its memories with {own!r}: the owner grants "
                            f"read access with store.grant({refused[0]!r}, {own!r}) (or `kvmem share {own} -n "
                            f"{refused[0]}`); grants are revocable (store.revoke / `kvmem unshare`)")
        return StoreView(self, own, others)

    def _granted(self, reader: str) -> set[str]:
        """Namespaces whose memories ``reader`` may read (besides its own)."""
        return {owner for owner, r in self.catalog.grants() if r in (reader, EVERYONE)}

    def grant(self, owner: str, reader: str) -> None:
        """Let ``reader`` (a namespace, or ``"*"`` for every namespace) read ``owner``'s memories, until
        `revoke`. Recorded in the catalog (and its change log)."""
        owner = check_name(owner, "owner namespace")
        if reader != EVERYONE:
            check_name(reader, "reader namespace")
        if owner == reader:
            raise CubeError(f"{owner!r} can always read its own memories: grant to another namespace")
        self.catalog.grant(owner, reader)

    def revoke(self, owner: str, reader: str) -> bool:
        """Withdraw a grant; views of ``reader`` stop seeing ``owner``'s memories at their next read. True if
        there was a grant."""
        return self.catalog.revoke(check_name(owner, "owner namespace"),
                                   reader if reader == EVERYONE else check_name(reader, "reader namespace"))

    def grants(self) -> list[tuple[str, str]]:
        """Every ``(owner, reader)`` grant."""
        return self.catalog.grants()

    # ---------------------------------------------------------------- change detection
    def version(self) -> int:
        """A number that grows with every change to the store (see `StoreView.changes_since`)."""
        return self.catalog.version()

    # ---------------------------------------------------------------- maintenance
    def gc(self, *, grace_s: float = GC_GRACE_S) -> GCReport:
        """Remove cube files no row names and repair rows whose cube file is missing; returns a `GCReport`.

        Never deletes a committed cube, nor one a live writer is putting (its name is reserved before its
        bytes exist; see kvmem/store_backend.py). ``grace_s``: unreferenced files, unfinished uploads and
        reservations younger than this are left alone (a writer that stalls longer gets a clean error at its
        commit instead). Refuses (CubeError) to run on a catalog it cannot trust.
        """
        if isinstance(grace_s, bool) or not isinstance(grace_s, (int, float)) or grace_s < 0:
            raise CubeError(f"grace_s must be a number of seconds >= 0, got {grace_s!r}")
        self.catalog.check(thorough=True)
        now = time.time()
        report = GCReport(swept=self.blobs.sweep(now - grace_s))
        present = self.blobs.names()            # list the blobs first, then read who references them
        old = {name for name, mtime in present.items() if mtime < now - grace_s}
        named, reserved = self.catalog.references(expire_before=now - grace_s, expire=old)
        for name in sorted(old - named - reserved):
            self.blobs.delete(name)
            report.removed.append(f"cubes/{name}.safetensors")
        for rec in self.catalog.list(None):
            if rec.blob is None and rec.kind != "memcube":
                continue
            if rec.blob is not None and _is_valid_blob(rec.blob):
                if rec.blob in present:
                    continue
                try:
                    if self.blobs.local_path(rec.blob) is not None:  # put after the listing
                        continue
                except CubeError:  # there but unreadable to this process: not lost, not ours to repair
                    continue
            if self.catalog.drop_blob(rec.namespace, rec.id, rec.blob):
                report.repaired.append(rec.qualified)
                _log.warning("gc: %s named a missing or invalid cube file %r; it is text-only now",
                             rec.qualified, rec.blob)
        self.catalog.trim_changes(CHANGES_KEPT)
        return report

    @classmethod
    def rebuild_catalog(cls, location) -> RebuildReport:
        """Rebuild a lost, emptied, damaged or replaced catalog of a store folder from its cube files.

        Each cube file written by `StoreView.put_cube` records its memory (namespace, id, text, meta); a cube from
        an older kvmem becomes ``recovered/<blob>`` with the cube's own text. Every file is fully validated
        (`MemCube.load`) first; where two files claim one memory, the newer wins. The old catalog is moved aside,
        not deleted. What only the catalog held (text-only memories, grants, use counts) cannot come back.

        Returns:
            RebuildReport.

        Raises:
            CubeError: not a local store folder, no write access, or the catalog is intact (nothing to rebuild).
        """
        if isinstance(location, str) and location.startswith(("redis://", "rediss://", "unix://")):
            raise CubeError(f"{location}: rebuild_catalog rebuilds store folders; a Redis store's catalog lives in "
                            "Redis itself: restore it from a Redis backup (RDB or AOF)")
        if not isinstance(location, (str, os.PathLike)):
            raise CubeError(f"a store location is a folder path, got {type(location).__name__}")
        from .local import fresh_local_catalog

        catalog, blobs, moved = fresh_local_catalog(location)
        report = RebuildReport(moved_aside=moved)
        chosen: dict[tuple[str, str], tuple[Record, str]] = {}
        for name, mtime in sorted(blobs.names().items()):
            where = f"cubes/{name}.safetensors"
            try:
                path = blobs.local_path(name)
                if path is None:
                    continue  # removed while listing
                rec = _record_from_cube(MemCube.load(path), name, mtime, path.stat().st_size)
            except (CubeError, OSError) as exc:
                report.skipped.append(f"{where}: {exc}")
                continue
            before = chosen.get((rec.namespace, rec.id))
            if before is not None:
                older, newer = sorted((before, (rec, where)), key=lambda pair: pair[0].last_used)
                report.skipped.append(f"{older[1]}: an older version of {rec.qualified} (kept {newer[1]})")
                rec, where = newer
            chosen[(rec.namespace, rec.id)] = (rec, where)
        for rec, _ in sorted(chosen.values(), key=lambda pair: pair[0].created):
            catalog.reserve(rec.blob, time.time())
            catalog.upsert(rec)
            (report.recovered if rec.namespace == RECOVERED and rec.id == rec.blob else report.rebuilt).append(
                rec.qualified)
        return report


def _record_from_cube(cube: MemCube, blob: str, mtime: float, size: int) -> Record:
    """The catalog row a cube file of the store stands for (CubeError when the file cannot say)."""
    memory = cube.meta.get(MEMORY_KEY)
    if memory is None:  # put by a kvmem from before files recorded their memory
        namespace, memory_id, text, meta, created, written = RECOVERED, blob, cube.text, {}, mtime, mtime
    elif not isinstance(memory, dict):
        raise CubeError(f"its {MEMORY_KEY!r} metadata is damaged ({type(memory).__name__}, not an object)")
    else:
        namespace = check_name(memory.get("namespace"), "namespace")
        memory_id = check_name(memory.get("id"), "memory id")
        text, meta = memory.get("text") or cube.text, check_meta(memory.get("meta"))
        created, written = (_seconds(memory.get(key), mtime) for key in ("created", "written"))
    if not isinstance(text, str) or not text.strip():
        raise CubeError("the cube records no text (it was built from ids and its text lived only in the catalog): "
                        "move the file out of cubes/ before the next gc if you want to keep it")
    return Record(namespace, memory_id, text, "memcube", meta, cube.fingerprint, cube.num_tokens, size, blob,
                  created, written)  # last_used: when this version was written (the newer of two copies wins)


def _seconds(value, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


class StoreView:
    """The store as one namespace sees it (own + granted shared namespaces); writes go to the own namespace.

    Ids: a plain ``"id"`` means the first visible namespace that has it (own first); ``"namespace/id"`` (as
    `Record.qualified` gives) names one memory unambiguously. Records always carry their namespace.

    Change detection (for a process that keeps an index or cubes of the store in memory):
        >>> v = view.version()                        # remember where you looked
        >>> v, changes = view.changes_since(v)        # later: what changed in the visible namespaces
        >>> # changes: [(namespace, id, op), ...], op in add / cube / rm / repair; ("owner", "reader",
        >>> # "grant"/"revoke") when what this view may read changed; None: too far behind, reread everything
    Both are one small catalog query, cheap enough for every request.
    """

    def __init__(self, store: CubeStore, namespace: str, shared: tuple[str, ...] = ()):
        self.store = store
        self._own, self._shared = namespace, tuple(shared)

    def __repr__(self) -> str:
        return f"StoreView({self.namespace!r}, shared={list(self._shared)}, {self.store!r})"

    @property
    def namespace(self) -> str:
        return self._own

    @property
    def namespaces(self) -> tuple[str, ...]:
        """The own namespace, then the shared ones whose grants still stand (a revoke applies at once)."""
        if not self._shared:
            return (self._own,)
        granted = self.store._granted(self._own)
        return (self._own, *(s for s in self._shared if s in granted))

    @staticmethod
    def mint_id(text: str) -> str:
        """The id a memory gets when the caller names none: ``m-`` and 12 hex digits of the text's xxh3 digest."""
        import xxhash

        return "m-" + xxhash.xxh3_64(str(text).encode()).hexdigest()[:12]

    # ---------------------------------------------------------------- sharing
    def share_with(self, reader: str) -> None:
        """Grant ``reader`` read access to this view's own namespace (`CubeStore.grant`)."""
        self.store.grant(self._own, reader)

    def unshare(self, reader: str) -> bool:
        """Revoke ``reader``'s read access to this view's own namespace."""
        return self.store.revoke(self._own, reader)

    # ---------------------------------------------------------------- writes
    def _own_id(self, memory_id: str) -> str:
        namespace, plain = split_id(memory_id)
        if namespace is not None and namespace != self._own:
            raise CubeError(f"memory id {memory_id!r} is in namespace {namespace!r}; this view writes only to "
                            f"{self._own!r} (shared namespaces are read-only)")
        return plain

    def add(self, memory_id: str, text: str, meta: dict | None = None) -> Record:
        """Add (or replace) a plaintext memory. Replacing the text drops a cube built from the old text.

        ``meta`` is checked (`check_meta`) before anything is written. No id at hand: ``view.mint_id(text)``."""
        memory_id = self._own_id(memory_id)
        if not isinstance(text, str) or not text.strip():
            raise CubeError(f"memory text must be a non-empty string, got {text!r:.40}")
        meta = check_meta(meta)
        now = time.time()
        rec = Record(self._own, memory_id, text, "text", meta, created=now, last_used=now)
        self._delete_blob(self.store.catalog.upsert(rec))
        return rec

    def put_cube(self, memory_id: str, cube: MemCube, *, text: str | None = None, meta: dict | None = None,
                 quantize: str | None = None) -> Record:
        """Store ``cube`` as the activation memory of ``memory_id`` (its text defaults to the cube's text).
        ``quantize``: "int8" / "int4" stores it quantized, with its measured error (`MemCube.quantize`)."""
        memory_id = self._own_id(memory_id)
        if not isinstance(cube, MemCube):
            raise CubeError(f"put_cube takes a MemCube, got {type(cube).__name__}")
        if quantize is not None:
            cube = cube.quantize(quantize)
        if text is not None and (not isinstance(text, str) or not text.strip()):
            raise CubeError(f"text must be a non-empty string, got {text!r:.40}")
        old = self.store.catalog.get((self._own,), memory_id)
        text = text or cube.text or (old.text if old else None)
        if not text:
            raise CubeError(f"memory {memory_id!r} needs a text (the cube was built from ids: pass text=...)")
        meta = check_meta(meta if meta is not None else (old.meta if old else None))
        catalog, blobs = self.store.catalog, self.store.blobs
        name = new_blob_name()  # a new blob per version: readers of the old one are safe
        # the file records which memory it is, so a lost catalog can be rebuilt from the files (rebuild_catalog)
        now = time.time()
        record = {"namespace": self._own, "id": memory_id, "meta": meta, "created": old.created if old else now,
                  "written": now}
        if text != cube.text:
            record["text"] = text
        stamped = cube.with_meta({MEMORY_KEY: record})  # a quantized cube stays packed
        catalog.reserve(name, time.time())
        staged = blobs.stage(name)
        try:
            try:
                stamped.save(staged)
                size = blobs.put(name, staged)
            except CubeError:  # already says what and why (a Redis that cannot be reached, a folder path)
                raise
            except Exception as exc:  # an OSError, safetensors' own error type, anything from the staged file
                raise CubeError(f"writing the cube of {self._own}/{memory_id} failed ({type(exc).__name__}: {exc}); "
                                "nothing was committed: write it again (if a gc with no grace ran beside this "
                                "write, it removed the unfinished file: give gc a grace, e.g. the default "
                                "`kvmem gc` keeps 10 minutes)") from None
            now = time.time()
            rec = Record(self._own, memory_id, text, "memcube", meta, cube.fingerprint, cube.num_tokens, size, name,
                         now, now)
            replaced = catalog.upsert(rec)
        except OSError as exc:  # the catalog's own files
            self._undo_put(name, staged)
            raise CubeError(f"writing the cube of {self._own}/{memory_id} failed ({exc}); nothing was committed: "
                            "write it again") from None
        except BaseException:
            self._undo_put(name, staged)
            raise
        self._delete_blob(replaced)
        return rec

    def _undo_put(self, name: str, staged) -> None:
        """Remove what a failed put left (staged file, blob, reservation); gc collects anything missed."""
        catalog, blobs = self.store.catalog, self.store.blobs
        for undo in (lambda: Path(staged).unlink(missing_ok=True), lambda: blobs.delete(name),
                     lambda: catalog.release(name)):
            try:
                undo()
            except Exception:  # the original error matters more; gc collects what is left
                pass

    def _delete_blob(self, name: str | None) -> None:
        if not name:
            return
        try:
            self.store.blobs.delete(check_blob(name))
        except CubeError as exc:  # a misnamed blob is never touched; gc reports it
            _log.warning("not deleting %r: %s", name, exc)

    def rm(self, memory_id: str) -> bool:
        """Delete ``memory_id`` from the own namespace (shared namespaces are read-only here)."""
        rec = self.store.catalog.delete(self._own, self._own_id(memory_id))
        if rec is None:
            return False
        self._delete_blob(rec.blob)
        return True

    # ---------------------------------------------------------------- reads
    def _where(self, memory_id: str) -> tuple[str, ...]:
        """The namespaces to look ``memory_id`` up in, own first; and the plain id."""
        namespace, plain = split_id(memory_id)
        visible = self.namespaces
        return ((namespace,) if namespace in visible else ()) if namespace else visible, plain

    def get(self, memory_id: str) -> Record | None:
        """The record of ``memory_id`` (plain: own namespace first; or ``"namespace/id"``) visible to this view,
        or None."""
        namespaces, plain = self._where(memory_id)
        return self.store.catalog.get(namespaces, plain) if namespaces else None

    def load_cube(self, memory_id: str, *, device=None) -> MemCube | None:
        """The validated cube of ``memory_id``, or None if it has none (or is not visible here).

        A row whose cube file is gone (deleted by hand, an old gc) is repaired: the memory becomes text-only
        and None is returned, so the request goes on with the text instead of failing every time."""
        last = None
        for _ in range(3):  # the file may be replaced between the catalog read and the open: read again
            rec = self.get(memory_id)
            if rec is None or rec.blob is None:
                return None
            if not _is_valid_blob(rec.blob):  # a damaged or forged row: its "file" is never opened
                return self._repair(rec)
            path = self.store.blobs.local_path(rec.blob)  # CubeError if it exists but may not be read
            if path is not None:
                try:
                    return MemCube.load(path, device=device)
                except CubeError:
                    if self.store.blobs.local_path(rec.blob) is not None:
                        raise
            elif rec.blob == last:  # the row still names a file that is not there: not a race, a loss
                return self._repair(rec)
            last = rec.blob
        raise CubeError(f"memory {memory_id!r}: its cube file keeps being replaced; is another process rewriting "
                        "it in a loop?")

    def _repair(self, rec: Record) -> None:
        try:
            if self.store.catalog.drop_blob(rec.namespace, rec.id, rec.blob):
                _log.warning("memory %s named a missing or invalid cube file %r: it is text-only now",
                             rec.qualified, rec.blob)
        except CubeError as exc:  # a read-only reader cannot repair; it still answers from the text
            _log.warning("memory %s names a missing or invalid cube file %r (%s)", rec.qualified, rec.blob, exc)
        return None

    def ls(self, kind: str | None = None) -> list[Record]:
        """Every memory this view sees (records carry their namespace), optionally of one kind."""
        if kind is not None and kind not in KINDS:
            raise CubeError(f"kind must be one of {KINDS}, got {kind!r}")
        return self.store.catalog.list(self.namespaces, kind)

    def touch(self, memory_id: str) -> None:
        """Count a use of ``memory_id`` (hits, last used)."""
        rec = self.get(memory_id)
        if rec is not None:
            self.store.catalog.touch(rec.namespace, rec.id, time.time())

    def stats(self) -> dict:
        recs = self.ls()
        return {"namespaces": list(self.namespaces), "memories": len(recs),
                "cubes": sum(r.kind == "memcube" for r in recs), "cube_bytes": sum(r.bytes for r in recs),
                "tokens": sum(r.tokens for r in recs), "hits": sum(r.hits for r in recs)}

    # ---------------------------------------------------------------- change detection
    def version(self) -> int:
        """The store's change counter now (pass it to `changes_since` later)."""
        return self.store.catalog.version()

    def changes_since(self, version: int) -> tuple[int, list[tuple[str, str, str]] | None]:
        """``(now, changes)``: what changed after ``version`` that this view can see, oldest first, as
        ``(namespace, id, op)`` (op: add, cube, rm, repair), plus ``(owner, reader, "grant"/"revoke")`` for
        grants that change what this view reads. ``changes`` is None when the change log no longer reaches
        back to ``version``: reread everything."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise CubeError(f"version must be an int >= 0 (from view.version()), got {version!r}")
        now, changes = self.store.catalog.changes_since(version)
        if changes is None:
            return now, None
        visible = set(self._own_and_requested())
        out = []
        for namespace, memory_id, op in changes:
            if op in ("grant", "revoke"):
                if memory_id in (self._own, EVERYONE) and namespace in visible:
                    out.append((namespace, memory_id, op))
            elif namespace in visible:
                out.append((namespace, memory_id, op))
        return now, out

    def _own_and_requested(self) -> tuple[str, ...]:
        return (self._own, *self._shared)


def _is_valid_blob(name) -> bool:
    try:
        check_blob(name)
        return True
    except CubeError:
        return False
