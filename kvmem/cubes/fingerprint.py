"""What a cube belongs to: model config facts, a weights digest, a tokenizer digest and the active adapter.

A fingerprint is a small dict of fields; `fingerprint_id` hashes it into the short id that `MemCube.fingerprint`
shows. `check_fields` compares the fields a cube recorded with the ones of the model it is used with and
raises `FingerprintMismatch` naming every field that differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from typing import Any

import torch
import xxhash

from ..errors import CubeError, FingerprintMismatch
from ..model.devices import hooks
from ..model.facts import base_model, text_config
from ..timing import one_thread

FIELDS = ("model", "weights", "tokenizer", "adapter")

# Per weight tensor, this many evenly spaced elements are compared at every call against the values seen when
# the tensor was last hashed in full: a cheap watch for edits that do not bump ``tensor._version``.
_SAMPLES_PER_TENSOR = 2048
_CHUNK = 1 << 24          # elements hashed (and converted) per step: bounds the temporary copies
# canonical dtypes a checkpoint is compared in across dtypes (see `same_weights`)
_CANONICAL = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Config keys that change the shape or the values of the KV cache.
_CONFIG_KEYS = (
    "model_type", "architectures", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "hidden_size", "vocab_size", "max_position_embeddings", "rope_parameters", "rope_theta",
    "rope_scaling", "partial_rotary_factor", "sliding_window", "layer_types", "attention_bias",
)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def model_facts(model) -> dict:
    """Config facts that shape the KV cache of ``model`` (a PreTrainedModel, PEFT-wrapped or not)."""
    config = text_config(model)
    return {key: _jsonable(getattr(config, key)) for key in _CONFIG_KEYS if getattr(config, key, None) is not None}


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
    hashers = {"exact": xxhash.xxh3_128(), "bf16": None if t.dtype == torch.float16 else xxhash.xxh3_128(),
               "fp16": xxhash.xxh3_128()}
    for piece in t.detach().reshape(-1).split(_CHUNK):
        piece = piece.to("cpu").contiguous()
        raw = _bytes(piece)
        hashers["exact"].update(raw)
        for name, dtype in _CANONICAL.items():
            if hashers[name] is not None:
                same = not piece.is_floating_point() or piece.dtype == dtype
                hashers[name].update(raw if same else _bytes(piece.to(dtype)))
    return {name: h.hexdigest() if h is not None else None for name, h in hashers.items()}


def _tensor_key(t: torch.Tensor) -> tuple:
    """What identifies a tensor's values short of reading them: storage, place, layout and version counter."""
    try:
        version = t._version
    except RuntimeError:  # an inference-mode tensor: no version counter, and nothing outside that mode edits it
        version = None
    return (t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, str(t.device), version)


class _OffloadedFile:
    """A weight accelerate keeps on disk (``offload_folder``): read through its ``OffloadedWeightsLoader`` when it
    must be hashed, and otherwise identified by the file's stat, so the per-call check reads no weight bytes."""

    def __init__(self, loader, key: str, param: torch.Tensor):
        self.loader, self.key, self.shape, self.dtype = loader, key, tuple(param.shape), param.dtype

    def stamp(self) -> tuple:
        entry = self.loader.index[self.key]
        if entry.get("safetensors_file") is not None:
            path, inner = entry["safetensors_file"], entry.get("weight_name", self.key)
        else:
            path, inner = os.path.join(self.loader.save_folder, f"{self.key}.dat"), None
        try:
            st = os.stat(path)
        except OSError as e:
            raise CubeError(f"the disk-offloaded weight {self.key!r} cannot be read ({e}): its offload folder was "
                            "removed or moved; dispatch the model again (accelerate.dispatch_model / "
                            "from_pretrained(device_map=..., offload_folder=...))") from None
        return (path, inner, st.st_ino, st.st_size, st.st_mtime_ns, entry.get("dtype"), self.shape, self.dtype)

    def digests(self) -> dict[str, str | None]:
        """The weight's full digests: cached on the loader under the file's stat; hashed in full when it moves."""
        cache = self.loader.__dict__.setdefault("_kvmem_digests", {})
        stamp = self.stamp()
        cached = cache.get(self.key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        digests = _full_digests([_as_held(self.loader[self.key], self.dtype)])[0]
        cache[self.key] = (stamp, digests)
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
    A disk-offloaded weight (an `_OffloadedFile`) is hashed again when its file's stat changes (path, inode,
    size, modification time); nothing of it is read otherwise.
    """
    in_memory = [i for i, t in enumerate(tensors) if isinstance(t, torch.Tensor)]
    samples = dict(zip(in_memory, samples if samples is not None else _quiet(_samples, [tensors[i] for i in in_memory])))
    shapes = ";".join(f"{tuple(t.shape)}" for t in tensors)
    per, stale = [], []
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            per.append(t.digests())
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


def _as_held(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value`` in the dtype the model holds it in (accelerate casts an offloaded float weight so on loading)."""
    return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value


