"""Loading bad cube files: missing, truncated, foreign, corrupted and edited files are each a kvmem.CubeError
that says what is wrong (a bit flip or a metadata edit is caught by the checksum)."""

from __future__ import annotations

import random
import struct

import pytest
import torch
from safetensors.torch import save_file

import kvmem
from kvmem import CubeError, FingerprintMismatch, MemCube

from helpers import (ANCHOR_LEN, NUM_TOKENS, assert_same_cube, header_len, join_file, split_file, with_header_meta,
                     with_meta_edit, write)


def test_error_classes():
    assert issubclass(CubeError, ValueError)
    assert issubclass(FingerprintMismatch, CubeError)
    assert issubclass(FingerprintMismatch, ValueError)
    assert kvmem.FingerprintMismatch("x", ["weights"]).fields == ["weights"]


def test_good_cube_loads(cube_path, cube, model):
    """The control for every test below: the untouched file loads and prefills."""
    again = MemCube.load(cube_path)
    assert_same_cube(again, cube)
    assert again.num_tokens == NUM_TOKENS and again.anchor_len == ANCHOR_LEN
    assert kvmem.prefill(model, again).num_tokens == ANCHOR_LEN + NUM_TOKENS


def test_missing_file(tmp_path):
    with pytest.raises(CubeError, match=r"no cube at .*nope\.safetensors.*check the path"):
        MemCube.load(tmp_path / "nope.safetensors")


def test_folder(tmp_path):
    with pytest.raises(CubeError, match=r"is a folder, not a cube file"):
        MemCube.load(tmp_path)


def test_empty_file(tmp_path):
    with pytest.raises(CubeError, match=r"is empty: not a cube"):
        MemCube.load(write(tmp_path, b""))


TRUNCATIONS = {
    # name: (where to cut, given the file's bytes; what the error must say)
    "1 byte": (lambda d: 1, r"only 1 bytes: not a cube"),
    "inside the length": (lambda d: 5, r"only 5 bytes: not a cube"),
    "length only": (lambda d: 8, r"not a valid safetensors file"),
    "inside the header": (lambda d: 8 + header_len(d) // 2, r"not a valid safetensors file"),
    "header without payload": (lambda d: 8 + header_len(d), r"not a valid safetensors file"),
    "inside the payload": (lambda d: 8 + header_len(d) + (len(d) - 8 - header_len(d)) // 2,
                           r"not a valid safetensors file"),
    "one byte short": (lambda d: len(d) - 1, r"not a valid safetensors file"),
}


@pytest.mark.parametrize("where", TRUNCATIONS)
def test_truncated(cube_bytes, tmp_path, where):
    cut, message = TRUNCATIONS[where]
    n = cut(cube_bytes)
    assert 0 < n < len(cube_bytes)
    with pytest.raises(CubeError, match=message):
        MemCube.load(write(tmp_path, cube_bytes[:n]))


def test_trailing_garbage(cube_bytes, tmp_path):
    with pytest.raises(CubeError, match=r"not a valid safetensors file"):
        MemCube.load(write(tmp_path, cube_bytes + b"\0" * 8))


def test_pickle_is_never_unpickled(cube, tmp_path, monkeypatch):
    """A torch.save pickle renamed .safetensors is refused, and nothing in kvmem tries to unpickle it."""
    path = tmp_path / "cube.safetensors"
    torch.save({"input_ids": cube.all_ids[0], "k.0": cube.kv[0][0], "meta": cube.meta}, path)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("kvmem called torch.load on a cube file")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(CubeError, match=r"not a valid safetensors file.*never reads pickles"):
        MemCube.load(path)


@pytest.mark.parametrize("prefix", [b"", struct.pack("<Q", 64), struct.pack("<Q", 1 << 40)],
                         ids=["random", "small length then junk", "huge length"])
def test_random_bytes(tmp_path, prefix):
    data = prefix + random.Random(0).randbytes(4096)
    with pytest.raises(CubeError, match=r"not a valid safetensors file"):
        MemCube.load(write(tmp_path, data))


def test_plain_safetensors_is_not_a_cube(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(3, 4)}, str(path))
    with pytest.raises(CubeError, match=r"safetensors file but not a kvmem\.memcube \(it has no kvmem header\)"):
        MemCube.load(path)


def test_plain_safetensors_with_unrelated_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(3, 4)}, str(path), metadata={"format": "pt"})
    with pytest.raises(CubeError, match=r"not a kvmem\.memcube \(it has no kvmem header\)"):
        MemCube.load(path)


