"""CubeStore: memories on disk. A folder of cube files plus a SQLite catalog, shared safely by processes.

Layout: ``<root>/catalog.sqlite`` and ``<root>/cubes/<hash>.safetensors``. Writes are atomic and ordered so a
reader never sees a partial cube and a killed writer leaves the store consistent: the cube file is written to a
temp file, fsynced and renamed first, then the catalog row is committed (SQLite, WAL, one transaction). A crash
between the two leaves an orphan file that no row names (``gc`` removes it); never a row without its file.

Namespaces: every read goes through a `StoreView` scoped to one namespace plus namespaces explicitly shared
with it; rows of any other namespace are invisible to it, whatever their ids. Writes go to its own namespace.
The catalog is behind `CatalogBackend` so a shared multi-host backend can replace SQLite.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol

from .cube import MemCube
from .errors import CubeError
from .sqlite_db import connect, transaction

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
KINDS = ("text", "memcube")


@dataclass
class Record:
    """One memory in the catalog."""

    namespace: str
    id: str
    text: str
    kind: str = "text"               # "text" (plaintext only) or "memcube" (with its activation cube)
    meta: dict = field(default_factory=dict)
    fingerprint: str | None = None
    tokens: int = 0
    bytes: int = 0
    path: str | None = None          # cube file, relative to the store root
    created: float = 0.0
    last_used: float = 0.0
    hits: int = 0


class CatalogBackend(Protocol):
    """What a catalog must do (SQLite here; a shared server later)."""

    def upsert(self, rec: Record) -> str | None: ...            # returns the path it replaced, if any
    def get(self, namespaces: tuple[str, ...], memory_id: str) -> Record | None: ...
    def list(self, namespaces: tuple[str, ...], kind: str | None = None) -> list[Record]: ...
    def delete(self, namespace: str, memory_id: str) -> Record | None: ...
    def touch(self, namespace: str, memory_id: str, when: float) -> None: ...
    def paths(self) -> set[str]: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS memories (
    namespace TEXT NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL, text TEXT NOT NULL, meta TEXT NOT NULL,
    fingerprint TEXT, tokens INTEGER NOT NULL DEFAULT 0, bytes INTEGER NOT NULL DEFAULT 0, path TEXT,
    created REAL NOT NULL, last_used REAL NOT NULL, hits INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (namespace, id)
);
"""
_COLUMNS = ("namespace", "id", "kind", "text", "meta", "fingerprint", "tokens", "bytes", "path", "created",
            "last_used", "hits")


class SQLiteCatalog:
    """The embedded catalog: one SQLite file in WAL mode; every call its own short transaction."""

    def __init__(self, path: Path):
        self.path = path
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    def _connect(self):
        return connect(self.path, synchronous="FULL")

    @staticmethod
    def _record(row) -> Record:
        values = dict(zip(_COLUMNS, row))
        values["meta"] = json.loads(values["meta"])
        return Record(**values)

    def upsert(self, rec: Record) -> str | None:
        with self._connect() as db, transaction(db):
            old = db.execute("SELECT path, created, hits FROM memories WHERE namespace=? AND id=?",
                             (rec.namespace, rec.id)).fetchone()
            if old is not None:
                rec.created, rec.hits = old[1], old[2]
            db.execute(f"INSERT OR REPLACE INTO memories ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * 12)})",
                       (rec.namespace, rec.id, rec.kind, rec.text, json.dumps(rec.meta), rec.fingerprint, rec.tokens,
                        rec.bytes, rec.path, rec.created, rec.last_used, rec.hits))
        return old[0] if old is not None and old[0] != rec.path else None

    def get(self, namespaces, memory_id):
        with self._connect() as db:
            for ns in namespaces:  # own namespace first, then the shared ones in the order given
                row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM memories WHERE namespace=? AND id=?",
                                 (ns, memory_id)).fetchone()
                if row:
                    return self._record(row)
            return None

    def list(self, namespaces, kind=None):
        marks = ", ".join("?" * len(namespaces))
        sql = f"SELECT {', '.join(_COLUMNS)} FROM memories WHERE namespace IN ({marks})"
        args = list(namespaces)
        if kind:
            sql += " AND kind=?"
            args.append(kind)
        with self._connect() as db:
            return [self._record(r) for r in db.execute(sql + " ORDER BY namespace, created, id", args)]

    def delete(self, namespace, memory_id):
        with self._connect() as db, transaction(db):
            row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM memories WHERE namespace=? AND id=?",
                             (namespace, memory_id)).fetchone()
            db.execute("DELETE FROM memories WHERE namespace=? AND id=?", (namespace, memory_id))
        return self._record(row) if row else None

    def touch(self, namespace, memory_id, when):
        with self._connect() as db:
            db.execute("UPDATE memories SET last_used=?, hits=hits+1 WHERE namespace=? AND id=?",
                       (when, namespace, memory_id))

    def paths(self):
        with self._connect() as db:
            return {r[0] for r in db.execute("SELECT path FROM memories WHERE path IS NOT NULL")}


