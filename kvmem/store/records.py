"""The store's record rules (names, ids, meta) and its two backends, as protocols: a catalog (rows, grants, a change log) and blobs (cube file bytes).

`CubeStore` (kvmem/store/cubestore.py) holds the rules (namespaces, grants, commit order, repair); a backend only keeps
data. Two implementations: SQLite + a local folder (kvmem/store/local.py) and Redis (kvmem/store/redis_backend.py,
the ``kvmem[redis]`` extra). Both are opened by ``CubeStore(location)``; a backend module imports this one and
never kvmem/store/cubestore.py (the store imports the backends).

The commit order that makes a store safe to share (any backend):

1. ``catalog.reserve(blob, when)``: the new blob's name is recorded before any byte exists;
2. ``blobs.put(blob, staged_file)``: the bytes become visible under that name, atomically;
3. ``catalog.upsert(record)``: one atomic step that consumes the reservation and commits the row (it fails,
   and the writer removes its blob, when the reservation is gone: gc expired a writer that stalled too long).

So at every moment each blob is named by a row or by a reservation, and `gc` (which reads the references
*after* listing the blobs) can never delete a live or committed cube, whatever the timing.

A batch (kvmem/store/batch.py: an install of a bundle) keeps this order for many memories at once: it reserves and
puts every blob, then commits every row with ONE ``catalog.upsert_many`` (readers see all of the rows or none).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol

from ..errors import CubeError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")   # namespaces and memory ids: never a "/"
BLOB = re.compile(r"^[0-9a-f]{32}$")                          # blob names: a uuid4's hex, nothing else
EVERYONE = "*"                                                # grant reader meaning every namespace
OPS = ("add", "cube", "rm", "repair", "grant", "revoke")      # what a change-log entry records
DERIVED_KEY = "derived_from"                                  # meta key: what a derived unit was made from
# a blob's key blocks beside its file ("<blob>.keys-b<N>"), written by a server (kvmem/integrations/key_blocks.py,
# `key_blocks_path`): deleted with the blob, swept by gc when the blob went another way
KEY_BLOCKS_FILE = re.compile(r"([0-9a-f]{32})\.keys-b\d+")


def check_name(value, what: str) -> str:
    """``value`` if it is a valid namespace / memory id, else a CubeError saying the rule."""
    if not isinstance(value, str) or not NAME.fullmatch(value):  # fullmatch: "$" alone lets "alice\n" through
        raise CubeError(f"{what} must be 1-128 characters of letters, digits and . _ : @ - (starting with a letter "
                        f"or digit), got {value!r:.80}")
    return value


def _is_iso_date(value) -> bool:
    import datetime

    try:  # the whole string: a date, or a date with a time ("2023-05-08T14:00"); never a date and then garbage
        datetime.datetime.fromisoformat(value.strip())
        return True
    except (AttributeError, TypeError, ValueError):
        return False


def check_meta(meta: dict | None) -> dict:
    """A copy of a memory's meta, checked where the index reads it (``turn`` orders a session's memories), where
    the store reads it (``ttl`` / ``expires``: its lifetime; ``derived_from``: what it was made from) and where the
    store writes it (JSON)."""
    import json

    if meta is not None and not isinstance(meta, dict):
        raise CubeError(f"meta must be a dict, got {type(meta).__name__}")
    meta = dict(meta or {})
    turn = meta.get("turn")
    if turn is not None and (isinstance(turn, bool) or not isinstance(turn, (int, float))):
        raise CubeError(f"meta['turn'] must be a number (the memory's order in its session), got {turn!r}")
    speaker = meta.get("speaker")
    if speaker is not None and (not isinstance(speaker, str) or not speaker.strip()):
        raise CubeError(f"meta['speaker'] must be a non-empty string (who said the memory), got {speaker!r}")
    date = meta.get("date")
    if date is not None and not _is_iso_date(date):
        raise CubeError(f"meta['date'] must be an ISO date string like '2023-05-08' (the session's date), "
                        f"got {date!r}")
    from .expiry import check_expiry

    check_expiry(meta)  # ttl / expires: the memory's lifetime (kvmem/store/expiry.py)
    if meta.get(DERIVED_KEY) is not None:  # what a derived memory was made from (kvmem/store/lineage.py)
        meta[DERIVED_KEY] = check_sources(meta[DERIVED_KEY])
    try:
        json.dumps(meta, allow_nan=False)
        _check_keys(meta)
    except RecursionError:
        raise CubeError("meta is nested too deeply to store as JSON: flatten it") from None
    except (TypeError, ValueError) as exc:
        raise CubeError(f"meta must be JSON (str keys; str, number, bool, None, list, dict values): {exc}") from None
    return meta


def check_sources(entries) -> list[dict]:
    """``entries`` as read from a unit's meta (``derived_from``, kvmem/store/lineage.py), checked: a list of
    ``{"memory": "ns/id", "text_sha256": hex}``."""
    if not isinstance(entries, list):
        raise CubeError(f"meta[{DERIVED_KEY!r}] must be a list of sources, got {type(entries).__name__}")
    out = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("memory"), str) \
                or not isinstance(entry.get("text_sha256"), str) or len(entry["text_sha256"]) != 64:
            raise CubeError(f"meta[{DERIVED_KEY!r}] entries must be {{'memory': 'ns/id', 'text_sha256': hex}}, "
                            f"got {entry!r:.80}")
        namespace, plain = split_id(entry["memory"])
        if namespace is None:
            raise CubeError(f"a lineage entry names its memory with its namespace ('ns/id'), got {entry['memory']!r}")
        check_name(plain, "memory id")
        out.append({"memory": entry["memory"], "text_sha256": entry["text_sha256"].lower()})
    return out


def _check_keys(value) -> None:
    """JSON turns every key into a string: refuse other keys rather than hand back a different dict."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"key {key!r} is a {type(key).__name__}, not a str")
            _check_keys(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_keys(item)


def split_id(memory_id: str) -> tuple[str | None, str]:
    """``"ns/id"`` -> ``("ns", "id")``; a plain ``"id"`` -> ``(None, "id")``. Both parts are checked."""
    if isinstance(memory_id, str) and "/" in memory_id:
        namespace, _, plain = memory_id.partition("/")
        return check_name(namespace, "the namespace part of a memory id"), check_name(plain, "memory id")
    return None, check_name(memory_id, "memory id")


def qualify(namespace: str, memory_id: str) -> str:
    """A memory's qualified id ``namespace/id``: one memory, unambiguously (names hold no '/'; `split_id` undoes it)."""
    return f"{namespace}/{memory_id}"


def new_blob_name() -> str:
    """A fresh blob name (never reused: a replaced cube gets a new one, so readers of the old one are safe)."""
    return uuid.uuid4().hex


def check_blob(name) -> str:
    """``name`` if it is a valid blob name. Blob names come from the catalog, which is a shared file: a name
    like ``../x`` must never become a path, so every backend checks it before touching anything."""
    if not isinstance(name, str) or not BLOB.fullmatch(name):
        raise CubeError(f"the catalog names an invalid cube file {name!r:.80} (not written by kvmem); "
                        "run `kvmem gc` to make that memory text-only again")
    return name


def check_unique(records) -> None:
    """CubeError if two of ``records`` are the same memory (a batch writes each once)."""
    seen = set()
    for rec in records:
        if (rec.namespace, rec.id) in seen:
            raise CubeError(f"a batch writes {rec.namespace}/{rec.id} twice: write each memory once")
        seen.add((rec.namespace, rec.id))


class StoreVersion(int):
    """A position in a store's change log: an int that grows with every change, carrying the ``epoch`` of the
    catalog it was read from. A rebuilt, recreated or flushed-and-recreated catalog gets a new epoch (and a
    restored one may count lower), so a reader's old position is recognised as meaningless, not trusted."""

    epoch: str

    def __new__(cls, seq: int, epoch: str = ""):
        version = super().__new__(cls, seq)
        version.epoch = epoch
        return version

    def __repr__(self) -> str:
        return f"StoreVersion({int(self)}, epoch={self.epoch!r})"


def is_valid_blob(name) -> bool:
    """Whether ``name`` passes `check_blob`."""
    return isinstance(name, str) and BLOB.fullmatch(name) is not None


@dataclass
class Record:
    """One memory in the catalog.

    ``blob`` is the name of its cube's bytes in the blob backend (None: plaintext only). It is checked with
    `check_blob` wherever it is used; a damaged catalog may hold anything here.
    """

    namespace: str
    id: str
    text: str
    kind: str = "text"               # "text" (plaintext only) or "memcube" (with its activation cube)
    meta: dict = field(default_factory=dict)
    fingerprint: str | None = None
    tokens: int = 0
    bytes: int = 0
    blob: str | None = None
    created: float = 0.0
    last_used: float = 0.0
    hits: int = 0

    @property
    def qualified(self) -> str:
        """``"namespace/id"``: names the memory unambiguously across namespaces."""
        return qualify(self.namespace, self.id)

    @property
    def path(self) -> str | None:
        """The cube file relative to a local store root (``cubes/<blob>.safetensors``), or None."""
        return f"cubes/{self.blob}.safetensors" if self.blob else None


class CatalogBackend(Protocol):
    """The rows of a store: memories, reservations of blob names, share grants and a change log.

    Every method is one atomic step; several processes (several hosts, for a server backend) call them at once.
    Errors are `CubeError` saying what is wrong (damaged, unreachable, read-only), never a driver's exception.
    ``store_id`` is the id of the store the catalog was opened as (cube files record it).
    """

    store_id: str | None

    def describe(self) -> str:
        """Where the catalog lives, for messages (e.g. ``catalog /s/catalog.sqlite``)."""

    def check(self, *, thorough: bool = False) -> None:
        """CubeError unless the catalog is the one this store was created with, complete and readable.
        ``thorough``: also verify its integrity (gc does, before deleting anything)."""

    # ---- memories
    def reserve(self, blob: str, when: float) -> None:
        """Record that a writer is about to put ``blob`` (before any of its bytes exist)."""

    def release(self, blob: str) -> None:
        """Drop the reservation of ``blob`` (a write that failed before its commit)."""

    def upsert(self, rec: Record) -> str | None:
        """Insert or replace ``(rec.namespace, rec.id)``, keeping ``created`` and ``hits`` of a replaced row
        (written back into ``rec``). If ``rec.blob`` is set, it must still be reserved: the reservation is
        consumed in the same step, else CubeError (nothing changes). Logs a change ("cube" with a blob, else
        "add"). Returns the blob the replaced row named, if it differs (the caller deletes it)."""

    def upsert_many(self, records: list[Record]) -> list[str]:
        """`upsert` of every record in ONE atomic step (a batch, kvmem/store/batch.py): readers see all of the
        rows or none of them. Every record's blob must still be reserved (all are consumed, else CubeError and
        nothing changes); a ``(namespace, id)`` twice is a CubeError. Logs one change per record. Returns the
        blobs the replaced rows named that differ from the new ones (the caller deletes them)."""

    def get(self, namespaces: tuple[str, ...], memory_id: str) -> Record | None:
        """The row ``memory_id`` of the first namespace in ``namespaces`` that has one."""

    def list(self, namespaces: tuple[str, ...] | None, kind: str | None = None) -> list[Record]:
        """Rows of ``namespaces`` (None: all), optionally of one kind, ordered by namespace, created, id."""

    def list_derived(self) -> list[Record]:
        """Rows of every namespace whose meta records ``derived_from`` (a superset is allowed: callers match the
        entries), ordered as ``list``. Filtered where the rows are kept, so a delete's cascade does not decode
        every row of the store."""

    def delete(self, namespace: str, memory_id: str) -> Record | None:
        """Delete a row (logs "rm"); returns it, or None if there was none."""

    def touch(self, namespace: str, memory_id: str, when: float) -> None:
        """Count a use of the row (``hits`` + 1, ``last_used``); not a change."""

    def drop_blob(self, namespace: str, memory_id: str, blob: str | None) -> bool:
        """Make the row text-only if it still names ``blob`` (logs "repair"); True if it did."""

    def references(self, *, expire_before: float, expire: Iterable[str] = ()
                   ) -> tuple[set[str], set[str], set[str]]:
        """For gc, in one step: first drop reservations made before ``expire_before`` or naming a blob in
        ``expire``; then return (blobs named by rows, blobs still reserved, blobs whose reservation it dropped:
        writes that never committed)."""

    def changed_at(self, namespace: str, memory_id: str) -> float | None:
        """When the change log last recorded an add (text replaced) or rm of ``namespace/id`` (None: not in the
        log): a cube file of it written before that is superseded (gc and repair read it)."""

    # ---- share grants
    def grant(self, owner: str, reader: str) -> None:
        """Let ``reader`` (a namespace, or ``"*"``: every namespace) read ``owner``'s memories (logs "grant")."""

    def revoke(self, owner: str, reader: str) -> bool:
        """Withdraw a grant (logs "revoke"); True if there was one."""

    def grants(self) -> list[tuple[str, str]]:
        """Every ``(owner, reader)`` grant."""

    # ---- change detection
    def version(self) -> StoreVersion:
        """A number that grows with every change (add, cube, rm, repair, grant, revoke); 0 for a new store;
        with the catalog's epoch."""

    def changes_since(self, version: int) -> tuple[StoreVersion, list[tuple[str, str, str]] | None]:
        """``(now, [(namespace, id, op), ...])`` for the changes after ``version``, oldest first; the list is
        None when the log no longer reaches back that far (then reread everything). For grant/revoke the pair
        is ``(owner, reader)``."""

    def trim_changes(self, keep: int) -> None:
        """Forget all but the latest ``keep`` change-log entries (gc calls it)."""


class BlobBackend(Protocol):
    """Where cube bytes live (a local folder here; Redis, object storage elsewhere). Names pass `check_blob`."""

    def describe(self) -> str:
        """Where the blobs live, for messages."""

    def stage(self, name: str) -> Path:
        """A local path to save the new blob ``name`` to (``MemCube.save``), before `put`."""

    def put(self, name: str, staged: Path) -> int:
        """Make the staged file visible as blob ``name``, atomically (all bytes or nothing). Returns its size."""

    def local_path(self, name: str) -> Path | None:
        """A local file with the blob's bytes, for ``MemCube.load``'s full validation; None if the blob does
        not exist. CubeError if it exists but cannot be read (saying why: e.g. permission denied)."""

    def refetch(self, name: str) -> Path | None:
        """A fresh local copy of blob ``name`` from where the bytes truly live, when `local_path` gave a copy
        (a Redis machine's cache) that failed validation; None where the local file is the only copy."""

    def delete(self, name: str) -> None:
        """Delete a blob; no error if it is already gone."""

    def names(self) -> dict[str, float]:
        """``{name: modification time}`` of every blob (valid names only), for gc."""

    def sweep(self, older_than: float) -> list[str]:
        """Remove unfinished uploads (staged or temporary files) last modified before ``older_than``; returns
        what it removed, for gc's report."""
