"""A put_cube whose staged file cannot be written or read back is one CubeError naming the problem and the fix,
and leaves nothing behind: whatever raised it (an OSError, safetensors' own SafetensorError, anything else)."""

from __future__ import annotations

import pytest
from safetensors import SafetensorError

import kvmem
import kvmem.cubes.format

from test_store_backends import tiny_cube


def _fail(exc):
    def raiser(*args, **kwargs):
        raise exc
    return raiser


@pytest.fixture(scope="module")
def cube():
    return tiny_cube()


FAILURES = {
    # safetensors' error for something other than I/O (cube_format turns only "I/O error" ones into OSError)
    "save: SafetensorError": ("save", SafetensorError("Error while serializing: header too large")),
    "save: OSError": ("save", OSError(28, "No space left on device")),
    # the staged file read back or moved into place
    "put: SafetensorError": ("put", SafetensorError("Error while deserializing header: InvalidHeaderDeserialization")),
    "put: FileNotFoundError": ("put", FileNotFoundError(2, "No such file or directory")),
    "put: RuntimeError": ("put", RuntimeError("unexpected failure")),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_a_failed_staged_write_is_a_clean_cube_error(tmp_path, cube, monkeypatch, failure):
    where, exc = FAILURES[failure]
    store = kvmem.CubeStore(tmp_path / "s")
    view = store.view("me")
    kept = view.put_cube("kept", cube)
    if where == "save":
        monkeypatch.setattr(kvmem.cubes.format, "save_file", _fail(exc))
    else:
        monkeypatch.setattr(store.blobs, "put", _fail(exc))
    with pytest.raises(kvmem.CubeError, match=rf"writing the cube of me/m failed \({type(exc).__name__}: .*"
                                              r"nothing was committed: write it again.*grace"):
        view.put_cube("m", cube)
    monkeypatch.undo()
    assert view.get("m") is None
    assert set(store.blobs.names()) == {kept.blob}
    assert sorted(p.name for p in (tmp_path / "s" / "cubes").iterdir()) == [f"{kept.blob}.safetensors"]
    report = store.gc(grace_s=0)  # the reservation was released: nothing for gc to expire or repair
    assert report.repaired == [] and report.removed == [] and report.swept == []
    assert view.put_cube("m", cube).blob and view.load_cube("m") is not None
