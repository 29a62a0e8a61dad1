"""Shared fixtures (tiny random models, a saved cube, the real SmolLM2) and the one hook for the ``gpu`` marker.

Plain helpers (tiny_model, random_ids, file surgery, fakes) live in ``helpers.py``; they are re-exported here so
``from conftest import tiny_model`` keeps working.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# bench/memory_text.py (invented memory texts) is support code the tests share with the benchmarks, not kvmem API
sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))
if not torch.cuda.is_available():
    # Triton kernels run on CPU through the interpreter (slow: tests use small shapes). Set before any kernel
    # module is imported, since @triton.jit reads it at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import (  # noqa: E402, F401  (after TRITON_INTERPRET; re-exported for `from conftest import ...`)
    ANCHOR_LEN, FAMILIES, FORMAT, NUM_TOKENS, random_ids, read_parts, tiny_config, tiny_model,
)


# ---------------------------------------------------------------------------------------------- the gpu marker
def pytest_collection_modifyitems(config, items):
    """Skip every ``@pytest.mark.gpu`` test when there is no CUDA device (asks only ``torch.cuda.is_available()``)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu test: needs a CUDA device, and torch.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


# ---------------------------------------------------------------------------------------------- models
@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer): the real SmolLM2-135M-Instruct in float32 on CPU (converted once, cached)."""
    from transformers.utils import logging

    from kvmem.demo.models import load_smollm2

    logging.set_verbosity_error()
    return load_smollm2(verbose=True)


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    return smollm2[1]


@pytest.fixture(scope="session")
def tok():
    """SmolLM2's real tokenizer alone (no model load); skips where the checkpoint is not installed."""
    from transformers import AutoTokenizer

    try:
        from kvmem.demo.models import smollm2_checkpoint

        return AutoTokenizer.from_pretrained(smollm2_checkpoint(verbose=False))
    except (ModuleNotFoundError, FileNotFoundError, OSError) as exc:
        pytest.skip(f"the real tokenizer is not available: {exc}")


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def model():
    """The tiny llama the saved cube below was built with (one per test module)."""
    return tiny_model("llama")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    """A folder holding a saved tiny llama and SmolLM2's tokenizer, loadable with from_pretrained (for the CLI)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer_pair():
    """Two tokenizers: SmolLM2's, and SmolLM2's with one token added (so the vocabularies differ)."""
    from transformers import AutoTokenizer

    try:
        from kvmem.demo.models import smollm2_checkpoint

        folder = smollm2_checkpoint(verbose=False)
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        pytest.skip(f"the real tokenizer is not available: {exc}")
    plain = AutoTokenizer.from_pretrained(folder)
    extended = AutoTokenizer.from_pretrained(folder)
    extended.add_tokens(["<kvmem-validation-extra>"])
    assert len(extended) == len(plain) + 1
    return plain, extended, folder


# ---------------------------------------------------------------------------------------------- cubes
@pytest.fixture(scope="module")
def cube_path(model, tmp_path_factory) -> Path:
    """A saved cube with text, anchor and non-ASCII metadata; its 'created' stamp pinned so bytes are stable."""
    from kvmem import MemCube
    from kvmem.cubes.format import write_cube_file

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
def cube(cube_path):
    from kvmem import MemCube

    return MemCube.load(cube_path)


@pytest.fixture(scope="module")
def cube_bytes(cube_path) -> bytes:
    return cube_path.read_bytes()


@pytest.fixture(scope="module")
def other_cube(model):
    """A second cube for the same model (other ids), to overwrite the first with."""
    from kvmem import MemCube

    return MemCube.from_ids(model, random_ids(7, seed=9), name="other", anchor_ids=random_ids(ANCHOR_LEN, seed=1))
