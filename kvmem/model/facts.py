"""Facts every layer asks of a model, read one way: the model under a PEFT wrapper, its text config, its context
length; `ModelFacts`, all of that and more resolved once per model generation (`resolve`); and `eval_mode`, the
one way kvmem runs a forward of its own. Devices are `kvmem.model.devices`'."""

from __future__ import annotations

import contextlib
import inspect
import weakref


def base_model(model):
    """The transformers model under a PEFT wrapper (or ``model`` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def text_config(model):
    """The decoder's text config (a multimodal model's language part; the config itself for a plain LM)."""
    return base_model(model).config.get_text_config(decoder=True)


def context_length(model) -> int | None:
    """The positions the model was built for (``max_position_embeddings``), or None when its config has none."""
    n = getattr(text_config(model), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def check_context(model, n_tokens: int, what: str, fix: str) -> None:
    """CubeError when ``n_tokens`` positions would run past the model's context length (nothing is computed
    there that the model was trained for): ``what`` names them, ``fix`` says what to do instead."""
    limit = context_length(model)
    if limit is not None and n_tokens > limit:
        from ..errors import CubeError

        raise CubeError(f"{what} is {n_tokens} tokens, past this model's context of {limit} "
                        f"(max_position_embeddings); {fix}")


@contextlib.contextmanager
def eval_mode(module):
    """``module`` in eval mode (no dropout) for the block, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


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

    __slots__ = ("generation", "_base", "config", "dtype", "device", "cache_kwarg", "dispatched", "memo",
                 "__weakref__")

    def __init__(self, model, generation: int):
        from .devices import dtype_device  # devices reads base_model from here

        base = base_model(model)
        self.generation = generation
        self._base = weakref.ref(base)  # kept beside the model, never keeping it alive
        self.config = base.config.get_text_config(decoder=True)
        self.dtype, self.device = dtype_device(model)
        self.cache_kwarg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        self.dispatched = hasattr(base, "_hf_hook") or bool(getattr(base, "hf_device_map", None))
        self.memo: dict = {}

    @property
    def base(self):
        return self._base()

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
    from .watch import watch  # the watch reads base_model from here

    generation = watch(model).refresh()
    facts = _FACTS.get(model)
    if facts is None or facts.generation != generation:
        facts = _FACTS[model] = ModelFacts(model, generation)
    return facts
