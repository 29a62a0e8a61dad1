"""What a cube belongs to: model config facts, a weights digest, a tokenizer digest and the active adapter.

A fingerprint is a small dict of fields; `fingerprint_id` hashes it into the short id that `MemCube.fingerprint`
shows. `check_fields` compares the fields a cube recorded with the ones of the model it is used with and
raises `FingerprintMismatch` naming every field that differs. The weights digest itself is `kvmem.cubes.weights`'.
Per request the fields of an unchanged model are taken from its resolved facts (`kvmem.model.resolve.resolve`):
only the config facts and the tokenizer key are read again.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

import torch

from ..errors import CubeError, FingerprintMismatch
from ..model.facts import text_config
from ..model.resolve import resolve
from ..model.watch import tuner_layers
from .weights import (  # noqa: F401
    _CANONICAL,
    _SAMPLES_PER_TENSOR,
    _digests,
    _hash,
    _weights,
    forget_digests,
    verify_weights,
    weights_digest,
)

FIELDS = ("model", "weights", "tokenizer", "adapter")

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
    layers = tuner_layers(model)
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


def fingerprint_fields(model, tokenizer=None, *, facts=None) -> dict:
    """All fingerprint fields for ``model`` (and ``tokenizer``, which may be None: then it is not checked).

    The weights and adapter digests are kept for the model's generation (``facts``: its `resolve`d facts, when
    the caller has them): an unchanged model's request reads no weight. See `kvmem.model.watch` for what starts a
    new generation and what does not (writes through ``.data``: `verify_weights`).
    """
    if not (isinstance(model, torch.nn.Module) and hasattr(model, "config")):
        swapped = " (model and tokenizer swapped?)" if callable(getattr(model, "get_vocab", None)) else ""
        raise CubeError(f"model must be a transformers model (a PreTrainedModel), got {type(model).__name__}"
                        f"{swapped}")
    facts = facts if facts is not None else resolve(model)
    return {
        "model": _current_model_facts(model, facts),
        "weights": dict(facts.remember("weights", lambda: weights_digest(model))),
        "tokenizer": tokenizer_digest(tokenizer) if tokenizer is not None else None,
        "adapter": facts.remember("adapter", lambda: adapter_facts(model)),
    }


def _current_model_facts(model, facts) -> dict:
    """`model_facts`, kept for the generation while the raw config values are equal to those it was read from
    (a config edit starts no new generation, so they are compared at every call: 16 reads, no JSON)."""
    raw = tuple(getattr(facts.config, key, None) for key in _CONFIG_KEYS)
    kept = facts.memo.get("model_facts")
    if kept is not None and kept[0] == raw:
        return kept[1]
    out = model_facts(model)
    facts.memo["model_facts"] = (copy.deepcopy(raw), out)  # a copy: an edit inside a dict value must show
    return out


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