def _offloaded_value(weights_map, key: str, param: torch.Tensor):
    """What an accelerate offload hook's ``weights_map`` holds under ``key``: a tensor in memory (CPU offload),
    an `_OffloadedFile` (disk offload), or None. Read without loading a disk-offloaded weight."""
    from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset

    while isinstance(weights_map, PrefixedDataset):
        key, weights_map = weights_map.prefix + key, weights_map.dataset
    if isinstance(weights_map, OffloadedWeightsLoader):
        if key in weights_map.state_dict:
            return _as_held(weights_map.state_dict[key], param.dtype)
        return _OffloadedFile(weights_map, key, param) if key in weights_map.index else None
    try:
        value = weights_map[key]
    except (KeyError, TypeError):
        return None
    return _as_held(value, param.dtype) if isinstance(value, torch.Tensor) else None


def _real_weight(modules: dict, name: str, param: torch.Tensor):
    """The real value of the offloaded (meta) parameter ``name``, from the accelerate hook that loads it before
    each forward (on its module or, with ``place_submodules``, on an ancestor); None when no hook holds it."""
    parts = name.split(".")
    for j in range(len(parts) - 1, -1, -1):  # nearest module first
        for hook in hooks(modules.get(".".join(parts[:j]))):
            if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
                value = _offloaded_value(hook.weights_map, ".".join(parts[j:]), param)
                if value is not None:
                    return value
    return None


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
            p = _real_weight(modules, name, p)
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


def same_weights(recorded, actual) -> bool:
    """Whether two ``weights`` fields name the same checkpoint: equal ``exact`` digests in one dtype; across
    dtypes, equal digests rounded to the 16-bit dtype involved (float16 before bfloat16: a bfloat16
    checkpoint holds exactly in float16, so the two agree there too)."""
    if not (isinstance(recorded, dict) and isinstance(actual, dict)):
        return recorded == actual
    if recorded.get("coverage") != actual.get("coverage"):
        return False
    if recorded.get("dtype") == actual.get("dtype"):
        return recorded.get("exact") == actual.get("exact")
    dtypes = {recorded.get("dtype"), actual.get("dtype")}
    order = [name for name, dtype in (("fp16", "torch.float16"), ("bf16", "torch.bfloat16")) if dtype in dtypes]
    for name in order or ["fp16", "bf16"]:
        if recorded.get(name) is not None and recorded.get(name) == actual.get(name):
            return True
    return False


def _tuner_layers(model) -> list:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


# LoraConfig fields that change what an adapter computes (the rest is bookkeeping: paths, modes, versions)
ADAPTER_CONFIG_KEYS = ("r", "lora_alpha", "use_rslora", "use_dora", "target_modules", "fan_in_fan_out", "bias",
                       "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform", "lora_bias")


