"""The local store backends: a SQLite catalog and a folder of cube files (see kvmem/store_backend.py).

Layout of a store folder::

    <root>/kvmem-store.json     marker: format and a store id, written when the store is created
    <root>/catalog.sqlite       the catalog (WAL mode); its ``store`` table holds the same store id
    <root>/cubes/<blob>.safetensors

The marker is what lets a lost or replaced catalog be told from an empty store: a marker without a catalog,
a catalog without the marker's id, or cube files without any catalog are errors, never "0 memories".
Files and folders are created with the modes the umask allows (a store shared by a group stays readable).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from ..errors import CubeError
from .sqlite_db import connect, transaction
from .folder import MARKER, STORE_FORMAT, LocalBlobs, read_marker, write_marker  # noqa: F401 (old home)
from .records import BLOB, Record, StoreVersion, check_blob, check_name, check_unique

CATALOG = "catalog.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS memories (
    namespace TEXT NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL, text TEXT NOT NULL, meta TEXT NOT NULL,
    fingerprint TEXT, tokens INTEGER NOT NULL DEFAULT 0, bytes INTEGER NOT NULL DEFAULT 0, path TEXT,
    created REAL NOT NULL, last_used REAL NOT NULL, hits INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (namespace, id)
);
CREATE TABLE IF NOT EXISTS store (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS reservations (blob TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS grants (owner TEXT NOT NULL, reader TEXT NOT NULL, created REAL NOT NULL,
                                   PRIMARY KEY (owner, reader));
CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, namespace TEXT NOT NULL,
                                    id TEXT NOT NULL, op TEXT NOT NULL, at REAL NOT NULL);
"""
TABLES = ("memories", "store", "reservations", "grants", "changes")
COLUMNS = ("namespace", "id", "kind", "text", "meta", "fingerprint", "tokens", "bytes", "path", "created",
            "last_used", "hits")
SELECT = f"SELECT {', '.join(COLUMNS)} FROM memories"


def column_of(blob: str | None) -> str | None:
    """The ``path`` column's value for a blob (the column keeps the layout older stores wrote)."""
    return None if blob is None else f"cubes/{blob}.safetensors"


def blob_of(column) -> str | None:
    """The blob a ``path`` column names; anything not of the form kvmem writes is passed on as it is (and
    refused by `check_blob` wherever it would be used)."""
    if column is None:
        return None
    if isinstance(column, str) and column.startswith("cubes/") and column.endswith(".safetensors"):
        name = column[len("cubes/"):-len(".safetensors")]
        if BLOB.fullmatch(name):
            return name
    return str(column)


