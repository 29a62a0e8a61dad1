"""Splice cubes of any storage into one destination buffer: full-width cubes through kvmem.kernels.splice,
quantized ones through kvmem.kernels.dequant_splice (packed bytes in, the model's dtype out, keys re-rotated in
the same launch). One launch per storage kind: a composition that mixes int8, int4 and full-width cubes costs
three launches, each over its own cubes' ranges of the one buffer.
"""

from __future__ import annotations

import torch

from ..cubes.memcube import MemCube
from ..cubes.quantize import KEY_GROUP, SCHEMES
from ..errors import CubeError
from ..kernels.dequant_splice import dequant_splice
from ..kernels.splice import splice


def splice_cubes(dst_k: torch.Tensor, dst_v: torch.Tensor, cubes: list[MemCube], *, src_start, dst_start, length,
                 delta, inv_freq: torch.Tensor, interleaved: bool, rotated_slot: str = "keys") -> None:
    """Write ``cubes`` into dst_k/dst_v [layers, kv_heads, T, dim] at the plan's ranges (kvmem.kernels.splice's
    arguments, one entry per cube), keys re-rotated by ``delta``. Sources are moved to dst's device first (their
    packed bytes, for quantized cubes)."""
    device = dst_k.device
    kinds: dict[str | None, list[int]] = {}
    for i, c in enumerate(cubes):
        kinds.setdefault(c.quantization["scheme"] if c.packed is not None else None, []).append(i)
    for scheme, idx in kinds.items():
        plan = {"inv_freq": inv_freq, "interleaved": interleaved}
        for key, values in (("src_start", src_start), ("dst_start", dst_start), ("length", length), ("delta", delta)):
            plan[key] = [values[i] for i in idx]
        if scheme is None:
            k_src = [[k.to(device).contiguous() for k, _ in cubes[i].kv] for i in idx]
            v_src = [[v.to(device).contiguous() for _, v in cubes[i].kv] for i in idx]
            slots = ((dst_k, k_src), (dst_v, v_src))
            if rotated_slot == "values":  # transformers' MLA caches the latent as keys, the rotated part as values
                slots = slots[::-1]
            (rot_dst, rot_src), (copy_dst, copy_src) = slots
            splice(rot_dst, copy_dst, rot_src, copy_src, **plan)
            continue
        if rotated_slot != "keys":
            raise CubeError(f"cube {cubes[idx[0]].name!r} is quantized, and this model caches its rotated part in "
                            "the value slot (MLA), which kvmem's quantized cubes do not cover: use full-width cubes")
        src = [[tuple(t.to(device).contiguous() for t in layer.tensors()) for layer in cubes[i].packed] for i in idx]
        dequant_splice(dst_k, dst_v, src, n_tokens=[cubes[i].all_ids.shape[1] for i in idx],
                       anchor_len=[cubes[i].anchor_len for i in idx], bits=SCHEMES[scheme], group=KEY_GROUP, **plan)


def dequantized_kv(cube: MemCube, *, device, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A quantized cube's KV on ``device`` in ``dtype``: per layer (keys, values) [kv_heads, T, dim], dequantized
    where it lands (on CUDA: one launch for all layers, the packed bytes are what moves)."""
    shapes = {(k[0], k[2], v[2]) for k, v in cube.kv_shapes}
    if len(shapes) != 1:  # layers of different widths cannot share a buffer: dequantize layer by layer
        return [(k.to(device), v.to(device)) for k, v in cube.to(device=device, dtype=dtype).kv]
    heads, dim, dim_v = next(iter(shapes))
    n = cube.all_ids.shape[1]
    layers = len(cube.kv_shapes)
    dst_k = torch.empty(layers, heads, n, dim, dtype=dtype, device=device)
    dst_v = torch.empty(layers, heads, n, dim_v, dtype=dtype, device=device)
    # no move: delta 0 and no rotary dims (the keys are where they were built)
    splice_cubes(dst_k, dst_v, [cube], src_start=[0], dst_start=[0], length=[n], delta=[0],
                 inv_freq=torch.zeros(0), interleaved=False)
    return [(dst_k[i], dst_v[i]) for i in range(layers)]


def quantized_report(cubes: list[MemCube]) -> list[dict]:
    """For each quantized cube among ``cubes``: its name, scheme and measured error (what `Prefix.quantized` and
    ``mm.last.quantized`` show: a quantized cube is approximate, and never silently)."""
    return [{"name": c.name, "scheme": q["scheme"], **q["error"]} for c in cubes if (q := c.quantization)]
