"""One way to open the SQLite files kvmem keeps (the store's catalog, the embedding cache).

Every call gets its own short-lived connection (several processes share the files), in autocommit mode with a
long busy timeout; `transaction` wraps writes that must land together in BEGIN IMMEDIATE ... COMMIT.

With ``what=`` (e.g. "catalog /s/catalog.sqlite"), SQLite's own errors inside the ``with`` block come out as a
`CubeError` naming the file and what to do (damaged file, read-only folder, locked), not a raw ``sqlite3`` trace.
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

from ..errors import CubeError

BUSY_TIMEOUT_S = 60


def explain(exc: sqlite3.Error, what: str) -> CubeError:
    """A CubeError for an SQLite error on ``what``, saying what it means and what to do."""
    text = str(exc)
    low = text.lower()
    if "not a database" in low or "malformed" in low or "corrupt" in low or "no such table" in low \
            or "no such column" in low:
        return CubeError(f"{what} is damaged ({text}): restore it from a backup; the cube files are untouched "
                         "(nothing was deleted)")
    if "readonly" in low or "read-only" in low:
        return CubeError(f"{what} is read-only for this process ({text}): reads work, writes need write access "
                         "to the store folder and its files")
    if "unable to open" in low or "authorization" in low or "permission" in low:
        return CubeError(f"cannot open {what} ({text}): check that the folder exists and that you may read it")
    if "locked" in low or "busy" in low:
        return CubeError(f"{what} stayed locked for {BUSY_TIMEOUT_S} s ({text}): another process holds a long "
                         "write; retry")
    return CubeError(f"{what}: SQLite error {type(exc).__name__}: {text}")


@contextmanager
def connect(path: str | Path, *, synchronous: str | None = None, readonly: bool = False,
            what: str | None = None, create: bool = True) -> Iterator[sqlite3.Connection]:
    """A connection to ``path`` (autocommit, busy timeout), closed on exit.

    Args:
        readonly: open with ``mode=ro`` (a store someone else owns can still be read).
        what: name of the file for error messages; given, SQLite errors become `CubeError`.
        create: False opens with ``mode=rw``: a file deleted meanwhile is an error, never a new empty database.
    """
    try:
        if readonly:
            db = _open_readonly(path)
        elif create:
            db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        else:
            db = sqlite3.connect(f"file:{quote(str(Path(path).absolute()))}?mode=rw", uri=True, timeout=BUSY_TIMEOUT_S,
                                 isolation_level=None)
    except sqlite3.Error as exc:
        if what is None:
            raise
        raise explain(exc, what) from None
    try:
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
        if synchronous and not readonly:
            db.execute(f"PRAGMA synchronous={synchronous}")
        yield db
    except sqlite3.Error as exc:
        if what is None:
            raise
        raise explain(exc, what) from None
    finally:
        db.close()


def _open_readonly(path) -> sqlite3.Connection:
    """A read-only connection. A WAL database closed cleanly has no -shm file, and a reader that may not write
    the folder cannot create one: SQLite then reads it only as ``immutable`` (safe: without a -wal file, the
    main file is the whole database, and nobody without write access could be changing it through us)."""
    uri = f"file:{Path(path).absolute()}"
    db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return db
    except sqlite3.OperationalError:
        db.close()
        if Path(f"{path}-wal").exists():
            raise
    return sqlite3.connect(f"{uri}?immutable=1", uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE (take the write lock now) ... COMMIT, or ROLLBACK on any error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
