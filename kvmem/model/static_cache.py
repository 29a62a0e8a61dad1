"""A prefix cache that never copies the memory again: transformers' StaticCache, allocated once with room for
the prefix, the request and its new tokens, filled from a `kvmem.Prefix`.

A DynamicCache concatenates its whole storage on every update: the query forward over a spliced memory copies
the memory once, and every decode step copies it again. A StaticCache writes new tokens in place
(`index_copy_`), so after the one fill here neither the query nor any decode step touches the cube's KV, and
its fixed shapes let `torch.compile` reuse one decode graph for every request of the same padded length.

Rows of a batch are right-aligned at the longest prefix (left padding, as transformers pads): row b of a
layer's storage is [zeros for padding | row b's prefix KV | room], and the attention mask hides the padding.

Sliding-window layers keep what a DynamicSlidingWindowLayer kept (the last window - 1 entries), placed where a
StaticSlidingWindowLayer that had seen the whole prefix would hold them.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

from ..errors import CubeError
from .cache import kv_from_cache
from .devices import layer_devices
from .facts import base_model
from .resolve import resolve


def static_prefix(model, prefix, *, max_new_tokens: int, query_len: int):
    """``prefix`` with its cache moved into a StaticCache that has room for ``query_len + max_new_tokens`` more.

    Args:
        model: the model the prefix was made for (PEFT-wrapped or accelerate-dispatched alike).
        prefix: a `kvmem.Prefix` (from `kvmem.prefill`); it is not changed, nor are its cubes.
        max_new_tokens: tokens generate may add.
        query_len: tokens of the request that follow the prefix.

    Returns:
        A Prefix (same ids, spans and names) whose ``cache`` is a fresh, filled StaticCache.

    Raises:
        CubeError: a bad size, or a model whose cache layers are not static-capable.

    Example:
        >>> prefix = static_prefix(model, kvmem.prefill(model, cube), max_new_tokens=32, query_len=q.shape[-1])
        >>> model.generate(prefix.extend(q), cache=prefix.cache, max_new_tokens=32)
    """
    for name, value in (("max_new_tokens", max_new_tokens), ("query_len", query_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CubeError(f"{name} must be an int >= 0, got {value!r}")
    n = prefix.input_ids.shape[1]
    cache = fill_static_cache(model, [kv_from_cache(prefix.cache)], [n], max_cache_len=n + query_len + max_new_tokens)
    return dataclasses.replace(prefix, cache=cache)


def fill_static_cache(model, rows: list[list[tuple[torch.Tensor, torch.Tensor]]], lengths: list[int], *,
                      max_cache_len: int) -> StaticCache:
    """A StaticCache for ``model`` holding one prefix per batch row, right-aligned at the longest.

    Args:
        rows: per row, per layer (keys, values) [1, kv_heads, m, head_dim] as a kvmem prefix cache holds them
            (m = the row's length, or fewer on a sliding-window layer that dropped what its window cannot see).
        lengths: per row, the number of tokens its prefix stands for.
        max_cache_len: storage per layer, in tokens (>= the longest prefix).

    Returns:
        StaticCache with ``get_seq_length() == max(lengths)``; each layer's storage on the device that layer runs on.
    """
    if not rows or len(rows) != len(lengths):
        raise CubeError(f"need one length per row, got {len(rows)} rows and {len(lengths)} lengths")
    longest = max(lengths)
    if not isinstance(max_cache_len, int) or max_cache_len < longest:
        raise CubeError(f"max_cache_len={max_cache_len!r} cannot hold a {longest}-token prefix: pass at least "
                        "the prefix length plus the request and max_new_tokens")
    facts = resolve(model)
    cache = PrefixStaticCache(config=facts.config, max_cache_len=max_cache_len)
    for b, row in enumerate(rows):
        if len(row) != len(cache.layers):
            raise CubeError(f"the model has {len(cache.layers)} cache layers, prefix {b} has {len(row)}: "
                            "make each prefix with kvmem.prefill for this model")
    devices = facts.remember(("layer_devices", len(cache.layers)), lambda: layer_devices(model, len(cache.layers)))
    pool = facts.remember("static_pool", StaticPool)
    pooled = [type(layer) is StaticLayer for layer in cache.layers]  # sliding layers keep their own storage
    stores = pool.lease(cache, [r[0] for r in zip(*rows)], len(rows), max_cache_len, devices, pooled)
    for i, layer in enumerate(cache.layers):
        if type(layer) not in (StaticLayer, StaticSlidingWindowLayer):
            raise CubeError(f"cache layer {i} is a {type(layer).__name__}; kvmem fills only StaticLayer and "
                            "StaticSlidingWindowLayer: use kvmem.prefill's own cache for this model")
        if stores is not None and type(layer) is StaticLayer:
            _adopt(layer, *stores[i], max_cache_len)
        _fill_layer(layer, [r[i] for r in rows], lengths, longest, devices[i])
    cache.track(longest)
    return cache


def refill_static_cache(cache: "PrefixStaticCache", kv: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
    """Overwrite ``cache`` (one row, full-attention layers only, made by `fill_static_cache`) with another prefix of
    ``length`` tokens, in place: the same storage and counters, so a graph captured over the cache (CUDA graphs
    keep addresses) runs on it again. ``kv``: per layer (keys, values) [1, kv_heads, length, head_dim]."""
    if length > cache.layers[0].max_cache_len or len(kv) != len(cache.layers):
        raise CubeError(f"a {length}-token prefix of {len(kv)} layers does not fit this cache "
                        f"({cache.layers[0].max_cache_len} tokens, {len(cache.layers)} layers): make a larger one")
    for i, layer in enumerate(cache.layers):
        _fill_layer(layer, [kv[i]], [length], length, layer.device)
    cache.track(length)


class PrefixStaticCache(StaticCache):
    """transformers' StaticCache that also keeps on the host how many tokens it holds: a StaticLayer keeps that count
    only in a device tensor (``cumulative_length``), which the mask builder would otherwise read (a device
    synchronisation per forward on a GPU). transformers sizes every full-attention mask by the first
    full-attention layer's counter, so that one layer's count is followed; `kvmem.model.visibility` takes the host
    copy while it is exact: the counter is that layer's own tensor at the version the copy was taken at. Eager
    updates advance the copy; any other change to the counter (``crop``, ``reset``, an edit) leaves it at another
    version, and a compiled call (whose writes the host does not follow) marks it unknown: the mask is then read."""

    host_known = True  # False once a compiled call ran: dynamo replays this store after each such call
    _followed = -1  # the layer whose count is followed (-1: none)
    _record = None  # (its counter's _version, its token count)

    def track(self, length: int) -> None:
        """Start following the token count (now ``length``: just filled) of the first full-attention layer."""
        index = next((i for i, layer in enumerate(self.layers) if type(layer) is StaticLayer), -1)
        if index < 0:
            return
        layer = self.layers[index]
        counter = layer.cumulative_length
        if counter.is_inference():  # an inference tensor keeps no version counter: give the layer one that does
            with torch.inference_mode(False):
                counter = torch.full((), length, dtype=counter.dtype, device=counter.device)
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(counter)  # as transformers marks its own: CUDA graphs
            layer.cumulative_length = counter
        counter._kvmem_host = (weakref.ref(self), index)
        self._followed, self._record, self.host_known = index, (counter._version, length), True

    def host_length(self, layer_idx: int, counter: torch.Tensor) -> int | None:
        """Layer ``layer_idx``'s token count when ``counter`` is its counter and the host copy is exact, else None."""
        record = self._record
        if (record is None or layer_idx != self._followed or not self.host_known
                or self.layers[layer_idx].cumulative_length is not counter or counter._version != record[0]):
            return None
        return record[1]

    def rewind(self, tokens: int, length: int) -> None:
        """Forget the last ``tokens`` written to every layer (a padded query's padding: its slots are written over by
        the next tokens, and the mask hides them until then), leaving ``length`` tokens; on the device, no read.
        Full-attention layers only (a sliding window would have dropped real entries for the padding)."""
        for i, layer in enumerate(self.layers):  # all checked before any is changed: never half rewound
            if type(layer) is not StaticLayer:
                raise CubeError(f"cache layer {i} is a {type(layer).__name__}: only full-attention layers rewind")
        for layer in self.layers:
            layer.cumulative_length.sub_(tokens)
        self.track(length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """`StaticCache.update`; for the followed layer, its host count advanced by ``key_states.shape[-2]``."""
        if layer_idx != self._followed:  # every other layer: nothing to follow (one int compare)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if torch.compiler.is_compiling():
            self.host_known = False
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        record = self._record
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if record is not None:
            version = self.layers[layer_idx].cumulative_length._version
            # the update's own add_ is the one version step allowed; anything else in between: unknown
            self._record = (version, record[1] + key_states.shape[-2]) if version == record[0] + 1 else None
        return out


class StaticPool:
    """The storage of one model's static prefix caches, reused between requests: one [batch, kv_heads, room, dim]
    keys/values pair per full-attention layer, as large as the largest request asked for, lent to one cache at a
    time (a request while the last cache is still alive gets fresh storage, as transformers would allocate it).
    No request then allocates or zero-fills its cache: the fill's one copy of the memory is all it writes.

    The storage is lent to the cache object: once the cache is gone (no reference to it or to the Prefix holding
    it), the next request writes into the same storage, so keep the cache, not tensors taken out of it, for as long
    as you read them. `free_static_pool(model)` drops the storage.
    """

    def __init__(self):
        self.stores: list | None = None
        self.key: tuple | None = None
        self._room = 0
        self._lent = None  # weak reference to the cache holding the storage

    def lease(self, cache, first_kv: list, batch: int, room: int, devices: list, pooled: list) -> list | None:
        """Per layer (keys, values) storage with at least ``room`` slots for ``cache`` ((None, None) for layers not
        ``pooled``), or None when the storage is still lent to a live cache (then the caller's cache allocates its
        own, as transformers does). ``first_kv``: per layer the first row's (keys, values), for shapes and dtype."""
        if self._lent is not None and self._lent() is not None:
            return None
        key = (batch, tuple((k.shape[1], k.shape[-1], v.shape[1], v.shape[-1], k.dtype, str(d), p)
                            for (k, v), d, p in zip(first_kv, devices, pooled)))
        if self.stores is None or key != self.key or self._room < room:
            self.stores = None  # the old storage goes before the new one is allocated
            self.stores = [(torch.zeros(batch, k.shape[1], room, k.shape[-1], dtype=k.dtype, device=d),
                            torch.zeros(batch, v.shape[1], room, v.shape[-1], dtype=v.dtype, device=d))
                           if p else (None, None) for (k, v), d, p in zip(first_kv, devices, pooled)]
            self.key, self._room = key, room
        self._lent = weakref.ref(cache)
        return self.stores


def free_static_pool(model) -> None:
    """Drop the storage kvmem keeps for ``model``'s static prefix caches (the next request allocates again)."""
    resolve(model).memo.pop("static_pool", None)


def _adopt(layer: StaticLayer, store_k: torch.Tensor, store_v: torch.Tensor, max_cache_len: int) -> None:
    """What StaticLayer.lazy_initialization sets up, with the pool's storage instead of fresh zeros (its first
    ``max_cache_len`` slots: a view; the fill overwrites the prefix's slots, the mask hides the rest)."""
    layer.device = store_k.device
    layer.batch_size, layer.num_heads = store_k.shape[:2]
    layer.k_head_dim, layer.v_head_dim = store_k.shape[-1], store_v.shape[-1]
    layer.keys, layer.values = store_k[:, :, :max_cache_len], store_v[:, :, :max_cache_len]
    layer.cumulative_length = _counter(layer.device)
    if not torch.compiler.is_compiling():  # as transformers does: fixed addresses for CUDA graphs
        for t in (layer.keys, layer.values, layer.cumulative_length):
            torch._dynamo.mark_static_address(t)
    layer.is_initialized = True


def _counter(device: torch.device) -> torch.Tensor:
    """A static layer's token counter made on ``device`` by a fill: transformers makes it on the host and moves it
    with a blocking copy, which on a GPU waits for every queued kernel. Made outside inference mode, so it keeps
    the version counter `PrefixStaticCache` checks."""
    with torch.inference_mode(False):
        return torch.zeros((), dtype=torch.long, device=device)


def _fill_layer(layer: StaticLayer, kv: list[tuple[torch.Tensor, torch.Tensor]], lengths: list[int], longest: int,
                device: torch.device) -> None:
    k0, v0 = kv[0]
    heads, dim, vdim = k0.shape[1], k0.shape[-1], v0.shape[-1]
    batch = len(kv)
    if not layer.is_initialized:  # no pooled storage: transformers' own zeros
        if not torch.compiler.is_compiling():
            layer.cumulative_length = _counter(device)  # lazy_initialization's .to(device) is then a no-op
        layer.lazy_initialization(torch.empty(batch, heads, 0, dim, dtype=k0.dtype, device=device),
                                  torch.empty(batch, heads, 0, vdim, dtype=v0.dtype, device=device))
    sliding = isinstance(layer, StaticSlidingWindowLayer)
    # where position `longest - 1` sits: slot longest - 1, or the last slot of a sliding layer already full
    end = min(longest, layer.max_cache_len)
    for b, ((k, v), n) in enumerate(zip(kv, lengths)):
        m = k.shape[2]
        if m != n and not (sliding and m < n and m <= end):
            raise CubeError(f"a prefix cache layer holds {m} entries for {n} tokens; "
                            "rebuild the prefix with kvmem.prefill")
        # [heads, m, dim] into slots end - m .. end - 1 of row b: the one copy of the memory
        layer.keys[b, :, end - m:end].copy_(k[0], non_blocking=True)
        layer.values[b, :, end - m:end].copy_(v[0], non_blocking=True)
    layer.cumulative_length.fill_(longest)
    if sliding:
        layer.cumulative_length_int = longest


# generate options under which a cache sized for one sequence of known length is not what generate needs
_OWN_CACHE = ("assistant_model", "prompt_lookup_num_tokens", "cache_implementation", "return_legacy_cache")


def static_room(model, prompt_len: int, generate_kwargs: dict) -> int | None:
    """How many new tokens a static prefix cache must leave room for, given the options ``model.generate`` will
    get; None when a static cache is not the right one: beams or several sequences per prompt (generate grows
    the batch), assisted/lookup decoding, a cache implementation of the caller's, or no length bound.

    Args:
        model: the transformers model (its generation_config fills in what ``generate_kwargs`` leaves out).
        prompt_len: tokens of the prompt (prefix + request) generate starts from.
        generate_kwargs: the keyword arguments for ``model.generate``.
    """
    config = getattr(model, "generation_config", None)
    if sequences_per_prompt(model, generate_kwargs) != 1:
        return None
    if any(generate_kwargs.get(name) is not None for name in _OWN_CACHE) or generate_kwargs.get("generation_config"):
        return None
    new = generate_kwargs.get("max_new_tokens")
    if new is None and generate_kwargs.get("max_length") is not None:
        new = generate_kwargs["max_length"] - prompt_len
    if new is None:
        new = getattr(config, "max_new_tokens", None)
    if new is None and getattr(config, "max_length", None) is not None:
        new = config.max_length - prompt_len
    return new if isinstance(new, int) and not isinstance(new, bool) and new >= 1 else None


def sequences_per_prompt(model, generate_kwargs: dict) -> int:
    """How many rows ``model.generate`` makes of each prompt row (beams, returned sequences): a cache passed in
    must be repeated that many times, since generate expands the inputs but not a cache of the caller's."""
    config = getattr(model, "generation_config", None)
    option = lambda name: generate_kwargs.get(name) or getattr(config, name, None) or 1  # noqa: E731
    return max(option("num_beams"), option("num_return_sequences"))


def static_capable(model) -> bool:
    """Whether every cache layer transformers' StaticCache makes for ``model`` is one `fill_static_cache` fills
    (full or sliding-window attention; not linear-attention or other hybrid layers)."""
    def read() -> bool:
        layers = StaticCache(config=base_model(model).config, max_cache_len=1).layers  # storage allocated lazily
        return all(type(layer) in (StaticLayer, StaticSlidingWindowLayer) for layer in layers)

    return resolve(model).remember("static_capable", read)