class SQLiteCatalog:
    """The embedded catalog: one SQLite file in WAL mode; every call its own short transaction."""

    def __init__(self, path: Path, *, store_id: str | None = None, create: bool = False):
        self.path = Path(path)
        self.store_id = store_id
        self.readonly = self.path.exists() and not (os.access(self.path, os.W_OK)
                                                    and os.access(self.path.parent, os.W_OK))
        if create:
            with connect(self.path, synchronous="FULL", what=self.describe()) as db:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(SCHEMA)
                if store_id is not None:
                    db.execute("INSERT OR IGNORE INTO store VALUES ('id', ?)", (store_id,))
                db.execute("INSERT OR IGNORE INTO store VALUES ('epoch', ?)", (uuid.uuid4().hex,))

    def describe(self) -> str:
        return f"catalog {self.path}"

    def _connect(self):
        if not self.path.is_file():  # never let SQLite create an empty catalog under a running process
            raise CubeError(f"{self.describe()} is gone (deleted or moved while this process used it): restore it "
                            f"from a backup, or rebuild it with `kvmem repair {self.path.parent}`")
        return connect(self.path, synchronous="FULL", readonly=self.readonly, what=self.describe(), create=False)

    def _write(self):
        if self.readonly:
            raise CubeError(f"{self.describe()} is read-only for this process: reads work, writes need write "
                            "access to the store folder and its files")
        return self._connect()

    # ---------------------------------------------------------------- trust
    def check(self, *, thorough: bool = False) -> None:
        if not self.path.is_file():
            raise CubeError(f"{self.describe()} is missing, but {self.path.parent / MARKER} says a store was "
                            "created here: the catalog was deleted or moved. Restore it from a backup, or rebuild "
                            f"it from the cube files with `kvmem repair {self.path.parent}`; the cube files in "
                            "cubes/ are untouched. Nothing was deleted (gc refuses to run).")
        if self.path.stat().st_size == 0:
            raise CubeError(f"{self.describe()} is empty (0 bytes): it was truncated or replaced. Restore it from "
                            f"a backup, or rebuild it from the cube files with `kvmem repair {self.path.parent}`; "
                            "the cube files are untouched (gc refuses to run)")
        try:
            self._check_tables(thorough)
        except CubeError as exc:
            if not str(exc).startswith(f"{self.describe()} is damaged"):
                raise
            raise CubeError(f"{exc}; or rebuild it from the cube files with `kvmem repair {self.path.parent}`") \
                from None

    def _check_tables(self, thorough: bool) -> None:
        with self._connect() as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            # without a marker (store_id None): a store from before markers needs only its memories (see adopt)
            missing = [t for t in (TABLES if self.store_id is not None else ("memories",)) if t not in tables]
            if missing:
                raise CubeError(f"{self.describe()} lacks the tables {missing}: it is damaged or not a kvmem "
                                "catalog. Restore it from a backup, or rebuild it from the cube files with "
                                f"`kvmem repair {self.path.parent}` (gc refuses to run)")
            if self.store_id is not None and "store" in tables:
                row = db.execute("SELECT value FROM store WHERE key='id'").fetchone()
                if row is None or row[0] != self.store_id:
                    raise CubeError(f"{self.describe()} belongs to another store (id {row[0] if row else None!r}, "
                                    f"the folder's marker says {self.store_id!r}): it was replaced. Restore the "
                                    "right catalog from a backup, or rebuild it from the cube files with "
                                    f"`kvmem repair {self.path.parent}` (gc refuses to run)")
            if thorough:
                result = db.execute("PRAGMA quick_check").fetchone()
                if not result or result[0] != "ok":
                    raise CubeError(f"{self.describe()} fails SQLite's integrity check ({result}): restore it "
                                    "from a backup, or rebuild it from the cube files with "
                                    f"`kvmem repair {self.path.parent}` (gc refuses to run)")

    def recorded_id(self) -> str | None:
        """The store id the catalog itself records (None: none, or unreadable)."""
        try:
            with connect(self.path, readonly=True, what=self.describe(), create=False) as db:
                row = db.execute("SELECT value FROM store WHERE key='id'").fetchone()
        except CubeError:
            return None
        return row[0] if row else None

    def adopt(self, store_id: str) -> None:
        """Bring a catalog written by an older kvmem up to this schema, under ``store_id``."""
        with self._write() as db, transaction(db):
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT OR IGNORE INTO store VALUES ('id', ?)", (store_id,))
            db.execute("INSERT OR IGNORE INTO store VALUES ('epoch', ?)", (uuid.uuid4().hex,))
        self.store_id = store_id

    # ---------------------------------------------------------------- memories
    def _record(self, row) -> Record:
        values = dict(zip(COLUMNS, row))
        try:
            values["meta"] = json.loads(values["meta"])
            if not isinstance(values["meta"], dict):
                raise ValueError("not a JSON object")
        except (TypeError, ValueError) as exc:
            raise CubeError(f"{self.describe()}: memory {values['namespace']}/{values['id']} has damaged meta "
                            f"({exc}); rewrite it (view.add) or restore the catalog") from None
        values["blob"] = blob_of(values.pop("path"))
        return Record(**values)

    @staticmethod
    def _log(db, namespace: str, memory_id: str, op: str) -> None:
        db.execute("INSERT INTO changes (namespace, id, op, at) VALUES (?, ?, ?, ?)",
                   (namespace, memory_id, op, time.time()))

    def reserve(self, blob, when):
        check_blob(blob)
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO reservations VALUES (?, ?)", (blob, when))

    def release(self, blob):
        with self._write() as db:
            db.execute("DELETE FROM reservations WHERE blob=?", (blob,))

    def _upsert_row(self, db, rec: Record) -> str | None:
        """Inside a write transaction: consume ``rec``'s reservation, write its row, log it; the replaced blob."""
        if rec.blob is not None:
            check_blob(rec.blob)
            if db.execute("DELETE FROM reservations WHERE blob=?", (rec.blob,)).rowcount != 1:
                raise CubeError(f"the write of {rec.namespace}/{rec.id} took so long that gc expired it "
                                "(its cube file may be gone): write it again")
        old = db.execute("SELECT path, created, hits FROM memories WHERE namespace=? AND id=?",
                         (rec.namespace, rec.id)).fetchone()
        if old is not None:
            rec.created, rec.hits = old[1], old[2]
        db.execute(f"INSERT OR REPLACE INTO memories ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * 12)})",
                   (rec.namespace, rec.id, rec.kind, rec.text, json.dumps(rec.meta), rec.fingerprint, rec.tokens,
                    rec.bytes, column_of(rec.blob), rec.created, rec.last_used, rec.hits))
        self._log(db, rec.namespace, rec.id, "cube" if rec.blob else "add")
        old_blob = blob_of(old[0]) if old is not None else None
        return old_blob if old_blob != rec.blob else None

    def upsert(self, rec: Record) -> str | None:
        json.dumps(rec.meta)  # unencodable meta fails before the write lock is taken
        with self._write() as db, transaction(db):
            return self._upsert_row(db, rec)

    def upsert_many(self, records) -> list[str]:
        records = list(records)
        check_unique(records)
        for rec in records:
            json.dumps(rec.meta)
        with self._write() as db, transaction(db):  # one transaction: WAL readers see all rows or none
            replaced = [self._upsert_row(db, rec) for rec in records]
        return [blob for blob in replaced if blob]

    def lock(self, name: str, *, wait: float):
        """A context manager holding the store-wide lock ``name`` (e.g. a namespace being installed into): an
        fcntl lock on ``<root>/locks/<name>.lock``, released by the kernel if its process dies (never stale).
        Waits up to ``wait`` seconds, then CubeError naming the holder."""
        from .file_lock import hold_file_lock

        return hold_file_lock(self.path.parent / "locks", check_name(name, "lock name"), wait=wait)

    def get(self, namespaces, memory_id):
        with self._connect() as db:
            for ns in namespaces:  # own namespace first, then the shared ones in the order given
                row = db.execute(f"{SELECT} WHERE namespace=? AND id=?", (ns, memory_id)).fetchone()
                if row:
                    return self._record(row)
            return None

    def list(self, namespaces, kind=None):
        sql, args = SELECT + " WHERE 1", []
        if namespaces is not None:
            sql += f" AND namespace IN ({', '.join('?' * len(namespaces))})"
            args += list(namespaces)
        if kind:
            sql += " AND kind=?"
            args.append(kind)
        with self._connect() as db:
            return [self._record(r) for r in db.execute(sql + " ORDER BY namespace, created, id", args)]

    def list_derived(self):
        # instr() runs in SQLite's C loop; only rows naming the key are decoded (lineage.dependants matches them)
        with self._connect() as db:
            return [self._record(r) for r in db.execute(
                SELECT + " WHERE instr(meta, '\"derived_from\"') > 0 ORDER BY namespace, created, id")]

    def delete(self, namespace, memory_id):
        with self._write() as db, transaction(db):
            row = db.execute(f"{SELECT} WHERE namespace=? AND id=?", (namespace, memory_id)).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM memories WHERE namespace=? AND id=?", (namespace, memory_id))
            self._log(db, namespace, memory_id, "rm")
        values = dict(zip(COLUMNS, row))
        return Record(namespace, memory_id, values["text"], values["kind"], {}, values["fingerprint"],
                      values["tokens"], values["bytes"], blob_of(values["path"]), values["created"],
                      values["last_used"], values["hits"])

    def touch(self, namespace, memory_id, when):
        if self.readonly:  # a reader without write access still gets answers; uses are just not counted
            return
        with self._connect() as db:
            db.execute("UPDATE memories SET last_used=?, hits=hits+1 WHERE namespace=? AND id=?",
                       (when, namespace, memory_id))

    def drop_blob(self, namespace, memory_id, blob):
        columns = {column_of(blob) if blob and BLOB.fullmatch(blob) else blob}
        with self._write() as db, transaction(db):
            row = db.execute("SELECT path FROM memories WHERE namespace=? AND id=?", (namespace, memory_id)).fetchone()
            if row is None or row[0] not in columns:
                return False
            db.execute("UPDATE memories SET path=NULL, kind='text', fingerprint=NULL, tokens=0, bytes=0 "
                       "WHERE namespace=? AND id=?", (namespace, memory_id))
            self._log(db, namespace, memory_id, "repair")
        return True

    def references(self, *, expire_before, expire=()):
        expire = set(expire)
        with self._write() as db, transaction(db):
            before = {r[0]: r[1] for r in db.execute("SELECT blob, created FROM reservations")}
            expired = {blob for blob, when in before.items() if when < expire_before or blob in expire}
            expired_list = sorted(expired)
            for i in range(0, len(expired_list), 500):
                chunk = expired_list[i:i + 500]
                db.execute(f"DELETE FROM reservations WHERE blob IN ({', '.join('?' * len(chunk))})", chunk)
            named = {blob_of(r[0]) for r in db.execute("SELECT path FROM memories WHERE path IS NOT NULL")}
        return named, set(before) - expired, expired

    def changed_at(self, namespace, memory_id):
        with self._connect() as db:
            row = db.execute("SELECT MAX(at) FROM changes WHERE namespace=? AND id=? AND op IN ('add', 'rm')",
                             (namespace, memory_id)).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def paths(self) -> set[str]:
        """The cube files rows name, relative to the store root (``cubes/<blob>.safetensors``)."""
        with self._connect() as db:
            return {r[0] for r in db.execute("SELECT path FROM memories WHERE path IS NOT NULL")}

    # ---------------------------------------------------------------- grants
    def grant(self, owner, reader):
        with self._write() as db, transaction(db):
            db.execute("INSERT OR REPLACE INTO grants VALUES (?, ?, ?)", (owner, reader, time.time()))
            self._log(db, owner, reader, "grant")

    def revoke(self, owner, reader):
        with self._write() as db, transaction(db):
            gone = db.execute("DELETE FROM grants WHERE owner=? AND reader=?", (owner, reader)).rowcount
            if gone:
                self._log(db, owner, reader, "revoke")
        return bool(gone)

    def grants(self):
        with self._connect() as db:
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name='grants'").fetchone():
                return []  # a read-only store from before grants
            return [tuple(r) for r in db.execute("SELECT owner, reader FROM grants ORDER BY owner, reader")]

    # ---------------------------------------------------------------- change detection
    @staticmethod
    def _version(db) -> StoreVersion:
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name='changes'").fetchone() \
            if db.execute("SELECT 1 FROM sqlite_master WHERE name='sqlite_sequence'").fetchone() else None
        epoch = db.execute("SELECT value FROM store WHERE key='epoch'").fetchone() \
            if db.execute("SELECT 1 FROM sqlite_master WHERE name='store'").fetchone() else None
        return StoreVersion(int(row[0]) if row else 0, epoch[0] if epoch else "")

    def version(self):
        with self._connect() as db:
            return self._version(db)

    def changes_since(self, version):
        with self._connect() as db:
            now = self._version(db)
            if version >= now:
                return now, []
            oldest = db.execute("SELECT MIN(seq) FROM changes").fetchone()[0]
            if oldest is None or oldest > version + 1:
                return now, None  # trimmed past ``version``: the caller rereads everything
            rows = db.execute("SELECT namespace, id, op FROM changes WHERE seq > ? AND seq <= ? ORDER BY seq",
                              (version, now)).fetchall()
            return now, [tuple(r) for r in rows]

    def trim_changes(self, keep):
        with self._write() as db:
            db.execute("DELETE FROM changes WHERE seq <= (SELECT MAX(seq) FROM changes) - ?", (int(keep),))


