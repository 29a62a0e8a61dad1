"""The rotation every splice implementation shares: cos/sin tables of each cube's position delta times the
model's RoPE inverse frequencies, and `rotate`, the rotation itself (torch). A module of its own so the Triton
kernel, the torch reference and kvmem.model.rope (which measures a model's RoPE pair order) import it without
importing each other."""

from __future__ import annotations

from typing import Sequence

import torch

Tensor = torch.Tensor


def rotation_tables(delta: Sequence[int], inv_freq: Tensor, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin float32 of delta[c] * inv_freq, computed in float64 (exact angles).

    ``inv_freq`` [half] gives tables [N, half]; a per-layer table [layers, half] gives [N, layers, half].
    Computed on the CUDA device when ``inv_freq`` is there (so a splice never waits on a device->host copy),
    on the CPU otherwise (float64 everywhere: MPS has none); returned on ``device`` (default: where computed).
    """
    where = inv_freq.device if inv_freq.device.type == "cuda" else torch.device("cpu")
    freq = inv_freq.detach().to(where, torch.float64)
    d = torch.tensor(list(delta), dtype=torch.float64).to(freq.device, non_blocking=True)
    angle = d.reshape(-1, *([1] * freq.dim())) * freq[None]
    cos, sin = angle.cos().float(), angle.sin().float()
    return (cos, sin) if device is None else (cos.to(device), sin.to(device))


def rotate(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool) -> Tensor:
    """Rotate the first 2 * len(cos) dims of x [..., head_dim] by the angles of cos/sin [half] (in x's dtype);
    the other dims pass through. NeoX pairs (i, i + half); interleaved (GPT-J) pairs (2i, 2i + 1)."""
    rot = cos.shape[-1] * 2
    r = x[..., :rot]
    if interleaved:
        x1, x2 = r[..., 0::2], r[..., 1::2]
        y = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = r[..., : rot // 2], r[..., rot // 2:]
        y = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((y, x[..., rot:]), dim=-1)