def adapter_config_facts(config) -> dict:
    """The numerics-relevant fields of a PEFT config, JSON-ready (sets sorted)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    out = {}
    for key in ADAPTER_CONFIG_KEYS:
        value = d.get(key)
        out[key] = sorted(value) if isinstance(value, (set, frozenset, tuple, list)) else value
    return _jsonable(out)


def adapter_facts(model) -> dict | None:
    """A digest of the active PEFT adapter(s) of ``model`` (weights and the config that shapes them); None for a
    bare model or while adapters are disabled (``with model.disable_adapter():``).

    Read from the LoRA layers themselves, so it works for a ``PeftModel``, the model inside it and models
    with adapters loaded through transformers alike. Adapter names are not part of it: the same adapter
    loaded under another name is the same adapter.
    """
    layers = _tuner_layers(model)
    if not layers or layers[0].disable_adapters:
        return None
    active = list(layers[0].active_adapters)
    if not active:
        return None
    params = [p for name, p in _weights(model, adapter=True) if any(f".{a}." in f"{name}." for a in active)]
    configs = getattr(model, "peft_config", None) or {}
    facts = [adapter_config_facts(configs.get(a)) if isinstance(configs, dict) and a in configs else None
             for a in active]
    return {"count": len(active), "digest": _hash(_digests(params)["exact"].encode(),
                                                   json.dumps(facts, sort_keys=True).encode())}


def tokenizer_digest(tokenizer) -> str:
    """A digest of the vocabulary and special tokens; cached on the tokenizer object."""
    if not callable(getattr(tokenizer, "get_vocab", None)):
        raise CubeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    # keyed on what add_tokens / special-token edits change, so an edited tokenizer is digested anew
    key = (len(tokenizer), json.dumps(_jsonable(tokenizer.special_tokens_map), sort_keys=True))
    cached = getattr(tokenizer, "_kvmem_digest", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    h = hashlib.blake2b(digest_size=16)
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    h.update(json.dumps(_jsonable(tokenizer.special_tokens_map), sort_keys=True).encode())
    digest = h.hexdigest()
    try:
        tokenizer._kvmem_digest = (key, digest)
    except AttributeError:  # some tokenizer classes forbid new attributes: recompute next time
        pass
    return digest


def fingerprint_fields(model, tokenizer=None) -> dict:
    """All fingerprint fields for ``model`` (and ``tokenizer``, which may be None: then it is not checked)."""
    if not (isinstance(model, torch.nn.Module) and hasattr(model, "config")):
        swapped = " (model and tokenizer swapped?)" if callable(getattr(model, "get_vocab", None)) else ""
        raise CubeError(f"model must be a transformers model (a PreTrainedModel), got {type(model).__name__}"
                        f"{swapped}")
    return {
        "model": model_facts(model),
        "weights": weights_digest(model),
        "tokenizer": tokenizer_digest(tokenizer) if tokenizer is not None else None,
        "adapter": adapter_facts(model),
    }


def fingerprint_id(fields: dict) -> str:
    """The short id shown as ``cube.fingerprint``: a hash of the model, weights and adapter fields.

    The tokenizer is left out so that a cube built from ids (no tokenizer at hand) and one built from text
    on the same model share an id, and the weights enter dtype-independently; all are checked field by field.
    """
    weights = fields.get("weights")
    core = {"model": fields.get("model"), "adapter": fields.get("adapter"),
            "weights": (weights.get("fp16") or weights.get("bf16")) if isinstance(weights, dict) else weights}
    return hashlib.blake2b(json.dumps(core, sort_keys=True).encode(), digest_size=8).hexdigest()


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


_FIXES = {
    "model": "the cube comes from another model architecture or config",
    "weights": "the weights differ (another checkpoint or a fine-tune; a cube recorded with an older kvmem's "
               "sampled digest must be rebuilt)",
    "tokenizer": "the tokenizer differs, so the cube's token ids mean other text",
    "adapter": "the active LoRA adapter differs from the one the cube was built under",
}


def check_fields(recorded: dict, actual: dict, *, what: str = "cube") -> None:
    """Raise FingerprintMismatch naming every field where ``recorded`` and ``actual`` differ.

    A tokenizer field that is None on either side was not known and is not compared.
    """
    if not isinstance(recorded, dict) or not all(isinstance(recorded.get(f), (dict, str, type(None))) for f in FIELDS) \
            or not isinstance(recorded.get("model"), dict):
        raise CubeError(f"{what} has damaged fingerprint fields; rebuild the cube")
    differ = []
    for field in FIELDS:
        rec, act = recorded.get(field), actual.get(field)
        if field == "tokenizer" and (rec is None or act is None):
            continue
        if field == "weights":  # across dtypes: the rounded digests (the dtype check itself is separate)
            if not same_weights(rec, act):
                differ.append(field)
        elif rec != act:
            differ.append(field)
    if not differ:
        return
    lines = [f"{what} was built for another {'/'.join(differ)}:"]
    for field in differ:
        if field == "model":
            keys = sorted(set(recorded.get("model") or {}) | set(actual.get("model") or {}))
            diffs = [k for k in keys if (recorded.get("model") or {}).get(k) != (actual.get("model") or {}).get(k)]
            detail = ", ".join(f"{k}: cube {_short((recorded.get('model') or {}).get(k))} vs model "
                               f"{_short((actual.get('model') or {}).get(k))}" for k in diffs)
        else:
            detail = f"cube {_short(recorded.get(field))} vs now {_short(actual.get(field))}"
        lines.append(f"  - {field}: {_FIXES[field]} ({detail})")
    lines.append("Rebuild the cube with this model, tokenizer and adapter (MemCube.from_text / `kvmem build`), "
                 "or use it with the model it was built for.")
    raise FingerprintMismatch("\n".join(lines), differ)
