"""Hot-swapping AdapterCubes on a live model through PEFT, several resident up to a byte capacity (LRU).

The first adapter wraps the base model in a ``peft.PeftModel`` (PEFT injects LoRA layers in place); later
adapters are added beside it and switched with ``set_adapter``, which only flips flags: no reload of the base.
``use(None)`` disables the LoRA layers, whose forward is then exactly the base layer's.

With ``hotswap=True`` there is one adapter slot whose weights are overwritten in place by peft's
``hotswap_adapter_from_state_dict``: parameter objects never change, so a ``torch.compile``d model is not
recompiled. That needs adapters with the same target modules and ranks no larger than the slot's (set
``max_rank`` to pad the slot for mixed ranks).

With ``merged=True`` an adapter is served by a copy of the base model with the LoRA merged into its weights
(PEFT's ``merge_and_unload`` on a deep copy, made at the adapter's first use; the ``merged_copies`` most recently
used are kept): a request then costs what the base model costs (no LoRA branch per projection), and the base model
itself is never touched, so ``use(None)`` is still exactly the base. The price is one copy of the weights per kept
adapter and a first use that takes the copy and merge; outputs equal the unmerged adapter's up to float rounding.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager

from .._deprecation import renamed
from ..cubes.adaptercube import AdapterCube, _peft
from ..errors import CubeError
from ..model.watch import mark_changed

DEFAULT_CAPACITY_BYTES = 256 * 2**20


class AdapterBridge:
    """Which adapters are resident on the model, which is active, and the swaps between them."""

    def __init__(self, model, *, capacity_bytes: int = DEFAULT_CAPACITY_BYTES, hotswap: bool = False,
                 max_rank: int | None = None, merged: bool = False, merged_copies: int = 1, **deprecated):
        capacity_bytes = renamed(deprecated, "budget_bytes", "capacity_bytes", capacity_bytes, where="AdapterBridge()")
        if deprecated:
            raise TypeError(f"AdapterBridge() got unexpected keyword arguments {sorted(deprecated)}")
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise CubeError(f"adapter capacity_bytes must be a positive int, got {capacity_bytes!r}")
        self.base = model
        self.peft = None
        self.capacity_bytes = capacity_bytes
        if merged and hotswap:
            raise CubeError("pick one of hotswap=True (one LoRA slot written in place) and merged=True (a merged "
                            "copy of the weights per adapter)")
        if isinstance(merged_copies, bool) or not isinstance(merged_copies, int) or merged_copies < 1:
            raise CubeError(f"merged_copies must be an int >= 1, got {merged_copies!r}")
        self.hotswap, self.max_rank = hotswap, max_rank
        self.merged, self.merged_copies = merged, merged_copies
        self._copies: OrderedDict[str, object] = OrderedDict()  # adapter digest -> merged copy of the base, LRU first
        self.resident: OrderedDict[str, int] = OrderedDict()  # adapter slot name -> bytes, LRU first
        self.active: AdapterCube | None = None
        self._checked: set[str] = set()  # adapter digests already matched against the base model
        self._layers: list | None = None  # the LoRA layers, found once per load (loads can add layers)
        self.stats = {"swaps": 0, "loads": 0, "evictions": 0}

    @property
    def model(self):
        """The model that runs: the active adapter's merged copy (``merged=True``), the PeftModel once an adapter
        was used, else the base model."""
        if self.merged and self.active is not None:
            return self._copies[self.active.digest]
        return self.peft if self.peft is not None else self.base

    @property
    def resident_bytes(self) -> int:
        return sum(self.resident.values())

    @contextmanager
    def using(self, cube: AdapterCube | None | str = "keep"):
        """``with bridge.using(cube):`` runs the block with ``cube`` active (None: the base model), then restores
        the adapter that was active before, also when the block raises. "keep" changes nothing."""
        if isinstance(cube, str) and cube == "keep":
            yield
            return
        previous = self.active
        self.use(cube)
        try:
            yield
        finally:
            self.use(previous)

    def use(self, cube: AdapterCube | None) -> None:
        """Make ``cube`` the active adapter (None: the base model, exactly)."""
        if cube is None:
            if self.peft is not None and self.active is not None:
                self._flip(None)
                self.stats["swaps"] += 1
            self.active = None
            return
        if not isinstance(cube, AdapterCube):
            raise CubeError(f"use_adapter takes an AdapterCube or None, got {type(cube).__name__} "
                            "(load one with kvmem.AdapterCube.load(path))")
        if self.active is not None and self.active.digest == cube.digest:
            return
        if cube.digest not in self._checked:
            cube.check_base(self.base)
            self._checked.add(cube.digest)
        if self.merged:
            self._merge(cube)
            self.active = cube
            self.stats["swaps"] += 1
            return
        slot = self._load_hotswap(cube) if self.hotswap else self._load(cube)
        self._flip(slot)
        self.resident.move_to_end(slot)
        self.active = cube
        self.stats["swaps"] += 1

    def _flip(self, slot: str | None) -> None:
        """Activate ``slot`` (None: disable adapters). PEFT's set_adapter walks every module and resets
        requires_grad (~20 ms on a 30-layer model); for inference only the LoRA layers' flags matter, so flip
        those directly (~0.3 ms). Adapters with modules_to_save take PEFT's own path."""
        if self._layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer
            self._layers = [m for m in self.peft.modules() if isinstance(m, BaseTunerLayer)]
        if any(getattr(c, "modules_to_save", None) for c in self.peft.peft_config.values()):
            if slot is None:
                self.peft.base_model.disable_adapter_layers()
            else:
                self.peft.set_adapter(slot)
                self.peft.base_model.enable_adapter_layers()
            return
        for layer in self._layers:
            if slot is not None:
                layer._active_adapter = [slot]
            layer._disable_adapters = slot is None
        if slot is not None:
            self.peft.base_model.active_adapter = slot
            self.peft.active_adapter = slot  # PeftModel keeps its own copy (what mm.model.active_adapter says)

    def _load(self, cube: AdapterCube) -> str:
        peft = _peft()
        slot = "kvmem_" + cube.digest[:16]
        if slot in self.resident:
            return slot
        if self.peft is None:
            self.peft = peft.PeftModel(self.base, cube.config, adapter_name=slot)
        else:
            self.peft.add_adapter(slot, cube.config)
        self._layers = None
        result = peft.set_peft_model_state_dict(self.peft, cube.state_dict, adapter_name=slot)
        missing = [k for k in getattr(result, "missing_keys", []) if f".{slot}" in k and "lora_" in k]
        if missing:
            self.peft.delete_adapter(slot)
            raise CubeError(f"adapter {cube.name!r} lacks weights for {missing[:3]}...; rebuild it from its PEFT folder")
        self.peft.eval()
        self.resident[slot] = cube.nbytes
        self.stats["loads"] += 1
        self.peft.set_adapter(slot)  # before evicting, so PEFT never sees its active adapter deleted
        self._evict(keep=slot)
        return slot

    def _merge(self, cube: AdapterCube) -> None:
        """Make (or reuse) the copy of the base with ``cube`` merged in; drop the least recently used beyond
        ``merged_copies``."""
        if cube.digest in self._copies:
            self._copies.move_to_end(cube.digest)
            return
        import copy

        from peft.tuners.tuners_utils import BaseTunerLayer

        peft = _peft()
        clone = copy.deepcopy(self.base)
        for module in list(clone.modules()):  # LoRA layers another bridge injected into the base: not copied
            for name, child in list(module.named_children()):
                if isinstance(child, BaseTunerLayer):
                    setattr(module, name, child.get_base_layer())
        if "peft_config" in vars(clone):  # left by that injection: the copy is a bare model now
            del clone.peft_config
        wrapped = peft.PeftModel(clone, cube.config, adapter_name="merged")
        peft.set_peft_model_state_dict(wrapped, cube.state_dict, adapter_name="merged")
        self._copies[cube.digest] = wrapped.merge_and_unload().eval()
        self.stats["loads"] += 1
        while len(self._copies) > self.merged_copies:
            self._copies.popitem(last=False)
            self.stats["evictions"] += 1

    def _evict(self, keep: str) -> None:
        for slot in list(self.resident):
            if self.resident_bytes <= self.capacity_bytes:
                break
            if slot != keep:
                self.peft.delete_adapter(slot)
                self._layers = None
                del self.resident[slot]
                self.stats["evictions"] += 1

    def _load_hotswap(self, cube: AdapterCube) -> str:
        peft = _peft()
        from peft.utils.hotswap import (
            check_hotswap_configs_compatible,
            hotswap_adapter_from_state_dict,
            prepare_model_for_compiled_hotswap,
        )
        from peft.utils.save_and_load import _insert_adapter_name_into_state_dict

        slot = "kvmem_slot"
        if self.peft is None:
            self.peft = peft.PeftModel(self.base, cube.config, adapter_name=slot)
            self._layers = None
            peft.set_peft_model_state_dict(self.peft, cube.state_dict, adapter_name=slot)
            if self.max_rank:
                prepare_model_for_compiled_hotswap(self.peft, target_rank=self.max_rank, check_compiled="ignore")
            self.peft.eval()
            self.resident[slot] = cube.nbytes
            self.stats["loads"] += 1
            return slot
        try:
            check_hotswap_configs_compatible(self.peft.peft_config[slot], cube.config)
            state = _insert_adapter_name_into_state_dict(cube.state_dict, adapter_name=slot, parameter_prefix="lora_")
            hotswap_adapter_from_state_dict(self.peft, state, adapter_name=slot, config=cube.config)
        except (RuntimeError, ValueError) as exc:
            raise CubeError(f"adapter {cube.name!r} cannot be hot-swapped into the slot ({exc}); hot swap needs the "
                            "same target modules and a rank no larger than the slot's (wrap(..., max_rank=R)), "
                            "or use wrap(..., hotswap=False)") from None
        self.peft.peft_config[slot] = cube.config  # keeps the fingerprint of KV cubes built under it right
        mark_changed(self.peft)  # peft's hot swap writes the slot through .data: no version counter sees it
        self.resident[slot] = cube.nbytes
        self.stats["loads"] += 1
        return slot
