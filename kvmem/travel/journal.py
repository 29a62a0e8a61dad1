"""The install journal, backups and ledger: how `install_bundle` makes a multi-memory install all or nothing on a
store that commits one memory at a time.

All three live in the store itself (reserved namespaces), so they work for every backend and every process that
shares the store:

- ``kvmem.installs``: one record per running install (its journal): state ``backup`` -> ``write`` -> ``commit``,
  which memories are new, the old text and meta of those it replaces (old cubes are copied to ``kvmem.rollback``
  before anything is overwritten), the adapter files it writes, and its owner (host, boot, pid + start time,
  heartbeat) so a recovery never touches a live install;
- ``kvmem.ledger``: per (namespace, signer, bundle name) the sequence and digest installed, for replay checks.

`recover_installs` rolls a dead install back (state ``backup``/``write``: new memories removed, replaced ones
restored, adapter files put back) or forward (``commit``: ledger written, backups and journal dropped); every step
can be repeated, so a recovery that is itself killed is finished by the next one.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

from ..errors import CubeError
from ..store.cubestore import CubeStore
from .provenance import as_store

JOURNALS, LEDGER, BACKUPS = "kvmem.installs", "kvmem.ledger", "kvmem.rollback"
STALE_S = 600.0                     # a journal of another host untouched this long belongs to a dead install


def ledger_id(namespace: str, signer: str | None, name: str) -> str:
    return "b-" + hashlib.sha256(f"{namespace}\0{signer or 'unsigned'}\0{name}".encode()).hexdigest()[:32]


def ledger_entry(store: CubeStore, namespace: str, signer: str | None, name: str) -> dict | None:
    """What the ledger says ``namespace`` holds of bundle ``name`` by ``signer`` (None: nothing)."""
    rec = store.view(LEDGER).get(ledger_id(namespace, signer, name))
    if rec is None:
        return None
    try:
        entry = json.loads(rec.text)
    except ValueError:
        raise CubeError(f"the ledger entry {LEDGER}/{rec.id} is damaged; remove it (`kvmem rm {rec.id} -n {LEDGER}`) "
                        "to install again (replays of older bundles are then not refused for that bundle)") from None
    return entry if isinstance(entry, dict) else None


def owner() -> dict:
    """Who runs this install: host, boot, pid and the process's start time (a reused pid is another process)."""
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


def _alive(journal: dict) -> bool:
    same_host = journal.get("host") == socket.gethostname()
    if same_host and journal.get("boot") == _boot_id() and journal.get("start"):
        return _start_time(int(journal.get("pid", -1))) == journal["start"]
    if same_host and journal.get("boot") != _boot_id():
        return False  # this machine rebooted since
    return time.time() - float(journal.get("heartbeat", 0)) < STALE_S


def save_journal(store: CubeStore, journal: dict) -> None:
    """Write the journal (one atomic catalog write), with a fresh heartbeat."""
    journal["heartbeat"] = time.time()
    store.view(JOURNALS).add(journal["tx"], json.dumps(journal, sort_keys=True))


def finish(store: CubeStore, journal: dict) -> None:
    """After the commit point: the ledger, then drop backups and the journal (each step repeatable)."""
    ledger = journal["ledger"]
    store.view(LEDGER).add(ledger_id(ledger["namespace"], ledger["signer"], ledger["bundle"]),
                           json.dumps(ledger, sort_keys=True))
    _drop_backups(store, journal)
    for slot in journal.get("adapters", []):
        Path(slot["backup"]).unlink(missing_ok=True)
    store.view(JOURNALS).rm(journal["tx"])


def _drop_backups(store: CubeStore, journal: dict) -> None:
    backups = store.view(BACKUPS)
    for old in journal.get("replaced", {}).values():
        if old.get("cube"):
            backups.rm(old["cube"])


def _restore(view, backups, memory_id: str, old: dict) -> None:
    cube = backups.load_cube(old["cube"]) if old.get("cube") else None
    if cube is not None:
        view.put_cube(memory_id, cube, text=old["text"], meta=old["meta"])
    else:
        view.add(memory_id, old["text"], old["meta"])


def roll_back(store: CubeStore, journal: dict) -> None:
    """Undo an install that did not reach its commit point (each step repeatable)."""
    view, backups = store.view(journal["namespace"]), store.view(BACKUPS)
    if journal["state"] == "write":  # in state "backup" the namespace was not touched yet
        for memory_id in journal.get("new", []):
            view.rm(memory_id)
        for memory_id, old in journal.get("replaced", {}).items():
            _restore(view, backups, memory_id, old)
        for slot in journal.get("adapters", []):
            path, backup = Path(slot["path"]), Path(slot["backup"])
            if backup.exists():
                os.replace(backup, path)
            else:
                path.unlink(missing_ok=True)
    _drop_backups(store, journal)
    store.view(JOURNALS).rm(journal["tx"])


def recover_installs(store, *, force: bool = False) -> list[str]:
    """Finish what killed installs left: roll each back (before its commit point) or forward (after it).

    Journals of installs still running (same host: their process is alive; another host: a heartbeat within
    `STALE_S`) are left alone unless ``force``. Returns ``"<bundle> into <namespace>: rolled back|forward"`` lines.
    """
    store = as_store(store)
    done = []
    for rec in store.view(JOURNALS).ls():
        try:
            journal = json.loads(rec.text)
            journal["tx"], journal["namespace"], journal["state"]
        except (ValueError, KeyError, TypeError):
            raise CubeError(f"the install journal {JOURNALS}/{rec.id} is damaged: restore it from a backup of the "
                            f"store or remove it (`kvmem rm {rec.id} -n {JOURNALS}`) and check the namespace by "
                            "hand") from None
        if journal.get("tx") != rec.id or (not force and _alive(journal)):
            continue
        if journal["state"] == "commit":
            finish(store, journal)
            done.append(f"{journal.get('bundle')} into {journal['namespace']}: rolled forward (it had committed)")
        else:
            roll_back(store, journal)
            done.append(f"{journal.get('bundle')} into {journal['namespace']}: rolled back (it was killed before "
                        "its commit point)")
    return done