def open_local_backends(root: str | os.PathLike, *, create: bool = False) -> tuple[SQLiteCatalog, LocalBlobs]:
    """The catalog and blobs of the store folder ``root``, checked (see the module docstring).

    Args:
        create: make the store if ``root`` does not exist or is an empty folder; without it, a missing store
            is a CubeError (so a mistyped path never silently becomes a new, empty store).
    """
    root = Path(root).expanduser()
    cubes, catalog_path = root / "cubes", root / CATALOG
    try:
        present = root.is_dir() and any(root.iterdir())
    except PermissionError:
        raise CubeError(f"permission denied listing {root}: ask the store's owner for read access") from None
    if root.exists() and not root.is_dir():
        raise CubeError(f"{root} is a file, not a store folder")
    if not present:
        if not create:
            raise CubeError(f"no kvmem store at {root}: check the path (--store / $KVMEM_STORE); create one with "
                            "`kvmem add` or CubeStore(path, create=True)")
        existed = root.exists()
        try:
            cubes.mkdir(parents=True, exist_ok=True)  # modes: 0777 less the umask, like any folder
            store_id = uuid.uuid4().hex
            catalog = SQLiteCatalog(catalog_path, store_id=store_id, create=True)
            write_marker(root, store_id)
        except (OSError, CubeError) as exc:
            # a half-made store (a catalog without its marker) would read as a lost catalog: take it away
            _remove_new_store(root, existed=existed)
            why = "permission denied" if isinstance(exc, PermissionError) else getattr(exc, "strerror", None) or exc
            raise CubeError(f"cannot create a store at {root} ({why}): pick a folder you may write, with free "
                            "space; nothing was left behind") from None
        return catalog, LocalBlobs(cubes)
    if (root / MARKER).exists():
        catalog = SQLiteCatalog(catalog_path, store_id=read_marker(root))
        catalog.check()
        cubes.mkdir(exist_ok=True) if not catalog.readonly else None
        return catalog, LocalBlobs(cubes)
    # no marker: a store from before markers (adopted), or something that is not (or no longer) a store
    if catalog_path.is_file() and catalog_path.stat().st_size > 0:
        catalog = SQLiteCatalog(catalog_path)
        catalog.check()
        with connect(catalog_path, readonly=True, what=catalog.describe()) as db:
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name='memories'").fetchone():
                raise CubeError(f"{catalog_path} is not a kvmem catalog (no memories table)")
        if not catalog.readonly:
            store_id = catalog.recorded_id() or uuid.uuid4().hex  # a marker lost from a newer store: same id
            catalog.adopt(store_id)
            write_marker(root, store_id)
        return catalog, LocalBlobs(cubes)
    cube_files = list(cubes.glob("*.safetensors")) if cubes.is_dir() else []
    if cube_files or catalog_path.exists():
        raise CubeError(f"{root} has {len(cube_files)} cube files but {'an empty' if catalog_path.exists() else 'no'} "
                        f"{CATALOG}: the catalog was lost. Restore it from a backup, or rebuild it from the cube "
                        f"files with `kvmem repair {root}`; nothing was deleted (gc refuses to run on a store "
                        "without its catalog)")
    raise CubeError(f"{root} is not empty and is not a kvmem store (no {MARKER}, no {CATALOG}): pick an empty or "
                    "new folder for a store")


def _remove_new_store(root: Path, *, existed: bool) -> None:
    """Undo a store creation that failed partway (only what creation makes; nothing else is touched)."""
    for name in (CATALOG, f"{CATALOG}-wal", f"{CATALOG}-shm", MARKER):
        try:
            (root / name).unlink(missing_ok=True)
        except OSError:
            pass
    for folder in (root / "cubes", *(() if existed else (root,))):
        try:
            folder.rmdir()  # only if empty
        except OSError:
            pass

