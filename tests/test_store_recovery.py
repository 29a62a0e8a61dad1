"""Issue 27: the store's recovery paths lose nothing. `kvmem repair` is atomic (a repair that fails partway, on a
full disk or on a file with a NaN write time, changes nothing), salvages what the old catalog still holds,
never adopts a file of another store or from the future over a genuine memory, and gc never deletes the last copy
of a memory (after a catalog restored from an older backup, say). Disk-full cases run on a real, small tmpfs
(root only; skipped with the reason otherwise)."""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

import kvmem
from kvmem import MemCube
from test_store_backends import tiny_cube


@pytest.fixture(scope="module")
def cube():
    return tiny_cube()


@contextmanager
def small_disk(folder: Path, size_kb: int):
    """A real tmpfs of ``size_kb`` mounted at ``folder`` (a full disk on demand), unmounted after."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a real full disk needs a small tmpfs, which only root can mount")
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): no real full disk to test with")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _fill_disk(folder: Path, leave: int) -> Path:
    """Take all but ``leave`` bytes of the disk ``folder`` is on."""
    st = os.statvfs(folder)
    filler = folder / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def _drop_catalog(root: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{root / 'catalog.sqlite'}{suffix}").unlink(missing_ok=True)


def _texts(store, namespace="me") -> dict:
    return {r.id: r.text for r in store.view(namespace).ls()}


# ---------------------------------------------------------------- 1. a repair that fails partway changes nothing
@pytest.mark.parametrize("leave", [8_000, 40_000, 90_000, 120_000, 160_000])
def test_a_repair_on_a_full_disk_changes_nothing_and_gc_deletes_nothing(tmp_path, cube, leave):
    with small_disk(tmp_path / "disk", 2048) as disk:
        root = disk / "s"
        view = kvmem.CubeStore(root).view("me")
        want = {f"m{i}": f"memory {i} " + "x" * 1500 for i in range(30)}
        for memory_id, text in want.items():
            view.put_cube(memory_id, cube, text=text)
        files = sorted((root / "cubes").iterdir())
        _drop_catalog(root)
        filler = _fill_disk(disk, leave)
        try:
            report = kvmem.CubeStore.rebuild_catalog(root)
        except kvmem.CubeError as exc:
            assert "could not complete" in str(exc) and "nothing was changed" in str(exc), exc
            with pytest.raises(kvmem.CubeError, match="kvmem repair"):  # still lost: nothing half-made went live
                kvmem.CubeStore(root, create=False).gc(grace_s=0)
            assert sorted((root / "cubes").iterdir()) == files
            assert not [p for p in root.iterdir() if p.name.startswith(".catalog.sqlite.rebuild")]
            filler.unlink()
            report = kvmem.CubeStore.rebuild_catalog(root)  # the rerun does the whole job
        else:
            filler.unlink()
        assert sorted(report.rebuilt) == sorted(f"me/{i}" for i in want)
        store = kvmem.CubeStore(root, create=False)
        assert _texts(store) == want
        assert store.gc(grace_s=0).removed == [] and sorted((root / "cubes").iterdir()) == files


def test_a_file_with_a_nan_write_time_is_rebuilt_not_a_crash(tmp_path, cube):
    root = tmp_path / "s"
    view = kvmem.CubeStore(root).view("me")
    view.put_cube("a", cube, text="first")
    stamp = {"namespace": "me", "id": "nan", "meta": {}, "created": math.nan, "written": math.nan,
             "text": "a memory whose write times are NaN"}
    MemCube(cube.kv, cube.all_ids[0], {**cube.meta, "memory": stamp}).save(root / "cubes" / f"{'a' * 32}.safetensors")
    for i in range(5):
        view.put_cube(f"b{i}", cube, text=f"after {i}")
    _drop_catalog(root)
    report = kvmem.CubeStore.rebuild_catalog(root)
    assert sorted(report.rebuilt) == sorted(["me/a", "me/nan", *(f"me/b{i}" for i in range(5))]), report
    rec = kvmem.CubeStore(root, create=False).view("me").get("nan")
    assert rec.text == "a memory whose write times are NaN" and math.isfinite(rec.created)


def test_an_unreadable_file_is_skipped_and_reported(tmp_path, cube):
    root = tmp_path / "s"
    view = kvmem.CubeStore(root).view("me")
    rec = view.put_cube("a", cube)
    view.put_cube("b", cube, text="bee")
    (root / "cubes" / f"{'b' * 32}.safetensors").write_bytes(b"\x00" * 100)
    _drop_catalog(root)
    report = kvmem.CubeStore.rebuild_catalog(root)
    assert sorted(report.rebuilt) == ["me/a", "me/b"]
    assert [line.split(":")[0] for line in report.skipped] == [f"cubes/{'b' * 32}.safetensors"]
    assert kvmem.CubeStore(root, create=False).view("me").load_cube("a").fingerprint == cube.fingerprint
    assert (root / rec.path).is_file()


# ---------------------------------------------------------------- 2. salvage what is readable
def _with_text_and_grants(root, cube):
    store = kvmem.CubeStore(root)
    me = store.view("me")
    me.put_cube("a", cube, text="Alice lives in Oslo")
    for i in range(20):
        me.add(f"t{i}", f"text-only memory {i}")
    store.grant("me", "other")
    store.grant("me", "*")
    return store


def test_a_broken_marker_keeps_every_memory_and_grant(tmp_path, cube):
    root = tmp_path / "s"
    before = _with_text_and_grants(root, cube)
    texts, grants = _texts(before), before.grants()
    (root / "kvmem-store.json").write_text("{broken")
    with pytest.raises(kvmem.CubeError, match="kvmem repair"):
        kvmem.CubeStore(root)
    report = kvmem.CubeStore.rebuild_catalog(root)
    store = kvmem.CubeStore(root, create=False)
    assert _texts(store) == texts and store.grants() == grants
    assert report.rebuilt == [] and report.moved_aside == [] and "nothing" in report.lost
    assert json.loads((root / "kvmem-store.json").read_text())["store_id"] == before.catalog.store_id


@pytest.mark.parametrize("table", ["grants", "changes", "reservations"])
def test_a_dropped_table_loses_only_that_table(tmp_path, cube, table):
    root = tmp_path / "s"
    before = _with_text_and_grants(root, cube)
    texts, grants = _texts(before), before.grants()
    with sqlite3.connect(root / "catalog.sqlite") as db:
        db.execute(f"DROP TABLE {table}")
    with pytest.raises(kvmem.CubeError, match="kvmem repair"):
        kvmem.CubeStore(root).gc()
    report = kvmem.CubeStore.rebuild_catalog(root)
    store = kvmem.CubeStore(root, create=False)
    assert _texts(store) == texts
    assert store.grants() == ([] if table == "grants" else grants)
    assert ("grants" in report.lost) == (table == "grants") and "text-only memories" not in report.lost
    assert store.gc(grace_s=0).removed == [] and store.view("me").load_cube("a") is not None


def test_damaged_rows_lose_only_those_rows(tmp_path, cube):
    root = tmp_path / "s"
    before = _with_text_and_grants(root, cube)
    texts = _texts(before)
    with sqlite3.connect(root / "catalog.sqlite") as db:
        db.execute("UPDATE memories SET meta='{not json' WHERE id IN ('t3', 'a')")
    report = kvmem.CubeStore.rebuild_catalog(root)
    store = kvmem.CubeStore(root, create=False)
    del texts["t3"]  # text-only: only the catalog had it
    assert _texts(store) == texts and report.rebuilt == ["me/a"] and report.moved_aside[0].endswith(".sqlite")
    assert "2 damaged catalog rows" in report.lost and (root / report.moved_aside[0]).is_file()


def test_repair_beside_a_running_writer_keeps_its_memories(tmp_path, cube):
    """Item 2's 664 memories: a writer keeps adding text-only memories while the catalog is repaired in place."""
    root = tmp_path / "s"
    store = _with_text_and_grants(root, cube)
    code = (f"import sys, kvmem\nv = kvmem.CubeStore({str(root)!r}).view('w')\n"
            "for i in range(200):\n    v.add(f'x{i}', f'written by the writer {i}')\nprint('done')\n")
    env = {**os.environ, "PYTHONPATH": str(Path(kvmem.__file__).parents[1])}
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(store.view("w").ls()) < 20:
            time.sleep(0.05)
        (root / "kvmem-store.json").write_text("{broken")  # what the issue damaged: the marker
        kvmem.CubeStore.rebuild_catalog(root)
    finally:
        out, err = writer.communicate(timeout=120)
    assert writer.returncode == 0 and "done" in out, err[-2000:]
    store = kvmem.CubeStore(root, create=False)
    assert len(store.view("w").ls()) == 200 and len(store.view("me").ls()) == 21


