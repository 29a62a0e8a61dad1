"""Which keys a forward's queries see, known on the host: kvmem_sdpa's mask builder, so that the attention reads
no mask values on the GPU path.

`kvmem.model.attention.Visible` needs, per forward, how far any query sees (``end``: a static cache's unused room
is not read) and how many leading keys every query sees (``full``: a decode step over what it sees needs no mask,
and on CUDA then runs the flash kernels). Read from the mask's values, that costs a device->host synchronisation
per forward on a GPU (the host waits for the queued work, and a CUDA graph cannot be captured around it). Where the
mask is the plain causal one with no padding, both follow from numbers the host already holds: the query's length,
the mask's length and offset, and the cache length the queries start at. `visible_mask` (registered as
kvmem_sdpa's mask builder) builds the same mask transformers' `sdpa_mask` builds and notes those facts beside it;
`Visible.of` takes them instead of reading the mask.

The cache length is a host int for kvmem's growing cache (a DynamicCache). A StaticCache keeps it in a device
tensor (``cumulative_length``, so compiled graphs need no recompiling); kvmem's static prefix cache
(`kvmem.model.static_cache.PrefixStaticCache`) keeps a host copy beside it, advanced at each eager update, and
`host_offset` trusts that copy only while the tensor is the same object at the version it recorded (any other
in-place change, ``crop``, ``reset`` or a compiled call, makes it unknown: the values are then read, as before).

Where the host does not know (a 2D ``attention_mask`` whose values may pad; sliding-window or chunked masks;
another cache type), nothing is noted and `Visible.of` reads the mask: free on the CPU, one synchronisation per
forward on a GPU (docs/gpu-path.md lists where).
"""

from __future__ import annotations

import weakref

import torch
from transformers.masking_utils import causal_mask_function, sdpa_mask

_NOTED: list[tuple] = []  # (weakref to a mask, its _version, end, full): the last few masks built (one per layer type)


def host_offset(q_offset) -> int | None:
    """The position of a forward's first query as a host int: ``q_offset`` itself when transformers passes an int,
    the host copy a `PrefixStaticCache` keeps of its device counter when that is still exact, else None."""
    if isinstance(q_offset, int) and not isinstance(q_offset, bool):
        return q_offset
    if not isinstance(q_offset, torch.Tensor):
        return None
    tag = getattr(q_offset, "_kvmem_host", None)  # (weakref to the cache, layer index), set where it was filled
    cache = tag[0]() if tag is not None else None
    return None if cache is None else cache.host_length(tag[1], q_offset)


def visible_mask(**kwargs) -> torch.Tensor | None:
    """transformers' `sdpa_mask` (same keyword arguments, same mask: [batch, 1, q_length, kv_length] bool, or None
    where sdpa's causal flag does), with its visibility noted for `noted` where the host knows it: a plain causal
    mask, no padding mask, a query offset known on the host. The known offset is passed on as an int, so
    transformers' own skip test reads no device tensor either. transformers versions whose builder takes other
    arguments (``cache_position`` before ``q_offset``) get `sdpa_mask` unchanged."""
    offset = None
    if "q_length" in kwargs and not torch.compiler.is_compiling():
        offset = host_offset(kwargs.get("q_offset", 0))
    if offset is None:
        return sdpa_mask(**kwargs)
    mask = sdpa_mask(**{**kwargs, "q_offset": offset})
    q_length, kv_length, kv_offset = kwargs["q_length"], kwargs["kv_length"], kwargs.get("kv_offset", 0)
    if (mask is not None and kwargs.get("attention_mask") is None and kwargs.get("local_size") is None
            and kwargs.get("mask_function", causal_mask_function) is causal_mask_function
            and isinstance(kv_offset, int)):
        # query i sits at offset + i and sees key j (at kv_offset + j) when kv_offset + j <= offset + i
        end = min(max(offset + q_length - kv_offset, 0), kv_length)
        full = min(max(offset + 1 - kv_offset, 0), end)
        version = None if mask.is_inference() else mask._version  # an in-place edit after this is not noted
        _NOTED[:] = [(weakref.ref(mask), version, end, full)] + [e for e in _NOTED if e[0]() is not None][:3]
    return mask


def noted(mask: torch.Tensor) -> tuple[int, int] | None:
    """(end, full) `visible_mask` noted for this very mask object, or None (then the mask must be read).
    By identity, never by value: an entry is dropped with its mask, so a new mask never inherits one; a mask edited
    in place since (its version moved; inference tensors, as transformers builds masks there, cannot be) is read."""
    for ref, version, end, full in _NOTED:
        if ref() is mask and (version is None or mask._version == version):
            return end, full
    return None
