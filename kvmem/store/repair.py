"""`kvmem repair` (`CubeStore.rebuild_catalog`): a store folder's catalog rebuilt from what is left of it.

What it uses, in order of trust:
1. every table of the old catalog that can still be read (rows, grants, the change log, reservations), when the
   old catalog is this store's: salvage what is readable, rebuild only what is lost;
2. the cube files: each records its memory (its stamp, kvmem/store/stamp.py), fully validated (`MemCube.load`).

Rules:
- a file is adopted only for a memory the catalog lacks, or whose row names a file that is gone or is not that
  memory's; a memory removed (or made text-only) after a file was written stays removed;
- of several files of one memory, the newest is adopted; a file of another store, or one whose write time is in
  the future, is never adopted (a forged or copied-in file must not replace a genuine memory): it is reported
  as a conflict and left in place (gc keeps it too);
- files it cannot read are skipped and reported (left in place);
- atomic: a sound catalog is changed in one transaction; any other is rebuilt in a temporary file that replaces
  the old one (moved aside under a unique name, never deleted) only once it is complete. A repair that fails
  changes nothing and can simply be run again.
Every repair gives the catalog a new epoch, so running processes reread the store (`StoreView.changes_since`).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from ..cubes.memcube import MemCube
from ..errors import CubeError
from .folder import MARKER, LocalBlobs, read_marker, write_marker
from .local import CATALOG, COLUMNS, SCHEMA, TABLES, blob_of, column_of
from .records import Record, is_valid_blob
from .sqlite_db import connect, transaction
from .stamp import FUTURE_SLACK_S, RECOVERED, Stamp, read_stamp, seconds

_MEMORY_OPS = ("add", "cube", "rm", "repair")
# changes after which a memory's older cube files are superseded: its text replaced (add) or the memory removed
# (rm). Not "cube" (the commit of a file is logged after the file was written) nor "repair" (a loss, not a change).
SUPERSEDING_OPS = ("add", "rm")


@dataclass
class RebuildReport:
    """What `CubeStore.rebuild_catalog` did: memories back in the catalog from cube files (``"namespace/id"``;
    files that record no memory come back as ``recovered/<blob>``), memories kept from the old catalog, files it
    did not use (``"cubes/<file>: why"``: unreadable, older versions, removed memories), conflicts it did not
    resolve (files of another store, future write times, versions the catalog does not name: left in place and
    kept by gc), the old catalog files it moved aside, and what could not be recovered."""

    rebuilt: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    moved_aside: list[str] = field(default_factory=list)
    lost: str = ""


@dataclass
class _Salvage:
    """What could be read from the old catalog (None: that table could not be read)."""

    store_id: str | None = None
    rows: dict | None = None            # (namespace, id) -> Record
    grants: list | None = None          # (owner, reader, created)
    changes: list | None = None         # (namespace, id, op, at), oldest first
    reservations: dict = field(default_factory=dict)
    sound: bool = False                 # this store's, passes SQLite's check, every row readable: repair in place
    complete: bool = False              # it has every table
    damaged: int = 0                    # rows that could not be read
    notes: list[str] = field(default_factory=list)


@dataclass
class _File:
    rec: Record
    stamp: Stamp | None

    @property
    def where(self) -> str:
        return f"cubes/{self.rec.blob}.safetensors"

    @property
    def written(self) -> float:
        return self.rec.last_used


def rebuild_catalog(location) -> RebuildReport:
    """See `CubeStore.rebuild_catalog`."""
    if isinstance(location, str) and location.startswith(("redis://", "rediss://", "unix://")):
        raise CubeError(f"{location}: rebuild_catalog rebuilds store folders; a Redis store's catalog lives in "
                        "Redis itself: restore it from a Redis backup (RDB or AOF)")
    if not isinstance(location, (str, os.PathLike)):
        raise CubeError(f"a store location is a folder path, got {type(location).__name__}")
    root = Path(location).expanduser()
    cubes = root / "cubes"
    if not root.is_dir() or not ((root / MARKER).exists() or cubes.is_dir()):
        raise CubeError(f"no kvmem store at {root} (no {MARKER}, no cubes/ folder): check the path")
    if not os.access(root, os.W_OK | os.X_OK):
        raise CubeError(f"rebuilding the catalog of {root} needs write access to that folder; run it as the "
                        "store's owner")
    try:
        marker_id = read_marker(root) if (root / MARKER).exists() else None
        marker_ok = marker_id is not None
    except CubeError:
        marker_id, marker_ok = None, False
    old = _salvage(root / CATALOG, marker_id)
    report = RebuildReport(lost=_lost(old))
    blobs = LocalBlobs(cubes)
    files = _read_files(blobs, old.reservations, report) if cubes.is_dir() else []
    store_id = marker_id or old.store_id or _most_recorded(files) or uuid.uuid4().hex
    rows, changed, text_only = _decide(old, files, store_id, report)
    if old.sound and old.store_id in (None, store_id):
        if not changed and not text_only and marker_ok and old.complete and old.store_id is not None:
            raise CubeError(f"catalog {root / CATALOG} is intact: nothing to rebuild (it holds every memory its cube "
                            "files hold; `kvmem gc` repairs memories whose cube file is missing)")
        _repair_in_place(root, old, store_id, changed, text_only, report)
    else:
        _replace_catalog(root, old, store_id, rows, report)
    if not marker_ok or marker_id != store_id:
        try:
            write_marker(root, store_id)
        except OSError as exc:
            raise CubeError(f"the catalog of {root} is repaired, but its marker {MARKER} could not be written "
                            f"({exc.strerror}): free some space and run `kvmem repair {root}` again") from None
    report.kept = sorted(f"{ns}/{i}" for ns, i in (old.rows or {}) if (ns, i) not in changed)
    return report


# ---------------------------------------------------------------- reading what is left
def _salvage(path: Path, marker_id: str | None) -> _Salvage:
    """Every table of the old catalog that can still be read (nothing from another store's catalog)."""
    out = _Salvage()
    if not path.is_file() or path.stat().st_size == 0:
        out.notes.append(f"{path.name} is {'empty' if path.is_file() else 'missing'}")
        return out
    try:
        db = sqlite3.connect(f"file:{quote(str(path.absolute()))}?mode=rw", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        out.notes.append(f"{path.name} cannot be opened ({exc})")
        return out
    try:
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            ok = db.execute("PRAGMA quick_check").fetchone()
        except sqlite3.Error as exc:
            out.notes.append(f"{path.name} is not a readable SQLite database ({exc})")
            return out
        found = _read(db, "SELECT value FROM store WHERE key='id'") if "store" in tables else None
        found = found[0][0] if found else None
        if marker_id is not None and found is not None and found != marker_id:
            out.notes.append(f"{path.name} belongs to another store (id {found}): nothing of it is used")
            return out
        out.store_id = found
        rows = _read(db, f"SELECT {', '.join(COLUMNS)} FROM memories") if "memories" in tables else None
        damaged = 0
        if rows is not None:
            out.rows = {}
            for row in rows:
                rec = _row_record(row)
                if rec is None:
                    damaged += 1
                else:
                    out.rows[(rec.namespace, rec.id)] = rec
        if "grants" in tables:
            out.grants = _read(db, "SELECT owner, reader, created FROM grants")
        if "changes" in tables:
            out.changes = _read(db, "SELECT namespace, id, op, at FROM changes ORDER BY seq")
        if "reservations" in tables:
            out.reservations = dict(_read(db, "SELECT blob, created FROM reservations") or [])
        out.sound = bool(ok and ok[0] == "ok" and out.rows is not None and not damaged)
        out.complete = all(t in tables for t in TABLES) and None not in (out.grants, out.changes)
        out.damaged = damaged
    finally:
        db.close()
    return out


def _read(db, sql: str):
    try:
        return db.execute(sql).fetchall()
    except sqlite3.Error:
        return None


def _row_record(row) -> Record | None:
    values = dict(zip(COLUMNS, row))
    try:
        meta = json.loads(values["meta"])
        if not isinstance(meta, dict) or not isinstance(values["text"], str):
            return None
        return Record(str(values["namespace"]), str(values["id"]), values["text"], str(values["kind"]), meta,
                      values["fingerprint"], int(values["tokens"] or 0), int(values["bytes"] or 0),
                      blob_of(values["path"]), seconds(values["created"], 0.0), seconds(values["last_used"], 0.0),
                      int(values["hits"] or 0))
    except (TypeError, ValueError):
        return None


def _lost(old: _Salvage) -> str:
    parts = [what for what, table in (("text-only memories (no cube file) and use counts", old.rows),
                                      ("grants", old.grants), ("the change log", old.changes)) if table is None]
    parts += [f"the rows of {old.damaged} damaged catalog rows (their text-only memories)"] if old.damaged else []
    if not parts:
        return "nothing: every table of the old catalog could be read"
    return (f"{', '.join(parts)} lived only in the catalog: they are gone unless the old catalog is restored from a "
            "backup")


def _read_files(blobs: LocalBlobs, reserved: dict, report: RebuildReport) -> list[_File]:
    """Every cube file, fully validated, with the memory it records; the others reported in ``skipped``."""
    files = []
    for name, mtime in sorted(blobs.names().items()):
        where = f"cubes/{name}.safetensors"
        if name in reserved:
            report.skipped.append(f"{where}: a write in progress (its writer commits it)")
            continue
        try:
            path = blobs.local_path(name)
            if path is None:
                continue  # removed while listing
            cube = MemCube.load(path)
            stamp = read_stamp(cube.meta, fallback_time=mtime)
            files.append(_File(_file_record(cube, stamp, name, mtime, path.stat().st_size), stamp))
        except (CubeError, OSError) as exc:
            report.skipped.append(f"{where}: {exc}")
    return files


def _file_record(cube: MemCube, stamp: Stamp | None, blob: str, mtime: float, size: int) -> Record:
    """The catalog row a cube file stands for (CubeError when the file cannot say)."""
    if stamp is None:  # put by a kvmem from before files recorded their memory
        namespace, memory_id, text, meta, created, written = RECOVERED, blob, cube.text, {}, mtime, mtime
    else:
        namespace, memory_id, text, meta = stamp.namespace, stamp.id, stamp.text, stamp.meta
        created, written = stamp.created, stamp.written
    if not isinstance(text, str) or not text.strip():
        raise CubeError("the cube records no text (it was built from ids and its text lived only in the catalog): "
                        "move the file out of cubes/ before the next gc if you want to keep it")
    return Record(namespace, memory_id, text, "memcube", meta, cube.fingerprint, cube.num_tokens, size, blob,
                  created, written)  # last_used: when this version was written (the newer of two copies wins)


def _most_recorded(files: list[_File]) -> str | None:
    """With marker and catalog both lost: the store id most files record."""
    ids = Counter(f.stamp.store for f in files if f.stamp is not None and f.stamp.store)
    return ids.most_common(1)[0][0] if ids else None


# ---------------------------------------------------------------- deciding
def _doubt(f: _File, store_id: str, now: float) -> str | None:
    """Why ``f`` must never replace a genuine memory (None: it may be adopted)."""
    if f.stamp is not None and f.stamp.store and f.stamp.store != store_id:
        return f"it belongs to another store (id {f.stamp.store})"
    if f.written > now + FUTURE_SLACK_S:
        return f"its write time {time.strftime('%Y-%m-%d', time.gmtime(min(f.written, 4e11)))} is in the future"
    return None


def _decide(old: _Salvage, files: list[_File], store_id: str, report: RebuildReport):
    """(all rows of the new catalog, rows adopted from files, keys made text-only)."""
    now = time.time()
    rows = dict(old.rows or {})
    last_change: dict = {}
    for namespace, memory_id, op, at in old.changes or ():
        if op in SUPERSEDING_OPS:
            last_change[(namespace, memory_id)] = seconds(at, 0.0)
    by_key: dict = {}
    for f in files:
        by_key.setdefault((f.rec.namespace, f.rec.id), []).append(f)
    by_blob = {f.rec.blob: f for f in files}
    changed, text_only = {}, set()
    for key, found in sorted(by_key.items()):
        found.sort(key=lambda f: f.written, reverse=True)
        qualified = f"{key[0]}/{key[1]}"
        row = rows.get(key)
        current = by_blob.get(row.blob) if row is not None and row.blob else None
        if current is not None and (current.rec.namespace, current.rec.id) != key:
            current = None  # the row names another memory's file (copied over): not this memory's
        if current is not None:  # the catalog's version stands
            for f in found:
                doubt = _doubt(f, store_id, now)
                if f is current:
                    continue
                if doubt is None and f.written <= current.written:
                    report.skipped.append(f"{f.where}: an older version of {qualified} (kept {current.where})")
                else:
                    report.conflicts.append(f"{f.where}: a version of {qualified} the catalog does not name"
                                            f"{' (' + doubt + ')' if doubt else ''}: not adopted, the catalog's "
                                            f"{current.where} stands")
            continue
        # the catalog lacks the memory, holds it as text only, or names a file that is gone or not this memory's
        floor = last_change.get(key) if (row is None and old.rows is not None) or \
            (row is not None and row.blob is None) else None
        best = None
        for f in found:
            doubt = _doubt(f, store_id, now)
            if doubt is not None:
                report.conflicts.append(f"{f.where}: claims {qualified}, but {doubt}: not adopted")
            elif floor is not None and f.written <= floor:
                report.skipped.append(f"{f.where}: {qualified} was {'removed' if row is None else 'rewritten'} "
                                      "after this file was written")
            elif best is None:
                best = f
            else:
                report.skipped.append(f"{f.where}: an older version of {qualified} (kept {best.where})")
        if best is None:
            continue
        rec = best.rec
        if row is not None:
            rec.created, rec.hits = row.created, row.hits
        rows[key] = changed[key] = rec
        (report.recovered if key[0] == RECOVERED and key[1] == rec.blob else report.rebuilt).append(qualified)
    for key, row in list(rows.items()):  # rows naming a file that is gone, damaged or another memory's
        if key in changed or row.blob is None:
            continue
        f = by_blob.get(row.blob)
        if f is None or (f.rec.namespace, f.rec.id) != key or not is_valid_blob(row.blob):
            rows[key] = Record(row.namespace, row.id, row.text, "text", row.meta, created=row.created,
                               last_used=row.last_used, hits=row.hits)
            text_only.add(key)
    return rows, changed, text_only


# ---------------------------------------------------------------- writing, atomically
def _insert(db, rec: Record) -> None:
    db.execute(f"INSERT OR REPLACE INTO memories ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
               (rec.namespace, rec.id, rec.kind, rec.text, json.dumps(rec.meta), rec.fingerprint, rec.tokens,
                rec.bytes, column_of(rec.blob), rec.created, rec.last_used, rec.hits))


def _log(db, namespace: str, memory_id: str) -> None:
    db.execute("INSERT INTO changes (namespace, id, op, at) VALUES (?, ?, 'repair', ?)",
               (namespace, memory_id, time.time()))


def _repair_in_place(root: Path, old: _Salvage, store_id: str, changed: dict, text_only: set,
                     report: RebuildReport) -> None:
    """One transaction on the sound old catalog: missing tables, adopted rows, rows made text-only, new epoch.
    A row a writer changed since it was read is left to the writer."""
    what = f"catalog {root / CATALOG}"
    try:
        with connect(root / CATALOG, synchronous="FULL", what=what, create=False) as db, transaction(db):
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            for key in sorted(set(changed) | text_only):
                now = db.execute("SELECT path FROM memories WHERE namespace=? AND id=?", key).fetchone()
                before = old.rows.get(key)
                if (now[0] if now else None) != (column_of(before.blob) if before else None) or \
                        (now is None) != (before is None):
                    report.skipped.append(f"{key[0]}/{key[1]}: changed by a writer during the repair (left as is)")
                    continue
                if key in changed:
                    _insert(db, changed[key])
                else:
                    db.execute("UPDATE memories SET path=NULL, kind='text', fingerprint=NULL, tokens=0, bytes=0 "
                               "WHERE namespace=? AND id=?", key)
                _log(db, *key)
            db.execute("INSERT OR IGNORE INTO store VALUES ('id', ?)", (store_id,))
            db.execute("INSERT OR REPLACE INTO store VALUES ('epoch', ?)", (uuid.uuid4().hex,))
    except CubeError as exc:
        raise CubeError(f"the repair of {root} could not complete ({exc}); nothing was changed: free some space or "
                        f"fix access, then run `kvmem repair {root}` again") from None


def _replace_catalog(root: Path, old: _Salvage, store_id: str, rows: dict, report: RebuildReport) -> None:
    """Build the whole new catalog in a temporary file, then swap it in (the old one moved aside)."""
    catalog = root / CATALOG
    tmp = root / f".{CATALOG}.rebuild-{uuid.uuid4().hex[:12]}"
    moved: list[tuple[Path, Path]] = []
    try:
        with connect(tmp, synchronous="FULL", what=f"new catalog {tmp}") as db:
            db.executescript(SCHEMA)
            with transaction(db):
                db.execute("INSERT INTO store VALUES ('id', ?)", (store_id,))
                db.execute("INSERT INTO store VALUES ('epoch', ?)", (uuid.uuid4().hex,))
                for namespace, memory_id, op, at in old.changes or ():  # history: gc and repair read it
                    if op in _MEMORY_OPS + ("grant", "revoke"):
                        db.execute("INSERT INTO changes (namespace, id, op, at) VALUES (?, ?, ?, ?)",
                                   (str(namespace), str(memory_id), op, seconds(at, 0.0)))
                for rec in sorted(rows.values(), key=lambda r: (r.created, r.namespace, r.id)):
                    _insert(db, rec)
                    _log(db, rec.namespace, rec.id)
                for owner, reader, created in old.grants or ():
                    db.execute("INSERT OR REPLACE INTO grants VALUES (?, ?, ?)", (owner, reader, seconds(created, 0)))
                for blob, created in old.reservations.items():  # live writers commit as if nothing happened
                    if is_valid_blob(blob):
                        db.execute("INSERT OR REPLACE INTO reservations VALUES (?, ?)", (blob, seconds(created, 0)))
            db.execute("PRAGMA journal_mode=WAL")
        _fsync(tmp)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]  # never overwrites
        for suffix in ("", "-wal", "-shm"):  # the WAL files keep their database's name, so the pair still opens
            source = Path(f"{catalog}{suffix}")
            if source.exists():
                aside = root / f"catalog.lost-{stamp}.sqlite{suffix}"
                os.replace(source, aside)
                moved.append((source, aside))
        os.replace(tmp, catalog)
        _fsync(root)
    except (OSError, CubeError, sqlite3.Error) as exc:
        for source, aside in reversed(moved):  # put the old catalog back where it was
            try:
                os.replace(aside, source)
            except OSError:
                pass
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise CubeError(f"the repair of {root} could not complete ({why}); nothing was changed: free some space or "
                        f"fix access, then run `kvmem repair {root}` again") from None
    report.moved_aside = [aside.name for _, aside in moved]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