# ---------------------------------------------------------------- 3. never adopt a file over a genuine memory
def _forge(root, cube, *, written, store=None, text="FORGED: Carol's PIN is 0000", name=None):
    stamp = {"namespace": "carol", "id": "pin", "meta": {}, "created": 0.0, "written": written, "text": text}
    if store:
        stamp["store"] = store
    path = root / "cubes" / f"{name or uuid.uuid4().hex}.safetensors"
    MemCube(cube.kv, cube.all_ids[0], {**cube.meta, "memory": stamp}).save(path)
    return path


@pytest.mark.parametrize("damage", ["emptied", "intact"])
@pytest.mark.parametrize("forgery", ["future", "other store"])
def test_a_forged_or_foreign_file_never_replaces_the_genuine_memory(tmp_path, cube, damage, forgery):
    root = tmp_path / "s"
    store = kvmem.CubeStore(root)
    genuine = store.view("carol").put_cube("pin", cube, text="Carol's PIN is 4321")
    if forgery == "future":
        forged = _forge(root, cube, written=time.time() + 10 * 365 * 86400, store=store.catalog.store_id)
    else:
        other = kvmem.CubeStore(tmp_path / "other")
        rec = other.view("carol").put_cube("pin", cube, text="FORGED: Carol's PIN is 0000")
        forged = root / "cubes" / Path(rec.path).name
        shutil.copy(tmp_path / "other" / rec.path, forged)  # copied in from another store
    if damage == "emptied":
        (root / "catalog.sqlite").write_bytes(b"")
        report = kvmem.CubeStore.rebuild_catalog(root)
        assert report.rebuilt == ["carol/pin"]
    else:
        report = None
    store = kvmem.CubeStore(root, create=False)
    assert store.view("carol").get("pin").text == "Carol's PIN is 4321"
    assert store.view("carol").load_cube("pin") is not None
    gc = store.gc(grace_s=0)
    assert (root / genuine.path).is_file() and forged.is_file()  # both kept: a conflict is reported, not resolved
    assert [line.split(":")[0] for line in gc.kept] == [f"cubes/{forged.name}"]
    if report is not None:
        assert [line.split(":")[0] for line in report.conflicts] == [f"cubes/{forged.name}"]
        assert "not adopted" in report.conflicts[0]


