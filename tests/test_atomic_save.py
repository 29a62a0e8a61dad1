"""Atomic saves: a save that fails half way (disk full, interrupt) leaves the previous cube, or nothing, and no
temp files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import kvmem
import kvmem.cubes.format
from kvmem import MemCube

from helpers import assert_same_cube


def test_save_leaves_no_temp_files(cube, other_cube, tmp_path):
    path = tmp_path / "memory.safetensors"
    cube.save(path)
    assert sorted(os.listdir(tmp_path)) == ["memory.safetensors"]
    other_cube.save(path)  # overwrite
    assert sorted(os.listdir(tmp_path)) == ["memory.safetensors"]
    assert_same_cube(MemCube.load(path), other_cube)


def _half_then_fail(exc: BaseException):
    real = kvmem.cubes.format.save_file

    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[:len(data) // 2])
        raise exc

    return save_file


FAILURES = {"disk full": OSError(28, "No space left on device"), "interrupt": KeyboardInterrupt()}


@pytest.mark.parametrize("failure", FAILURES)
def test_failed_save_keeps_previous_cube(cube, other_cube, tmp_path, monkeypatch, failure):
    path = tmp_path / "memory.safetensors"
    cube.save(path)
    before = path.read_bytes()
    monkeypatch.setattr(kvmem.cubes.format, "save_file", _half_then_fail(FAILURES[failure]))
    with pytest.raises(type(FAILURES[failure])):
        other_cube.save(path)
    assert sorted(os.listdir(tmp_path)) == ["memory.safetensors"]
    assert path.read_bytes() == before
    assert_same_cube(MemCube.load(path), cube)


def test_failed_first_save_leaves_nothing(cube, tmp_path, monkeypatch):
    monkeypatch.setattr(kvmem.cubes.format, "save_file", _half_then_fail(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match=r"No space left"):
        cube.save(tmp_path / "memory.safetensors")
    assert os.listdir(tmp_path) == []