def check_meta(meta: dict | None) -> dict:
    """A copy of a memory's meta, checked where the index reads it (``turn`` orders a session's memories)."""
    if meta is not None and not isinstance(meta, dict):
        raise CubeError(f"meta must be a dict, got {type(meta).__name__}")
    meta = dict(meta or {})
    turn = meta.get("turn")
    if turn is not None and (isinstance(turn, bool) or not isinstance(turn, (int, float))):
        raise CubeError(f"meta['turn'] must be a number (the memory's order in its session), got {turn!r}")
    return meta


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise CubeError(f"{what} must be 1-128 characters of letters, digits and . _ : @ - (starting with a letter "
                        f"or digit), got {value!r}")
    return value


class CubeStore:
    """A store folder. Use `view(namespace, shared=...)` to read and write memories.

    Example:
        >>> store = kvmem.CubeStore("~/.kvmem/store")
        >>> alice = store.view("alice", shared=["public"])
        >>> alice.add("m1", "Alice lives in Oslo.")
        >>> alice.put_cube("m1", cube)
    """

    def __init__(self, root: str | os.PathLike, *, catalog: CatalogBackend | None = None):
        self.root = Path(root).expanduser()
        (self.root / "cubes").mkdir(parents=True, exist_ok=True)
        self.catalog = catalog or SQLiteCatalog(self.root / "catalog.sqlite")

    def view(self, namespace: str, shared: Iterable[str] = ()) -> "StoreView":
        """Everything ``namespace`` may see: its own memories, then those of the ``shared`` namespaces."""
        own = _check_name(namespace, "namespace")
        others = tuple(_check_name(s, "shared namespace") for s in shared if s != own)
        return StoreView(self, (own, *others))

    def gc(self) -> list[str]:
        """Remove cube files no catalog row names (left by crashed or replaced writes). Returns them."""
        named = self.catalog.paths()
        removed = []
        for f in (self.root / "cubes").iterdir():
            rel = f"cubes/{f.name}"
            stale_tmp = f.name.startswith(".") and time.time() - f.stat().st_mtime > 60
            if (f.suffix == ".safetensors" and not f.name.startswith(".") and rel not in named) or stale_tmp:
                f.unlink(missing_ok=True)
                removed.append(rel)
        return removed