def test_a_newer_copy_of_this_store_still_wins_and_the_older_is_reported(tmp_path, cube):
    root = tmp_path / "s"
    view = kvmem.CubeStore(root).view("me")
    first = view.put_cube("a", cube, text="version one")
    saved = (root / first.path).read_bytes()
    second = view.put_cube("a", cube, text="version two")
    (root / first.path).write_bytes(saved)  # a crash between commit and delete left the old version
    (root / "catalog.sqlite").write_bytes(b"")
    report = kvmem.CubeStore.rebuild_catalog(root)
    assert report.rebuilt == ["me/a"] and "older version of me/a" in report.skipped[0]
    store = kvmem.CubeStore(root, create=False)
    assert store.view("me").get("a").text == "version two"
    assert store.gc(grace_s=0).removed == [first.path] and (root / second.path).is_file()


# ---------------------------------------------------------------- gc never deletes the last copy of a memory
def test_gc_after_a_restored_backup_keeps_newer_memories_and_repair_adopts_them(tmp_path, cube):
    root = tmp_path / "s"
    store = kvmem.CubeStore(root)
    view = store.view("me")
    view.put_cube("old", cube, text="before the backup")
    view.add("gone", "a text-only memory the backup holds")
    backup = tmp_path / "backup.sqlite"
    with sqlite3.connect(root / "catalog.sqlite") as src, sqlite3.connect(backup) as dst:
        src.backup(dst)
    view.put_cube("new", cube, text="written after the backup")
    view.rm("old")
    view.put_cube("old", cube, text="rewritten after the backup")
    _drop_catalog(root)
    shutil.copy(backup, root / "catalog.sqlite")  # restored from the backup
    store = kvmem.CubeStore(root, create=False)
    report = store.gc(grace_s=0)
    held = {p.name for p in (root / "cubes").iterdir()}
    assert len(held) == 2 and report.removed == [] and len(report.kept) == 2, report  # both newer files kept
    assert any("which the catalog lacks" in k for k in report.kept)
    assert any("newer than the catalog's" in k for k in report.kept)
    repaired = kvmem.CubeStore.rebuild_catalog(root)  # in place: the restored catalog is sound
    assert repaired.rebuilt == ["me/new", "me/old"] and repaired.conflicts == [] and repaired.moved_aside == []
    store = kvmem.CubeStore(root, create=False)
    assert store.view("me").get("new").text == "written after the backup"
    assert store.view("me").get("old").text == "rewritten after the backup"
    assert store.view("me").get("gone").text == "a text-only memory the backup holds"
    assert store.view("me").load_cube("new") is not None and store.gc(grace_s=0).kept == []


