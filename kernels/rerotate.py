"""Re-rotate post-RoPE keys by a position delta: the reference (torch) implementation.

transformers caches keys after RoPE: k_p = R(p) k (times a constant attention scaling for some RoPE types).
Rotations compose, R(p + d) = R(d) R(p), so a key built at position p moves to p + d by one more rotation by
d, for every RoPE whose angle is linear in the position (default, linear, llama3, yarn). The scaling is already inside k_p and must not be applied again.
"""

from __future__ import annotations

import torch


def rerotate_reference(keys: torch.Tensor, delta: int | torch.Tensor, inv_freq: torch.Tensor, *,
                       interleaved: bool = False) -> torch.Tensor:
    """Rotate ``keys`` by ``delta`` positions; returns a new tensor in ``keys.dtype``.

    Args:
        keys: [..., seq, head_dim] post-RoPE keys.
        delta: position shift (int or 0-d tensor); negative moves keys earlier.
        inv_freq: [rotary_dim // 2] the model's inverse frequencies (rotary_dim <= head_dim: partial rotary
            leaves the trailing ``head_dim - rotary_dim`` dims as they are).
        interleaved: GPT-J layout (pairs (0,1), (2,3), ...) instead of NeoX halves (i, i + rotary_dim/2).

    Computed in float32 (float64 if keys are float64), cast back once.
    """
    rot = inv_freq.numel() * 2
    work = torch.float64 if keys.dtype == torch.float64 else torch.float32
    angle = torch.as_tensor(delta, dtype=torch.float64, device=keys.device) * inv_freq.to(keys.device, torch.float64)
    cos, sin = angle.cos().to(work), angle.sin().to(work)  # [rot/2]
    x = keys[..., :rot].to(work)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        y = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = x[..., : rot // 2], x[..., rot // 2:]
        y = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    out = keys.clone()
    out[..., :rot] = y.to(keys.dtype)
    return out
