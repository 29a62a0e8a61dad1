"""The Triton dequantizing splice kernel (imported lazily by kernels/dequant_splice.py).

One program per (cube, layer, head, block of tokens) on one flat grid, as in _splice_triton.py. Each program
reads a [BLOCK_T, head_dim] tile of packed key and value levels (uint8; two tokens a byte for 4 bits) with their
float16 scales and minimums, dequantizes in float32, rotates the keys by the cube's delta and writes dst's dtype:
only the packed bytes cross memory on their way into the cache.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .rotation import rotation_tables


@triton.jit
def _keys(q_ptr, s_ptr, m_ptr, qrow, grow, shift, col, mask, D: tl.constexpr, BITS: tl.constexpr):
    """Dequantized keys [BLOCK_T, len(col)] float32: levels at [qrow, col], scale/min at [grow, col]."""
    q = tl.load(q_ptr + qrow[:, None] * D + col[None, :], mask=mask, other=0).to(tl.int32)
    if BITS == 4:
        q = (q >> shift[:, None]) & 15
    s = tl.load(s_ptr + grow[:, None] * D + col[None, :], mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + grow[:, None] * D + col[None, :], mask=mask, other=0.0).to(tl.float32)
    return q.to(tl.float32) * s + m


@triton.jit
def _dequant_splice_kernel(meta_ptr, q_typed, s_typed, dst_k, dst_v, table_ptr,
                           n_cubes, n_layers, n_heads, t_dst, n_blocks,
                           D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                           HALF: tl.constexpr, ROT: tl.constexpr, SPLIT: tl.constexpr, INTERLEAVED: tl.constexpr,
                           BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    tb = pid % n_blocks
    rest = pid // n_blocks
    h = rest % n_heads
    layer = (rest // n_heads) % n_layers
    c = rest // (n_heads * n_layers)
    # meta: 6 pointer tables [k_q | k_scale | k_min | v_q | v_scale | v_min], each [cubes * layers], then
    # src_start | dst_start | length | n_tokens | anchor_len, each [cubes]
    p = n_cubes * n_layers
    at = c * n_layers + layer
    kq = tl.load(meta_ptr + at).to(q_typed.dtype, bitcast=True)
    ks = tl.load(meta_ptr + p + at).to(s_typed.dtype, bitcast=True)
    km = tl.load(meta_ptr + 2 * p + at).to(s_typed.dtype, bitcast=True)
    vq = tl.load(meta_ptr + 3 * p + at).to(q_typed.dtype, bitcast=True)
    vs = tl.load(meta_ptr + 4 * p + at).to(s_typed.dtype, bitcast=True)
    vm = tl.load(meta_ptr + 5 * p + at).to(s_typed.dtype, bitcast=True)
    ints = meta_ptr + 6 * p
    src_start = tl.load(ints + c)
    dst_start = tl.load(ints + n_cubes + c)
    length = tl.load(ints + 2 * n_cubes + c)
    n_tok = tl.load(ints + 3 * n_cubes + c)
    anchor = tl.load(ints + 4 * n_cubes + c)

    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)     # [BLOCK_T] token index within the copied range
    in_range = t < length
    s = src_start + t                            # token index within the cube (int64, as pid)
    if BITS == 4:                                # tokens 2i, 2i + 1 share a byte row, 2i in the low nibble
        qrow = h * ((n_tok + 1) // 2) + s // 2
        shift = (s % 2) * 4
    else:
        qrow = h * n_tok + s
        shift = s * 0
    a_groups = (anchor + GROUP - 1) // GROUP     # key groups restart where the memory starts
    n_groups = a_groups + (n_tok - anchor + GROUP - 1) // GROUP
    grow = h * n_groups + tl.where(s < anchor, s // GROUP, a_groups + (s - anchor) // GROUP)
    dst_row = (layer * n_heads + h) * t_dst + dst_start + t
    table = (c * n_layers + layer) * HALF
    sin_ptr = table_ptr + n_cubes * n_layers * HALF

    if SPLIT:  # NeoX halves over the whole head: two half-width tiles, each key read once
        f = tl.arange(0, HALF)
        cos = tl.load(table_ptr + table + f)[None, :]
        sin = tl.load(sin_ptr + table + f)[None, :]
        m = in_range[:, None]
        x1 = _keys(kq, ks, km, qrow, grow, shift, f, m, D, BITS)
        x2 = _keys(kq, ks, km, qrow, grow, shift, f + HALF, m, D, BITS)
        out = dst_k + dst_row[:, None] * D + f[None, :]
        tl.store(out, (x1 * cos - x2 * sin).to(dst_k.dtype.element_ty), mask=m)
        tl.store(out + HALF, (x2 * cos + x1 * sin).to(dst_k.dtype.element_ty), mask=m)
    else:  # any layout: y[d] = x[d] * cos[f(d)] + sign(d) * x[partner(d)] * sin[f(d)] on the rotary dims
        d = tl.arange(0, BLOCK_D)
        mask = in_range[:, None] & (d < D)[None, :]
        if INTERLEAVED:
            partner = d ^ 1
            sign = tl.where(d % 2 == 0, -1.0, 1.0)
            f = d // 2
        else:
            partner = tl.where(d < HALF, d + HALF, d - HALF)
            sign = tl.where(d < HALF, -1.0, 1.0)
            f = d % HALF
        rot = d < ROT
        cos = tl.load(table_ptr + table + f, mask=rot, other=1.0)
        sin = tl.load(sin_ptr + table + f, mask=rot, other=0.0)
        x = _keys(kq, ks, km, qrow, grow, shift, d, mask, D, BITS)
        xp = _keys(kq, ks, km, qrow, grow, shift, partner, mask & rot[None, :], D, BITS)
        y = x * cos[None, :] + sign[None, :] * xp * sin[None, :]
        tl.store(dst_k + dst_row[:, None] * D + d[None, :], y.to(dst_k.dtype.element_ty), mask=mask)

    dv = tl.arange(0, BLOCK_DV)                  # values: one scale and min per token
    mask_v = in_range[:, None] & (dv < DV)[None, :]
    q = tl.load(vq + qrow[:, None] * DV + dv[None, :], mask=mask_v, other=0).to(tl.int32)
    if BITS == 4:
        q = (q >> shift[:, None]) & 15
    vrow = h * n_tok + s
    scale = tl.load(vs + vrow, mask=in_range, other=0.0).to(tl.float32)
    low = tl.load(vm + vrow, mask=in_range, other=0.0).to(tl.float32)
    v = q.to(tl.float32) * scale[:, None] + low[:, None]
    tl.store(dst_v + dst_row[:, None] * DV + dv[None, :], v.to(dst_v.dtype.element_ty), mask=mask_v)


def launch(dst_k, dst_v, src, *, n_tokens, anchor_len, bits, group, src_start, dst_start, length, delta, inv_freq,
           interleaved, block_t, num_warps=None):
    device = dst_k.device
    n_layers, n_heads, t_dst, dim = dst_k.shape
    dim_v = dst_v.shape[3]
    for cube in src:
        for layer in cube:
            for t in layer:
                if t.device != device or not t.is_contiguous():
                    raise ValueError("dequant_splice_triton needs contiguous sources on the destination's device")
            if layer[1].dtype != torch.float16 or {x.dtype for x in layer[1:3] + layer[4:]} != {torch.float16}:
                raise ValueError("dequant_splice_triton needs float16 scales and minimums")
    if not (dst_k.is_contiguous() and dst_v.is_contiguous()):
        raise ValueError("dequant_splice_triton needs contiguous dst_k/dst_v")
    freq = inv_freq.reshape(1, -1).expand(n_layers, -1) if inv_freq.dim() == 1 else inv_freq
    half = freq.shape[-1]
    n_cubes, max_len = len(src), max(list(length) + [0])
    if max_len == 0:
        return
    split = not interleaved and half > 0 and 2 * half == dim and half == triton.next_power_of_2(half)
    n_blocks = triton.cdiv(max_len, block_t)
    grid = (n_cubes * n_layers * n_heads * n_blocks,)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if half == 0:
            table = torch.zeros(2 * n_cubes * n_layers, device=device)
        else:
            cos, sin = rotation_tables(delta, freq)
            table = torch.cat([cos.reshape(-1), sin.reshape(-1)]).to(device, non_blocking=True)
        meta = [layer[j].data_ptr() for j in range(6) for cube in src for layer in cube]
        meta += [*src_start, *dst_start, *length, *n_tokens, *anchor_len]
        meta = torch.tensor(meta, dtype=torch.int64).to(device, non_blocking=True)
        _dequant_splice_kernel[grid](meta, src[0][0][0], src[0][0][1], dst_k, dst_v, table,
                                     n_cubes, n_layers, n_heads, t_dst, n_blocks,
                                     D=dim, DV=dim_v, BLOCK_D=triton.next_power_of_2(dim),
                                     BLOCK_DV=triton.next_power_of_2(dim_v), HALF=max(half, 1), ROT=2 * half,
                                     SPLIT=split, INTERLEAVED=interleaved, BITS=bits, GROUP=group, BLOCK_T=block_t,
                                     **({"num_warps": num_warps} if num_warps else {}))
