"""A batch: many memories (and files beside the store) written so that a reader sees all of them or none of them.

`StoreView.add` / `put_cube` commit one memory each. A batch (an install of a bundle: kvmem/travel/install.py) keeps
the store's commit order (reserve -> put -> upsert, kvmem/store/records.py), spread over four steps:

1. **journal**: a row in ``kvmem.batches`` names every blob the batch will put and every file it will move in, and
   its owner (host, boot, pid and the process's start time, a heartbeat);
2. **stage**: each cube blob is reserved and put (no row names it: no reader can see it); each file (an
   AdapterCube) is written under a hidden staged name in the folder it goes to;
3. **commit**: ONE `CatalogBackend.upsert_many` writes every row, consumes every reservation and marks the journal
   committed (SQLite: one transaction; Redis: one MULTI/EXEC under WATCH). This is the only step readers can see;
4. **finish**: the blobs the batch replaced are deleted, staged files are renamed in, the journal row goes.

A batch that fails (an error, Ctrl-C) before 3 is rolled back at once by its own process; one that was killed is
rolled back (before 3) or finished (after 3) by `recover_batches`, which `CubeStore` runs when it opens a writable
store (one small catalog read when there is nothing to do) and which runs before every batch. Each step can be
repeated, so a recovery that is itself killed is completed by the next one. A journal is recovered only once its
process is gone (same host: its pid and start time no longer match; another host: no heartbeat for `STALE_S`).

Writers of one name (an install's namespace) are serialised with `lock`: an fcntl lock on a local store (the
kernel releases it when its process dies), a Redis key with a token and an expiry its holder renews.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import CubeError
from .records import Record, check_blob, check_meta, check_name, is_valid_blob, new_blob_name
from .stamp import MEMORY_KEY, make_stamp

BATCHES = "kvmem.batches"          # the journals of running (or killed) batches
STALE_S = 600.0                    # a journal of another host untouched this long belongs to a dead batch
LOCK_WAIT_S = 600.0                # how long a batch waits for another writer of its lock name
_HEARTBEAT_S = 20.0
_log = logging.getLogger("kvmem.store")


# ---------------------------------------------------------------------------------------------- owners
def owner() -> dict:
    """Who runs a batch: host, boot, pid and the process's start time (a reused pid is another process)."""
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(), "start": _start_time(os.getpid()),
            "heartbeat": time.time()}


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """The start time of process ``pid`` (clock ticks since boot; "" if it is gone or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return "" if fields[0] in "ZX" else fields[19]
    except (OSError, IndexError):
        return ""


def is_alive(journal: dict) -> bool:
    """Whether the process that wrote ``journal`` (its `owner` fields) may still be running."""
    same_host = journal.get("host") == socket.gethostname()
    if same_host and journal.get("boot") == _boot_id() and journal.get("start"):
        return _start_time(int(journal.get("pid", -1))) == journal["start"]
    if same_host and journal.get("boot") != _boot_id():
        return False  # this machine rebooted since
    return time.time() - float(journal.get("heartbeat", 0)) < STALE_S


# ---------------------------------------------------------------------------------------------- locks
def lock(store, name: str, *, wait: float = LOCK_WAIT_S):
    """A context manager holding the store-wide lock ``name`` (e.g. a namespace an install writes), waiting up to
    ``wait`` seconds for its holder (then CubeError). A dead holder never blocks for long (see the module doc)."""
    take = getattr(store.catalog, "lock", None)
    if take is None:
        raise CubeError(f"{store.catalog.describe()} cannot lock (a custom catalog backend without a lock method): "
                        "batches into it cannot be serialised")
    return take(name, wait=wait)


# ---------------------------------------------------------------------------------------------- the batch
@dataclass
class _Write:
    record: Record
    cube: object = None               # a MemCube, or a callable returning one (loaded when staged)


@dataclass
class BatchReport:
    """What `Batch.commit` wrote: ``records`` (as committed) and ``replaced`` blobs it deleted."""

    records: list[Record] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)


class Batch:
    """Memories and files to write all at once (see the module docstring).

    Example:
        >>> batch = Batch(store, label="install team.kvmem into team")
        >>> batch.add("team", "m1", "Pavel lives in Brno.", {"turn": 1})
        >>> batch.put_cube("team", "m2", cube, text="...")           # or a callable that loads the cube
        >>> batch.put_file(Path("adapters/team/a.safetensors"), lambda path: adapter.save(path))
        >>> batch.commit()                                            # readers see all of it, or none
    """

    def __init__(self, store, *, label: str = "batch"):
        self.store, self.label = store, label
        self.tx = uuid.uuid4().hex[:24]
        self._writes: list[_Write] = []
        self._files: list[tuple[Path, Path, Callable]] = []   # (staged, final, write(staged))
        self._ids: set[tuple[str, str]] = set()

    def __len__(self) -> int:
        return len(self._writes) + len(self._files)

    def add(self, namespace: str, memory_id: str, text: str, meta: dict | None = None) -> None:
        """Write a plaintext memory (replacing a memory's text drops a cube built from the old text)."""
        self._writes.append(_Write(self._record(namespace, memory_id, text, meta, "text")))

    def put_cube(self, namespace: str, memory_id: str, cube, *, text: str, meta: dict | None = None) -> None:
        """Write a memory with its MemCube. ``cube``: a `MemCube`, or a callable returning one (so a batch of
        thousands of cubes holds one in memory at a time)."""
        rec = self._record(namespace, memory_id, text, meta, "memcube")
        rec.blob = new_blob_name()
        self._writes.append(_Write(rec, cube))

    def put_file(self, path, write: Callable[[Path], object]) -> None:
        """Write the file ``path`` with the memories: ``write(staged)`` writes it to a hidden name beside ``path``
        while the batch stages; it is renamed to ``path`` (replacing any file there) after the commit."""
        path = Path(path).absolute()
        self._files.append((_staged_path(path, self.tx), path, write))

    def _record(self, namespace, memory_id, text, meta, kind) -> Record:
        check_name(namespace, "namespace")
        check_name(memory_id, "memory id")
        if not isinstance(text, str) or not text.strip():
            raise CubeError(f"memory text must be a non-empty string, got {text!r:.40}")
        if (namespace, memory_id) in self._ids:
            raise CubeError(f"a batch writes {namespace}/{memory_id} twice: write each memory once")
        self._ids.add((namespace, memory_id))
        return Record(namespace, memory_id, text, kind, check_meta(meta))

    def commit(self, *, progress: Callable[[int, int], None] | None = None) -> BatchReport:
        """Stage everything, commit every row in one atomic step, then finish; on any error (or Ctrl-C) before
        the commit, nothing is visible and what was staged is removed. ``progress(done, total)`` per item."""
        catalog = self.store.catalog
        records = [w.record for w in self._writes]
        old = _current_rows(catalog, records)
        journal = {"tx": self.tx, "label": self.label, "state": "staging",
                   "blobs": [r.blob for r in records if r.blob], "files": [[str(s), str(f)] for s, f, _ in self._files],
                   "replaces": sorted({o.blob for o in old.values() if o.blob and is_valid_blob(o.blob)}), **owner()}
        _save_journal(catalog, journal)
        try:
            self._stage(journal, old, progress)
            journal["state"] = "commit"
            journal["heartbeat"] = time.time()
            replaced = catalog.upsert_many([*records, _journal_record(journal)])  # THE commit point
        except BaseException:
            try:
                _settle(self.store, self.tx)  # rolls back, or finishes if the commit did land (a lost reply)
            except Exception as exc:  # noqa: BLE001  (the original error matters more; recovery finishes it)
                _log.warning("batch %s (%s) could not be undone now (%s): the next recovery does", self.tx,
                             self.label, exc)
            raise
        gone = _finish(self.store, journal, replaced)
        # an install that replaces a memory's text is an edit: what derives from the old text goes, as after
        # StoreView.add / put_cube (kvmem/store/forgetting.py); a crash here leaves it to the read-time check and gc
        edited = [rec.qualified for rec in records
                  if (before := old.get((rec.namespace, rec.id))) is not None and before.text != rec.text]
        if edited:
            from .forgetting import Receipt, invalidate

            invalidate(self.store, edited, Receipt(f"batch {self.tx}", "edited", True))
        return BatchReport(records, gone)

    def _stage(self, journal: dict, old: dict, progress) -> None:
        catalog, blobs = self.store.catalog, self.store.blobs
        store_id = getattr(catalog, "store_id", None)
        total, beat = len(self), time.monotonic()
        for i, write in enumerate(self._writes):
            rec = write.record
            if rec.blob is not None:
                cube = write.cube() if callable(write.cube) else write.cube
                before = old.get((rec.namespace, rec.id))
                now = time.time()
                # the file records its memory, so a lost catalog can be rebuilt from the files (kvmem/store/stamp.py)
                stamp = make_stamp(store=store_id, namespace=rec.namespace, memory_id=rec.id, meta=rec.meta,
                                   created=before.created if before else now, written=now,
                                   text=rec.text if rec.text != cube.text else None)
                catalog.reserve(rec.blob, time.time())
                staged = blobs.stage(rec.blob)
                try:
                    cube.with_meta({MEMORY_KEY: stamp}).save(staged)
                    rec.bytes = blobs.put(rec.blob, staged)
                except CubeError:
                    raise
                except Exception as exc:  # an OSError, safetensors' own errors
                    raise CubeError(f"writing the cube of {rec.qualified} failed ({type(exc).__name__}: {exc}); "
                                    "nothing was committed: run the batch again") from None
                finally:
                    Path(staged).unlink(missing_ok=True)
                rec.fingerprint, rec.tokens = cube.fingerprint, cube.num_tokens
            rec.created = rec.last_used = time.time()
            if progress is not None:
                progress(i + 1, total)
            if time.monotonic() - beat > _HEARTBEAT_S:
                _save_journal(catalog, journal)
                beat = time.monotonic()
        for j, (staged, final, write) in enumerate(self._files):
            staged.parent.mkdir(parents=True, exist_ok=True)
            write(staged)
            if progress is not None:
                progress(len(self._writes) + j + 1, total)


def _staged_path(final: Path, tx: str) -> Path:
    return final.parent / f".{final.name}.{tx}.staged"


def _current_rows(catalog, records: list[Record]) -> dict:
    """{(namespace, id): the row now} for the memories ``records`` will replace."""
    wanted = {(r.namespace, r.id) for r in records}
    rows = {}
    for namespace in sorted({ns for ns, _ in wanted}):
        for row in catalog.list((namespace,)):
            if (row.namespace, row.id) in wanted:
                rows[(row.namespace, row.id)] = row
    return rows


def _journal_record(journal: dict) -> Record:
    now = time.time()
    return Record(BATCHES, journal["tx"], json.dumps(journal, sort_keys=True), created=now, last_used=now)


def _save_journal(catalog, journal: dict) -> None:
    journal["heartbeat"] = time.time()
    catalog.upsert(_journal_record(journal))


def _read_journal(rec: Record) -> dict:
    try:
        journal = json.loads(rec.text)
        if journal["tx"] != rec.id or journal["state"] not in ("staging", "commit"):
            raise ValueError("not a batch journal")
        for blob in journal["blobs"] + journal["replaces"]:
            check_blob(blob)
        for staged, final in journal["files"]:  # recovery renames and deletes only files this batch named
            if Path(staged) != _staged_path(Path(final), journal["tx"]):
                raise ValueError("a staged file is not the hidden file the batch writes beside its target")
    except (ValueError, KeyError, TypeError, CubeError):
        raise CubeError(f"the batch journal {BATCHES}/{rec.id} is damaged: restore the store from a backup, or "
                        f"remove it (`kvmem rm {rec.id} -n {BATCHES}`; `kvmem gc` then collects what it staged)") \
            from None
    return journal


def _finish(store, journal: dict, replaced=()) -> list[str]:
    """After the commit point: delete what the batch replaced, move its files in, drop its journal."""
    ours = set(journal["blobs"])
    gone = sorted((set(journal["replaces"]) | set(replaced)) - ours)
    for blob in gone:  # blob names are never reused: no row names a replaced one any more
        store.blobs.delete(check_blob(blob))
    for staged, final in journal["files"]:
        try:
            os.replace(staged, final)
        except FileNotFoundError:  # moved in already (a recovery that was itself interrupted, or a second one)
            pass
    store.catalog.delete(BATCHES, journal["tx"])
    return gone


def _roll_back(store, journal: dict) -> None:
    """Before the commit point: remove what the batch staged (no row names any of it), then its journal."""
    for blob in journal["blobs"]:
        Path(store.blobs.stage(blob)).unlink(missing_ok=True)
        store.blobs.delete(blob)    # the bytes go first, then the reservation that protected them from gc
        store.catalog.release(blob)
    for staged, _ in journal["files"]:
        Path(staged).unlink(missing_ok=True)
    store.catalog.delete(BATCHES, journal["tx"])


def _settle(store, tx: str) -> str | None:
    """Roll the batch ``tx`` back or forward by what its journal row says now; "rolled back" / "finished"."""
    rec = store.catalog.get((BATCHES,), tx)
    if rec is None:
        return None
    journal = _read_journal(rec)
    if journal["state"] == "commit":
        _finish(store, journal)
        return "finished (it had committed)"
    _roll_back(store, journal)
    return "rolled back (it stopped before its commit)"


def recover_batches(store, *, force: bool = False) -> list[str]:
    """Finish what killed batches left: roll each back (before its commit) or forward (after it). Batches whose
    process may still run are left alone unless ``force``. Returns ``"<label>: rolled back|finished"`` lines.
    A read-only store is left as it is."""
    if getattr(store.catalog, "readonly", False):
        return []
    done = []
    for rec in store.catalog.list((BATCHES,)):
        journal = _read_journal(rec)
        if not force and is_alive(journal):
            continue
        how = _settle(store, rec.id)
        if how is not None:
            done.append(f"{journal.get('label')}: {how}")
            _log.warning("recovered a killed batch: %s: %s", journal.get("label"), how)
    return done


def recover_on_open(store) -> None:
    """`recover_batches` for `CubeStore` to run when it opens: never fails the open (a warning instead)."""
    try:
        recover_batches(store)
    except CubeError as exc:
        _log.warning("%s", exc)