def test_adapter_cube_is_not_a_memcube(cube_bytes, tmp_path):
    data = with_header_meta(cube_bytes, format="kvmem.adaptercube")
    with pytest.raises(CubeError, match=r"not a kvmem\.memcube \(it is an AdapterCube \(AdapterCube\.load\)\)"):
        MemCube.load(write(tmp_path, data))


@pytest.mark.parametrize("version", ["3", "0", "1.0", ""])
def test_format_version_changed(cube_bytes, tmp_path, version):
    data = with_header_meta(cube_bytes, format_version=version)
    with pytest.raises(CubeError, match=rf"format version {version!r}; this kvmem reads versions 1 and 2"):
        MemCube.load(write(tmp_path, data))


def test_full_width_cube_relabelled_version_2_is_refused(cube_bytes, tmp_path):
    """Version 2 is the quantized cubes: a full-width file claiming it fails its checksum (which covers the
    version), and with a recomputed checksum its metadata (tests/test_quantized_cubes.py)."""
    with pytest.raises(CubeError, match="checksum mismatch"):
        MemCube.load(write(tmp_path, with_header_meta(cube_bytes, format_version="2")))


def test_format_version_missing(cube_bytes, tmp_path):
    header, payload = split_file(cube_bytes)
    del header["__metadata__"]["format_version"]
    with pytest.raises(CubeError, match=r"format version None; this kvmem reads versions 1 and 2"):
        MemCube.load(write(tmp_path, join_file(header, payload)))


def _payload_offset(data: bytes, tensor: str, where: str) -> int:
    header, _ = split_file(data)
    start, end = header[tensor]["data_offsets"]
    base = 8 + header_len(data)
    return base + {"first": start, "middle": (start + end) // 2, "last": end - 1}[where]


@pytest.mark.parametrize("tensor", ["input_ids", "k.0", "v.1"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("bit", [0, 7])
def test_bit_flip_in_payload(cube_bytes, tmp_path, tensor, where, bit):
    data = bytearray(cube_bytes)
    data[_payload_offset(cube_bytes, tensor, where)] ^= 1 << bit
    with pytest.raises(CubeError, match=r"checksum mismatch .*corrupted or edited after it was saved"):
        MemCube.load(write(tmp_path, bytes(data)))


META_EDITS = {
    "num_tokens": lambda m: m.update(num_tokens=m["num_tokens"] + 1),
    "anchor_len": lambda m: m.update(anchor_len=m["anchor_len"] - 1, num_tokens=m["num_tokens"] + 1),
    "name": lambda m: m.update(name="someone else's cube"),
    "text": lambda m: m.update(text="Alice lives in Bergen"),
    "anchor": lambda m: m.update(anchor=None),
    "fingerprint": lambda m: m["fingerprint_fields"].update(weights="0" * 32),
    "new key": lambda m: m.update(note="added later"),
    "dropped key": lambda m: m.pop("created"),
}


@pytest.mark.parametrize("edit", META_EDITS)
def test_metadata_edit_breaks_checksum(cube_bytes, tmp_path, edit):
    """The file stays valid safetensors and valid JSON; only the checksum can tell."""
    data = with_meta_edit(cube_bytes, META_EDITS[edit])
    assert data != cube_bytes
    with pytest.raises(CubeError, match=r"checksum mismatch \(stored [0-9a-f]{32}, computed [0-9a-f]{32}\)"):
        MemCube.load(write(tmp_path, data))


@pytest.mark.parametrize("checksum_value", [None, "", "0" * 32])
def test_checksum_missing_or_wrong(cube_bytes, tmp_path, checksum_value):
    header, payload = split_file(cube_bytes)
    if checksum_value is None:
        del header["__metadata__"]["checksum"]
    else:
        header["__metadata__"]["checksum"] = checksum_value
    with pytest.raises(CubeError, match=r"checksum mismatch"):
        MemCube.load(write(tmp_path, join_file(header, payload)))


@pytest.mark.parametrize("meta_json, message", [
    ('{"name": "x"', r"cube metadata is damaged"),
    ("", r"cube metadata is damaged"),
    ("[]", r"cube metadata is damaged \(metadata is not a JSON object\)"),
    ('"a string"', r"cube metadata is damaged"),
    ("1" * 5000, r"cube metadata is damaged"),
    ("[" * 100_000, r"cube metadata is damaged"),  # nesting deeper than Python's recursion limit
], ids=["cut", "empty", "list", "string", "huge int", "deep nesting"])
def test_metadata_not_a_json_object(cube_bytes, tmp_path, meta_json, message):
    data = with_header_meta(cube_bytes, meta=meta_json)
    with pytest.raises(CubeError, match=message):
        MemCube.load(write(tmp_path, data))
