"""Glue to transformers' Cache objects: read KV out of a prefilled cache, build a fresh cache from KV.

transformers 5.x renamed the forward/generate kwarg `past_key_values` to `cache`; `cache_kwarg` picks the
name the installed model understands so kvmem works on both sides of the rename.
"""

from __future__ import annotations

import inspect
import weakref

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .._deprecation import renamed_function
from .devices import model_device
from .facts import base_model, eval_mode


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


def new_cache(model, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A fresh DynamicCache for ``model`` holding ``kv`` (per layer keys/values [1, kv_heads, seq, head_dim]).

    Plain full-attention layers take the tensors as they are, without a copy: DynamicLayer.update always
    concatenates into new storage, so generation never writes into them (that is what keeps cubes immutable).
    Other layer kinds (sliding window) get them through their own `update`, which keeps what they need.
    """
    cache = DynamicCache(config=base_model(model).config)
    if len(cache.layers) != len(kv):
        raise ValueError(f"the model has {len(cache.layers)} cache layers, the KV has {len(kv)}")
    for layer, (k, v) in zip(cache.layers, kv):
        if type(layer) is DynamicLayer:
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
        else:
            layer.update(k, v)
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
