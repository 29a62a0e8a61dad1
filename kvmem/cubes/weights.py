"""The weights digest of a fingerprint: every element of every base weight hashed (xxh3-128) once, as held and
rounded to the 16-bit dtypes, and the checks that decide when a weight must be hashed again.

Two levels. Per request, `kvmem.model.watch` says in one pass over references whether anything changed (no weight
read); `fingerprint_fields` then takes the digests kept for the model's generation. After a change (a new
generation), `weights_digest` checks every weight: its identity and version, and a sample of its values (which
catches dense writes through ``.data`` such as PEFT's merge); only weights that changed are hashed again.
`verify_weights` hashes every weight now: the explicit full check, for writes no cheap check sees.
"""

from __future__ import annotations

import weakref

import torch
import xxhash

from ..errors import CubeError
from ..model.devices import DiskWeight, hooks, real_weight
from ..model.facts import base_model
from ..model.watch import mark_changed
from ..timing import one_thread

# Per weight tensor, this many evenly spaced elements are compared at every call against the values seen when
# the tensor was last hashed in full: a cheap watch for edits that do not bump ``tensor._version``.
_SAMPLES_PER_TENSOR = 2048
_CHUNK = 1 << 24          # elements hashed (and converted) per step: bounds the temporary copies
# canonical dtypes a checkpoint is compared in across dtypes (see `same_weights`)
_CANONICAL = {"bf16": torch.bfloat16, "fp16": torch.float16}



def _is_adapter_param(name: str) -> bool:
    return "lora_" in name or "modules_to_save" in name


