"""CubeStore: memories kept for many processes. A catalog (rows, grants, a change log) plus cube blobs.

``CubeStore(location)`` picks the backends (kvmem/store/records.py has their protocols):
    a folder path           -> SQLite catalog + cube files in ``<folder>/cubes`` (kvmem/store/local.py)
    ``redis://host:port/db`` -> Redis (kvmem/store/redis_backend.py, the ``kvmem[redis]`` extra)

Safe to share: writes are atomic and ordered (reserve the blob name, put the bytes, commit the row) so a reader
never sees a partial cube, a killed writer leaves the store consistent, and `gc` can never delete a live or
committed cube. Cube files are found by names the store derives and checks, never by paths the catalog holds.
A lost, emptied or replaced catalog is an error, not an empty store; `CubeStore.rebuild_catalog` (`kvmem repair`,
kvmem/store/repair.py) rebuilds it from the cube files, each of which records its memory (kvmem/store/stamp.py),
and gc never deletes a file that holds the last copy of a memory. `StoreView` (kvmem/store/view.py) reads and writes.

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

from ..errors import CubeError
from .records import (EVERYONE, BlobBackend, CatalogBackend, Record, StoreVersion, check_meta, check_name,
                      is_valid_blob, split_id)
from . import expiry
from .forgetting import Receipt, delete_blob, invalidate, stale_adapters
from .repair import RebuildReport
from .stamp import MEMORY_KEY, RECOVERED, peek_stamp  # noqa: F401  (MEMORY_KEY, RECOVERED lived here)
from .view import KINDS, StoreView  # noqa: F401  (StoreView and KINDS lived here)

__all__ = ["CubeStore", "StoreView", "Record", "CatalogBackend", "BlobBackend", "GCReport", "RebuildReport",
           "check_meta", "split_id"]

GC_GRACE_S = 600.0          # unreferenced files and unfinished writes younger than this are left to their writer
CHANGES_KEPT = 100_000      # change-log entries gc keeps (a reader further behind rereads everything)
_log = logging.getLogger("kvmem.store")


@dataclass
class GCReport:
    """What `CubeStore.gc` did: files removed, memories made text-only because their cube file was missing or
    misnamed (``"namespace/id"``), expired reservations of writers that never committed, files no row names
    that it kept because they may hold the last copy of a memory (``"cubes/<file>: why"``), memories removed
    because they expired (``expired``: ``"namespace/id"``), stored units removed because a memory they were made
    from is gone, changed or expired (``invalidated``: `Receipt.dependants` entries), and AdapterCubes that
    learned such a memory (``stale_adapters``: they stay, refused per request by `lineage.usable_for`)."""

    removed: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    swept: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    invalidated: list[dict] = field(default_factory=list)
    stale_adapters: list[dict] = field(default_factory=list)

    def __iter__(self):  # older callers treated the result as the list of removed files
        return iter(self.removed)

    def __len__(self):
        return len(self.removed)


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
        from .batch import recover_on_open

        recover_on_open(self)  # what a killed batch left (kvmem/store/batch.py): one small read when nothing

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
        granted = self.granted(own)
        refused = [s for s in others if s not in granted]
        if refused:
            raise CubeError(f"namespace {refused[0]!r} has not shared its memories with {own!r}: the owner grants "
                            f"read access with store.grant({refused[0]!r}, {own!r}) (or `kvmem share {own} -n "
                            f"{refused[0]}`); grants are revocable (store.revoke / `kvmem unshare`)")
        return StoreView(self, own, others)

    def granted(self, reader: str) -> set[str]:
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
    def version(self) -> StoreVersion:
        """A number that grows with every change to the store, with the catalog's epoch (see
        `StoreView.changes_since`)."""
        return self.catalog.version()

    # ---------------------------------------------------------------- maintenance
    def gc(self, *, grace_s: float = GC_GRACE_S) -> GCReport:
        """Remove cube files no row names and repair rows whose cube file is missing; returns a `GCReport`.

        Never deletes a committed cube, nor one a live writer is putting (its name is reserved before its
        bytes exist; see kvmem/store/records.py), nor the last copy of a memory: a file no row names is removed
        only when its memory has a later version or was removed after it was written (its stamp against the
        catalog and its change log), when its writer never committed it, or when it records no memory of this
        store that can be read; every other such file is kept and listed in ``kept`` (`kvmem repair` adopts the
        ones whose memory the catalog lacks). ``grace_s``: unreferenced files, unfinished uploads and
        reservations younger than this are left alone (a writer that stalls longer gets a clean error at its
        commit instead). Refuses (CubeError) to run on a catalog it cannot trust.
        """
        if isinstance(grace_s, bool) or not isinstance(grace_s, (int, float)) or grace_s < 0:
            raise CubeError(f"grace_s must be a number of seconds >= 0, got {grace_s!r}")
        self.catalog.check(thorough=True)
        now = time.time()
        report = GCReport(swept=self.blobs.sweep(now - grace_s))
        self._forget_expired(report)
        present = self.blobs.names()            # list the blobs first, then read who references them
        old = {name for name, mtime in present.items() if mtime < now - grace_s}
        named, reserved, expired = self.catalog.references(expire_before=now - grace_s, expire=old)
        for name in sorted(old - named - reserved):
            keep = None if name in expired else self._last_copy_of(name, present[name])
            if keep is not None:
                report.kept.append(f"cubes/{name}.safetensors: {keep}")
                continue
            self.blobs.delete(name)
            report.removed.append(f"cubes/{name}.safetensors")
        for rec in self.catalog.list(None):
            if rec.blob is None and rec.kind != "memcube":
                continue
            if rec.blob is not None and is_valid_blob(rec.blob):
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

    def _forget_expired(self, report: GCReport) -> None:
        """Remove expired memories and every stored unit derived from content that is gone (an expired or
        deleted source, or an edit whose cascade did not complete); list stale adapters."""
        at = expiry.now()
        receipt = Receipt("gc", "expired", True)
        gone = []
        for rec in self.catalog.list(None):
            if not expiry.is_expired(rec.meta, at):
                continue
            now = self.catalog.get((rec.namespace,), rec.id)  # rewritten since the listing: not expired any more
            if now is None or not expiry.is_expired(now.meta, at):
                continue
            removed = self.catalog.delete(rec.namespace, rec.id)
            if removed is not None:
                gone.append(rec.qualified)
                delete_blob(self, removed.blob if is_valid_blob(removed.blob) else None, receipt)
        invalidate(self, gone, receipt, at=at, everything=True)
        report.expired = gone
        report.invalidated = receipt.dependants
        report.removed += receipt.cube_files
        report.stale_adapters = stale_adapters(self, at=at)

    def _last_copy_of(self, name: str, mtime: float) -> str | None:
        """Why the unreferenced file ``name`` must be kept (it may hold the last copy of a memory), or None."""
        try:
            path = self.blobs.local_path(name)
            stamp = peek_stamp(path, fallback_time=mtime) if path is not None else None
        except CubeError:
            return None  # unreadable: nothing a repair could rebuild from (`kvmem repair` skips it too)
        if stamp is None:
            return None  # records no memory: an older kvmem's leftover, or not a store file
        ours = getattr(self.catalog, "store_id", None)  # (a custom catalog may not know its store's id)
        if stamp.store and ours and stamp.store != ours:
            return f"it belongs to another store (id {stamp.store}): move it to that store, or delete it by hand"
        row = self.catalog.get((stamp.namespace,), stamp.id)
        if row is not None and row.blob is not None and is_valid_blob(row.blob):
            try:
                current = self.blobs.local_path(row.blob)
                newest = peek_stamp(current, fallback_time=0.0) if current is not None else None
            except CubeError:
                newest = None
            if newest is not None and newest.written >= stamp.written:
                return None  # an older version of a memory the catalog holds
        changed = self.catalog.changed_at(stamp.namespace, stamp.id)
        if changed is not None and changed >= stamp.written and (row is None or row.blob is None):
            return None  # removed, or made text-only, after this file was written
        if row is None:
            return f"it holds {stamp.qualified}, which the catalog lacks: `kvmem repair` adopts it"
        return (f"it holds a version of {stamp.qualified} newer than the catalog's: the catalog's stands "
                "(move this file aside if it is not wanted)")

    @classmethod
    def rebuild_catalog(cls, location) -> RebuildReport:
        """Rebuild a lost, emptied, damaged or replaced catalog of a store folder from what is left: every table
        of the old catalog that can still be read, and the cube files (kvmem/store/repair.py has the rules).

        Atomic: the new catalog is built aside and swapped in only when complete (or, for a sound catalog that
        lacks memories its files hold, changed in one transaction); a repair that fails changes nothing and can
        be run again. Files it cannot read, files of another store and conflicting copies are reported, never
        adopted over a genuine memory. The old catalog is moved aside, not deleted.

        Returns:
            RebuildReport.

        Raises:
            CubeError: not a local store folder, no write access, the repair could not complete (nothing
                changed), or the catalog is intact and every file's memory is in it (nothing to rebuild).
        """
        from .repair import rebuild_catalog

        return rebuild_catalog(location)