class StoreView:
    """The store as one namespace sees it (own + shared namespaces); writes go to the own namespace."""

    def __init__(self, store: CubeStore, namespaces: tuple[str, ...]):
        self.store = store
        self.namespaces = namespaces

    @property
    def namespace(self) -> str:
        return self.namespaces[0]

    @staticmethod
    def mint_id(text: str) -> str:
        """The id a memory gets when the caller names none: ``m-`` and 12 hex digits of the text's xxh3 digest."""
        import xxhash

        return "m-" + xxhash.xxh3_64(str(text).encode()).hexdigest()[:12]

    def add(self, memory_id: str, text: str, meta: dict | None = None) -> Record:
        """Add (or replace) a plaintext memory. Replacing the text drops a cube built from the old text.

        ``meta`` is checked (`check_meta`) before anything is written. No id at hand: ``view.mint_id(text)``."""
        _check_name(memory_id, "memory id")
        if not isinstance(text, str) or not text.strip():
            raise CubeError(f"memory text must be a non-empty string, got {text!r:.40}")
        meta = check_meta(meta)
        now = time.time()
        rec = Record(self.namespace, memory_id, text, "text", meta, created=now, last_used=now)
        self._replace_file(self.store.catalog.upsert(rec))
        return rec

    def put_cube(self, memory_id: str, cube: MemCube, *, text: str | None = None, meta: dict | None = None) -> Record:
        """Store ``cube`` as the activation memory of ``memory_id`` (its text defaults to the cube's text)."""
        _check_name(memory_id, "memory id")
        if not isinstance(cube, MemCube):
            raise CubeError(f"put_cube takes a MemCube, got {type(cube).__name__}")
        old = self.store.catalog.get((self.namespace,), memory_id)
        text = text or cube.text or (old.text if old else None)
        if not text:
            raise CubeError(f"memory {memory_id!r} needs a text (the cube was built from ids: pass text=...)")
        rel = f"cubes/{uuid.uuid4().hex}.safetensors"  # a new file per version: readers of the old one are safe
        cube.save(self.store.root / rel)
        now = time.time()
        rec = Record(self.namespace, memory_id, text, "memcube", dict(meta or (old.meta if old else {})),
                     cube.fingerprint, cube.num_tokens, (self.store.root / rel).stat().st_size, rel, now, now)
        self._replace_file(self.store.catalog.upsert(rec))
        return rec

    def _replace_file(self, old_path: str | None) -> None:
        if old_path:
            (self.store.root / old_path).unlink(missing_ok=True)

    def get(self, memory_id: str) -> Record | None:
        """The record of ``memory_id`` visible to this view (own namespace first), or None."""
        return self.store.catalog.get(self.namespaces, memory_id)

    def load_cube(self, memory_id: str, *, device=None) -> MemCube | None:
        """The validated cube of ``memory_id``, or None if it has none (or is not visible here)."""
        for _ in range(3):  # the file may be replaced between the catalog read and the open: read again
            rec = self.get(memory_id)
            if rec is None or rec.path is None:
                return None
            path = self.store.root / rec.path
            if path.exists():
                try:
                    return MemCube.load(path, device=device)
                except CubeError:
                    if path.exists():
                        raise
        raise CubeError(f"memory {memory_id!r}: its cube file keeps disappearing; is another process deleting it?")

    def ls(self, kind: str | None = None) -> list[Record]:
        if kind is not None and kind not in KINDS:
            raise CubeError(f"kind must be one of {KINDS}, got {kind!r}")
        return self.store.catalog.list(self.namespaces, kind)

    def rm(self, memory_id: str) -> bool:
        """Delete ``memory_id`` from the own namespace (shared namespaces are read-only here)."""
        rec = self.store.catalog.delete(self.namespace, memory_id)
        if rec is None:
            return False
        self._replace_file(rec.path)
        return True

    def touch(self, memory_id: str) -> None:
        rec = self.get(memory_id)
        if rec is not None:
            self.store.catalog.touch(rec.namespace, memory_id, time.time())

    def stats(self) -> dict:
        recs = self.ls()
        return {"namespaces": list(self.namespaces), "memories": len(recs),
                "cubes": sum(r.kind == "memcube" for r in recs), "cube_bytes": sum(r.bytes for r in recs),
                "tokens": sum(r.tokens for r in recs), "hits": sum(r.hits for r in recs)}
