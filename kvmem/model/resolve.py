"""A model's facts resolved once: what kvmem reads of a model (base model, text config, dtype and device, cache
argument name, whether accelerate dispatches it) in one `ModelFacts`, with a memo that later layers fill (weights
and adapter digests, per-layer devices, a cache template). `resolve` gives the same object for every request
until the model's watch (`kvmem.model.watch`) sees a change; then the facts are read again."""

from __future__ import annotations

import inspect
import weakref

import torch

from .devices import dtype_device
from .facts import base_model
from .watch import watch


class ModelFacts:
    """What kvmem reads of a model, resolved once per model generation (`resolve`) and passed down a request.

    Attributes:
        generation: the model's `kvmem.model.watch.Watch` generation these facts were read at.
        base: the transformers model under a PEFT wrapper.
        config: its decoder's text config.
        dtype, device: where its KV is computed (`kvmem.model.devices.dtype_device`).
        cache_kwarg: "cache" or "past_key_values", whichever its forward takes.
        dispatched: whether accelerate hooks place its layers (device_map, CPU/disk offload).
        memo: what other modules keep for this model and generation (weights and adapter digests, per-layer
            devices, a cache template); a new generation starts with an empty one.
    """

    __slots__ = ("generation", "_model", "_base", "_dtype_device", "config", "cache_kwarg", "dispatched", "memo",
                 "__weakref__")

    def __init__(self, model, generation: int):
        base = base_model(model)
        self.generation = generation
        self._model, self._base = weakref.ref(model), weakref.ref(base)  # beside the model, never keeping it alive
        self._dtype_device = None
        self.config = base.config.get_text_config(decoder=True)
        self.cache_kwarg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        self.dispatched = hasattr(base, "_hf_hook") or bool(getattr(base, "hf_device_map", None))
        self.memo: dict = {}

    @property
    def base(self):
        return self._base()

    @property
    def dtype(self) -> torch.dtype:
        return self._where()[0]

    @property
    def device(self) -> torch.device:
        return self._where()[1]

    def _where(self) -> tuple:
        if self._dtype_device is None:  # read on first use: a model with no readable weights fails where asked
                self._dtype_device = dtype_device(self._model())
        return self._dtype_device

    def remember(self, key, make):
        """``memo[key]``, made by ``make()`` on its first use in this generation."""
        try:
            return self.memo[key]
        except KeyError:
            value = self.memo[key] = make()
            return value


_FACTS: "weakref.WeakKeyDictionary[object, ModelFacts]" = weakref.WeakKeyDictionary()


def resolve(model) -> ModelFacts:
    """``model``'s `ModelFacts`, read on first use and again only after its watch saw a change (a weight replaced,
    edited in place through autograd, cast or moved; a module replaced; an adapter swapped or merged): per call,
    one pass over the watch's references (`kvmem.model.watch`), no weight read."""
    generation = watch(model).refresh()
    facts = _FACTS.get(model)
    if facts is None or facts.generation != generation:
        facts = _FACTS[model] = ModelFacts(model, generation)
    return facts
