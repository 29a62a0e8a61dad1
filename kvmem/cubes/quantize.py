"""Quantize a cube's KV to int8 or int4 (KIVI-style): keys per channel over groups of tokens, values per token.

Keys after RoPE carry a few channels of large magnitude whatever the token (outlier channels), so their scale is
per channel, shared by a group of ``KEY_GROUP`` tokens; values have no such channels, and one scale per token and
head serves them (KIVI, Liu et al. 2024). Both are asymmetric, ``x = q * scale + min`` with a float16 scale and
min: symmetric scales measured worse (bench/README.md, "Quantized cubes": the design study). Key groups restart
where the memory starts, so the anchor (an attention sink, with outlier keys) never shares a scale with the
memory, and a later cube of a composition, whose anchor is skipped, starts on a group boundary.
kvmem.kernels.dequant_splice documents the packed layout and reads it: `kvmem.prefill` dequantizes inside the
splice, never into a full-width copy first.

Every quantized cube carries its measured error (kvmem.cubes.quant_error): `quantization_meta`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.dequant_splice import dequantize, key_groups
from .quant_error import measure_error

Tensor = torch.Tensor
SCHEMES = {"int8": 8, "int4": 4}  # name -> bits
KEY_GROUP = 32                    # tokens per key scale (see the module docstring)
# the file's tensors of one layer i: "<name>.<i>", in PackedLayer's field order
PACKED_NAMES = ("k_q", "k_scale", "k_min", "v_q", "v_scale", "v_min")


@dataclass(frozen=True)
class PackedLayer:
    """One layer's packed KV (shapes: kvmem.kernels.dequant_splice)."""

    k_q: Tensor
    k_scale: Tensor
    k_min: Tensor
    v_q: Tensor
    v_scale: Tensor
    v_min: Tensor

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.k_q, self.k_scale, self.k_min, self.v_q, self.v_scale, self.v_min)

    def to(self, device) -> PackedLayer:
        return PackedLayer(*(t.to(device) for t in self.tensors()))

    def pin_memory(self) -> PackedLayer:
        return PackedLayer(*(t.pin_memory() for t in self.tensors()))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _fit(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """float16 (scale, min) that map [lo, hi] onto levels 0 .. 2**bits - 1 (a zero range gets scale 0: the
    level is 0 and min is the value)."""
    low = lo.to(torch.float16)
    # the top level must reach hi from the float16-rounded min: fit the scale to what is really stored
    scale = ((hi - low.float()) / (2 ** bits - 1)).clamp_min(0)
    scale = scale.to(torch.float16)
    # float16 may round the scale down so the top level falls short of hi by a rounding step: nudge it up
    short = low.float() + scale.float() * (2 ** bits - 1) < hi
    scale = torch.where(short, torch.nextafter(scale, torch.tensor(float("inf"), dtype=torch.float16)), scale)
    return scale, low


def _levels(x: Tensor, scale: Tensor, low: Tensor, bits: int) -> Tensor:
    s = scale.float()
    q = torch.where(s > 0, (x - low.float()) / torch.where(s > 0, s, 1), 0)
    return q.round().clamp(0, 2 ** bits - 1).to(torch.uint8)


def _pack(q: Tensor, bits: int) -> Tensor:
    """Levels uint8 [H, T, D] -> packed [H, T, D] (8 bits) or [H, ceil(T / 2), D] (4 bits, low nibble first)."""
    if bits == 8:
        return q.contiguous()
    if q.shape[1] % 2:
        q = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def quantize_layer(k: Tensor, v: Tensor, *, bits: int, anchor_len: int, group: int = KEY_GROUP) -> PackedLayer:
    """Pack one layer's keys [H, T, D] and values [H, T, DV] (any float dtype) to ``bits`` levels."""
    heads, n, dim = k.shape
    k32, v32 = k.float(), v.float()
    # key groups: the anchor's tokens in groups of `group`, then the memory's; a short last group is padded with
    # its own last token (a repeat never widens a group's range)
    levels, scales, mins = [], [], []
    for start, stop in ((0, anchor_len), (anchor_len, n)):
        if stop == start:
            continue
        seg = k32[:, start:stop]
        pad = (-(stop - start)) % group
        seg = torch.cat([seg, seg[:, -1:].expand(-1, pad, -1)], dim=1) if pad else seg
        seg = seg.reshape(heads, -1, group, dim)                          # [H, groups, group, D]
        scale, low = _fit(seg.amin(2), seg.amax(2), bits)                 # [H, groups, D]
        levels.append(_levels(seg, scale[:, :, None], low[:, :, None], bits).reshape(heads, -1, dim)[:, :stop - start])
        scales.append(scale)
        mins.append(low)
    k_q, k_scale, k_min = (torch.cat(x, dim=1) for x in (levels, scales, mins))
    v_scale, v_min = _fit(v32.amin(2, keepdim=True), v32.amax(2, keepdim=True), bits)  # [H, T, 1]
    v_q = _levels(v32, v_scale, v_min, bits)
    return PackedLayer(_pack(k_q, bits), k_scale.contiguous(), k_min.contiguous(), _pack(v_q, bits),
                       v_scale.contiguous(), v_min.contiguous())


def dequantize_layer(layer: PackedLayer, *, bits: int, n_tokens: int, anchor_len: int, dtype: torch.dtype,
                     group: int = KEY_GROUP) -> tuple[Tensor, Tensor]:
    """Keys and values [H, n_tokens, D] of a packed layer, in ``dtype`` (kvmem.kernels' reference)."""
    return dequantize(layer.tensors(), bits=bits, group=group, n_tokens=n_tokens, anchor_len=anchor_len, dtype=dtype)


def quantize_kv(kv, *, scheme: str, anchor_len: int) -> list[PackedLayer]:
    """Per layer (keys, values) [H, T, D] -> per layer a PackedLayer of ``scheme`` ("int8" or "int4")."""
    return [quantize_layer(k, v, bits=SCHEMES[scheme], anchor_len=anchor_len) for k, v in kv]


def dequantize_kv(packed, *, scheme: str, n_tokens: int, anchor_len: int, dtype: torch.dtype):
    """Per layer (keys, values) [H, n_tokens, D] in ``dtype``, dequantized from ``packed`` (a full-width copy)."""
    return [dequantize_layer(layer, bits=SCHEMES[scheme], n_tokens=n_tokens, anchor_len=anchor_len, dtype=dtype)
            for layer in packed]


def packed_tensors(packed) -> dict[str, Tensor]:
    """The file's tensors of ``packed``: ``"k_q.0"``, ``"k_scale.0"``, ... (PACKED_NAMES per layer)."""
    return {f"{name}.{i}": t for i, layer in enumerate(packed) for name, t in zip(PACKED_NAMES, layer.tensors())}


def quantization_meta(model, kv, packed, ids: Tensor, *, scheme: str, anchor_len: int, dtype: torch.dtype,
                      device) -> dict:
    """What a quantized cube records: scheme, layout, bytes, and the error measured with ``model`` against the
    full-width ``kv`` (kvmem.cubes.quant_error)."""
    exact = [(k.to(device, dtype), v.to(device, dtype)) for k, v in kv]
    approx = dequantize_kv([layer.to(device) for layer in packed], scheme=scheme, n_tokens=ids.numel(),
                           anchor_len=anchor_len, dtype=dtype)
    full = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
    small = sum(layer.nbytes for layer in packed)
    return {
        "scheme": scheme,
        "bits": SCHEMES[scheme],
        "key_group": KEY_GROUP,
        "layout": "keys: per channel over token groups; values: per token; asymmetric, float16 scale and min",
        "bytes": small,
        "full_bytes": full,
        "full_dtype": str(dtype),
        "error": measure_error(model, exact, approx, ids, anchor_len=anchor_len),
    }


def check_packed(quantization, tensors: dict[str, Tensor], shapes, *, anchor_len: int, bad) -> list[PackedLayer]:
    """The packed layers of a loaded file, checked against its metadata (``shapes``: per layer [[H, T, D],
    [H, T, DV]], already checked to be ints); ``bad(why)`` makes the CubeError. Scales and minimums must be finite
    and scales >= 0: a forged file must not put inf or NaN into a cache."""
    try:
        scheme, group = quantization["scheme"], quantization["key_group"]
        bits = SCHEMES[scheme]
        if quantization["bits"] != bits or group != KEY_GROUP or isinstance(group, bool):
            raise ValueError(f"bits {quantization['bits']!r}, key_group {group!r}")
        if not isinstance(quantization.get("error"), dict):
            raise TypeError("error")
    except (KeyError, TypeError, ValueError) as exc:
        raise bad(f"its quantization metadata lacks or garbles {exc}") from None
    layers = []
    for i, ((h, t, d), (hv, tv, dv)) in enumerate(shapes):
        rows = t if bits == 8 else (t + 1) // 2
        groups = key_groups(t, anchor_len, group) if 0 <= anchor_len <= t else -1
        want = {"k_q": (torch.uint8, (h, rows, d)), "k_scale": (torch.float16, (h, groups, d)),
                "k_min": (torch.float16, (h, groups, d)), "v_q": (torch.uint8, (hv, rows, dv)),
                "v_scale": (torch.float16, (hv, tv, 1)), "v_min": (torch.float16, (hv, tv, 1))}
        if t != tv or h != hv:
            raise bad(f"kv_shapes of layer {i} give keys and values different token or head counts")
        layer = []
        for name, (dtype, shape) in want.items():
            x = tensors[f"{name}.{i}"]
            if x.dtype != dtype or tuple(x.shape) != shape:
                raise bad(f"{name}.{i} is {x.dtype} {tuple(x.shape)}, the metadata ({scheme}) says {dtype} {shape}")
            if dtype == torch.float16 and not (torch.isfinite(x).all() and (name.endswith("min") or (x >= 0).all())):
                raise bad(f"{name}.{i} holds a value that is not finite{'' if name.endswith('min') else ' or < 0'}")
            layer.append(x)
        layers.append(PackedLayer(*layer))
    return layers
