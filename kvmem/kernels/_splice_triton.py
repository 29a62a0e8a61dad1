"""The Triton splice kernel (imported lazily by kernels/splice.py: importing kvmem never imports Triton).

One program per (cube, layer, head, block of tokens), on one flat grid. Each program reads a [BLOCK_T, head_dim]
tile of keys and values from its cube's layer (found through a table of data pointers, so N cubes need no gather copy),
rotates the keys by the cube's delta with precomputed cos/sin of that layer's own frequencies (a zero row leaves
a NoPE layer's keys as they are), casts, and writes the tile into dst.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .rotation import rotation_tables


@triton.jit
def _splice_kernel(meta_ptr, typed_src, dst_k, dst_v, table_ptr,
                   n_cubes, n_layers, n_heads, t_dst, n_blocks,
                   D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   HALF: tl.constexpr, ROT: tl.constexpr, SPLIT: tl.constexpr, INTERLEAVED: tl.constexpr,
                   BLOCK_T: tl.constexpr):
    # one flat grid (no per-axis launch limit): token blocks vary fastest, then heads, layers, cubes
    pid = tl.program_id(0).to(tl.int64)
    tb = pid % n_blocks
    rest = pid // n_blocks
    h = rest % n_heads
    layer = (rest // n_heads) % n_layers
    c = rest // (n_heads * n_layers)
    # meta: [k pointers (cubes * layers) | v pointers (cubes * layers) | src_start | dst_start | length | src_len]
    ints = meta_ptr + 2 * n_cubes * n_layers
    src_start = tl.load(ints + c)
    dst_start = tl.load(ints + n_cubes + c)
    length = tl.load(ints + 2 * n_cubes + c)
    src_len = tl.load(ints + 3 * n_cubes + c)
    k_src = tl.load(meta_ptr + c * n_layers + layer).to(typed_src.dtype, bitcast=True)
    v_src = tl.load(meta_ptr + n_cubes * n_layers + c * n_layers + layer).to(typed_src.dtype, bitcast=True)

    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)     # [BLOCK_T] token index within the copied range
    in_range = t < length
    src_row = h * src_len + src_start + t        # int64 throughout: pid is, and so is every product with it
    dst_row = (layer * n_heads + h) * t_dst + dst_start + t
    table = (c * n_layers + layer) * HALF        # this cube's and layer's row of the [cubes, layers, HALF] tables
    sin_ptr = table_ptr + n_cubes * n_layers * HALF  # table: [cos | sin], each [cubes, layers, HALF]

    if SPLIT:
        # NeoX halves over the whole head (Llama, Qwen, Mistral, Gemma...): two contiguous half-width tiles, so
        # every load and store is a plain vectorised row segment, and each key is read once
        f = tl.arange(0, HALF)
        cos = tl.load(table_ptr + table + f)[None, :]
        sin = tl.load(sin_ptr + table + f)[None, :]
        m = in_range[:, None]
        src = k_src + src_row[:, None] * D + f[None, :]
        x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
        out = dst_k + dst_row[:, None] * D + f[None, :]
        tl.store(out, (x1 * cos - x2 * sin).to(dst_k.dtype.element_ty), mask=m)
        tl.store(out + HALF, (x2 * cos + x1 * sin).to(dst_k.dtype.element_ty), mask=m)
    else:
        # any layout: y[d] = x[d] * cos[f(d)] + sign(d) * x[partner(d)] * sin[f(d)] on the first 2*HALF dims
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
        rot = d < ROT                            # the rotary dims (none for NoPE: then an exact copy)
        cos = tl.load(table_ptr + table + f, mask=rot, other=1.0)
        sin = tl.load(sin_ptr + table + f, mask=rot, other=0.0)
        x = tl.load(k_src + src_row[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
        xp = tl.load(k_src + src_row[:, None] * D + partner[None, :], mask=mask & rot[None, :],
                     other=0.0).to(tl.float32)
        y = x * cos[None, :] + sign[None, :] * xp * sin[None, :]
        tl.store(dst_k + dst_row[:, None] * D + d[None, :], y.to(dst_k.dtype.element_ty), mask=mask)

    dv = tl.arange(0, BLOCK_DV)                  # values have their own width (MLA)
    mask_v = in_range[:, None] & (dv < DV)[None, :]
    v = tl.load(v_src + src_row[:, None] * DV + dv[None, :], mask=mask_v, other=0.0)
    tl.store(dst_v + dst_row[:, None] * DV + dv[None, :], v.to(dst_v.dtype.element_ty), mask=mask_v)


def launch(dst_k, dst_v, src_k, src_v, *, src_start, dst_start, length, delta, inv_freq, interleaved, block_t,
           num_warps=None):
    device = dst_k.device
    n_layers, n_heads, t_dst, dim = dst_k.shape
    dim_v = dst_v.shape[3]
    dtypes = {t.dtype for cube in (*src_k, *src_v) for t in cube}
    if len(dtypes) != 1:
        raise ValueError(f"splice_triton needs all sources in one dtype, got {sorted(map(str, dtypes))}")
    for cube in (*src_k, *src_v):
        for t in cube:
            if t.device != device or not t.is_contiguous():
                raise ValueError("splice_triton needs contiguous sources on the destination's device")
    if not (dst_k.is_contiguous() and dst_v.is_contiguous()):
        raise ValueError("splice_triton needs contiguous dst_k/dst_v")
    freq = inv_freq.reshape(1, -1).expand(n_layers, -1) if inv_freq.dim() == 1 else inv_freq
    half = freq.shape[-1]
    n_cubes, max_len = len(src_k), max(list(length) + [0])
    if max_len == 0:
        return
    split = not interleaved and half > 0 and 2 * half == dim and half == triton.next_power_of_2(half)
    n_blocks = triton.cdiv(max_len, block_t)
    grid = (n_cubes * n_layers * n_heads * n_blocks,)
    # Triton launches on the current device's current stream: make dst's device current, so the kernel and the
    # copies below run there, in order, also when the model lives on another GPU than the current one
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if half == 0:  # no rotary dims: valid pointers for the (masked-off) table loads
            table = torch.zeros(2 * n_cubes * n_layers, device=device)
        else:  # [cos | sin], each [cubes, layers, half]: computed where inv_freq lives, sent in at most one copy
            cos, sin = rotation_tables(delta, freq)
            table = torch.cat([cos.reshape(-1), sin.reshape(-1)]).to(device, non_blocking=True)
        # one host->device copy of the integers (pointers and ranges)
        meta = [t.data_ptr() for cube in src_k for t in cube] + [t.data_ptr() for cube in src_v for t in cube]
        meta += [*src_start, *dst_start, *length, *(cube[0].shape[1] for cube in src_k)]
        meta = torch.tensor(meta, dtype=torch.int64).to(device, non_blocking=True)
        _splice_kernel[grid](meta, src_k[0][0], dst_k, dst_v, table,
                             n_cubes, n_layers, n_heads, t_dst, n_blocks,
                             D=dim, DV=dim_v, BLOCK_D=triton.next_power_of_2(dim),
                             BLOCK_DV=triton.next_power_of_2(dim_v), HALF=max(half, 1), ROT=2 * half, SPLIT=split,
                             INTERLEAVED=interleaved, BLOCK_T=block_t,
                             **({"num_warps": num_warps} if num_warps else {}))