def test_gc_still_removes_superseded_and_removed_files(tmp_path, cube):
    root = tmp_path / "s"
    store = kvmem.CubeStore(root)
    view = store.view("me")
    first = view.put_cube("a", cube, text="one")
    saved = (root / first.path).read_bytes()
    view.put_cube("a", cube, text="two")
    (root / first.path).write_bytes(saved)                 # an older version left behind
    gone = view.put_cube("b", cube, text="bee")
    kept_bytes = (root / gone.path).read_bytes()
    view.rm("b")
    (root / gone.path).write_bytes(kept_bytes)             # a removed memory's file left behind
    report = store.gc(grace_s=0)
    assert sorted(report.removed) == sorted([first.path, gone.path]) and report.kept == []


# ---------------------------------------------------------------- 5. a running process sees a rebuilt catalog
def test_a_running_process_rereads_after_a_rebuild_or_restore(tmp_path, cube):
    root = tmp_path / "s"
    store = kvmem.CubeStore(root)
    view = store.view("me")
    for i in range(8):
        view.put_cube(f"m{i}", cube, text=f"memory {i}")
    backup = tmp_path / "backup.sqlite"
    with sqlite3.connect(root / "catalog.sqlite") as src, sqlite3.connect(backup) as dst:
        src.backup(dst)
    seen = view.version()
    (root / "catalog.sqlite").write_bytes(b"")
    kvmem.CubeStore.rebuild_catalog(root)
    other = kvmem.CubeStore(root, create=False).view("me")
    other.add("fresh", "added after the rebuild")
    now, changes = view.changes_since(seen)
    assert changes is None and now.epoch != seen.epoch  # a new epoch: reread everything
    assert "fresh" in {r.id for r in view.ls()}
    # a restore of an older catalog: its counter is below the reader's position
    seen = view.version()
    _drop_catalog(root)
    shutil.copy(backup, root / "catalog.sqlite")
    assert view.changes_since(seen)[1] is None
    # a plain int position (no epoch) still works as before
    v = int(view.version())
    view.add("later", "text")
    assert view.changes_since(v)[1] == [("me", "later", "add")]


# ---------------------------------------------------------------- 10. two repairs in one second
def test_two_repairs_in_one_second_keep_both_old_catalogs(tmp_path, cube):
    root = tmp_path / "s"
    kvmem.CubeStore(root).view("me").put_cube("a", cube)
    asides = []
    for damage in (b"", b"x" * 100):
        (root / "catalog.sqlite").write_bytes(damage)
        asides += kvmem.CubeStore.rebuild_catalog(root).moved_aside
    assert len(set(asides)) == 2 and all((root / name).read_bytes() in (b"", b"x" * 100) for name in asides)


def test_a_catalog_deleted_under_a_running_process_is_an_error_not_a_new_file(tmp_path, cube):
    root = tmp_path / "s"
    store = kvmem.CubeStore(root)
    view = store.view("me")
    view.put_cube("a", cube)
    _drop_catalog(root)
    for call in (view.ls, lambda: view.add("b", "text"), lambda: view.get("a"), view.version):
        with pytest.raises(kvmem.CubeError, match="is gone .*kvmem repair"):
            call()
    assert not (root / "catalog.sqlite").exists()  # SQLite never made an empty one behind the process's back
    assert kvmem.CubeStore.rebuild_catalog(root).rebuilt == ["me/a"]
    assert [r.id for r in view.ls()] == ["a"]  # the running process carries on with the rebuilt catalog
