"""Resumable distillation checkpoints: the LoRA weights, the optimizer's state and the step, in one folder.

No pickle (DESIGN.md): tensors go to ``checkpoint.safetensors``, everything else (the step, the run's key, the
optimizer's non-tensor state, the losses so far) to ``checkpoint.json``. Both are written to temporary names and
renamed, the JSON last: a checkpoint is complete exactly when its JSON names the tensor file's digest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import xxhash
from safetensors.torch import load_file, save_file

from ..errors import CubeError

TENSORS, STATE = "checkpoint.safetensors", "checkpoint.json"


def _file_digest(path: Path) -> str:
    return xxhash.xxh3_128(path.read_bytes()).hexdigest()


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict -> (its tensors by flat name, the rest as JSON)."""
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entry in state["state"].items():
        plain["state"][str(pid)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{pid}.{key}"] = value.detach().cpu().contiguous()
                plain["state"][str(pid)][key] = {"tensor": f"optimizer.{pid}.{key}"}
            else:
                plain["state"][str(pid)][key] = value
    return tensors, plain


def _join_optimizer(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state = {}
    for pid, entry in plain["state"].items():
        state[int(pid)] = {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
                           for k, v in entry.items()}
    return {"state": state, "param_groups": plain["param_groups"]}


def save_checkpoint(folder, *, lora: dict[str, torch.Tensor], optimizer: dict, step: int, key: str,
                    losses: list[float], averaged: list[torch.Tensor] | None = None) -> Path:
    """Write a checkpoint of ``step`` into ``folder`` (created), replacing the previous one atomically
    (``averaged``: the moving average of the trained weights, in their order, where distill keeps one)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        opt_tensors, opt_plain = _split_optimizer(optimizer)
        tensors = {**{f"lora.{k}": v.detach().cpu().contiguous() for k, v in lora.items()}, **opt_tensors,
                   **{f"averaged.{i}": t.detach().cpu().contiguous() for i, t in enumerate(averaged or [])}}
        tmp = folder / (TENSORS + ".tmp")
        save_file(tensors, str(tmp))
        digest = _file_digest(tmp)
        os.replace(tmp, folder / TENSORS)
        doc = {"step": step, "key": key, "losses": losses, "optimizer": opt_plain, "tensors_digest": digest}
        tmp = folder / (STATE + ".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, folder / STATE)
    except OSError as exc:
        raise CubeError(f"cannot write the distillation checkpoint in {folder}: {exc}; pass another "
                        "checkpoint_dir (or none)") from None
    return folder


def load_checkpoint(folder, *, key: str) -> dict | None:
    """The checkpoint in ``folder`` as ``{"step", "losses", "lora", "optimizer"}``; None if there is none. A
    checkpoint of another run (other memories, model, rank, seed or options) or a damaged one is a CubeError."""
    folder = Path(folder)
    if not (folder / STATE).is_file():
        return None
    try:
        doc = json.loads((folder / STATE).read_text())
        if doc.get("key") != key:
            raise CubeError(f"the checkpoint in {folder} is from another distillation (other memories, base model, "
                            "rank, seed or options); resume it with the same arguments, or use a fresh "
                            "checkpoint_dir")
        if _file_digest(folder / TENSORS) != doc["tensors_digest"]:
            raise CubeError(f"the checkpoint in {folder} is damaged (its tensors do not match their digest); "
                            "delete it and distil again")
        tensors = load_file(str(folder / TENSORS))
    except CubeError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CubeError(f"cannot read the distillation checkpoint in {folder}: {type(exc).__name__}: {exc}; "
                        "delete it and distil again") from None
    lora = {k[len("lora."):]: v for k, v in tensors.items() if k.startswith("lora.")}
    averaged = sorted((int(k[len("averaged."):]), v) for k, v in tensors.items() if k.startswith("averaged."))
    return {"step": int(doc["step"]), "losses": list(doc["losses"]), "lora": lora,
            "optimizer": _join_optimizer(tensors, doc["optimizer"]), "averaged": [v for _, v in averaged]}
