"""AdapterCube: parametric memory. A LoRA adapter packaged like a MemCube: one safetensors file with the
adapter weights, its PEFT config, the fingerprint of the base model it belongs to and a checksum.

Only LoRA (PEFT's most common adapter) is supported; others are refused with a CubeError.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import xxhash

from .._version import __version__
from ..errors import CubeError
from ..model.facts import base_model
from .fingerprint import (
    adapter_config_facts,
    check_fields,
    fingerprint_fields,
    fingerprint_id,
)
from .format import read_cube_file, write_cube_file

FORMAT = "kvmem.adaptercube"


def _peft():
    try:
        import peft
    except ImportError:
        raise ModuleNotFoundError("adapters need PEFT: pip install 'kvmem[peft]' (or pip install peft)") from None
    return peft


def _plain(value):
    """JSON-ready copy: sets become sorted lists, enums their value, anything else exotic its str."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "value") and type(value).__module__.startswith("peft"):
        return value.value
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _digest(tensors: dict[str, torch.Tensor], config: dict) -> str:
    h = xxhash.xxh3_128(json.dumps(config, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
    return h.hexdigest()


def _check_fits(model, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Every LoRA tensor must sit on a module of ``model`` whose shape it fits: else it is the wrong adapter."""
    modules = dict(base_model(model).named_modules())
    for key, t in tensors.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        path = key.split(".lora_")[0]
        for prefix in ("base_model.model.", ""):
            if path.startswith(prefix) and path[len(prefix):] in modules:
                module = modules[path[len(prefix):]]
                break
        else:
            raise CubeError(f"adapter {source} targets {path!r}, which this model does not have: it was trained "
                            "for another architecture; use it with its own base model")
        base = getattr(module, "base_layer", module)
        fan_in, fan_out = getattr(base, "in_features", None), getattr(base, "out_features", None)
        if ".lora_A." in key and fan_in is not None and t.shape[-1] != fan_in:
            raise CubeError(f"adapter {source}: {key} expects {t.shape[-1]} input features, {path} has {fan_in}; "
                            "it was trained for another model size")
        if ".lora_B." in key and fan_out is not None and t.shape[0] != fan_out:
            raise CubeError(f"adapter {source}: {key} produces {t.shape[0]} features, {path} has {fan_out}; "
                            "it was trained for another model size")


def _check_ranks(path, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Every rank the metadata declares (PEFT allocates LoRA layers of that size when the adapter is used) must be
    one the file's own LoRA tensors have: a forged ``r`` of 10**12 is refused here, not allocated later."""
    ranks = {int(t.shape[0]) for key, t in tensors.items() if ".lora_A." in key and t.dim() == 2}
    ranks |= {int(t.shape[1]) for key, t in tensors.items() if ".lora_B." in key and t.dim() == 2}
    try:
        config = meta["peft_config"]
        declared = [meta["rank"], config.get("r", meta["rank"]), *dict(config.get("rank_pattern") or {}).values()]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CubeError(f"{path}: adapter metadata garbles its ranks ({exc}); rebuild the cube") from None
    if not ranks:
        raise CubeError(f"{path}: the adapter holds no 2-D lora_A / lora_B weights; rebuild the cube")
    for value in declared:
        if isinstance(value, bool) or not isinstance(value, int) or value not in ranks:
            raise CubeError(f"{path}: the metadata declares LoRA rank {value!r:.40}, but the adapter's weights have "
                            f"ranks {sorted(ranks)}; the cube is damaged or forged; rebuild it")


class AdapterCube:
    """Parametric memory: a LoRA adapter with the base-model fingerprint it belongs to.

    Build with `from_peft`, persist with `save` / `load`, activate with ``kvmem.wrap(...).use_adapter(cube)``.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict):
        self._tensors = tensors
        self._meta = meta

    @classmethod
    def from_peft(cls, source, name: str | None = None, *, base_model=None, adapter_name: str | None = None
                  ) -> "AdapterCube":
        """Package a PEFT LoRA adapter.

        Args:
            source: a ``peft.PeftModel`` (its base model is fingerprinted), or the path of a PEFT adapter folder
                (``adapter_config.json`` + ``adapter_model.safetensors``; then pass ``base_model``).
            name: a name for the cube (default: the adapter name or folder name).
            base_model: the model the adapter belongs to (required with a folder; checked against it).
            adapter_name: which adapter of a PeftModel (default: the active one).
        """
        peft = _peft()
        if isinstance(source, (str, os.PathLike)):
            folder = Path(source)
            if not (folder / "adapter_config.json").is_file():
                raise CubeError(f"{folder} is not a PEFT adapter folder (no adapter_config.json)")
            weights = folder / "adapter_model.safetensors"
            if not weights.is_file():
                found = "adapter_model.bin (a pickle)" if (folder / "adapter_model.bin").exists() else "no weights"
                raise CubeError(f"{folder} has {found}; kvmem reads only safetensors: re-save the adapter with "
                                "save_pretrained(..., safe_serialization=True)")
            if base_model is None:
                raise CubeError("pass base_model= (the model the adapter was trained on) so the cube records the "
                                "base model it belongs to")
            try:
                config = peft.PeftConfig.from_pretrained(str(folder))
                from safetensors.torch import load_file
                tensors = load_file(str(weights))
            except Exception as exc:
                raise CubeError(f"cannot read the PEFT adapter in {folder}: {type(exc).__name__}: {exc}") from None
            model, provenance, default_name = base_model, str(folder.resolve()), folder.name
        elif isinstance(source, peft.PeftModel):
            adapter_name = adapter_name or source.active_adapter
            if adapter_name not in source.peft_config:
                raise CubeError(f"the PeftModel has no adapter {adapter_name!r} (it has {list(source.peft_config)})")
            config = source.peft_config[adapter_name]
            tensors = {k: v.detach().clone() for k, v in
                       peft.get_peft_model_state_dict(source, adapter_name=adapter_name).items()}
            model, provenance, default_name = source, "PeftModel", adapter_name
            if base_model is not None:
                check_fields({**fingerprint_fields(base_model), "adapter": None},
                             {**fingerprint_fields(source.get_base_model()), "adapter": None}, what="base_model")
        else:
            raise CubeError(f"from_peft takes a PeftModel or a PEFT adapter folder, got {type(source).__name__}")
        if getattr(config, "peft_type", None) != peft.PeftType.LORA:
            raise CubeError(f"only LoRA adapters are supported, this one is {getattr(config, 'peft_type', '?')}")
        if not tensors:
            raise CubeError("the adapter has no weights")
        _check_fits(model, tensors, provenance)
        base_fields = fingerprint_fields(base_model or model)
        base_fields["adapter"], base_fields["tokenizer"] = None, None
        facts = adapter_config_facts(config)
        meta = {
            "name": name or default_name,
            "peft_config": _plain(config.to_dict()),
            "config_facts": facts,
            "rank": int(config.r),
            "target_modules": facts["target_modules"],
            "adapter_digest": _digest(tensors, facts),
            "base_fingerprint": fingerprint_id(base_fields),
            "base_fingerprint_fields": base_fields,
            "provenance": provenance,
            "peft_version": peft.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kvmem_version": __version__,
        }
        return cls(tensors, meta)

    def save(self, path: str | os.PathLike) -> str:
        """Save to one ``.safetensors`` file, atomically. Returns the path."""
        return str(write_cube_file(path, FORMAT, self._meta, self._tensors))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AdapterCube":
        """Load and validate (format, version, checksum, weights digest) an AdapterCube."""
        meta, tensors = read_cube_file(path, FORMAT)
        try:
            facts, digest = meta["config_facts"], meta["adapter_digest"]
            meta["base_fingerprint_fields"]["model"]
            str(meta["name"]), int(meta["rank"]), dict(meta["peft_config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CubeError(f"{path}: adapter metadata lacks or garbles {exc}; rebuild the cube") from None
        if _digest(tensors, facts) != digest:
            raise CubeError(f"{path}: adapter weights do not match their recorded digest; rebuild the cube")
        _check_ranks(path, meta, tensors)
        return cls(tensors, meta)

    def check_base(self, model) -> None:
        """FingerprintMismatch unless ``model`` (adapters aside) is the base model this adapter belongs to."""
        actual = fingerprint_fields(base_model(model))
        actual["adapter"], actual["tokenizer"] = None, None
        check_fields(self._meta["base_fingerprint_fields"], actual, what=f"adapter {self.name!r}")
        _check_fits(model, self._tensors, self.name)

    @property
    def config(self):
        """A fresh peft LoraConfig for this adapter (inference mode)."""
        peft = _peft()
        d = dict(self._meta["peft_config"])
        d["inference_mode"] = True
        return peft.LoraConfig(**{k: v for k, v in d.items() if k in peft.LoraConfig.__dataclass_fields__})

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter weights as PEFT's get_peft_model_state_dict names them (do not modify)."""
        return self._tensors

    @property
    def name(self) -> str:
        return self._meta["name"]

    @property
    def rank(self) -> int:
        return self._meta["rank"]

    @property
    def target_modules(self):
        return self._meta["target_modules"]

    @property
    def digest(self) -> str:
        return self._meta["adapter_digest"]

    @property
    def fingerprint(self) -> str:
        """Short id of the base model this adapter belongs to."""
        return self._meta["base_fingerprint"]

    @property
    def meta(self) -> dict:
        import copy
        return copy.deepcopy(self._meta)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def __repr__(self) -> str:
        return (f"AdapterCube(name={self.name!r}, rank={self.rank}, targets={self.target_modules}, "
                f"{self.nbytes / 1e6:.1f} MB, base={self.fingerprint})")
