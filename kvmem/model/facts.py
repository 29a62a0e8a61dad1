"""Facts every layer asks of a model, read one way: the model under a PEFT wrapper, its text config, its context
length; and `eval_mode`, the one way kvmem runs a forward of its own. Devices are `kvmem.model.devices`'; all of
it resolved once per model generation, `kvmem.model.resolve`'s."""

from __future__ import annotations

import contextlib


def base_model(model):
    """The transformers model under a PEFT wrapper (or ``model`` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def text_config(model):
    """The decoder's text config (a multimodal model's language part; the config itself for a plain LM)."""
    return base_model(model).config.get_text_config(decoder=True)


def context_length(model) -> int | None:
    """The positions the model was built for (``max_position_embeddings``), or None when its config has none."""
    n = getattr(text_config(model), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def check_context(model, n_tokens: int, what: str, fix: str) -> None:
    """CubeError when ``n_tokens`` positions would run past the model's context length (nothing is computed
    there that the model was trained for): ``what`` names them, ``fix`` says what to do instead."""
    limit = context_length(model)
    if limit is not None and n_tokens > limit:
        from ..errors import CubeError

        raise CubeError(f"{what} is {n_tokens} tokens, past this model's context of {limit} "
                        f"(max_position_embeddings); {fix}")


def switch_attention(model, name: str, *, fix: str) -> str:
    """Set ``model``'s attention implementation to ``name`` (a registered one) the supported way
    (``set_attn_implementation`` on the model under a PEFT wrapper); the one place kvmem switches it.

    Args:
        model: a transformers model (PEFT-wrapped or not).
        name: the attention implementation to select.
        fix: what the user can do instead, for the error message.

    Returns:
        The attention implementation now in use.

    Raises:
        CubeError: the model cannot take ``name`` (transformers refused it).
    """
    target = base_model(model)
    try:
        target.set_attn_implementation(name)
    except (ValueError, AttributeError) as e:
        from ..errors import CubeError

        raise CubeError(f"{type(target).__name__} cannot switch its attention to {name!r} ({e}); {fix}") from e
    return target.config._attn_implementation


@contextlib.contextmanager
def eval_mode(module):
    """``module`` in eval mode (no dropout) for the block, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)

