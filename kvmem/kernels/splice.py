"""Splice N cubes' K/V into one destination cache buffer, re-rotating keys by each cube's position delta and
casting to the destination dtype: the reference (torch) implementation, and the launcher that picks Triton.

Shapes (every function here):
    dst_k, dst_v      [layers, kv_heads, T_dst, head_dim]   the composed cache, written in place (values may have
                      their own dim: MLA caches keys and values of different widths)
    src_k[c][l]       [kv_heads, T_c, head_dim]             cube c, layer l (contiguous), any float dtype
    src_start[c]      first token of cube c that is copied (skips an anchor already in dst)
    dst_start[c]      where that token lands in dst
    length[c]         how many tokens of cube c are copied
    delta[c]          position shift applied to those keys (dst position - position the cube was built at)
    inv_freq          [rotary_dim // 2] float32, one for every layer, or [layers, rotary_dim // 2]: each
                      layer's own RoPE inverse frequencies (per-layer-type RoPE; a row of zeros leaves a NoPE
                      layer's keys as they are, exactly). Partial rotary: the trailing head_dim - rotary_dim
                      dims are copied unrotated
    interleaved       GPT-J pairs (2i, 2i+1) instead of NeoX halves (i, i + rotary_dim/2)

`splice_reference` is the CPU path and the test oracle; `splice_triton` is one kernel launch for all cubes,
layers and heads. `splice` picks Triton on CUDA when it is installed, the reference otherwise.
"""

from __future__ import annotations

import os

import torch

from .rotation import rotate, rotation_tables

Tensor = torch.Tensor


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """`rotate` with a positional layout flag (kept for existing callers)."""
    return rotate(x, cos, sin, interleaved=interleaved)


def per_layer(inv_freq: Tensor, layers: int) -> Tensor:
    """``inv_freq`` as a per-layer table [layers, half] (a shared [half] vector repeated)."""
    if inv_freq.dim() == 1:
        return inv_freq.reshape(1, -1).expand(layers, -1)
    return inv_freq


def _check(dst_k, dst_v, src_k, src_v, src_start, dst_start, length, delta, inv_freq):
    n = len(src_k)
    if not (len(src_v) == len(src_start) == len(dst_start) == len(length) == len(delta) == n):
        raise ValueError("src_k, src_v, src_start, dst_start, length and delta need one entry per cube")
    if dst_k.shape[:3] != dst_v.shape[:3] or dst_k.dim() != 4 or dst_v.dim() != 4:
        raise ValueError(f"dst_k/dst_v must both be [layers, heads, T, head_dim], got {tuple(dst_k.shape)}, "
                         f"{tuple(dst_v.shape)}")
    layers, heads, t_dst, dim = dst_k.shape
    dim_v = dst_v.shape[3]
    if inv_freq.dim() not in (1, 2) or (inv_freq.dim() == 2 and inv_freq.shape[0] != layers):
        raise ValueError(f"inv_freq must be [half] or [layers={layers}, half], got {tuple(inv_freq.shape)}")
    if inv_freq.shape[-1] * 2 > dim:
        raise ValueError(f"rotary dim {inv_freq.shape[-1] * 2} exceeds head_dim {dim}")
    for c in range(n):
        if len(src_k[c]) != layers or len(src_v[c]) != layers:
            raise ValueError(f"cube {c} has {len(src_k[c])} layers, dst has {layers}")
        t_c = src_k[c][0].shape[1]
        for k, v in zip(src_k[c], src_v[c]):
            if k.shape != (heads, t_c, dim) or v.shape != (heads, t_c, dim_v):
                raise ValueError(f"cube {c}: every layer's keys/values must be [{heads}, {t_c}, {dim}]/[{heads}, "
                                 f"{t_c}, {dim_v}], got {tuple(k.shape)}/{tuple(v.shape)}")
        if not (0 <= src_start[c] and src_start[c] + length[c] <= t_c and 0 <= dst_start[c]
                and dst_start[c] + length[c] <= t_dst and length[c] >= 0):
            raise ValueError(f"cube {c}: tokens [{src_start[c]}, +{length[c]}) -> [{dst_start[c]}, ...) "
                             f"out of range (cube has {t_c}, dst has {t_dst})")


def splice_reference(dst_k: Tensor, dst_v: Tensor, src_k, src_v, *, src_start, dst_start, length, delta,
                     inv_freq: Tensor, interleaved: bool = False) -> None:
    """Torch reference: per cube and layer, rotate in float32 (float64 for float64 data), cast, copy."""
    _check(dst_k, dst_v, src_k, src_v, src_start, dst_start, length, delta, inv_freq)
    work = torch.float64 if dst_k.dtype == torch.float64 else torch.float32
    cos, sin = rotation_tables(delta, per_layer(inv_freq, dst_k.shape[0]), dst_k.device)  # [N, layers, half]
    for c in range(len(src_k)):
        s, d, n = src_start[c], dst_start[c], length[c]
        if n == 0:
            continue
        for layer, (k, v) in enumerate(zip(src_k[c], src_v[c])):
            k = k[:, s:s + n].to(dst_k.device, work)
            if delta[c]:
                k = rotate(k, cos[c, layer].to(work), sin[c, layer].to(work), interleaved=interleaved)
            dst_k[layer, :, d:d + n] = k.to(dst_k.dtype)
            dst_v[layer, :, d:d + n] = v[:, s:s + n].to(dst_v.device, dst_v.dtype)


def splice_triton(dst_k: Tensor, dst_v: Tensor, src_k, src_v, *, src_start, dst_start, length, delta,
                  inv_freq: Tensor, interleaved: bool = False, block_t: int = 64,
                  num_warps: int | None = None) -> None:
    """The same as `splice_reference`, in one Triton launch. All tensors on one device (CPU only under
    TRITON_INTERPRET=1); sources contiguous and of one dtype. ``block_t`` tokens per program and ``num_warps``
    (Triton's default, 4, when None) tune it; bench/gpu_check.py measures them. The default, 64 tokens and 4 warps,
    was the fastest in the first measured sweep on an H200 (bf16, 32 layers x 8 heads x 128 dims, 4 cubes of 2,048
    tokens: 0.86 of a plain device copy's bandwidth; 32 tokens 0.82, 256 tokens 0.76), and again in a second
    sweep that ran lower overall (0.70; 32 tokens 0.69, 256 tokens 0.62)."""
    from ._splice_triton import launch  # lazy: importing kvmem never imports Triton

    _check(dst_k, dst_v, src_k, src_v, src_start, dst_start, length, delta, inv_freq)
    launch(dst_k, dst_v, src_k, src_v, src_start=src_start, dst_start=dst_start, length=length, delta=delta,
           inv_freq=inv_freq, interleaved=interleaved, block_t=block_t, num_warps=num_warps)


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA devices, or anywhere under TRITON_INTERPRET=1 (slow: tests only)."""
    if os.environ.get("KVMEM_DISABLE_TRITON") == "1":
        return False
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def splice(dst_k: Tensor, dst_v: Tensor, src_k, src_v, *, src_start, dst_start, length, delta, inv_freq: Tensor,
           interleaved: bool = False) -> None:
    """Triton on CUDA (when installed), the torch reference elsewhere. Same arguments as both."""
    fn = splice_triton if dst_k.device.type == "cuda" and triton_usable(dst_k.device) else splice_reference
    fn(dst_k, dst_v, src_k, src_v, src_start=src_start, dst_start=dst_start, length=length, delta=delta,
       inv_freq=inv_freq, interleaved=interleaved)
