"""Validation: every bad file, bad argument or mismatched model is a kvmem.CubeError that says what is wrong.

Covers loading (missing, truncated, foreign, corrupted, edited and checksum-forged files, plus a seeded fuzz
loop over the bytes and the header), fingerprints (weights, model config, tokenizer, LoRA adapter, dtype),
bad arguments, atomic saves, and bit-exact save/load round trips.

A cube file is a safetensors file: an 8-byte little-endian header length, the header JSON (tensor entries and
``__metadata__`` with format, format_version, meta, checksum), then the tensor bytes. The helpers below take it
apart and put it back together so a test can damage exactly one thing.
"""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import kvmem
import kvmem.cube_format
from kvmem import CubeError, FingerprintMismatch, MemCube
from kvmem.cube_format import checksum, write_cube_file

from conftest import random_ids, tiny_model

FORMAT = "kvmem.memcube"
ANCHOR_LEN, NUM_TOKENS = 3, 13  # 16 KV entries; 13 is not a power of two
FUZZ_SEED, FUZZ_ROUNDS = 20240611, 400
FORGED_FUZZ_SEED, FORGED_FUZZ_ROUNDS = 7, 150


# ---------------------------------------------------------------------------------------------- file surgery
def split_file(data: bytes) -> tuple[dict, bytes]:
    """(header JSON as a dict, tensor payload) of a safetensors file's bytes."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def header_len(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def join_file(header: dict, payload: bytes) -> bytes:
    """Bytes of a safetensors file with this header and payload (header padded with spaces to 8 bytes)."""
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + payload


def with_header_meta(data: bytes, **changes) -> bytes:
    """The file with some ``__metadata__`` strings replaced and everything else (the checksum too) as it was."""
    header, payload = split_file(data)
    header["__metadata__"].update(changes)
    return join_file(header, payload)


def with_meta_edit(data: bytes, edit) -> bytes:
    """The file with ``edit(meta)`` applied to the cube metadata, keeping the stored checksum (now stale)."""
    header, payload = split_file(data)
    meta = json.loads(header["__metadata__"]["meta"])
    edit(meta)
    header["__metadata__"]["meta"] = json.dumps(meta, sort_keys=True, ensure_ascii=False)
    return join_file(header, payload)


def read_parts(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) of a cube file, read with plain safetensors (no kvmem validation)."""
    header, _ = split_file(path.read_bytes())
    return json.loads(header["__metadata__"]["meta"]), load_file(str(path))


def forge(path: Path, meta: dict, tensors: dict[str, torch.Tensor], *, fmt: str = FORMAT) -> Path:
    """Write a cube file whose checksum matches its (possibly inconsistent) contents: only validation can object."""
    meta_json = json.dumps(meta, sort_keys=True, ensure_ascii=False)
    tensors = {k: t.contiguous() for k, t in tensors.items()}
    save_file(tensors, str(path), metadata={"format": fmt, "format_version": "1", "meta": meta_json,
                                            "checksum": checksum(fmt, "1", meta_json, tensors)})
    return path


def assert_same_cube(a: MemCube, b: MemCube) -> None:
    """Ids, metadata and every KV tensor equal bit for bit (compared as raw bytes, so NaNs and -0.0 count)."""
    assert torch.equal(a.all_ids, b.all_ids)
    assert a.anchor_len == b.anchor_len and a.num_tokens == b.num_tokens
    assert a.meta == b.meta
    assert len(a.kv) == len(b.kv)
    for (ka, va), (kb, vb) in zip(a.kv, b.kv):
        for x, y in ((ka, kb), (va, vb)):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))


def same_cube(a: MemCube, b: MemCube) -> bool:
    try:
        assert_same_cube(a, b)
    except AssertionError:
        return False
    return True


