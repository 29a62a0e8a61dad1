"""EmbeddingCache: sentence embeddings kept on disk, so an index rebuilt over a store does not re-embed it.

One SQLite file (WAL mode, every call its own short transaction, so several processes can share it), one row
per (encoder, text): the key is the xxh3-128 digest of the UTF-8 text, the value the float32 vector. The
encoder id names the model and a digest of its files, so vectors of another model are never mixed in.
Embeddings are derived data: a row whose blob has the wrong length is ignored (and rewritten); an unreadable
cache file raises a `CubeError` that names it, and deleting the file only costs re-embedding.

A process that may not write the cache (a store folder it only may read, a read-only mount) uses it read-only:
the vectors the file holds are read, the others are computed and not kept (``readonly`` is then True), so a
dense search of someone else's store works and costs only the embedding of what their cache lacks.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

import numpy as np

from ..errors import CubeError
from ..store.sqlite_db import connect, transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS embeddings (
    encoder TEXT NOT NULL,
    key     TEXT NOT NULL,
    vec     BLOB NOT NULL,
    PRIMARY KEY (encoder, key)
) WITHOUT ROWID;
"""
_CHUNK = 500  # keys per SELECT (SQLite's bound-parameter limit is 999 on old builds)
_log = logging.getLogger("kvmem.embedding_cache")


def store_cache_path(view) -> Path | None:
    """Where a store keeps its memories' embeddings: ``<store folder>/embeddings.sqlite``; None for a store without
    a folder (Redis): its index embeds in memory."""
    root = getattr(getattr(view, "store", None), "root", None)
    return None if root is None else Path(root) / "embeddings.sqlite"


def text_key(text: str) -> str:
    import xxhash

    return xxhash.xxh3_128_hexdigest(text.encode("utf-8"))


def encoder_id(model_dir: Path, name: str) -> str:
    """``name@digest``: the digest covers the model's config files and the sizes of its weight files."""
    import xxhash

    h = xxhash.xxh3_64()
    for f in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        h.update(f.relative_to(model_dir).as_posix().encode())
        h.update(f.read_bytes() if f.suffix == ".json" else str(f.stat().st_size).encode())
    return f"{name}@{h.hexdigest()}"


class EmbeddingCache:
    """Vectors of ``dim`` float32 values for texts, per encoder, in the SQLite file ``path``."""

    def __init__(self, path: str | Path, encoder: str, dim: int):
        self.path, self.encoder, self.dim = Path(path).expanduser(), encoder, int(dim)
        self.readonly = not _writable(self.path)
        if not self.readonly:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self._connect() as db:
                    db.execute("PRAGMA journal_mode=WAL")
                    db.executescript(_SCHEMA)
            except sqlite3.DatabaseError as exc:
                if "readonly" not in str(exc).lower():
                    raise CubeError(f"embedding cache {self.path} is not a readable SQLite file ({exc}); delete it "
                                    "and it is rebuilt (it only holds embeddings, which are recomputed)") from None
                self.readonly = True  # e.g. a read-only mount that access() did not report
        if self.readonly:
            _log.info("embedding cache %s is read-only for this process: the embeddings it holds are read, new "
                      "ones are computed and not kept", self.path)

    def _connect(self):
        return connect(self.path, readonly=self.readonly)

    def get_many(self, texts: list[str]) -> dict[int, np.ndarray]:
        """{position in ``texts``: vector} for the texts the cache holds a well-formed vector of."""
        keys = [text_key(t) for t in texts]
        found: dict[str, bytes] = {}
        unique = list(dict.fromkeys(keys))
        try:
            if self.readonly and not self.path.is_file():
                return {}
            with self._connect() as db:
                for i in range(0, len(unique), _CHUNK):
                    chunk = unique[i:i + _CHUNK]
                    rows = db.execute(f"SELECT key, vec FROM embeddings WHERE encoder=? AND key IN "
                                      f"({','.join('?' * len(chunk))})", (self.encoder, *chunk)).fetchall()
                    found.update(rows)
        except sqlite3.Error as exc:
            if not self.readonly:
                raise
            # this process can neither repair nor rebuild the file: embed everything instead of failing a search
            _log.warning("embedding cache %s cannot be read (%s): embedding every text", self.path, exc)
            return {}
        out = {}
        for i, k in enumerate(keys):
            blob = found.get(k)
            if blob is not None and len(blob) == 4 * self.dim:  # anything else is ignored and rewritten
                out[i] = np.frombuffer(blob, dtype=np.float32)
        return out

    def put_many(self, texts: list[str], vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(texts), self.dim):
            raise CubeError(f"expected {len(texts)} x {self.dim} vectors, got {tuple(vectors.shape)}")
        if self.readonly:  # computed and not kept: this process may not write the cache
            return
        rows = [(self.encoder, text_key(t), v.tobytes()) for t, v in zip(texts, vectors)]
        with self._connect() as db, transaction(db):
            db.executemany("INSERT OR REPLACE INTO embeddings (encoder, key, vec) VALUES (?, ?, ?)", rows)

    def __len__(self) -> int:
        try:
            if self.readonly and not self.path.is_file():
                return 0
            with self._connect() as db:
                return db.execute("SELECT COUNT(*) FROM embeddings WHERE encoder=?", (self.encoder,)).fetchone()[0]
        except sqlite3.Error:
            if not self.readonly:
                raise
            return 0


def _writable(path: Path) -> bool:
    """Whether this process may write the cache: the file (if there is one) and its folder (SQLite's WAL keeps
    ``-wal`` and ``-shm`` files beside it). A folder that does not exist yet counts as writable: mkdir decides."""
    folder = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
    if folder is None or not os.access(folder, os.W_OK | os.X_OK):
        return False
    return not path.exists() or os.access(path, os.R_OK | os.W_OK)
