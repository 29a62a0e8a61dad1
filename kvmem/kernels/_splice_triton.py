"""The Triton splice kernel (imported lazily by kernels/splice.py: importing kvmem never imports Triton).

One program per (cube, layer, head, block of tokens). Each program reads a [BLOCK_T, head_dim] tile of keys
and values from its cube's layer (found through a table of data pointers, so N cubes need no gather copy),
rotates the keys by the cube's delta with precomputed cos/sin of that layer's own frequencies (a zero row leaves
a NoPE layer's keys as they are), casts, and writes the tile into dst.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rotation import rotation_tables


@triton.jit
def _splice_kernel(k_ptrs, v_ptrs, typed_src, dst_k, dst_v, cos_ptr, sin_ptr,
                   src_start_ptr, dst_start_ptr, length_ptr, src_len_ptr,
                   n_layers, n_heads, t_dst,
                   D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, HALF: tl.constexpr,
                   INTERLEAVED: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0)                       # over cubes * layers * heads
    tb = tl.program_id(1)                        # token block
    h = pid % n_heads
    layer = (pid // n_heads) % n_layers
    c = pid // (n_heads * n_layers)
    length = tl.load(length_ptr + c)
    src_start = tl.load(src_start_ptr + c)
    dst_start = tl.load(dst_start_ptr + c)
    src_len = tl.load(src_len_ptr + c)
    k_src = tl.load(k_ptrs + c * n_layers + layer).to(typed_src.dtype, bitcast=True)
    v_src = tl.load(v_ptrs + c * n_layers + layer).to(typed_src.dtype, bitcast=True)

    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)     # [BLOCK_T] token index within the copied range
    d = tl.arange(0, BLOCK_D)                    # [BLOCK_D] feature index
    mask = (t < length)[:, None] & (d < D)[None, :]
    src_row = (h * src_len + src_start + t).to(tl.int64)
    dst_row = ((layer * n_heads + h) * t_dst + dst_start + t).to(tl.int64)

    # rotation: y[d] = x[d] * cos[f(d)] + sign(d) * x[partner(d)] * sin[f(d)] on the first 2*HALF dims
    if INTERLEAVED:
        partner = d ^ 1
        sign = tl.where(d % 2 == 0, -1.0, 1.0)
        f = d // 2
    else:
        partner = tl.where(d < HALF, d + HALF, d - HALF)
        sign = tl.where(d < HALF, -1.0, 1.0)
        f = d % HALF
    rot = d < 2 * HALF
    table = (c * n_layers + layer) * HALF         # this cube's and layer's row of the [N, layers, HALF] tables
    cos = tl.load(cos_ptr + table + f, mask=rot, other=1.0)
    sin = tl.load(sin_ptr + table + f, mask=rot, other=0.0)

    x = tl.load(k_src + src_row[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(k_src + src_row[:, None] * D + partner[None, :], mask=mask & rot[None, :], other=0.0).to(tl.float32)
    y = x * cos[None, :] + sign[None, :] * xp * sin[None, :]
    tl.store(dst_k + dst_row[:, None] * D + d[None, :], y.to(dst_k.dtype.element_ty), mask=mask)

    mask_v = (t < length)[:, None] & (d < DV)[None, :]  # values have their own width (MLA)
    v = tl.load(v_src + src_row[:, None] * DV + d[None, :], mask=mask_v, other=0.0)
    tl.store(dst_v + dst_row[:, None] * DV + d[None, :], v.to(dst_v.dtype.element_ty), mask=mask_v)


def launch(dst_k, dst_v, src_k, src_v, *, src_start, dst_start, length, delta, inv_freq, interleaved, block_t):
    device = dst_k.device
    n_layers, n_heads, t_dst, dim = dst_k.shape
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
    cos, sin = rotation_tables(delta, freq, device)  # [N, layers, half]
    if half == 0:  # no rotary dims: keep valid pointers for the (masked-off) loads
        cos, sin = torch.ones(len(delta), n_layers, 1, device=device), torch.zeros(len(delta), n_layers, 1, device=device)
    cos, sin = cos.contiguous(), sin.contiguous()
    k_ptrs = torch.tensor([t.data_ptr() for cube in src_k for t in cube], dtype=torch.int64, device=device)
    v_ptrs = torch.tensor([t.data_ptr() for cube in src_v for t in cube], dtype=torch.int64, device=device)
    ints = lambda xs: torch.tensor(list(xs), dtype=torch.int64, device=device)  # noqa: E731
    src_len = ints(cube[0].shape[1] for cube in src_k)
    n_cubes, max_len = len(src_k), max(list(length) + [1])
    grid = (n_cubes * n_layers * n_heads, triton.cdiv(max_len, block_t))
    _splice_kernel[grid](k_ptrs, v_ptrs, src_k[0][0], dst_k, dst_v, cos, sin,
                         ints(src_start), ints(dst_start), ints(length), src_len,
                         n_layers, n_heads, t_dst,
                         D=dim, DV=dst_v.shape[3], BLOCK_D=triton.next_power_of_2(max(dim, dst_v.shape[3])),
                         HALF=half,
                         INTERLEAVED=interleaved, BLOCK_T=block_t)
