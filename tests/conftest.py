"""Shared fixtures: tiny random models of several families (fast), and the real SmolLM2 (truth)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Triton kernels run on CPU through the interpreter (slow: tests use small shapes). Set before any kernel
    # module is imported, since @triton.jit reads it at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def tiny_config(family: str, **overrides):
    """A small config of ``family``: 2 layers, GQA, head_dim 16, the SmolLM2 vocabulary size."""
    from transformers import AutoConfig

    kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=49152, max_position_embeddings=2048,
                  tie_word_embeddings=False)
    if family == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str = "llama", *, dtype=torch.float32, seed: int = 0, attn: str = "sdpa", **overrides):
    """A randomly initialised causal LM of ``family`` (deterministic for a seed), in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    config._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer): the real SmolLM2-135M-Instruct in float32 on CPU (converted once, cached)."""
    from transformers.utils import logging

    from kvmem.real_model import load_smollm2

    logging.set_verbosity_error()
    return load_smollm2(verbose=True)


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    return smollm2[1]


@pytest.fixture
def llama():
    return tiny_model("llama")


def random_ids(n: int, *, seed: int = 0, vocab: int = 49152) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (n,), generator=g)