def load_or_usable(path: Path, model) -> str:
    """Load ``path``: either CubeError, or a cube whose every view works and which prefill takes or refuses with
    CubeError. Any other exception propagates (that is the bug a test reports). Returns what happened."""
    try:
        cube = MemCube.load(path)
    except CubeError:
        return "refused at load"
    repr(cube), cube.name, cube.fingerprint, cube.input_ids, cube.anchor_ids, cube.meta  # noqa: B018
    try:
        prefix = kvmem.prefill(model, cube)
    except CubeError:
        return "refused at prefill"
    # accepted: then the cache must fit the model
    config = model.config
    fits = (config.num_key_value_heads, prefix.num_tokens, config.head_dim)
    layers = len(cube.kv)
    want = config.num_hidden_layers
    assert layers == want, f"prefill accepted {layers} KV layers for a {want}-layer model"
    for k, v in cube.kv:
        shape_k, shape_v = tuple(k.shape), tuple(v.shape)
        assert shape_k == shape_v == fits, f"prefill accepted KV {shape_k}/{shape_v}, the model needs {fits}"
    low, high = int(prefix.input_ids.min()), int(prefix.input_ids.max())
    ok = 0 <= low and high < config.vocab_size
    assert ok, f"prefill accepted token ids in [{low}, {high}], outside the model's vocabulary [0, {config.vocab_size})"
    return "accepted"


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def cube_path(model, tmp_path_factory) -> Path:
    """A saved cube with text, anchor and non-ASCII metadata; its 'created' stamp pinned so bytes are stable."""
    built = MemCube.from_ids(model, random_ids(NUM_TOKENS), name="validation",
                             anchor_ids=random_ids(ANCHOR_LEN, seed=1),
                             text="Alice lives in Ålesund ✓", anchor="<|system|>")
    path = tmp_path_factory.mktemp("cube") / "validation.safetensors"
    built.save(path)
    meta, tensors = read_parts(path)
    meta["created"] = "2000-01-01T00:00:00Z"  # the file is then byte-identical run to run (fuzz reproducibility)
    write_cube_file(path, FORMAT, meta, tensors)
    return path


@pytest.fixture(scope="module")
def cube(cube_path) -> MemCube:
    return MemCube.load(cube_path)


@pytest.fixture(scope="module")
def cube_bytes(cube_path) -> bytes:
    return cube_path.read_bytes()


@pytest.fixture(scope="module")
def other_cube(model) -> MemCube:
    """A second cube for the same model (other ids), to overwrite the first with."""
    return MemCube.from_ids(model, random_ids(7, seed=9), name="other", anchor_ids=random_ids(ANCHOR_LEN, seed=1))


@pytest.fixture(scope="module")
def tokenizer_pair():
    """Two tokenizers: SmolLM2's, and SmolLM2's with one token added (so the vocabularies differ)."""
    from transformers import AutoTokenizer

    try:
        from kvmem.real_model import smollm2_checkpoint

        folder = smollm2_checkpoint(verbose=False)
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        pytest.skip(f"the real tokenizer is not available: {exc}")
    plain = AutoTokenizer.from_pretrained(folder)
    extended = AutoTokenizer.from_pretrained(folder)
    extended.add_tokens(["<kvmem-validation-extra>"])
    assert len(extended) == len(plain) + 1
    return plain, extended, folder


