"""Round trips: save then load is bit-exact in every dtype, and a dtype cast at load is recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kvmem
from kvmem import MemCube

from helpers import assert_same_cube, random_ids, tiny_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_round_trip_is_bit_exact(dtype, tmp_path):
    model = tiny_model("llama", dtype=dtype, seed=3)
    text, anchor = "Bjørn lives in Tromsø ✓", "<|im_start|>system\n"
    cube = MemCube.from_ids(model, random_ids(11, seed=4), name="round trip", anchor_ids=random_ids(2, seed=5),
                            text=text, anchor=anchor)
    path = Path(cube.save(tmp_path / "rt.safetensors"))
    loaded = MemCube.load(path)
    assert_same_cube(loaded, cube)
    assert loaded.dtype == dtype and loaded.meta["dtype"] == str(dtype)
    assert (loaded.name, loaded.text, loaded.anchor) == ("round trip", text, anchor)
    assert loaded.fingerprint == cube.fingerprint and loaded.fingerprint_fields == cube.fingerprint_fields
    assert torch.equal(loaded.input_ids, random_ids(11, seed=4)[None])
    assert torch.equal(loaded.anchor_ids, random_ids(2, seed=5)[None])
    assert "cast_from" not in loaded.meta
    prefix = kvmem.prefill(model, loaded)
    assert torch.equal(prefix.input_ids, cube.all_ids) and prefix.spans == [(2, 13)]
    assert_same_cube(MemCube.load(loaded.save(tmp_path / "again.safetensors")), cube)  # saving a loaded cube


def test_load_with_dtype_records_cast(cube_path, cube):
    cast = MemCube.load(cube_path, dtype=torch.bfloat16)
    assert cast.dtype == torch.bfloat16
    assert cast.meta["cast_from"] == "torch.float32" and cast.meta["dtype"] == "torch.bfloat16"
    for (k, v), (k0, v0) in zip(cast.kv, cube.kv):
        assert torch.equal(k, k0.to(torch.bfloat16)) and torch.equal(v, v0.to(torch.bfloat16))
    assert torch.equal(cast.all_ids, cube.all_ids) and cast.fingerprint == cube.fingerprint
    assert "cast_from" not in cube.meta  # the source cube is untouched


def test_load_with_own_dtype_is_no_cast(cube_path, cube):
    same = MemCube.load(cube_path, dtype=torch.float32)
    assert_same_cube(same, cube)
    assert "cast_from" not in same.meta
