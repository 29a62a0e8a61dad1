"""Forged checksums: files whose checksum was recomputed after an inconsistent edit, so only validation can
object, at load or at prefill, and always with a kvmem.CubeError."""

from __future__ import annotations

import pytest
import torch

from kvmem import CubeError, MemCube

from helpers import ANCHOR_LEN, assert_same_cube, forge, load_or_usable, read_parts


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