def _sample_views(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """An evenly spaced sample of every tensor, as strided views of it (they see in-place edits of its storage)."""
    return [t.detach().reshape(-1)[::max(1, t.numel() // _SAMPLES_PER_TENSOR)][:_SAMPLES_PER_TENSOR]
            for t in tensors]


def _gather(views: list[torch.Tensor]) -> list[tuple[list[int], torch.Tensor]]:
    """The views' values as raw bytes on the CPU: one ``torch.cat`` per (device, dtype) and one device->host copy
    each (on a GPU a handful of kernels for a whole model, not one per weight). [(view indices, uint8 bytes)]."""
    groups = {}
    for i, v in enumerate(views):  # a model split across devices (device_map), or of mixed dtypes
        groups.setdefault((v.device, v.dtype), []).append(i)
    return [(idx, torch.cat([views[i] for i in idx]).cpu().view(torch.uint8)) for idx in groups.values()]


def _per_tensor(views: list[torch.Tensor], gathered: list[tuple[list[int], torch.Tensor]]) -> list[torch.Tensor]:
    """`_gather`'s bytes split back into one sample per view (in the views' order)."""
    out: list[torch.Tensor | None] = [None] * len(views)
    for idx, values in gathered:
        sizes = [views[i].numel() * views[i].element_size() for i in idx]
        for i, sample in zip(idx, torch.split(values, sizes)):
            out[i] = sample
    return out


def _samples(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """`_sample_views`' values per tensor, as raw bytes (uint8) on the CPU."""
    views = _sample_views(tensors)
    return _per_tensor(views, _gather(views))


def _quiet(fn, *args):
    """``fn(*args)`` on one thread: hundreds of tiny gathers, where a thread pool only adds barrier waits."""
    with one_thread():
        return fn(*args)


def _hash(*parts: bytes) -> str:
    h = xxhash.xxh3_128()
    for part in parts:
        h.update(part)
    return h.hexdigest()


def _bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor (viewing as uint8 works for dtypes numpy lacks, like bfloat16)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _full_digests(tensors: list[torch.Tensor]) -> list[dict[str, str | None]]:
    """xxh3-128 of every element of each tensor: as held ("exact"), and rounded to each canonical dtype (None
    where no comparison needs it: bfloat16 of a float16 tensor). In chunks of ``_CHUNK`` elements (no full-size
    temporary copy), on one thread: these conversions are memory-bound, and on a busy CPU a thread pool's
    barriers cost ten times the work itself (1 s vs 10 s for SmolLM2 at a load of 16 on 2 cores)."""
    with one_thread():
        return [_full_digest(t) for t in tensors]


def _full_digest(t: torch.Tensor) -> dict[str, str | None]:
    # A canonical dtype the tensor is held in (or any dtype, for an integer tensor) hashes the very bytes "exact"
    # hashes, so its digest is "exact"'s: one pass fewer over a bfloat16 or float16 model (a third of the work).
    same = {name: not t.is_floating_point() or t.dtype == dtype for name, dtype in _CANONICAL.items()}
    skip = {"bf16"} if t.dtype == torch.float16 else set()  # no comparison needs bfloat16 of a float16 tensor
    own = ["exact", *(name for name in _CANONICAL if not same[name] and name not in skip)]
    hashers = {name: xxhash.xxh3_128() for name in own}
    for held in t.detach().reshape(-1).split(_CHUNK):
        # rounded on the weight's own device (a GPU converts 16 GB in milliseconds, a CPU in tens of seconds),
        # then each piece hashed on the host; on a CPU the .to("cpu") copies nothing
        for name in own:
            hashers[name].update(_bytes(_host(held, name)))
    out = {name: h.hexdigest() for name, h in hashers.items()}
    for name in _CANONICAL:
        out[name] = None if name in skip else out["exact"] if same[name] else out[name]
    return out


def _host(held: torch.Tensor, name: str) -> torch.Tensor:
    """A piece of a weight as hashed under ``name``: as held ("exact") or rounded to that canonical dtype, on the
    host, contiguous."""
    piece = held if name == "exact" else held.to(_CANONICAL[name])
    return piece.to("cpu").contiguous()


def _tensor_key(t: torch.Tensor) -> tuple:
    """What identifies a tensor's values short of reading them: storage, place, layout and version counter."""
    try:
        version = t._version
    except RuntimeError:  # an inference-mode tensor: no version counter, and nothing outside that mode edits it
        version = None
    return (t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, str(t.device), version)


def _disk_digests(weight: DiskWeight) -> dict[str, str | None]:
    """A disk-offloaded weight's full digests: cached on its loader under the file's stat; hashed again (read
    through the loader) only when the stat moves, so the check reads no weight bytes otherwise."""
    cache = weight.loader.__dict__.setdefault("_kvmem_digests", {})
    stamp = weight.stamp()
    cached = cache.get(weight.key)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    digests = _full_digests([weight.read()])[0]
    cache[weight.key] = (stamp, digests)
    return digests



def _digests(tensors: list, samples: list | None = None) -> dict[str, str]:
    """Digests over every element of ``tensors`` ("exact" and one per canonical dtype), at a per-call cost of a
    sample, not of the model's size.

    Each tensor is hashed in full once; the digest is kept on the tensor with its key (storage pointer, shape,
    stride, dtype, device, ``_version``) and a sample of its values. It is hashed again when the key changes
    (a new tensor, ``.data = ...``, any in-place op through autograd's view: optimizers, ``no_grad`` edits) or
    when the sample differs (in-place edits through ``.data``, which leave ``_version`` as it was, e.g. PEFT's
    merge: they change nearly every element). What no cheap check sees is a ``.data`` edit of a few elements
    that all miss the sample; after such an edit, call `forget_digests` (or edit without ``.data``).
    A disk-offloaded weight (a `kvmem.model.devices.DiskWeight`) is hashed again when its file's stat changes (path, inode,
    size, modification time); nothing of it is read otherwise.
    """
    in_memory = [i for i, t in enumerate(tensors) if isinstance(t, torch.Tensor)]
    samples = dict(zip(in_memory, samples if samples is not None else _quiet(_samples, [tensors[i] for i in in_memory])))
    shapes = ";".join(f"{tuple(t.shape)}" for t in tensors)
    per, stale = [], []
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            per.append(_disk_digests(t))
            continue
        key, bits = _tensor_key(t), samples[i]
        cached = getattr(t, "_kvmem_digests", None)
        if cached is None or cached[0] != key or not torch.equal(cached[1], bits):
            stale.append((i, key, bits.clone()))
            per.append(None)
        else:
            per.append(cached[2])
    for (i, key, bits), digests in zip(stale, _full_digests([tensors[i] for i, _, _ in stale])):
        per[i] = digests
        try:
            tensors[i]._kvmem_digests = (key, bits, digests)
        except (AttributeError, RuntimeError):  # a tensor type that takes no attributes: hashed every time
            pass
    out = {}
    for name in ("exact", *_CANONICAL):
        parts = [d[name] for d in per]
        out[name] = None if any(p is None for p in parts) else _hash(shapes.encode(), *(p.encode() for p in parts))
    return out


def _weights(model, adapter: bool) -> list[tuple[str, object]]:
    """(name, weight) of every base (or, with ``adapter``, adapter) weight of ``model`` as the model computes with
    it: the parameter, or for one accelerate offloaded (held as ``meta``), the value its hook loads before each
    forward. A weight tied to one listed before it is listed once, as the model does when it is not offloaded."""
    base = base_model(model)
    named = [(n, p) for n, p in base.named_parameters() if _is_adapter_param(n) == adapter]
    offloaded = {n for n, p in named if p.device.type == "meta"}
    if not offloaded:
        return named
    modules = dict(base.named_modules())
    tied = getattr(base, "all_tied_weights_keys", None) or {}
    tied = {**tied, **{source: target for target, source in tied.items()}}  # both ways
    out, seen = [], set()
    for name, p in named:
        partner = tied.get(name)
        if partner in seen and offloaded & {name, partner}:  # offloading unties them; the plain model lists one
            continue
        if name in offloaded:
            p = real_weight(modules, name, p)
            if p is None:
                raise CubeError(f"weight {name!r} is on the meta device and no accelerate offload hook holds its "
                                "value, so kvmem cannot fingerprint it: load the model's weights (from_pretrained "
                                "without init_empty_weights, or dispatch it with accelerate: dispatch_model, "
                                "cpu_offload, device_map=...) before building or injecting cubes")
        seen.add(name)
        out.append((name, p))
    return out


def forget_digests(model) -> None:
    """Drop the cached weight digests of ``model``, so the next fingerprint hashes every weight again (offloaded
    ones included: after editing an offload folder's files in place, call this)."""
    mark_changed(model)  # the digests kept for the model's generation go too
    _WEIGHTS_MEMO.pop(base_model(model), None)
    for p in model.parameters():
        if hasattr(p, "_kvmem_digests"):
            del p._kvmem_digests
    for module in base_model(model).modules():
        for hook in hooks(module):
            weights_map = getattr(hook, "weights_map", None)
            while hasattr(weights_map, "dataset"):
                weights_map = weights_map.dataset
            for value in [*getattr(weights_map, "state_dict", {}).values(),
                          *(weights_map.values() if isinstance(weights_map, dict) else [])]:
                if hasattr(value, "_kvmem_digests"):
                    del value._kvmem_digests
            getattr(weights_map, "__dict__", {}).pop("_kvmem_digests", None)


# base model -> (keys, weak refs to its weights, their gathered sample bytes, digests): weights_digest's last
# answer. Kept out of the model, so pickling or deep-copying a model never meets it.
_WEIGHTS_MEMO: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def weights_digest(model) -> dict:
    """Digests of every base weight (adapter weights excluded), over every element.

    ``exact`` hashes the values as the model holds them: any change to any weight changes it, and so does
    running the same checkpoint in another dtype. ``bf16`` and ``fp16`` hash them rounded to those dtypes: a
    checkpoint held in float32 and the same checkpoint loaded in float16 agree on ``fp16`` (and in bfloat16, on
    ``bf16``), so a cube explicitly cast to a model's dtype (``MemCube.load(path, dtype=...)``, recorded as
    ``meta['cast_from']``) is matched to it (`same_weights`). ``dtype`` says which dtype ``exact`` was taken in;
    ``coverage`` "full" tells these digests from the sampled ones older kvmem versions recorded.

    A model dispatched with accelerate is hashed as it computes: offloaded weights (``meta`` in the model) are
    read through their hooks, so the digest equals the same checkpoint's when it is not offloaded.
    """
    params = [p for _, p in _weights(model, adapter=False)]
    dtypes = sorted({str(p.dtype) for p in params})
    facts = {"dtype": dtypes[0] if len(dtypes) == 1 else ",".join(dtypes), "coverage": "full"}
    if not all(isinstance(p, torch.Tensor) for p in params):  # disk-offloaded weights: checked by file stat
        return {**_digests(params), **facts}
    # The per-call check, for the whole model at once: when every weight is the same tensor object with the same
    # key and the same sampled bytes as at the last call, `_digests` would take every cached digest and hash the
    # same parts again, so its last answer is kept with them. One gather and one comparison per (device, dtype),
    # not a split, a comparison and a lookup per weight: on a GPU host this check is most of what kvmem adds to a
    # request's time. (The memo keeps bytes, not views: a view would keep a replaced weight's storage alive.)
    keys = tuple(_tensor_key(p) for p in params)
    views = _sample_views(params)
    gathered = _gather(views)
    base = base_model(model)
    memo = _WEIGHTS_MEMO.get(base)
    if (memo is not None and memo[0] == keys and len(memo[1]) == len(params)
            and all(ref() is p for ref, p in zip(memo[1], params))  # not a new tensor at a freed one's address
            and len(gathered) == len(memo[2])
            and all(ia == ib and a.numpy().tobytes() == b.numpy().tobytes()
                    for (ia, a), (ib, b) in zip(gathered, memo[2]))):
        return dict(memo[3])
    out = {**_digests(params, _per_tensor(views, gathered)), **facts}
    try:
        _WEIGHTS_MEMO[base] = (keys, tuple(weakref.ref(p) for p in params), gathered, dict(out))
    except TypeError:  # a model or tensor type that takes no weak reference: no memo, every call checks per weight
        pass
    return out


def verify_weights(model) -> dict:
    """The explicit full check: hash every element of every weight of ``model`` now and make the next request
    compare cubes against that (a cube built before a write its watch could not see, through ``.data`` or raw
    storage, is then refused). Costs a pass over the whole model (about a second per GB on a CPU).

    Returns:
        The weights field (`weights_digest`) of the model as it is now.
    """
    forget_digests(model)
    return weights_digest(model)
