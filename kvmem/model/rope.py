"""RoPE facts per attention layer: whether its keys are rotated, by which inverse frequencies, in which pair
layout, and what the layer attends to. kvmem re-rotates a moved cube's keys with them.

Read from the model itself, not from a list of model types:
- the inverse frequencies come from the model's rotary module(s), wherever it keeps them (``model.rotary_emb``,
  ``gpt_neox.rotary_emb``, per-layer ``self_attn.rotary_emb``, or one module holding ``<layer_type>_inv_freq``
  per layer type as Gemma 3 does), so every scaling transformers implements comes out as the frequencies the
  model really uses;
- what each layer attends to (full, sliding window, chunked) comes from transformers' own reading of the config
  (``get_layer_types_and_kwargs``: ``layer_types``, ``sliding_window``, ``attention_chunk_size``);
- whether a layer rotates its keys at all (NoPE layers: SmolLM3, EXAONE 4, Cohere 2, Llama 4), in which layout
  (NeoX halves or GPT-J interleaved pairs) and over how many dims is *measured* once per model: the same few
  tokens run at positions [0, n) and [d, d + n); in a layer whose attention sees only relative positions the
  second run's keys are the first run's rotated by d (or equal to them, for a NoPE layer). A layer that matches
  neither is refused, naming the layer. So is RoPE whose angle is not linear in the position (dynamic NTK,
  longrope) and query scaling by absolute position (Llama 4's ``attn_temperature_tuning``, Ministral 3's
  ``llama_4_scaling_beta``): there no key rotation can make a moved cube exact.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

import torch

from ..errors import CubeError
from ..kernels.rotation import rotate, rotation_tables
from .devices import dtype_device
from .facts import base_model, eval_mode, text_config

# RoPE types whose angle is position * inv_freq with a fixed inv_freq.
LINEAR_IN_POSITION = frozenset({"default", "linear", "llama3", "yarn"})
# RoPE types whose frequencies depend on the sequence length: one cube equals a full prefill only while neither
# the cube nor the request crosses the threshold (original_max_position_embeddings).
LENGTH_DEPENDENT = frozenset({"dynamic", "longrope"})

_PROBE_TOKENS, _PROBE_SHIFT = 6, 5


@dataclass(frozen=True)
class LayerRope:
    """One attention layer's facts.

    Attributes:
        rotated: whether the layer's cached keys carry RoPE (False: a NoPE layer, copied as they are).
        inv_freq: [rotary_dim // 2] float32 of this layer (zeros for a NoPE layer).
        attention: "full_attention", "sliding_attention" or "chunked_attention".
        window: the sliding window or chunk size in tokens (None for full attention).
    """

    rotated: bool
    inv_freq: torch.Tensor
    attention: str = "full_attention"
    window: int | None = None


@dataclass(frozen=True)
class RopeFacts:
    """What kvmem needs to move cubes on a model: per-layer facts and the shared pair layout."""

    family: str
    layers: tuple[LayerRope, ...]
    interleaved: bool
    rope_type: str
    rotated_slot: str = "keys"  # "values" where the model caches its rotated part in the value slot (MLA)

    @property
    def inv_freq(self) -> torch.Tensor:
        """[layers, rotary_dim // 2] float32: each layer's inverse frequencies, zeros for NoPE layers (a rotation
        by angle 0 is the identity, exactly)."""
        return torch.stack([layer.inv_freq for layer in self.layers])

    @property
    def rotary_dim(self) -> int:
        return self.layers[0].inv_freq.numel() * 2


def attention_kinds(model) -> list[tuple[str, int | None]]:
    """Per layer (attention type, window or chunk size), as transformers' own caches read the config."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    config = text_config(model)
    types, kwargs = get_layer_types_and_kwargs(config)
    out = []
    for kind, kw in zip(types, kwargs):
        window = kw.get("sliding_window")
        out.append((kind, int(window) if window is not None else None))
    return out


def _rope_parameters(config) -> dict[str, dict]:
    """layer type (or "") -> rope parameters dict; handles per-layer-type nesting (Gemma 3, OLMo 3)."""
    params = getattr(config, "rope_parameters", None) or {}
    if not isinstance(params, dict):
        return {"": {}}
    if params and all(isinstance(v, dict) for v in params.values()):
        return params
    return {"": params}


def rope_types(model) -> set[str]:
    """Every RoPE type the model's config names ("default" when it names none)."""
    return {p.get("rope_type", p.get("type", "default")) or "default"
            for p in _rope_parameters(text_config(model)).values()}


def _refusal(model) -> str | None:
    """Why moving this model's cubes cannot be exact, read from its config; None when nothing forbids it."""
    config = text_config(model)
    kinds = rope_types(model)
    bad = sorted(kinds - LINEAR_IN_POSITION)
    if bad:
        why = ("its frequencies change with the sequence length" if set(bad) <= LENGTH_DEPENDENT
               else "kvmem does not know it to be linear in the position")
        return f"RoPE type {'/'.join(bad)} is not linear in the position ({why})"
    if any(p.get("llama_4_scaling_beta") for p in _rope_parameters(config).values()):
        return "queries are scaled by their absolute position (rope_parameters['llama_4_scaling_beta'])"
    if getattr(config, "attn_temperature_tuning", False):
        return "NoPE layers scale queries by their absolute position (attn_temperature_tuning)"
    if any(kind == "chunked_attention" for kind, _ in attention_kinds(model)):
        return "chunked attention layers see only their own chunk, so moving tokens changes what they attend to"
    return None


def _rotary_sources(model) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor], torch.Tensor | None]:
    """Inverse frequencies found in the model: per layer type, per layer index, and a shared one."""
    by_type, by_layer, shared = {}, {}, None
    for name, module in base_model(model).named_modules():
        buffers = dict(module.named_buffers(recurse=False))
        typed = {key[:-len("_inv_freq")]: t for key, t in buffers.items()
                 if key.endswith("_inv_freq") and not key.endswith("original_inv_freq")}
        if typed:
            by_type.update(typed)
        if "inv_freq" in buffers:
            index = re.search(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.", name + ".")
            if index is not None:
                by_layer[int(index.group(1))] = buffers["inv_freq"]
            elif shared is None:
                shared = buffers["inv_freq"]
    return by_type, by_layer, shared


def _layer_inv_freq(model, kinds) -> list[torch.Tensor]:
    by_type, by_layer, shared = _rotary_sources(model)
    out = []
    for i, (kind, _) in enumerate(kinds):
        freq = by_layer.get(i)
        if freq is None:
            freq = by_type.get(kind, shared)
        if freq is None:
            family = text_config(model).model_type
            raise CubeError(f"cannot move cubes on this {family} model: found no rotary embedding (an inv_freq "
                            f"buffer) for layer {i} ({kind}); inject one cube at a time")
        out.append(freq.detach().float().cpu())
    return out


def _probe_kv(model, start: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The two cache slots (keys, values) [kv_heads, n, dim] of every layer for fixed probe tokens at positions
    [start, start + n)."""
    from transformers import DynamicCache

    from .cache import cache_kwarg, kv_from_cache, output_cache

    config = text_config(model)
    _, device = dtype_device(model)
    vocab = int(getattr(config, "vocab_size", 0) or 0) or 1000
    ids = (torch.arange(_PROBE_TOKENS) * 7919 + 101) % vocab
    positions = torch.arange(start, start + _PROBE_TOKENS)
    try:
        with eval_mode(base_model(model)), torch.inference_mode():
            out = model(input_ids=ids[None].to(device), position_ids=positions[None].to(device), use_cache=True,
                        **{cache_kwarg(model): DynamicCache()})
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as exc:
        raise CubeError(f"cannot move cubes on this {config.model_type} model: measuring its RoPE needs a forward "
                        f"with explicit position_ids and a DynamicCache, which failed ({type(exc).__name__}: "
                        f"{str(exc)[:200]}); inject one cube at a time") from None
    return [(k[0].detach().double().cpu(), v[0].detach().double().cpu()) for k, v in kv_from_cache(output_cache(out))]


def _errors(a: torch.Tensor, b: torch.Tensor, freq: torch.Tensor) -> dict[str, float]:
    """Relative error of ``b`` (shifted run) against ``a`` unrotated, NeoX-rotated and interleaved-rotated."""
    scale = max(b.abs().max().item(), 1e-12)
    out = {"none": (b - a).abs().max().item() / scale}
    if freq.numel() * 2 <= a.shape[-1]:
        cos, sin = rotation_tables([_PROBE_SHIFT], freq.double())
        for layout, inter in (("neox", False), ("interleaved", True)):
            rotated = rotate(a, cos[0].double(), sin[0].double(), interleaved=inter)
            out[layout] = (b - rotated).abs().max().item() / scale
    return out


def _measure(model, freqs: list[torch.Tensor]) -> tuple[list[bool], bool, str]:
    """Per layer: rotated or not; whether the rotation is interleaved; which cache slot carries it ("keys", or
    "values" where a model stores its rotated part there, as transformers' MLA does). CubeError when a layer
    matches none of these."""
    family = text_config(model).model_type
    dtype, _ = dtype_device(model)
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 6e-2
    before, after = _probe_kv(model, 0), _probe_kv(model, _PROBE_SHIFT)
    rotated, layouts, slots = [], set(), set()
    for i, ((k0, v0), (k1, v1), freq) in enumerate(zip(before, after, freqs)):
        errors = {"keys": _errors(k0, k1, freq), "values": _errors(v0, v1, freq)}
        best = {slot: min(e, key=e.get) for slot, e in errors.items()}
        fits = {slot: errors[slot][best[slot]] <= tol for slot in errors}
        moved = [slot for slot in errors if best[slot] != "none"]
        if not all(fits.values()) or len(moved) > 1:
            detail = "; ".join(f"{slot}: " + ", ".join(f"{k} {v:.1e}" for k, v in e.items())
                               for slot, e in errors.items())
            raise CubeError(f"cannot move cubes on this {family} model: in layer {i} the cache of tokens moved by "
                            f"{_PROBE_SHIFT} positions is neither the same nor rotated by the model's RoPE "
                            f"(relative error {detail}), so its attention is not relative in position or kvmem "
                            "does not know its rotary layout; inject one cube at a time")
        rotated.append(bool(moved))
        if moved:
            layouts.add(best[moved[0]])
            slots.add(moved[0])
    if len(layouts) > 1 or len(slots) > 1:
        raise CubeError(f"cannot move cubes on this {family} model: its layers mix RoPE layouts or cache slots "
                        f"({sorted(layouts)}, {sorted(slots)})")
    return rotated, layouts == {"interleaved"}, next(iter(slots), "keys")


_FACTS: "weakref.WeakKeyDictionary[object, RopeFacts | CubeError]" = weakref.WeakKeyDictionary()


def rope_facts(model) -> RopeFacts:
    """The per-layer RoPE facts of ``model`` (measured once per model object, then cached).

    Raises:
        CubeError: naming the family, the layer and the reason, when kvmem cannot move its keys exactly.
    """
    inner = base_model(model)
    cached = _FACTS.get(inner)
    if cached is None:
        try:
            cached = _read_facts(model)
        except CubeError as exc:
            cached = exc
        _FACTS[inner] = cached
    if isinstance(cached, CubeError):
        raise CubeError(str(cached))
    return cached


def _read_facts(model) -> RopeFacts:
    config = text_config(model)
    family = config.model_type
    why = _refusal(model)
    if why is not None:
        raise CubeError(f"cannot move cubes on this {family} model: {why}. No re-rotation of a cube's keys equals "
                        "a full prefill here; prefill the memories' text together instead (one cube built from "
                        "all of them), or use a model without this feature")
    kinds = attention_kinds(model)
    freqs = _layer_inv_freq(model, kinds)
    if len({f.numel() for f in freqs}) != 1:
        raise CubeError(f"cannot move cubes on this {family} model: its layers rotate different numbers of dims")
    rotated, interleaved, slot = _measure(model, freqs)
    layers = tuple(LayerRope(rotated=r, inv_freq=f if r else torch.zeros_like(f), attention=kind, window=window)
                   for r, f, (kind, window) in zip(rotated, freqs, kinds))
    return RopeFacts(family=family, layers=layers, interleaved=interleaved,
                     rope_type="/".join(sorted(rope_types(model))), rotated_slot=slot)