def write(tmp_path: Path, data: bytes, name: str = "cube.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# ================================================================================= 1. loading bad files
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


@pytest.mark.parametrize("version", ["2", "0", "1.0", ""])
def test_format_version_changed(cube_bytes, tmp_path, version):
    data = with_header_meta(cube_bytes, format_version=version)
    with pytest.raises(CubeError, match=rf"format version {version!r}; this kvmem reads version 1"):
        MemCube.load(write(tmp_path, data))


def test_format_version_missing(cube_bytes, tmp_path):
    header, payload = split_file(cube_bytes)
    del header["__metadata__"]["format_version"]
    with pytest.raises(CubeError, match=r"format version None; this kvmem reads version 1"):
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


# ------------------------------------------------------------------ forged checksums: validation must object
def _drop_layer_tensor(meta, t):
    del t["v.1"]


def _extra_tensor(meta, t):
    t["extra"] = torch.zeros(2)


def _more_tokens(meta, t):
    meta["num_tokens"] += 1


def _fewer_tokens(meta, t):
    meta["num_tokens"] -= 1


def _no_own_tokens(meta, t):
    meta["anchor_len"], meta["num_tokens"] = meta["anchor_len"] + meta["num_tokens"], 0


def _negative_anchor(meta, t):
    meta["anchor_len"], meta["num_tokens"] = -1, meta["num_tokens"] + meta["anchor_len"] + 1


def _more_layers(meta, t):
    meta["num_layers"] += 1


def _fewer_layers(meta, t):
    meta["num_layers"] -= 1


def _dtype_says_fp16(meta, t):
    meta["dtype"] = "torch.float16"


def _dtype_unknown(meta, t):
    meta["dtype"] = "torch.int8"


def _kv_cast_to_fp16(meta, t):
    for name in list(t):
        if name != "input_ids":
            t[name] = t[name].half()


def _ids_int32(meta, t):
    t["input_ids"] = t["input_ids"].int()


def _kv_shapes_wrong(meta, t):
    meta["kv_shapes"][1][0] = [2, 16, 8]


def _kv_shortened(meta, t):
    """Every KV tensor loses its last token and kv_shapes says so; num_tokens and input_ids still count it."""
    for name in list(t):
        if name != "input_ids":
            t[name] = t[name][:, :-1]
    meta["kv_shapes"] = [[list(t[f"k.{i}"].shape), list(t[f"v.{i}"].shape)] for i in range(meta["num_layers"])]


def _kv_2d(meta, t):
    t["k.0"] = t["k.0"].reshape(t["k.0"].shape[0], -1)
    meta["kv_shapes"][0][0] = list(t["k.0"].shape)


def _kv_shapes_empty(meta, t):
    meta["kv_shapes"] = []


def _kv_shapes_not_lists(meta, t):
    meta["kv_shapes"] = [5, 5]


def _kv_shapes_missing(meta, t):
    del meta["kv_shapes"]


def _num_tokens_garbled(meta, t):
    meta["num_tokens"] = "thirteen"


def _num_layers_none(meta, t):
    meta["num_layers"] = None


def _no_fingerprint_fields(meta, t):
    del meta["fingerprint_fields"]


FORGED_AT_LOAD = {
    # name: (edit of (meta, tensors) with the checksum recomputed, what the error must say)
    "tensor missing": (_drop_layer_tensor, r"tensor set differs from the metadata \(missing \['v\.1'\]"),
    "tensor extra": (_extra_tensor, r"tensor set differs from the metadata .*unexpected \['extra'\]"),
    "num_tokens too big": (_more_tokens, r"input_ids is torch\.int64 \(16,\), metadata says int64 \(17,\)"),
    "num_tokens too small": (_fewer_tokens, r"input_ids is torch\.int64 \(16,\), metadata says int64 \(15,\)"),
    "no own tokens": (_no_own_tokens, r"input_ids is torch\.int64 \(16,\)"),
    "negative anchor": (_negative_anchor, r"input_ids is torch\.int64 \(16,\)"),
    "num_layers too big": (_more_layers, r"missing \['k\.2', 'v\.2'\]"),
    "num_layers too small": (_fewer_layers, r"unexpected \['k\.1', 'v\.1'\]"),
    "dtype says fp16": (_dtype_says_fp16, r"k\.0 is torch\.float32 .*metadata says torch\.float16"),
    "dtype unknown": (_dtype_unknown, r"metadata lacks or garbles 'torch\.int8'"),
    "kv stored as fp16": (_kv_cast_to_fp16, r"k\.0 is torch\.float16 .*metadata says torch\.float32"),
    "ids stored as int32": (_ids_int32, r"input_ids is torch\.int32"),
    "kv_shapes wrong": (_kv_shapes_wrong, r"k\.1 is torch\.float32 \(2, 16, 16\), metadata says .*\(2, 16, 8\)"),
    "kv shorter than ids": (_kv_shortened, r"k\.0 is torch\.float32 \(2, 15, 16\), .* with 16 tokens"),
    "kv 2-D": (_kv_2d, r"k\.0 is torch\.float32 \(2, 256\)"),
    "kv_shapes empty": (_kv_shapes_empty, r"kv_shapes"),
    "kv_shapes not lists": (_kv_shapes_not_lists, r"kv_shapes|k\.0"),
    "kv_shapes missing": (_kv_shapes_missing, r"metadata lacks or garbles 'kv_shapes'"),
    "num_tokens garbled": (_num_tokens_garbled, r"metadata lacks or garbles .*thirteen"),
    "num_layers None": (_num_layers_none, r"metadata lacks or garbles"),
    "no fingerprint": (_no_fingerprint_fields, r"metadata lacks or garbles 'fingerprint_fields'"),
}


@pytest.mark.parametrize("edit", FORGED_AT_LOAD)
def test_forged_checksum_inconsistent_file(cube_path, tmp_path, edit):
    """Checksum recomputed after an inconsistent edit: the checksum passes, the shape/dtype validation must not."""
    change, message = FORGED_AT_LOAD[edit]
    meta, tensors = read_parts(cube_path)
    change(meta, tensors)
    path = forge(tmp_path / "forged.safetensors", meta, tensors)
    with pytest.raises(CubeError, match=r"the cube is damaged or was written by something else; rebuild it"):
        MemCube.load(path)
    with pytest.raises(CubeError, match=message):
        MemCube.load(path)


def test_forged_consistent_file_loads(cube_path, cube, tmp_path):
    """The control of the forged tests: forging an unchanged cube gives a file that loads as the same cube."""
    meta, tensors = read_parts(cube_path)
    loaded = MemCube.load(forge(tmp_path / "forged.safetensors", meta, tensors))
    assert_same_cube(loaded, cube)


def _meta_without(key):
    def edit(meta, t):
        del meta[key]
    return edit


def _fingerprint_model_not_a_dict(meta, t):
    meta["fingerprint_fields"]["model"] = "llama"


def _ids_out_of_vocab(meta, t):
    t["input_ids"] = t["input_ids"].clone()
    t["input_ids"][ANCHOR_LEN + 2] = 10 ** 9


def _ids_negative(meta, t):
    t["input_ids"] = t["input_ids"].clone()
    t["input_ids"][0] = -1


def _extra_layer(meta, t):
    """A consistent 3-layer cube whose fingerprint still claims the 2-layer model."""
    t["k.2"], t["v.2"] = t["k.1"].clone(), t["v.1"].clone()
    meta["num_layers"] = 3
    meta["kv_shapes"].append(meta["kv_shapes"][1])


def _half_head_dim(meta, t):
    """Consistent metadata and tensors, but head_dim 8 where the fingerprinted model has 16."""
    for name in list(t):
        if name != "input_ids":
            t[name] = t[name][..., :8]
    meta["kv_shapes"] = [[list(t[f"k.{i}"].shape), list(t[f"v.{i}"].shape)] for i in range(meta["num_layers"])]


def _too_many_kv_heads(meta, t):
    for name in list(t):
        if name != "input_ids":
            t[name] = torch.cat([t[name], t[name]], dim=0)
    meta["kv_shapes"] = [[list(t[f"k.{i}"].shape), list(t[f"v.{i}"].shape)] for i in range(meta["num_layers"])]


FORGED_UNUSABLE = {
    "no name": _meta_without("name"),
    "no fingerprint id": _meta_without("fingerprint"),
    "fingerprint model not a dict": _fingerprint_model_not_a_dict,
    "ids out of vocab": _ids_out_of_vocab,
    "negative id": _ids_negative,
    "extra layer": _extra_layer,
    "head_dim 8": _half_head_dim,
    "kv heads doubled": _too_many_kv_heads,
}


@pytest.mark.parametrize("edit", FORGED_UNUSABLE)
def test_forged_cube_that_does_not_fit_is_refused(cube_path, model, tmp_path, edit):
    """Checksum-consistent files whose contents cannot be used with the model their fingerprint names.

    kvmem may refuse them at load or at prefill, but with CubeError: never a KeyError / AttributeError /
    plain ValueError, and never a Prefix whose cache does not fit the model.
    """
    meta, tensors = read_parts(cube_path)
    FORGED_UNUSABLE[edit](meta, tensors)
    path = forge(tmp_path / "forged.safetensors", meta, tensors)
    assert load_or_usable(path, model) in ("refused at load", "refused at prefill")


# ================================================================================= 2. fuzzing
def _rand_bytes(rng: random.Random, lo: int = 1, hi: int = 16) -> bytes:
    return rng.randbytes(rng.randint(lo, hi))


def _flip_anywhere(rng, data):
    i, b = rng.randrange(len(data)), rng.randrange(8)
    out = bytearray(data)
    out[i] ^= 1 << b
    return bytes(out), f"flip bit {b} of byte {i}"


def _flip_in_header(rng, data):
    i, b = rng.randrange(8 + header_len(data)), rng.randrange(8)
    out = bytearray(data)
    out[i] ^= 1 << b
    return bytes(out), f"flip bit {b} of header byte {i}"


def _overwrite(rng, data):
    junk = _rand_bytes(rng, 1, 8)
    i = rng.randrange(len(data) - len(junk))
    return data[:i] + junk + data[i + len(junk):], f"overwrite {len(junk)} bytes at {i}"


def _truncate(rng, data):
    n = rng.randrange(len(data))
    return data[:n], f"truncate to {n} bytes"


def _insert(rng, data):
    junk, i = _rand_bytes(rng), rng.randrange(len(data) + 1)
    return data[:i] + junk + data[i:], f"insert {len(junk)} bytes at {i}"


def _delete(rng, data):
    i = rng.randrange(len(data))
    n = rng.randint(1, 16)
    return data[:i] + data[i + n:], f"delete {n} bytes at {i}"


def _fuzz_value(rng: random.Random, old):
    pool = [None, True, False, 0, -1, 1, 10 ** 6, 2 ** 63, 1.5, float("nan"), "", "x", "torch.float16", [], {},
            [1, 2], {"a": 1}, "[" * 50]
    if isinstance(old, bool):
        pool.append(not old)
    elif isinstance(old, int):
        pool += [old + 1, old - 1, -old]
    elif isinstance(old, str):
        pool += [old[:-1], old + "x", old.upper()]
    elif isinstance(old, list) and old:
        pool += [old[:-1], old + old[-1:], old[::-1]]
    return rng.choice(pool)


def _random_path(rng: random.Random, obj) -> list:
    """A random key path into nested dicts/lists (at least one step)."""
    path = []
    while True:
        keys = list(obj) if isinstance(obj, dict) else list(range(len(obj))) if isinstance(obj, list) else []
        if not keys or (path and rng.random() < 0.4):
            return path
        key = rng.choice(keys)
        path.append(key)
        obj = obj[key]


def _set_path(obj, path: list, value, *, delete: bool = False) -> None:
    for key in path[:-1]:
        obj = obj[key]
    if delete:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


def _mutate_meta(rng: random.Random, meta: dict) -> str:
    """Edit ``meta`` in place at a random nested place; returns a description."""
    path = _random_path(rng, meta)
    if rng.random() < 0.2:
        _set_path(meta, path, None, delete=True)
        return f"delete meta{path}"
    obj = meta
    for key in path:
        obj = obj[key]
    value = _fuzz_value(rng, obj)
    _set_path(meta, path, value)
    return f"meta{path} = {value!r:.40}"


def _header_tweak(rng, data):
    header, payload = split_file(data)
    md = header["__metadata__"]
    tensors = [k for k in header if k != "__metadata__"]
    what = rng.randrange(10)
    if what == 0:
        meta = json.loads(md["meta"])
        desc = _mutate_meta(rng, meta)
        md["meta"] = json.dumps(meta, sort_keys=True, ensure_ascii=False)
    elif what == 1:
        md["meta"] = rng.choice(["", "{", "[]", "null", "[" * 100_000, md["meta"][:-1], md["meta"] + " x"])
        desc = f"meta = {md['meta']!r:.30}"
    elif what == 2:
        name, dtype = rng.choice(tensors), rng.choice(["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "XX"])
        header[name]["dtype"] = dtype
        desc = f"{name}.dtype = {dtype}"
    elif what == 3:
        name = rng.choice(tensors)
        shape = header[name]["shape"]
        if rng.random() < 0.5 and len(shape) > 1:
            shape = shape[::-1]
        else:
            shape = list(shape)
            shape[rng.randrange(len(shape))] += rng.choice([-1, 1, 2])
        header[name]["shape"] = shape
        desc = f"{name}.shape = {shape}"
    elif what == 4:
        name, j, d = rng.choice(tensors), rng.randrange(2), rng.choice([-8, -4, -1, 1, 4, 8])
        header[name]["data_offsets"][j] += d
        desc = f"{name}.data_offsets[{j}] += {d}"
    elif what == 5:
        name = rng.choice(tensors)
        del header[name]
        desc = f"delete tensor {name}"
    elif what == 6:
        name, new = rng.choice(tensors), rng.choice(["k.9", "v.2", "ids", "k.0", "input_ids"])
        header[new] = header.pop(name)
        desc = f"rename tensor {name} -> {new}"
    elif what == 7:
        key = rng.choice(["format", "format_version", "checksum"])
        md[key] = rng.choice(["", "1", "2", "kvmem.memcube", "kvmem.adaptercube", md[key][:-1], md[key] + "0"])
        desc = f"{key} = {md[key]!r:.40}"
    elif what == 8:
        key = rng.choice(list(md))
        del md[key]
        desc = f"delete __metadata__.{key}"
    else:
        # swap the data offsets of two tensors of the same size: both tensors' bytes move
        a, b = rng.sample([t for t in tensors if t != "input_ids"], 2)
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
        desc = f"swap data of {a} and {b}"
    return join_file(header, payload), f"header: {desc}"


MUTATORS = [_flip_anywhere, _flip_in_header, _overwrite, _truncate, _insert, _delete, _header_tweak, _header_tweak]


def test_fuzz_mutated_files_raise_cube_error(cube_bytes, cube, tmp_path):
    """Seeded random damage: every mutated file raises CubeError on load, or (when the damage did not change
    what the file says, e.g. an unchecked extra header key) loads as exactly the original cube."""
    rng = random.Random(FUZZ_SEED)
    path = tmp_path / "fuzz.safetensors"
    failures, refused, identical = [], 0, 0
    for i in range(FUZZ_ROUNDS):
        mutate = rng.choice(MUTATORS)
        data, desc = mutate(rng, cube_bytes)
        path.write_bytes(data)
        try:
            loaded = MemCube.load(path)
        except CubeError:
            refused += 1
            continue
        except Exception as exc:  # the bug this test exists for
            failures.append(f"#{i} {desc}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        if data == cube_bytes or same_cube(loaded, cube):
            identical += 1
        else:
            failures.append(f"#{i} {desc}: loaded a cube that differs from the original")
    assert not failures, (f"{len(failures)} of {FUZZ_ROUNDS} mutations (seed {FUZZ_SEED}) escaped validation:\n"
                          + "\n".join(failures[:15]))
    assert refused > 0.9 * FUZZ_ROUNDS  # the fuzz really damages files


def test_fuzz_forged_metadata_never_crashes(cube_path, model, tmp_path):
    """Seeded random metadata edits with the checksum recomputed (so only validation stands in the way): each
    file is refused with CubeError at load or prefill, or gives a cube that works. Nothing else escapes."""
    rng = random.Random(FORGED_FUZZ_SEED)
    meta0, tensors = read_parts(cube_path)
    path = tmp_path / "forged.safetensors"
    failures, outcomes = [], {}
    for i in range(FORGED_FUZZ_ROUNDS):
        meta = json.loads(json.dumps(meta0))
        desc = _mutate_meta(rng, meta)
        forge(path, meta, tensors)
        try:
            outcome = load_or_usable(path, model)
        except Exception as exc:
            failures.append(f"#{i} {desc}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert not failures, (f"{len(failures)} of {FORGED_FUZZ_ROUNDS} forged edits (seed {FORGED_FUZZ_SEED}) escaped "
                          "as non-CubeError exceptions:\n" + "\n".join(failures[:15]))
    assert outcomes.get("refused at load", 0) + outcomes.get("refused at prefill", 0) > 0


# ================================================================================= 3. fingerprints
TOKENIZER_MISMATCH = r"built for another tokenizer:\n  - tokenizer: the tokenizer differs"
ADAPTER_MISMATCH = r"built for another adapter:\n  - adapter: the active LoRA adapter"

def test_nudged_weights(cube, model):
    fresh = tiny_model("llama")  # same seed: the same weights as the cube's model
    kvmem.prefill(fresh, cube)  # control: an identical copy is accepted
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1e-3)
    with pytest.raises(FingerprintMismatch, match=r"built for another weights:\n  - weights: the weights differ") as e:
        kvmem.prefill(fresh, cube)
    assert e.value.fields == ["weights"]
    assert isinstance(e.value, CubeError) and isinstance(e.value, ValueError)


def test_one_nudged_matrix(cube):
    """A fine-tune of a single matrix still changes the digest."""
    fresh = tiny_model("llama")
    with torch.no_grad():
        fresh.model.layers[1].mlp.down_proj.weight.add_(1e-3)
    with pytest.raises(FingerprintMismatch, match=r"weights") as e:
        kvmem.prefill(fresh, cube)
    assert "weights" in e.value.fields


@pytest.mark.parametrize("family, overrides, key", [
    ("llama", {"num_hidden_layers": 3}, "num_hidden_layers"),
    ("llama", {"num_key_value_heads": 4}, "num_key_value_heads"),
    ("llama", {"rope_theta": 1234.0}, "rope"),
    ("qwen2", {}, "model_type"),
    ("mistral", {}, "model_type"),
])
def test_other_model(cube, family, overrides, key):
    other = tiny_model(family, **overrides)
    with pytest.raises(FingerprintMismatch, match=rf"(?s)built for another model.*- model: .*{key}") as e:
        kvmem.prefill(other, cube)
    assert "model" in e.value.fields


def test_tokenizer_mismatch(model, tokenizer_pair):
    plain, extended, _ = tokenizer_pair
    cube = MemCube.from_text(model, plain, "Alice lives in Oslo.")
    kvmem.prefill(model, cube, tokenizer=plain)  # control
    kvmem.prefill(model, cube)  # no tokenizer given: not checked
    with pytest.raises(FingerprintMismatch, match=TOKENIZER_MISMATCH) as e:
        kvmem.prefill(model, cube, tokenizer=extended)
    assert e.value.fields == ["tokenizer"]


def test_tokenizer_changed_after_use(model, tokenizer_pair):
    """A tokenizer object that gains a token after a cube was checked against it is a different tokenizer: the
    digest must not be served stale from a cache on the object."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_pair[2])
    cube = MemCube.from_text(model, tok, "Alice lives in Oslo.")
    kvmem.prefill(model, cube, tokenizer=tok)
    tok.add_tokens(["<kvmem-validation-late>"])
    with pytest.raises(FingerprintMismatch, match=r"tokenizer") as e:
        kvmem.prefill(model, cube, tokenizer=tok)
    assert e.value.fields == ["tokenizer"]


def _lora(seed: int):
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama")  # seeds the RNG itself, so seed the LoRA init after it
    torch.manual_seed(seed)
    return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


@pytest.fixture(scope="module")
def lora_model():
    return _lora(seed=1)


@pytest.fixture(scope="module")
def lora_cube(lora_model):
    return MemCube.from_ids(lora_model, random_ids(NUM_TOKENS), anchor_ids=random_ids(ANCHOR_LEN, seed=1))


def test_adapter_cube_on_adapter_model(lora_model, lora_cube, cube):
    """Controls: the same adapter is accepted, and the adapter really changes the KV."""
    kvmem.prefill(lora_model, lora_cube)
    assert not torch.equal(lora_cube.kv[0][1], cube.kv[0][1])  # layer-0 values go through the LoRA'd v_proj


def test_adapter_cube_on_bare_model(model, lora_cube):
    with pytest.raises(FingerprintMismatch, match=ADAPTER_MISMATCH) as e:
        kvmem.prefill(model, lora_cube)
    assert e.value.fields == ["adapter"]


def test_bare_cube_on_adapter_model(lora_model, cube):
    with pytest.raises(FingerprintMismatch, match=ADAPTER_MISMATCH) as e:
        kvmem.prefill(lora_model, cube)
    assert e.value.fields == ["adapter"]


def test_bare_cube_on_adapter_model_with_adapter_disabled(lora_model, cube):
    with lora_model.disable_adapter():
        kvmem.prefill(lora_model, cube)


def test_other_adapter(lora_cube):
    with pytest.raises(FingerprintMismatch, match=r"- adapter: ") as e:
        kvmem.prefill(_lora(seed=2), lora_cube)
    assert e.value.fields == ["adapter"]


def test_cast_cube_on_fp32_model(cube_path, model):
    """Same model and weights, KV cast to bf16 at load: refused for the dtype, not for the fingerprint."""
    cast = MemCube.load(cube_path, dtype=torch.bfloat16)
    with pytest.raises(CubeError, match=r"holds torch\.bfloat16 KV but the model runs in torch\.float32") as e:
        kvmem.prefill(model, cast)
    assert not isinstance(e.value, FingerprintMismatch)


def test_fp32_cube_on_bf16_model(cube):
    bf16 = tiny_model("llama", dtype=torch.bfloat16)
    with pytest.raises(CubeError, match=r"dtype"):
        kvmem.prefill(bf16, cube)


# ================================================================================= 4. bad arguments
def test_prefill_no_cubes(model):
    with pytest.raises(CubeError, match=r"no cubes to inject: pass at least one MemCube"):
        kvmem.prefill(model, [])


def test_prefill_path_instead_of_cube(model, cube_path):
    with pytest.raises(CubeError, match=r"cubes must be MemCubes, got str \(load files with MemCube\.load\(path\)\)"):
        kvmem.prefill(model, str(cube_path))


@pytest.mark.parametrize("cubes", [None, 5], ids=["None", "int"])
def test_prefill_not_cubes(model, cubes):
    with pytest.raises(CubeError, match=r"cubes must be a MemCube or a list of MemCubes"):
        kvmem.prefill(model, cubes)


def test_prefill_mixed_list(model, cube):
    with pytest.raises(CubeError, match=r"cubes must be MemCubes, got dict"):
        kvmem.prefill(model, [cube, {"k.0": cube.kv[0][0]}])


@pytest.mark.parametrize("mode", ["bogus", None, "NONE"])
def test_prefill_bad_recompute(model, cube, mode):
    with pytest.raises(CubeError, match=rf"recompute={mode!r} is not a mode; choose one of .*none"):
        kvmem.prefill(model, [cube], recompute=mode)


def test_prefill_tokenizer_not_a_tokenizer(model, cube):
    with pytest.raises(CubeError, match=r"tokenizer"):
        kvmem.prefill(model, cube, tokenizer="HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.mark.parametrize("ids", [[], torch.zeros(0, dtype=torch.long), torch.zeros(1, 0, dtype=torch.long), None],
                         ids=["list", "1-D", "[1, 0]", "None"])
def test_from_ids_empty(model, ids):
    with pytest.raises(CubeError, match=r"input_ids is empty: a cube needs at least one token"):
        MemCube.from_ids(model, ids)


@pytest.mark.parametrize("ids, low, high", [([5, 49152], 5, 49152), ([-1, 7], -1, 7), ([10 ** 9], 10 ** 9, 10 ** 9)])
def test_from_ids_out_of_vocab(model, ids, low, high):
    with pytest.raises(CubeError, match=rf"token ids must lie in \[0, 49152\) .*got min {low}, max {high}"):
        MemCube.from_ids(model, ids)


def test_anchor_ids_out_of_vocab(model):
    with pytest.raises(CubeError, match=r"token ids must lie in \[0, 49152\)"):
        MemCube.from_ids(model, [5, 6], anchor_ids=[49152])


@pytest.mark.parametrize("ids", [[1.0, 2.0], torch.tensor([1.5, 2.5]), torch.tensor([True, False])],
                         ids=["float list", "float tensor", "bool tensor"])
def test_from_ids_not_integers(model, ids):
    with pytest.raises(CubeError, match=r"input_ids must hold integer token ids, got dtype torch\.(float32|bool)"):
        MemCube.from_ids(model, ids)


def test_anchor_ids_not_integers(model):
    with pytest.raises(CubeError, match=r"anchor_ids must hold integer token ids"):
        MemCube.from_ids(model, [5, 6], anchor_ids=[0.5])


@pytest.mark.parametrize("ids", [random_ids(6).reshape(2, 3), [[1, 2], [3, 4]], torch.ones(1, 2, 3, dtype=torch.long)],
                         ids=["batch of 2", "nested list", "3-D"])
def test_from_ids_batch(model, ids):
    with pytest.raises(CubeError, match=r"input_ids must be 1-D or shaped \[1, n\] \(one sequence\), got shape"):
        MemCube.from_ids(model, ids)


@pytest.mark.parametrize("ids", ["hello", ["a", "b"], [[1, 2], [3]], [2 ** 70]],
                         ids=["string", "strings", "ragged", "overflow"])
def test_from_ids_not_token_ids(model, ids):
    with pytest.raises(CubeError, match=r"input_ids must be token ids \(a list of ints or a LongTensor\)"):
        MemCube.from_ids(model, ids)


@pytest.mark.parametrize("chunk_size", [0, -1, 1.5, "64"])
def test_from_ids_bad_chunk_size(model, chunk_size):
    with pytest.raises(CubeError, match=r"chunk_size must be a positive int"):
        MemCube.from_ids(model, [5, 6], chunk_size=chunk_size)


@pytest.mark.parametrize("text", ["", None, 123, ["Alice lives in Oslo."], b"Alice"],
                         ids=["empty", "None", "int", "list", "bytes"])
def test_from_text_bad_text(model, tokenizer_pair, text):
    with pytest.raises(CubeError, match=r"text must be a non-empty string"):
        MemCube.from_text(model, tokenizer_pair[0], text)


def test_from_text_swapped_arguments(model, tokenizer_pair):
    with pytest.raises(CubeError, match=r"text must be a non-empty string, got (?!str)\w+"):
        MemCube.from_text(model, "Alice lives in Oslo.", tokenizer_pair[0])


def test_from_text_bad_anchor(model, tokenizer_pair):
    with pytest.raises(CubeError, match=r"anchor must be a string or None, got int"):
        MemCube.from_text(model, tokenizer_pair[0], "Alice lives in Oslo.", anchor=7)


def test_from_text_without_tokenizer(model):
    with pytest.raises(CubeError, match=r"tokenizer"):
        MemCube.from_text(model, None, "Alice lives in Oslo.")


def test_save_onto_folder(cube, tmp_path):
    folder = tmp_path / "cubes"
    folder.mkdir()
    with pytest.raises(CubeError, match=r"is a folder: give the cube a file name, e\.g\. .*memory\.safetensors"):
        cube.save(folder)
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("dtype", ["bfloat16", torch.int64, torch.bool], ids=["string", "int64", "bool"])
def test_load_bad_dtype(cube_path, dtype):
    with pytest.raises(CubeError, match=r"dtype must be a floating torch\.dtype"):
        MemCube.load(cube_path, dtype=dtype)


def test_load_bad_device(cube_path):
    with pytest.raises(CubeError, match=r"device"):
        MemCube.load(cube_path, device="bogus")


# ================================================================================= 5. atomic save
def test_save_leaves_no_temp_files(cube, other_cube, tmp_path):
    path = tmp_path / "memory.safetensors"
    cube.save(path)
    assert sorted(os.listdir(tmp_path)) == ["memory.safetensors"]
    other_cube.save(path)  # overwrite
    assert sorted(os.listdir(tmp_path)) == ["memory.safetensors"]
    assert_same_cube(MemCube.load(path), other_cube)


def _half_then_fail(exc: BaseException):
    real = kvmem.cube_format.save_file

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
    monkeypatch.setattr(kvmem.cube_format, "save_file", _half_then_fail(FAILURES[failure]))
    with pytest.raises(type(FAILURES[failure])):
        other_cube.save(path)
    assert sorted(os.listdir(tmp_path)) == ["memory.safetensors"]
    assert path.read_bytes() == before
    assert_same_cube(MemCube.load(path), cube)


def test_failed_first_save_leaves_nothing(cube, tmp_path, monkeypatch):
    monkeypatch.setattr(kvmem.cube_format, "save_file", _half_then_fail(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match=r"No space left"):
        cube.save(tmp_path / "memory.safetensors")
    assert os.listdir(tmp_path) == []


# ================================================================================= 6. round trip
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
