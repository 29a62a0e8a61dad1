"""One way to open the SQLite files kvmem keeps (the store's catalog, the embedding cache).

Every call gets its own short-lived connection (several processes share the files), in autocommit mode with a
long busy timeout; `transaction` wraps writes that must land together in BEGIN IMMEDIATE ... COMMIT.
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

BUSY_TIMEOUT_S = 60


@contextmanager
def connect(path: str | Path, *, synchronous: str | None = None) -> Iterator[sqlite3.Connection]:
    """A connection to ``path`` (autocommit, busy timeout), closed on exit."""
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
        if synchronous:
            db.execute(f"PRAGMA synchronous={synchronous}")
        yield db
    finally:
        db.close()


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
