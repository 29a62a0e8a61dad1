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


def context_length(model) -> int | None:
    """The positions the model was built for (``max_position_embeddings``), or None when its config has none."""
    n = getattr(text_config(model), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def check_context(model, n_tokens: int, what: str, fix: str) -> None:
    """CubeError when ``n_tokens`` positions would run past the model's context length (nothing is computed
    there that the model was trained for): ``what`` names them, ``fix`` says what to do instead."""
    limit = context_length(model)
    if limit is not None and n_tokens > limit:
        from .errors import CubeError

        raise CubeError(f"{what} is {n_tokens} tokens, past this model's context of {limit} "
                        f"(max_position_embeddings); {fix}")
