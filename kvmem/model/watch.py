"""Whether a model changed since kvmem last looked at it: one pass over cached references, no weight read.

kvmem resolves what it needs of a model once (its facts, its weights and adapter digests) and keeps it while the
model's `Watch` says nothing changed. Per request the watch reads, for each parameter it recorded: that the module
slot still holds the same parameter object, that its storage is the same storage (held by weak reference: a replaced
storage is a dead reference, never a reused address) and that its version counter is unchanged (autograd bumps it
on every in-place op it sees: an optimizer step, ``load_state_dict``, ``copy_``/``add_`` under ``no_grad``); a cast
or a move (``model.to``, ``.half()``) swaps the storage. For each PEFT tuner layer it reads the active, merged and
disabled adapters. A module, parameter or buffer registered on a module of a watched model (a module replaced, as
PEFT's injection and ``merge_and_unload`` do; an adapter loaded; ``module.weight = Parameter(...)``) makes every
watch stale: a counter bumped by torch's global registration hooks. A stale watch sends the next request through the
full check (every weight's identity and a sample of its values, `kvmem.cubes.weights`).

What the watch cannot see: writes that keep the storage and bypass autograd's version counter, that is through
``.data`` (``p.data.add_(...)``, ``p.data.copy_(...)``) or raw memory (``untyped_storage()``, a numpy view of a
parameter, a kernel writing at ``data_ptr()``), and in-place writes to weights that are inference tensors (a model
built or loaded under ``torch.inference_mode()``: such tensors keep no version counter; torch allows the write only
inside inference mode). After such a write call `mark_changed(model)` (the next request
checks in full) or `kvmem.verify_weights(model)` (hash every weight now). PEFT's ``hotswap_adapter`` writes through
``.data``: kvmem's own adapter bridge marks the model itself. A model with weights offloaded by accelerate
(``meta`` parameters, read through hooks) is checked in full on every request.
"""

from __future__ import annotations

import weakref

import torch

from .facts import base_model

_EPOCH = [0]  # bumped when a module, parameter or buffer is registered on a module of a watched model
_WATCHED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # every module of every watched model


def _registered(parent, *_args) -> None:
    # Registrations on modules no model of kvmem's holds are not changes: transformers' forward slices its
    # ModuleList of layers (``layers[:n]``: a new container, its members registered again) at every call.
    # Returning None leaves the registration as it was. Under torch.compile tracing (the forward's own slicing)
    # it does nothing: traced, the set lookup would become a guard on the set's contents.
    if not torch.compiler.is_compiling() and parent in _WATCHED:
        _EPOCH[0] += 1


for _register in ("register_module_module_registration_hook", "register_module_parameter_registration_hook",
                  "register_module_buffer_registration_hook"):
    getattr(torch.nn.modules.module, _register)(_registered)


def _tuner_state(layer) -> tuple:
    return (tuple(layer.active_adapters), tuple(getattr(layer, "merged_adapters", ())),
            bool(getattr(layer, "disable_adapters", False)))


def tuner_layers(model) -> list:
    """PEFT's tuner layers (LoRA, ...) inside ``model``; [] without peft."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


class Watch:
    """A snapshot of what makes ``model`` compute what it computes, and the one-pass test that it still holds.

    Attributes:
        generation: how many changes were seen; what kvmem caches per model is keyed on it.
        offloaded: whether some weight is on the ``meta`` device (accelerate offload): never `unchanged`.
    """

    def __init__(self, model):
        self.generation = 0
        self._model = weakref.ref(model)
        self._take()

    def _take(self) -> None:
        base = base_model(self._model())
        self.epoch = _EPOCH[0]
        self.marked = False
        entries, self.offloaded = [], False
        for module in base.modules():
            _WATCHED.add(module)
            slots = module._parameters  # the dict a module keeps its parameters in: read by identity below
            for name, p in slots.items():
                if p is not None:
                    self.offloaded |= p.device.type == "meta"
                    version = None if p.is_inference() else p._version  # inference tensors keep no counter
                    entries.append((slots, name, weakref.ref(p), weakref.ref(p.untyped_storage()), version))
        self._entries = entries
        self._tuners = [(weakref.ref(layer), _tuner_state(layer)) for layer in tuner_layers(base)]

    def unchanged(self) -> bool:
        """True when no parameter, storage, version counter, tuner state or module registration changed: one pass
        over the recorded references (no weight is read, nothing is synchronised with a device)."""
        if self.marked or self.offloaded or _EPOCH[0] != self.epoch or self._model() is None:
            return False
        # one plain loop with an early exit: measured as fast as flat map() passes over the 272 weights of SmolLM2
        for slots, name, p_ref, s_ref, version in self._entries:
            p = slots.get(name)
            if (p is None or p is not p_ref() or p.untyped_storage() is not s_ref()
                    or (version is not None and p._version != version)):
                return False
        for layer_ref, state in self._tuners:
            layer = layer_ref()
            if layer is None or _tuner_state(layer) != state:
                return False
        return True

    def refresh(self) -> int:
        """Check; on a change take a new snapshot and count a new generation. Returns the generation."""
        if not self.unchanged():
            self._take()
            self.generation += 1
        return self.generation


_WATCHES: "weakref.WeakKeyDictionary[object, Watch]" = weakref.WeakKeyDictionary()


def watch(model) -> Watch:
    """The `Watch` of ``model`` (made on first use; kept outside the model, so copying a model never copies it)."""
    w = _WATCHES.get(model)
    if w is None:
        w = _WATCHES[model] = Watch(model)
    return w


def mark_changed(model) -> None:
    """Tell kvmem that ``model``'s weights changed in a way its watch cannot see (a write through ``.data`` or
    raw storage): the next request checks every weight again (rehashing those whose sampled values moved; for a
    sparse edit that no sample sees, `kvmem.verify_weights` hashes every element). Marks every watch over the same
    base model (a PEFT wrapper and the model inside it)."""
    base = base_model(model)
    for key, w in list(_WATCHES.items()):
        if base_model(key) is base:
            w.marked = True
