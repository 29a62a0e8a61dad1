"""Splice quantized cubes: unpack int8 / int4 KV, dequantize, re-rotate keys by each cube's position delta and
write the model's dtype into the destination cache. The torch reference and the launcher that picks Triton.

The packed layout (kvmem.cubes.quantize writes it; KIVI-style: keys per channel over token groups, values per
token). For a cube of T tokens, A of them its anchor, and key group G:
    k_q      uint8 [kv_heads, T, head_dim] (8 bits) or [kv_heads, ceil(T / 2), head_dim] (4 bits: tokens 2i and
             2i + 1 share a byte, 2i in the low nibble)
    k_scale  float16 [kv_heads, groups, head_dim], k_min alike: token t's group is t // G inside the anchor and
             ceil(A / G) + (t - A) // G after it (groups restart where the memory starts, so a later cube, whose
             anchor is skipped, starts on a group boundary and the anchor's outliers never share a scale with it)
    v_q      uint8 like k_q, of width head_dim_v
    v_scale  float16 [kv_heads, T, 1], v_min alike: one scale per token and head
A value is ``q * scale + min`` (float32 arithmetic).

Shapes of the splice (as kvmem.kernels.splice, plus):
    src[c][l]     (k_q, k_scale, k_min, v_q, v_scale, v_min) of cube c, layer l, contiguous, on dst's device
    n_tokens[c]   T of cube c; anchor_len[c]: its A
    bits, group   4 or 8; G (one scheme per call: cubes of another scheme go in another call)
"""

from __future__ import annotations

import torch

from .rotation import rotate, rotation_tables
from .splice import per_layer, triton_usable

Tensor = torch.Tensor
BITS = (4, 8)


