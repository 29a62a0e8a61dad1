"""Bad arguments to prefill, MemCube.from_ids / from_text, save and load: each a kvmem.CubeError naming the
problem and the fix."""

from __future__ import annotations

import pytest
import torch

import kvmem
from kvmem import CubeError, MemCube

from helpers import random_ids


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
