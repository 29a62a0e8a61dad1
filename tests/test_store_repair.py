"""A lost, emptied, damaged or replaced catalog is rebuilt from the store's cube files (`CubeStore.rebuild_catalog`,
`kvmem repair`): each cube file records its memory; what only the catalog held is reported gone."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import kvmem
from kvmem import MemCube
from kvmem.cli import app
from test_store_backends import tiny_cube

runner = CliRunner(env={"COLUMNS": "400", "NO_COLOR": "1"})


@pytest.fixture(scope="module")
def cube():
    return tiny_cube()


def _fill(root, cube):
    """A store with cubes in two namespaces (own text, overriding text, meta), a text-only memory and a grant."""
    store = kvmem.CubeStore(root)
    me = store.view("me")
    me.put_cube("a", cube)
    me.put_cube("a", cube)  # replaced: the catalog names only the second file
    me.put_cube("b", tiny_cube(seed=1), text="Bob's memory, not the cube's text",
                meta={"speaker": "Bob", "turn": 3, "date": "2024-05-08"})
    store.view("other").put_cube("c", cube)
    me.add("t", "a text-only memory")
    store.grant("me", "other")
    return {r.qualified: r for ns in ("me", "other") for r in store.view(ns).ls()}


def _damage(root, how):
    catalog = root / "catalog.sqlite"
    if how == "emptied":
        catalog.write_bytes(b"")
    elif how == "deleted":
        catalog.unlink()
    elif how == "garbage":
        catalog.write_bytes(os.urandom(8192))
    else:  # another store's (empty) catalog copied over this one
        kvmem.CubeStore(root.parent / "other-store")
        shutil.copy(root.parent / "other-store" / "catalog.sqlite", catalog)
    for suffix in ("-wal", "-shm"):
        Path(f"{catalog}{suffix}").unlink(missing_ok=True)


@pytest.mark.parametrize("how", ["emptied", "deleted", "garbage", "replaced"])
def test_a_lost_catalog_is_rebuilt_from_the_cube_files(tmp_path, cube, how):
    root = tmp_path / "s"
    before = _fill(root, cube)
    files = sorted((root / "cubes").iterdir())
    _damage(root, how)
    with pytest.raises(kvmem.CubeError, match="kvmem repair"):
        kvmem.CubeStore(root, create=False)

    report = kvmem.CubeStore.rebuild_catalog(root)
    assert sorted(report.rebuilt) == ["me/a", "me/b", "other/c"] and report.recovered == [] and report.skipped == []
    assert len(report.moved_aside) == (0 if how == "deleted" else 1)
    assert "text-only memories" in report.lost and "grants" in report.lost
    store = kvmem.CubeStore(root, create=False)
    for qualified in report.rebuilt:
        namespace, memory_id = qualified.split("/")
        view = store.view(namespace)
        got, want = view.get(memory_id), before[qualified]
        for field in ("namespace", "id", "text", "kind", "meta", "fingerprint", "tokens", "bytes", "blob"):
            assert getattr(got, field) == getattr(want, field), (qualified, field)
        assert got.created == pytest.approx(want.created, abs=1.0)
        loaded = view.load_cube(memory_id)
        assert torch.equal(loaded.all_ids, store.view(namespace).load_cube(memory_id).all_ids)
    assert store.view("me").get("t") is None           # text-only: only the catalog had it
    assert store.grants() == []                       # grants too
    assert store.gc(grace_s=0).removed == [] and sorted((root / "cubes").iterdir()) == files
    if how != "deleted":  # the old file is kept beside the new one
        assert (root / report.moved_aside[0]).is_file()
    with pytest.raises(kvmem.CubeError, match="intact: nothing to rebuild"):
        kvmem.CubeStore.rebuild_catalog(root)


def test_files_that_cannot_say_their_memory(tmp_path, cube):
    """A cube from before files recorded their memory comes back as recovered/<blob>; one without any text,
    a corrupted file and an older copy of a memory are skipped, each with the reason."""
    root = tmp_path / "s"
    view = kvmem.CubeStore(root).view("me")
    first = view.put_cube("a", cube)
    older = (root / first.path).read_bytes()
    second = view.put_cube("a", cube)                    # deletes the first file: put it back as a stale copy
    (root / first.path).write_bytes(older)
    os.utime(root / first.path, (1, 1))
    cubes = root / "cubes"
    legacy, textless, corrupt = "1" * 32, "2" * 32, "3" * 32
    cube.save(cubes / f"{legacy}.safetensors")           # no "memory" record: an older kvmem's file
    MemCube(cube.kv, cube.all_ids[0], {k: v for k, v in cube.meta.items() if k != "text"}).save(
        cubes / f"{textless}.safetensors")
    data = bytearray((root / second.path).read_bytes())
    data[-1] ^= 0xFF
    (cubes / f"{corrupt}.safetensors").write_bytes(bytes(data))
    (root / "catalog.sqlite").unlink()

    report = kvmem.CubeStore.rebuild_catalog(root)
    assert report.rebuilt == ["me/a"] and report.recovered == [f"recovered/{legacy}"]
    skipped = dict(line.split(": ", 1) for line in report.skipped)
    assert set(skipped) == {first.path, f"cubes/{textless}.safetensors", f"cubes/{corrupt}.safetensors"}
    assert "older version of me/a" in skipped[first.path]
    assert "records no text" in skipped[f"cubes/{textless}.safetensors"]
    assert "checksum mismatch" in skipped[f"cubes/{corrupt}.safetensors"]
    store = kvmem.CubeStore(root, create=False)
    assert store.view("me").get("a").blob == second.blob
    assert store.view("recovered").get(legacy).text == cube.text
    assert store.view("recovered").load_cube(legacy) is not None


def test_repair_refuses_what_it_cannot_rebuild(tmp_path, cube):
    with pytest.raises(kvmem.CubeError, match="no kvmem store"):
        kvmem.CubeStore.rebuild_catalog(tmp_path / "nothing")
    with pytest.raises(kvmem.CubeError, match="Redis backup"):
        kvmem.CubeStore.rebuild_catalog("redis://localhost:6379/0")
    kvmem.CubeStore(tmp_path / "s").view("me").put_cube("a", cube)
    with pytest.raises(kvmem.CubeError, match="intact"):
        kvmem.CubeStore.rebuild_catalog(tmp_path / "s")


def test_kvmem_repair_command(tmp_path, cube):
    root = tmp_path / "s"
    _fill(root, cube)
    _damage(root, "emptied")
    result = runner.invoke(app, ["repair", str(root)])
    assert result.exit_code == 0, result.output
    for line in ("moved the old catalog file aside: catalog.lost-", "rebuilt me/a", "rebuilt me/b", "rebuilt other/c",
                 "repair: 3 memories rebuilt from cube files, 0 files skipped",
                 "Not recoverable: text-only memories"):
        assert line in result.output, result.output
    assert "me/a" in runner.invoke(app, ["ls", "--store", str(root), "-n", "me"]).output
    again = runner.invoke(app, ["repair", str(root)])
    assert again.exit_code == 1 and "intact" in again.output and "Traceback" not in again.output


def test_cube_files_without_catalog_or_marker(tmp_path, cube):
    root = tmp_path / "s"
    kvmem.CubeStore(root).view("me").put_cube("a", cube)
    (root / "catalog.sqlite").unlink()
    (root / "kvmem-store.json").unlink()
    with pytest.raises(kvmem.CubeError, match="catalog was lost.*kvmem repair"):
        kvmem.CubeStore(root)
    assert kvmem.CubeStore.rebuild_catalog(root).rebuilt == ["me/a"]
    store = kvmem.CubeStore(root, create=False)
    assert store.view("me").load_cube("a") is not None and (root / "kvmem-store.json").is_file()


def test_kvmem_repair_takes_store_like_every_command(tmp_path, cube):
    root = tmp_path / "s"
    kvmem.CubeStore(root).view("me").put_cube("a", cube)
    (root / "catalog.sqlite").unlink()
    result = runner.invoke(app, ["repair", "--store", str(root)])
    assert result.exit_code == 0 and "rebuilt me/a" in result.output, result.output
    both = runner.invoke(app, ["repair", str(root), "--store", str(tmp_path / "elsewhere")])
    assert both.exit_code != 0 and "give one" in both.output