def key_groups(n_tokens: int, anchor_len: int, group: int) -> int:
    """How many key groups a cube of ``n_tokens`` (``anchor_len`` of them its anchor) has."""
    return -(-anchor_len // group) + -(-(n_tokens - anchor_len) // group)


def key_group_of(t: Tensor, anchor_len: int, group: int) -> Tensor:
    """The key group of each token index in ``t`` (see the module docstring)."""
    return torch.where(t < anchor_len, t // group, -(-anchor_len // group) + (t - anchor_len) // group)


def unpack(q: Tensor, *, bits: int, n_tokens: int) -> Tensor:
    """uint8 [H, T or ceil(T / 2), D] -> the levels uint8 [H, T, D] (0..255 or 0..15)."""
    if bits == 8:
        return q
    return torch.stack((q & 15, q >> 4), dim=2).reshape(q.shape[0], -1, q.shape[2])[:, :n_tokens]


def dequantize(layer, *, bits: int, group: int, n_tokens: int, anchor_len: int, start: int = 0,
               stop: int | None = None, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Keys and values [H, stop - start, D] of tokens [start, stop) of one packed layer, in ``dtype`` (the
    arithmetic in float32, float64 for float64)."""
    k_q, k_scale, k_min, v_q, v_scale, v_min = layer
    stop = n_tokens if stop is None else stop
    work = torch.float64 if dtype == torch.float64 else torch.float32
    t = torch.arange(start, stop, device=k_q.device)
    g = key_group_of(t, anchor_len, group)
    k = unpack(k_q, bits=bits, n_tokens=n_tokens)[:, start:stop].to(work)
    k = k * k_scale[:, g].to(work) + k_min[:, g].to(work)
    v = unpack(v_q, bits=bits, n_tokens=n_tokens)[:, start:stop].to(work)
    v = v * v_scale[:, start:stop].to(work) + v_min[:, start:stop].to(work)
    return k.to(dtype), v.to(dtype)


def _check(dst_k, dst_v, src, n_tokens, anchor_len, bits, group, src_start, dst_start, length, delta, inv_freq):
    n = len(src)
    if not (len(n_tokens) == len(anchor_len) == len(src_start) == len(dst_start) == len(length) == len(delta) == n):
        raise ValueError("src, n_tokens, anchor_len, src_start, dst_start, length and delta need one entry per cube")
    if bits not in BITS or not (isinstance(group, int) and group >= 1):
        raise ValueError(f"bits must be one of {BITS} and group a positive int, got {bits!r}, {group!r}")
    if dst_k.dim() != 4 or dst_v.dim() != 4 or dst_k.shape[:3] != dst_v.shape[:3]:
        raise ValueError(f"dst_k/dst_v must both be [layers, heads, T, head_dim], got {tuple(dst_k.shape)}, "
                         f"{tuple(dst_v.shape)}")
    layers, heads, t_dst, dim = dst_k.shape
    dim_v = dst_v.shape[3]
    if inv_freq.dim() not in (1, 2) or (inv_freq.dim() == 2 and inv_freq.shape[0] != layers) \
            or inv_freq.shape[-1] * 2 > dim:
        raise ValueError(f"inv_freq must be [half] or [layers={layers}, half] with 2 * half <= {dim}, "
                         f"got {tuple(inv_freq.shape)}")
    for c in range(n):
        t, a = n_tokens[c], anchor_len[c]
        rows = t if bits == 8 else (t + 1) // 2
        groups = key_groups(t, a, group)
        want = ((heads, rows, dim), (heads, groups, dim), (heads, groups, dim), (heads, rows, dim_v),
                (heads, t, 1), (heads, t, 1))
        if len(src[c]) != layers:
            raise ValueError(f"cube {c} has {len(src[c])} layers, dst has {layers}")
        for layer in src[c]:
            got = tuple(tuple(x.shape) for x in layer)
            if got != want or layer[0].dtype != torch.uint8 or layer[3].dtype != torch.uint8:
                raise ValueError(f"cube {c}: a packed layer must be uint8/scales shaped {want}, got {got}")
        if not (0 <= a <= t and 0 <= src_start[c] and length[c] >= 0 and src_start[c] + length[c] <= t
                and 0 <= dst_start[c] and dst_start[c] + length[c] <= t_dst):
            raise ValueError(f"cube {c}: tokens [{src_start[c]}, +{length[c]}) -> [{dst_start[c]}, ...) "
                             f"out of range (cube has {t}, dst has {t_dst})")


def dequant_splice_reference(dst_k: Tensor, dst_v: Tensor, src, *, n_tokens, anchor_len, bits: int, group: int,
                             src_start, dst_start, length, delta, inv_freq: Tensor,
                             interleaved: bool = False) -> None:
    """Torch reference: per cube and layer, dequantize the copied tokens, rotate in float32 (float64 for float64
    dst), cast, copy."""
    _check(dst_k, dst_v, src, n_tokens, anchor_len, bits, group, src_start, dst_start, length, delta, inv_freq)
    work = torch.float64 if dst_k.dtype == torch.float64 else torch.float32
    cos, sin = rotation_tables(delta, per_layer(inv_freq, dst_k.shape[0]), dst_k.device)  # [N, layers, half]
    for c, cube in enumerate(src):
        s, d, n = src_start[c], dst_start[c], length[c]
        if n == 0:
            continue
        for i, layer in enumerate(cube):
            layer = [x.to(dst_k.device) for x in layer]
            k, v = dequantize(layer, bits=bits, group=group, n_tokens=n_tokens[c], anchor_len=anchor_len[c],
                              start=s, stop=s + n, dtype=work)
            if delta[c]:
                k = rotate(k, cos[c, i].to(work), sin[c, i].to(work), interleaved=interleaved)
            dst_k[i, :, d:d + n] = k.to(dst_k.dtype)
            dst_v[i, :, d:d + n] = v.to(dst_v.dtype)


def dequant_splice_triton(dst_k: Tensor, dst_v: Tensor, src, *, n_tokens, anchor_len, bits: int, group: int,
                          src_start, dst_start, length, delta, inv_freq: Tensor, interleaved: bool = False,
                          block_t: int = 64, num_warps: int | None = None) -> None:
    """The same as `dequant_splice_reference` in one Triton launch: the kernel reads the packed bytes and scales
    and writes dst's dtype, re-rotation included. All tensors on one device (CPU only under TRITON_INTERPRET=1)."""
    from ._dequant_splice_triton import (
        launch,  # lazy: importing kvmem never imports Triton
    )

    _check(dst_k, dst_v, src, n_tokens, anchor_len, bits, group, src_start, dst_start, length, delta, inv_freq)
    launch(dst_k, dst_v, src, n_tokens=n_tokens, anchor_len=anchor_len, bits=bits, group=group,
           src_start=src_start, dst_start=dst_start, length=length, delta=delta, inv_freq=inv_freq,
           interleaved=interleaved, block_t=block_t, num_warps=num_warps)


def dequant_splice(dst_k: Tensor, dst_v: Tensor, src, *, n_tokens, anchor_len, bits: int, group: int, src_start,
                   dst_start, length, delta, inv_freq: Tensor, interleaved: bool = False) -> None:
    """Triton on CUDA (when installed), the torch reference elsewhere. Same arguments as both."""
    fn = (dequant_splice_triton if dst_k.device.type == "cuda" and triton_usable(dst_k.device)
          else dequant_splice_reference)
    fn(dst_k, dst_v, src, n_tokens=n_tokens, anchor_len=anchor_len, bits=bits, group=group, src_start=src_start,
       dst_start=dst_start, length=length, delta=delta, inv_freq=inv_freq, interleaved=interleaved)
