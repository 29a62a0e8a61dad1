"""The install ledger, and recovery of installs a killed process left.

- ``kvmem.ledger``: per (namespace, signer, bundle name) the sequence and digest installed, for replay checks. An
  install writes its entry in the same atomic commit as its memories (kvmem/travel/install.py).
- `recover_installs`: the store's batch recovery (kvmem/store/batch.py: a killed install is rolled back before its
  commit, finished after it), plus the journals older kvmem versions wrote in ``kvmem.installs`` (their installs
  wrote one memory at a time, backing up what they replaced in ``kvmem.rollback``): rolled back or forward as
  those versions did, so a store left by one is still brought to the old or the new state.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from ..errors import CubeError
from ..store.batch import STALE_S, is_alive, recover_batches  # noqa: F401  (STALE_S lived here)
from ..store.cubestore import CubeStore
from .provenance import as_store

JOURNALS, LEDGER, BACKUPS = "kvmem.installs", "kvmem.ledger", "kvmem.rollback"


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


def save_journal(store: CubeStore, journal: dict) -> None:
    """Write an older-format journal (one atomic catalog write), with a fresh heartbeat (tests make dead ones)."""
    journal["heartbeat"] = time.time()
    store.view(JOURNALS).add(journal["tx"], json.dumps(journal, sort_keys=True))


def finish(store: CubeStore, journal: dict) -> None:
    """An older-format install after its commit point: the ledger, then drop backups and the journal."""
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
    """Undo an older-format install that did not reach its commit point (each step repeatable)."""
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
    """Finish what killed installs left: roll each back (before its commit) or forward (after it).

    Installs still running (same host: their process is alive; another host: a heartbeat within `STALE_S`) are
    left alone unless ``force``. Returns ``"<what> into <namespace>: rolled back|forward|finished"`` lines.
    """
    store = as_store(store)
    done = recover_batches(store, force=force)
    for rec in store.view(JOURNALS).ls():  # journals of older kvmem versions
        try:
            journal = json.loads(rec.text)
            journal["tx"], journal["namespace"], journal["state"]
        except (ValueError, KeyError, TypeError):
            raise CubeError(f"the install journal {JOURNALS}/{rec.id} is damaged: restore it from a backup of the "
                            f"store or remove it (`kvmem rm {rec.id} -n {JOURNALS}`) and check the namespace by "
                            "hand") from None
        if journal.get("tx") != rec.id or (not force and is_alive(journal)):
            continue
        if journal["state"] == "commit":
            finish(store, journal)
            done.append(f"{journal.get('bundle')} into {journal['namespace']}: rolled forward (it had committed)")
        else:
            roll_back(store, journal)
            done.append(f"{journal.get('bundle')} into {journal['namespace']}: rolled back (it was killed before "
                        "its commit point)")
    return done
