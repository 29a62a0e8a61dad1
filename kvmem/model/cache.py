"""Glue to transformers' Cache objects: read KV out of a prefilled cache, build a fresh cache from KV (a
`GrowingCache`: a DynamicCache whose full-attention layers grow with room instead of copying at every step).

transformers 5.x renamed the forward/generate kwarg `past_key_values` to `cache`; `cache_kwarg` picks the
name the installed model understands so kvmem works on both sides of the rename.
"""

from __future__ import annotations

import copy
import inspect
import threading
import weakref

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from .._deprecation import renamed_function
from .devices import model_device
from .facts import base_model, eval_mode
from .resolve import resolve


def cache_kwarg(model) -> str:
    """'cache' on transformers versions whose forward takes it, else 'past_key_values'."""
    params = inspect.signature(base_model(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(outputs):
    """The Cache a forward returned, under either name."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else getattr(outputs, "past_key_values", None)


def kv_from_cache(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values), each [batch, kv_heads, seq, head_dim], as the cache holds them (post-RoPE)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"kvmem needs a transformers Cache with .layers (transformers>=5), got {type(cache).__name__}")
    return [(layer.keys, layer.values) for layer in layers]


# Room a growing layer adds when it runs out, beyond what the update needs: an eighth of its length (at least 256
# tokens). A 6k-token memory then decodes 758 tokens before the next copy, and each copy's cost is paid back
# over the n/8 steps that follow it (amortized O(1) per token), for at most 12.5% more memory than a DynamicLayer.
_ROOM_MIN, _ROOM_FRACTION = 256, 8


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer that writes new tokens in place into storage with room, grown by amortized
    steps: a DynamicLayer copies its whole storage at every update (``torch.cat``), so every decode step after a
    long memory copies the memory again; this one copies it once, when it first grows (the query forward), and
    then about once per n/8 new tokens.

    ``keys`` / ``values`` are [batch, kv_heads, seq, dim] views of the first ``seq`` slots of its storage (what
    DynamicLayer holds, with the same values). Anything that assigns ``keys`` / ``values`` itself (``crop``, beam
    reordering, a caller's own tensors as kvmem.prefill sets them) is taken as the new contents: the next update
    copies them into fresh storage, never into the tensors it was given (a cube's KV is never written).
    """

    _store_k = _store_v = _view_k = _view_v = _spare = None
    _origin = None  # (keys, values) as `new_cache` gave them, while a `PrefixPool` may adopt or keep this layer
    _slot = None  # (weakref to a pool, lease id, layer index): keep the storage this layer first grows into from ``_origin``

    def adopt(self, store_k: torch.Tensor, store_v: torch.Tensor) -> bool:
        """Take pooled storage whose first entries already hold this layer's ``_origin`` (a `PrefixPool` hit): the
        layer then writes new tokens after them, with no copy. False (nothing changed) when the layer no longer
        holds its origin (a caller assigned other keys) or the storage does not fit it."""
        keys, values = self.keys, self.values
        if (self._origin is None or keys is not self._origin[0] or values is not self._origin[1]
                or self._store_k is not None or keys.dim() != 4):
            return False
        n = keys.shape[-2]
        if not (_fits(store_k, keys, n) and _fits(store_v, values, n)):
            return False
        self._store_k, self._store_v, self._origin = store_k, store_v, None
        self.keys = self._view_k = store_k[:, :, :n]
        self.values = self._view_v = store_v[:, :, :n]
        return True

    def reserve(self, new: int) -> None:
        """Allocate (not fill) the storage this layer's first update of ``new`` tokens will grow into, before the
        forward reaches the layer (`GrowingCache.update` calls it for every layer at the forward's first update).

        Why: a first growth allocated inside the forward lands between that forward's own temporaries, so each
        request's heap grows through the forward and is handed back to the OS after it, and the next request
        page-faults the same memory again (the CPU proxy of bench/host_overhead.py: ~2,400 minor page faults a
        request, none with the reservation; the bench records them per call). Allocated first, the forward's
        temporaries reuse the same freed memory at every layer.
        """
        keys, values = self.keys, self.values
        if self._store_k is None and self._spare is None and keys is not None and keys.dim() == 4:
            self._spare = self._empty(keys, values, keys.shape[-2] + new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append [batch, kv_heads, new, dim] keys/values; returns the layer's keys/values [batch, kv_heads, seq, dim]."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.keys, self.values
        n, new = (keys.shape[-2] if keys.dim() == 4 else 0), key_states.shape[-2]
        store_k = self._store_k
        if (keys is not self._view_k or values is not self._view_v or store_k is None
                or n + new > store_k.shape[-2]):
            store_k = self._grow(keys, values, key_states, value_states, n, n + new)
        store_k[:, :, n:n + new].copy_(key_states)
        self._store_v[:, :, n:n + new].copy_(value_states)
        self.keys = self._view_k = store_k[:, :, :n + new]
        self.values = self._view_v = self._store_v[:, :, :n + new]
        return self.keys, self.values

    def _grow(self, keys, values, key_states, value_states, n: int, need: int) -> torch.Tensor:
        """Fresh storage for ``need`` tokens and room, holding the layer's first ``n`` entries (the reserved
        storage where it fits: never handed out before, so no caller holds a view of it)."""
        spare, self._spare = self._spare, None
        if spare is not None and _fits(spare[0], key_states, need) and _fits(spare[1], value_states, need):
            store_k, store_v = spare
        else:
            store_k, store_v = self._empty(key_states, value_states, need)
        if n:
            store_k[:, :, :n].copy_(keys)
            store_v[:, :, :n].copy_(values)
        self._store_k, self._store_v = store_k, store_v
        slot, origin, self._slot, self._origin = self._slot, self._origin, None, None
        pool = slot[0]() if slot is not None else None
        if pool is not None and origin is not None and keys is origin[0] and values is origin[1]:
            pool.keep(slot[1], slot[2], store_k, store_v)  # its first n entries are the origin's, as pooled
        return store_k

    @staticmethod
    def _empty(like_k: torch.Tensor, like_v: torch.Tensor, need: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Uninitialised keys/values storage [batch, heads, need + room, dim] shaped, typed and placed like
        ``like_k`` / ``like_v``."""
        room = need + max(_ROOM_MIN, need // _ROOM_FRACTION)
        return (like_k.new_empty(like_k.shape[0], like_k.shape[1], room, like_k.shape[-1]),
                like_v.new_empty(like_v.shape[0], like_v.shape[1], room, like_v.shape[-1]))

    def reset(self) -> None:
        self._store_k = self._store_v = self._view_k = self._view_v = self._spare = self._origin = self._slot = None
        # dropped, never zeroed: the tensors may be a cube's views or pooled storage (transformers versions whose
        # reset zeroes a layer's keys in place skip that for a layer not initialized)
        self.keys = self.values = None
        self.is_initialized = False
        super().reset()


def _fits(store: torch.Tensor, states: torch.Tensor, need: int) -> bool:
    """Whether ``store`` [batch, heads, room, dim] can hold ``need`` tokens of ``states``' batch, heads, dim,
    dtype and device."""
    return (store.shape[-2] >= need and store.shape[:2] == states.shape[:2] and store.shape[-1] == states.shape[-1]
            and store.dtype == states.dtype and store.device == states.device)


class GrowingCache(DynamicCache):
    """A DynamicCache (generate treats it as one) whose full-attention layers are `GrowingLayer`s; made by
    `new_cache` with its layers ready."""

    _reserve_pending = False
    _pool = _source = None  # weak references to the model's PrefixPool and the cube whose KV the layers hold

    def __init__(self, layers: list | None = None, **kwargs):
        if layers is None:  # made the DynamicCache way (from_legacy_cache and the like): plain layers
            DynamicCache.__init__(self, **kwargs)
        else:
            Cache.__init__(self, layers=layers)
            self._reserve_pending = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """`Cache.update`; the first one (the query forward's first layer) first gives every growing layer its
        storage: the model's pooled storage that already holds the same cube (`PrefixPool`: no copy), else a
        reservation for the ``key_states.shape[-2]`` new tokens (`GrowingLayer.reserve`)."""
        if self._reserve_pending:
            self._reserve_pending = False
            pool, source = (None, None) if self._pool is None else (self._pool(), self._source())
            lease = pool.lease(self, source, len(self.layers)) if pool is not None and source is not None else None
            new = key_states.shape[-2]
            for i, layer in enumerate(self.layers):
                if type(layer) is not GrowingLayer:
                    continue
                stored = lease[1][i] if lease is not None else None
                if stored is not None and layer.adopt(*stored):
                    continue
                if lease is not None:  # the pool keeps what this layer grows into from its origin
                    layer._slot = (weakref.ref(pool), lease[0], i)  # weak: a deepcopy of the cache copies no pool
                layer.reserve(new)
            self._pool = self._source = None
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


class PrefixPool:
    """The grown storage of one model's last single-cube prefix, reused by the next request on the same cube: the
    query forward then writes its tokens after the cube's KV, already in place, instead of copying the memory into
    fresh storage (the copy a DynamicCache's first update, or transformers' prefix reuse's ``deepcopy``, makes).

    The storage is lent to one cache object at a time, at its first update (a request whose cache's first update
    comes while the last one is still alive grows its own storage, as before); only a cache's full-attention
    layers that still hold their cube's KV as `new_cache` gave it adopt it. The first ``n`` entries (the cube's)
    are written once, when the storage is made: layers only write after their own length, and a layer that is
    cropped, reordered or reset takes fresh storage. As with the static pool, once the cache is gone the next
    request writes after the cube's entries: keep the cache, not tensors taken out of it, for as long as you read
    them. One cube's storage per model (the last one used: as much memory again as that cube's KV, plus room, held
    between requests); `free_prefix_pool(model)` drops it.
    """

    def __init__(self):
        self._lock = threading.Lock()  # one lease at a time, also between threads
        self._lent = None  # weak reference to the cache holding the storage
        self._source = None  # weak reference to the cube whose KV the storage begins with
        self._stores: list = []  # per layer (keys, values) storage, or None
        self._lease = 0

    def lease(self, cache, source, n_layers: int) -> tuple[int, list] | None:
        """For ``cache``'s first update: (lease id, per layer pooled (keys, values) or None). The stores are those
        left by an earlier request on ``source`` (the cube); for another cube they are dropped, and the layers'
        growth fills them (`keep`). None when a live cache holds the storage."""
        with self._lock:
            if self._lent is not None and self._lent() is not None:
                return None
            self._lease += 1
            self._lent = weakref.ref(cache)
            if self._source is None or self._source() is not source or len(self._stores) != n_layers:
                self._source, self._stores = weakref.ref(source), [None] * n_layers  # old storage goes first
            return self._lease, list(self._stores)

    def keep(self, lease: int, layer: int, store_k: torch.Tensor, store_v: torch.Tensor) -> None:
        """Pool ``layer``'s storage, whose first entries are its cube's KV, if lease ``lease`` is still the last."""
        with self._lock:
            if lease == self._lease:
                self._stores[layer] = (store_k, store_v)


def free_prefix_pool(model) -> None:
    """Drop the storage kvmem keeps of ``model``'s last prefix cache (the next request copies the memory again)."""
    resolve(model).memo.pop("prefix_pool", None)


_POOL_OFF = "_kvmem_prefix_pool_off"  # on the base model: outlives the facts, which a weight change renews


def set_prefix_pool(model, *, enabled: bool) -> None:
    """Keep (``enabled=True``, the default) or stop keeping `PrefixPool` storage for ``model``.

    Off, every request copies its cube's KV into fresh storage at the query forward's first update (the copy the
    pool saves) and nothing is held between requests: for cubes too large to hold twice. Turning it off frees what
    the pool holds now. The setting stays with the model (weight changes, adapter swaps keep it).
    """
    base = base_model(model)
    if enabled:
        base.__dict__.pop(_POOL_OFF, None)
    else:
        base.__dict__[_POOL_OFF] = True
        free_prefix_pool(model)


def new_cache(model, kv: list[tuple[torch.Tensor, torch.Tensor]], *, facts=None, source=None) -> GrowingCache:
    """A fresh cache for ``model`` holding ``kv`` (per layer keys/values [1, kv_heads, seq, head_dim]).

    Full-attention layers (`GrowingLayer`) take the tensors as they are, without a copy; their first update copies
    them into storage with room, so generation never writes into them (that is what keeps cubes immutable) and
    decoding never copies the memory again. Other layer kinds (sliding window) get them through their own
    `update`, which keeps what they need. ``facts``: the model's `resolve`d facts, when the caller has them.
    ``source``: the cube whose KV ``kv`` is (always the same tensors' values for it): the full-attention layers then
    take the model's `PrefixPool` storage that already holds it, where free, and write after it with no copy.
    """
    facts = facts if facts is not None else resolve(model)
    template = facts.remember("cache_template", lambda: DynamicCache(config=facts.config).layers)
    if len(template) != len(kv):
        raise ValueError(f"the model has {len(template)} cache layers, the KV has {len(kv)}")
    layers = []
    for plain, (k, v) in zip(template, kv):
        if type(plain) is DynamicLayer:
            layer = GrowingLayer()
            layer.is_initialized, layer.device, layer.keys, layer.values = True, k.device, k, v
            if source is not None:
                layer._origin = (k, v)
        else:
            layer = copy.deepcopy(plain)  # an empty layer of the model's own kind, with its options
            layer.update(k, v)
        layers.append(layer)
    cache = GrowingCache(layers)
    if source is not None and not facts.base.__dict__.get(_POOL_OFF, False):
        cache._pool, cache._source = weakref.ref(facts.remember("prefix_pool", PrefixPool)), weakref.ref(source)
    return cache


_LAYOUTS: "weakref.WeakKeyDictionary[object, list]" = weakref.WeakKeyDictionary()


def kv_shapes(model) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per layer ((key heads, key dim), (value heads, value dim)) as ``model`` really caches them, measured once by
    a one-token forward (config fields do not describe every cache: multi-query Falcon, DeepSeek's MLA keys and
    values of different dims)."""
    inner = base_model(model)
    layout = _LAYOUTS.get(inner)
    if layout is None:
        with eval_mode(inner), torch.inference_mode():
            out = model(input_ids=torch.ones(1, 1, dtype=torch.long, device=model_device(model)),
                        use_cache=True, **{cache_kwarg(model): DynamicCache()})
        layout = [((k.shape[1], k.shape[3]), (v.shape[1], v.shape[3])) for k, v in kv_from_cache(output_cache(out))]
        _LAYOUTS[inner] = layout
    return layout


cache_layout = renamed_function(kv_shapes, "cache_layout")  # the flat layout's name, for one release
