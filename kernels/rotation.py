"""The rotation tables every splice implementation shares: cos/sin of each cube's position delta times the
model's RoPE inverse frequencies. A module of its own so the Triton kernel and the torch reference both import
it without importing each other."""

from __future__ import annotations

from typing import Sequence

import torch

Tensor = torch.Tensor


def rotation_tables(delta: Sequence[int], inv_freq: Tensor, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin [N, rotary_dim // 2] float32 of delta[c] * inv_freq, computed in float64 (exact angles)."""
    d = torch.as_tensor(list(delta), dtype=torch.float64).reshape(-1, 1)
    angle = d * inv_freq.detach().to("cpu", torch.float64).reshape(1, -1)
    return angle.cos().float().to(device), angle.sin().float().to(device)
