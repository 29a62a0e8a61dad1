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
    """The dtype and device of ``model``'s first parameter (PEFT-wrapped or not): where its KV is computed.

    For a model dispatched with accelerate whose first weight is offloaded (``meta``), the device is the execution
    device of accelerate's hooks (the model's own first, else that of the module holding the weight): where the
    model takes its inputs."""
    base = base_model(model)
    p = next(base.parameters())
    if p.device.type != "meta":
        return p.dtype, p.device
    holder = next((m for m in base.modules() if any(q is p for q in m.parameters(recurse=False))), None)
    for module in (base, holder):
        device = _execution_device(module)
        if device is not None:
            return p.dtype, device
    from .errors import CubeError

    raise CubeError("the model's weights are on the meta device and no accelerate hook says where it runs: load "
                    "its weights (from_pretrained without init_empty_weights) or dispatch it with accelerate "
                    "(dispatch_model, cpu_offload, device_map=...)")


def _execution_device(module) -> torch.device | None:
    """The execution device of accelerate's hook on ``module`` (a SequentialHook's first that has one)."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", [hook]):
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return None


def model_device(model) -> torch.device:
    """Where ``model`` takes its inputs: its first parameter's device, or accelerate's execution device when that
    weight is offloaded (see `dtype_device`)."""
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
