"""Where a model runs, read one way: its inputs' device, each cache layer's device, and accelerate's hooks (the
one reader of them: a model dispatched with ``device_map``, CPU or disk offload keeps weights on ``meta`` and says
through its hooks where each module computes and where its offloaded weights are held)."""

from __future__ import annotations

import torch

from ..errors import CubeError
from .facts import base_model


def hooks(module) -> list:
    """accelerate's hooks on ``module`` (a SequentialHook's members one by one; none for a plain module)."""
    hook = getattr(module, "_hf_hook", None)
    return [] if hook is None else list(getattr(hook, "hooks", [hook]))


def execution_device(module) -> torch.device | None:
    """The execution device of accelerate's hook on ``module`` (a SequentialHook's first that has one), or None."""
    for h in hooks(module):
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return None


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
        device = execution_device(module)
        if device is not None:
            return p.dtype, device
    raise CubeError("the model's weights are on the meta device and no accelerate hook says where it runs: load "
                    "its weights (from_pretrained without init_empty_weights) or dispatch it with accelerate "
                    "(dispatch_model, cpu_offload, device_map=...)")


def model_device(model) -> torch.device:
    """Where ``model`` takes its inputs: its first parameter's device, or accelerate's execution device when that
    weight is offloaded (see `dtype_device`)."""
    return dtype_device(model)[1]


def layer_devices(model, n_layers: int) -> list[torch.device]:
    """Per cache layer, the device its attention computes keys on: accelerate's execution device when the model
    is dispatched with hooks (``device_map``, CPU/disk offload; the hook may sit on the attention, a module inside
    it or the decoder layer around it), else where the layer's weights live."""
    named = dict(base_model(model).named_modules())
    fallback = model_device(model)  # an offloaded first weight is meta: where the model takes its inputs
    found: dict[int, torch.device] = {}
    for name, module in named.items():
        idx = getattr(module, "layer_idx", None)
        if not (isinstance(idx, int) and hasattr(module, "k_proj")) or idx in found:
            continue
        parts = name.split(".")
        ancestors = [named[".".join(parts[:j])] for j in range(len(parts) - 1, -1, -1)]
        found[idx] = (next(filter(None, map(execution_device, [module.k_proj, module, *ancestors])), None)
                      or _weight_device(module) or fallback)
    return [found.get(i, fallback) for i in range(n_layers)]


def _weight_device(module: torch.nn.Module) -> torch.device | None:
    return next((p.device for p in module.parameters() if p.device.type != "meta"), None)
