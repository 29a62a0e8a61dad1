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


# ---------------------------------------------------------------- offloaded weights, read through the hooks
class DiskWeight:
    """A weight accelerate keeps on disk (``offload_folder``): identified by its file's stat (`stamp`), read
    through its ``OffloadedWeightsLoader`` only when asked (`read`)."""

    def __init__(self, loader, key: str, param: torch.Tensor):
        self.loader, self.key, self.shape, self.dtype = loader, key, tuple(param.shape), param.dtype

    def stamp(self) -> tuple:
        """(path, inner name, inode, size, mtime, stored dtype, shape, dtype): what changes when the file does."""
        import os

        entry = self.loader.index[self.key]
        if entry.get("safetensors_file") is not None:
            path, inner = entry["safetensors_file"], entry.get("weight_name", self.key)
        else:
            path, inner = os.path.join(self.loader.save_folder, f"{self.key}.dat"), None
        try:
            st = os.stat(path)
        except OSError as e:
            raise CubeError(f"the disk-offloaded weight {self.key!r} cannot be read ({e}): its offload folder was "
                            "removed or moved; dispatch the model again (accelerate.dispatch_model / "
                            "from_pretrained(device_map=..., offload_folder=...))") from None
        return (path, inner, st.st_ino, st.st_size, st.st_mtime_ns, entry.get("dtype"), self.shape, self.dtype)

    def read(self) -> torch.Tensor:
        """The weight's values, in the dtype the model holds it in."""
        return as_held(self.loader[self.key], self.dtype)


def as_held(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value`` in the dtype the model holds it in (accelerate casts an offloaded float weight so on loading)."""
    return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value


def offloaded_value(weights_map, key: str, param: torch.Tensor):
    """What an accelerate offload hook's ``weights_map`` holds under ``key``: a tensor in memory (CPU offload),
    a `DiskWeight` (disk offload), or None. Read without loading a disk-offloaded weight."""
    from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset

    while isinstance(weights_map, PrefixedDataset):
        key, weights_map = weights_map.prefix + key, weights_map.dataset
    if isinstance(weights_map, OffloadedWeightsLoader):
        if key in weights_map.state_dict:
            return as_held(weights_map.state_dict[key], param.dtype)
        return DiskWeight(weights_map, key, param) if key in weights_map.index else None
    try:
        value = weights_map[key]
    except (KeyError, TypeError):
        return None
    return as_held(value, param.dtype) if isinstance(value, torch.Tensor) else None


def real_weight(modules: dict, name: str, param: torch.Tensor):
    """The real value of the offloaded (meta) parameter ``name`` (a tensor or a `DiskWeight`), from the accelerate
    hook that loads it before each forward (on its module or, with ``place_submodules``, on an ancestor); None when
    no hook holds it. ``modules``: the model's ``dict(named_modules())``."""
    parts = name.split(".")
    for j in range(len(parts) - 1, -1, -1):  # nearest module first
        for hook in hooks(modules.get(".".join(parts[:j]))):
            if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
                value = offloaded_value(hook.weights_map, ".".join(parts[j:]), param)
                if value is not None:
                    return value
    return None
