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

from .rotation import rotation_tables
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
    arithmetic in float32, float64 for float64): `dequantize_into` fresh buffers."""
    k_q, _, _, v_q, _, _ = layer
    stop = n_tokens if stop is None else stop
    work = _work_dtype(dtype)
    k = torch.empty(k_q.shape[0], stop - start, k_q.shape[2], dtype=work, device=k_q.device)
    v = torch.empty(v_q.shape[0], stop - start, v_q.shape[2], dtype=work, device=k_q.device)
    dequantize_into(k, v, layer, bits=bits, group=group, n_tokens=n_tokens, anchor_len=anchor_len, start=start)
    return k.to(dtype), v.to(dtype)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _key_runs(start: int, stop: int, anchor_len: int, group: int):
    """Tokens [start, stop) as runs (a, b, g, n): tokens [a, b) are n key groups from group g on, whole groups
    (n >= 1) or the part of one group (n == 1), so each run's scales broadcast over a [n, (b - a) / n] view."""
    for seg0, seg1, base in ((0, anchor_len, 0), (anchor_len, stop, -(-anchor_len // group))):
        lo, hi = max(start, seg0), min(stop, seg1)
        while lo < hi:
            off, g = (lo - seg0) % group, base + (lo - seg0) // group
            if off == 0 and hi - lo >= group:
                n = (hi - lo) // group
                yield lo, lo + n * group, g, n
                lo += n * group
            else:
                b = min(hi, lo - off + group)
                yield lo, b, g, 1
                lo = b


def levels(q: Tensor, *, bits: int, start: int, stop: int) -> Tensor:
    """The levels uint8 [H, stop - start, D] of tokens [start, stop) of packed q: a view for 8 bits; for 4 bits
    only the bytes holding those tokens are unpacked."""
    if bits == 8:
        return q[:, start:stop]
    r0 = start // 2
    return unpack(q[:, r0:(stop + 1) // 2], bits=4, n_tokens=stop - 2 * r0)[:, start - 2 * r0:]


def dequantize_into(k: Tensor, v: Tensor, layer, *, bits: int, group: int, n_tokens: int, anchor_len: int,
                    start: int = 0) -> None:
    """k [H, n, D], v [H, n, DV] (float32 or float64, any strides: a cache slice) <- tokens [start, start + n) of
    one packed layer dequantized, ``q * scale + min`` in k's dtype. Written in place by one multiply-add that
    reads the uint8 levels and converts them on the fly: no temporary of k's size (on a CPU the cost is the
    memory traffic)."""
    k_q, k_scale, k_min, v_q, v_scale, v_min = layer
    n, work = k.shape[1], k.dtype
    q = levels(k_q, bits=bits, start=start, stop=start + n)
    # the key scales of a layer are 1 / group of its keys: converted whole, then broadcast over each run's view
    ks, km = k_scale.to(work), k_min.to(work)
    for a, b, g, m in _key_runs(start, start + n, anchor_len, group):
        out = k[:, a - start:b - start].unflatten(1, (m, -1))           # [H, m groups, tokens per group, D]
        torch.addcmul(km[:, g:g + m, None], q[:, a - start:b - start].unflatten(1, (m, -1)), ks[:, g:g + m, None],
                      out=out)
    q = levels(v_q, bits=bits, start=start, stop=start + n)
    torch.addcmul(v_min[:, start:start + n].to(work), q, v_scale[:, start:start + n].to(work), out=v)


def rotate_(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool) -> None:
    """`kvmem.kernels.rotation.rotate` in place on x [..., head_dim]: the same arithmetic in x's dtype, up to the
    rounding of a fused multiply-add (within an ulp: the oracle tests bound it); one temporary of a quarter of x."""
    rot = cos.shape[-1] * 2
    x1, x2 = (x[..., 0:rot:2], x[..., 1:rot:2]) if interleaved else (x[..., :rot // 2], x[..., rot // 2:rot])
    keep = x1.clone()
    x1.mul_(cos).addcmul_(x2, sin, value=-1)  # x1 cos - x2 sin
    x2.mul_(cos).addcmul_(keep, sin)          # x2 cos + x1 sin


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
    """Torch reference: per cube and layer, dequantize the copied tokens straight into dst's slices, rotate them
    there (`dequantize_into`, `rotate_`); the arithmetic in float32 (float64 for a float64 dst), so a dst of
    another dtype gets a float32 scratch per cube, cast on the way in."""
    _check(dst_k, dst_v, src, n_tokens, anchor_len, bits, group, src_start, dst_start, length, delta, inv_freq)
    work = _work_dtype(dst_k.dtype)
    cos, sin = rotation_tables(delta, per_layer(inv_freq, dst_k.shape[0]), dst_k.device)  # [N, layers, half]
    cos, sin = cos.to(work), sin.to(work)
    for c, cube in enumerate(src):
        s, d, n = src_start[c], dst_start[c], length[c]
        if n == 0:
            continue
        scratch = None if dst_k.dtype == work and dst_v.dtype == work else (
            torch.empty(dst_k.shape[1], n, dst_k.shape[3], dtype=work, device=dst_k.device),
            torch.empty(dst_v.shape[1], n, dst_v.shape[3], dtype=work, device=dst_k.device))
        for i, layer in enumerate(cube):
            layer = [x.to(dst_k.device) for x in layer]
            k, v = scratch or (dst_k[i, :, d:d + n], dst_v[i, :, d:d + n])
            dequantize_into(k, v, layer, bits=bits, group=group, n_tokens=n_tokens[c], anchor_len=anchor_len[c],
                            start=s)
            if delta[c]:
                rotate_(k, cos[c, i], sin[c, i], interleaved=interleaved)
            if scratch is not None:
                dst_k[i, :, d:d + n] = k
                dst_v[i, :, d:d + n] = v


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
