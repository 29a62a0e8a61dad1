"""How a cube file is read: one read() of the file, never a memory map (faulting a mapped file in page by page
cost seconds under memory pressure), and tensors that belong to the loaded cube alone."""

from __future__ import annotations

import pytest
import safetensors
import safetensors.torch
import torch

import kvmem
from kvmem import MemCube

from helpers import assert_same_cube, header_len, write


def _no_mapping(*args, **kwargs):
    raise AssertionError("MemCube.load mapped the cube file (safe_open / load_file): it must read it in one go")


def test_load_never_maps_the_file(cube_bytes, cube, tmp_path, monkeypatch):
    import kvmem.cubes.format as cube_format

    path = write(tmp_path, cube_bytes)
    for owner in (safetensors, safetensors.torch, cube_format):
        for name in ("safe_open", "load_file"):
            monkeypatch.setattr(owner, name, _no_mapping, raising=False)
    assert_same_cube(MemCube.load(path), cube)


def test_loaded_tensors_are_private(cube_bytes, cube, tmp_path):
    """Each tensor owns exactly its own bytes: rewriting the file in place (same inode, every payload byte
    flipped) or writing into one loaded cube changes neither that cube's other tensors nor another load."""
    path = write(tmp_path, cube_bytes)
    loaded = MemCube.load(path)
    tensors = [loaded.all_ids] + [t for pair in loaded.kv for t in pair]
    pointers = set()
    for t in tensors:
        storage = t.untyped_storage()
        assert storage.nbytes() == t.numel() * t.element_size(), "a view into a larger buffer (the whole file?)"
        pointers.add(storage.data_ptr())
    assert len(pointers) == len(tensors)

    start = 8 + header_len(cube_bytes)
    flipped = cube_bytes[:start] + bytes(b ^ 0xFF for b in cube_bytes[start:])
    with open(path, "r+b") as f:  # in place: a mapping of the old file would see these bytes
        f.write(flipped)
    assert_same_cube(loaded, cube)

    path.write_bytes(cube_bytes)
    second = MemCube.load(path)
    second.kv[0][0].fill_(7.0)  # documented as "do not write", but a write must stay inside that one cube
    assert_same_cube(loaded, cube)
    assert torch.equal(MemCube.load(path).kv[0][0], cube.kv[0][0])


def test_load_with_device_and_dtype(cube_path, cube, model):
    loaded = MemCube.load(cube_path, device="cpu", dtype=torch.bfloat16)
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.kv[1][1], cube.kv[1][1].to(torch.bfloat16))


@pytest.mark.gpu
def test_load_onto_the_gpu(cube_path, cube, model):
    """The GPU path: the validated tensors land on the device, equal to the CPU load, and prefill there."""
    loaded = MemCube.load(cube_path, device="cuda")
    assert loaded.device.type == "cuda"
    for (k, v), (k0, v0) in zip(loaded.kv, cube.kv):
        assert torch.equal(k.cpu(), k0) and torch.equal(v.cpu(), v0)
    gpu_model = model.to("cuda")
    try:
        assert kvmem.prefill(gpu_model, loaded).num_tokens == cube.num_tokens + cube.anchor_len
    finally:
        model.to("cpu")
