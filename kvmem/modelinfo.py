"""Facts every layer asks of a model, read one way: the model under a PEFT wrapper, its text config, and the
dtype and device its weights live in."""

from __future__ import annotations

import torch


def base_model(model):
    """The transformers model under a PEFT wrapper (or ``model`` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def text_config(model):
    """The decoder's text config (a multimodal model's language part; the config itself for a plain LM)."""
    return base_model(model).config.get_text_config(decoder=True)


def dtype_device(model) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of ``model``'s first parameter (PEFT-wrapped or not): where its KV is computed."""
    p = next(base_model(model).parameters())
    return p.dtype, p.device


def model_device(model) -> torch.device:
    """The device of ``model``'s first parameter."""
    return dtype_device(model)[1]
