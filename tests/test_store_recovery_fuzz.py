"""Issue 27: a seeded fuzz of repair / flush / restore / copy-in interleavings with writers and gc. Whatever the
order, no memory that a cube file still holds is lost: the newest version of every memory stays on disk (gc never
deletes it), the final repair puts it back in the catalog, and no forged or foreign file ever becomes a memory."""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
import time
import uuid
from pathlib import Path

import pytest

import kvmem
from kvmem import MemCube
from test_store_backends import tiny_cube

IDS = [f"m{i}" for i in range(5)]


@pytest.fixture(scope="module")
def cube():
    return tiny_cube()


def _files(root: Path) -> dict:
    """{(namespace, id, text) of every cube file of this store}: what the files still hold."""
    out = set()
    try:
        marker_id = json.loads((root / "kvmem-store.json").read_text())["store_id"]
    except (OSError, ValueError, KeyError):
        marker_id = None
    for path in (root / "cubes").glob("*.safetensors"):
        try:
            memory = MemCube.load(path).meta.get("memory") or {}
        except kvmem.CubeError:
            continue
        if memory.get("store") in (None, marker_id):
            out.add((memory.get("namespace"), memory.get("id"), memory.get("text")))
    return out


def _drop(root: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{root / 'catalog.sqlite'}{suffix}").unlink(missing_ok=True)


@pytest.mark.parametrize("seed", range(6))
def test_no_interleaving_loses_a_memory_a_file_holds(tmp_path, cube, seed):
    rng = random.Random(seed)
    root = tmp_path / "s"
    foreign = kvmem.CubeStore(tmp_path / "foreign").view("me")
    kvmem.CubeStore(root)
    latest: dict[str, str | None] = {}   # memory id -> text of its newest committed cube version (None: none)
    backups: list[Path] = []
    counter = 0
    log = []
    for step in range(70):
        op = rng.choice(["put", "put", "put", "put", "add", "rm", "gc", "backup", "flush", "restore", "copy-in",
                         "forge", "repair"])
        log.append(op)
        memory_id = rng.choice(IDS)
        try:
            store = kvmem.CubeStore(root, create=False)
        except kvmem.CubeError:
            store = None  # catalog lost: only repair (and restore) can do anything
        try:
            if op == "put" and store is not None:
                counter += 1
                text = f"{memory_id} version {counter}"
                store.view("me").put_cube(memory_id, cube, text=text)
                latest[memory_id] = text
            elif op == "add" and store is not None:
                store.view("me").add(memory_id, f"{memory_id} as text")
                latest[memory_id] = None
            elif op == "rm" and store is not None:
                store.view("me").rm(memory_id)
                latest[memory_id] = None
            elif op == "gc" and store is not None:
                store.gc(grace_s=0)
            elif op == "backup" and store is not None:
                backups.append(tmp_path / f"backup-{step}.sqlite")
                with sqlite3.connect(root / "catalog.sqlite") as src, sqlite3.connect(backups[-1]) as dst:
                    src.backup(dst)
            elif op == "flush":
                if rng.random() < 0.5:
                    _drop(root)
                else:
                    (root / "catalog.sqlite").write_bytes(b"")
            elif op == "restore" and backups:
                _drop(root)
                shutil.copy(rng.choice(backups), root / "catalog.sqlite")
            elif op == "copy-in":  # another store's version of the same memory copied into cubes/
                rec = foreign.put_cube(memory_id, cube, text=f"FORGED foreign {memory_id}")
                shutil.copy(tmp_path / "foreign" / rec.path, root / "cubes" / f"{uuid.uuid4().hex}.safetensors")
            elif op == "forge" and store is not None:  # this store's id, a write time far in the future
                stamp = {"store": store.catalog.store_id, "namespace": "me", "id": memory_id, "meta": {},
                         "created": 0.0, "written": time.time() + 1e8, "text": f"FORGED future {memory_id}"}
                MemCube(cube.kv, cube.all_ids[0], {**cube.meta, "memory": stamp}).save(
                    root / "cubes" / f"{uuid.uuid4().hex}.safetensors")
            elif op == "repair":
                kvmem.CubeStore.rebuild_catalog(root)
        except kvmem.CubeError:
            pass  # a write into a lost catalog, a repair of an intact one: refused, nothing changed
        held = _files(root)
        for memory_id, text in latest.items():  # the newest version of every memory is still on disk
            if text is not None:
                assert ("me", memory_id, text) in held, (seed, step, op, memory_id, text, log)
    try:
        kvmem.CubeStore.rebuild_catalog(root)
    except kvmem.CubeError as exc:
        assert "intact" in str(exc)
    store = kvmem.CubeStore(root, create=False)
    store.gc(grace_s=0)
    view = store.view("me")
    for memory_id, text in latest.items():
        if text is not None:
            rec = view.get(memory_id)
            assert rec is not None and rec.text == text, (seed, memory_id, text, rec, log)
            assert view.load_cube(memory_id).fingerprint == cube.fingerprint
    assert not any(r.text.startswith("FORGED") for r in view.ls()), log
    assert {h[2] for h in _files(root) if h[1] in latest and latest[h[1]]} >= {t for t in latest.values() if t}
