"""Injection: turn cubes into a fresh transformers Cache that a plain `model.generate` continues from.

One cube is exact: its KV is what a full prefill of its ids computes. Several cubes built after the same anchor
share that anchor once and are laid end to end, each re-rotated to its new positions (`recompute="none"`,
the pure splice). They never attended to each other, so that is an approximation, opt-in by passing several.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvmem.kernels import rerotate_reference
from kvmem.patches import rope_facts

from .cache import base_model, new_cache
from .cube import MemCube
from .errors import CubeError
from .fingerprint import check_fields, fingerprint_fields

RECOMPUTE_MODES = ("none",)


@dataclass
class Prefix:
    """What `prefill` returns: a fresh cache, the ids it holds, and where each cube sits.

    Attributes:
        cache: a transformers Cache (fresh each call; generating from it never changes a cube).
        input_ids: LongTensor [1, n] on the model's device, one id per KV entry, in order.
        spans: [(start, end), ...] the positions of each cube's own tokens in ``input_ids``.
        names: the cube names, in order.
    """

    cache: object
    input_ids: torch.Tensor
    spans: list[tuple[int, int]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def extend(self, query_ids: torch.Tensor) -> torch.Tensor:
        """``torch.cat([input_ids, query_ids], -1)``: the ids to pass to generate with this cache."""
        query_ids = torch.as_tensor(query_ids, device=self.input_ids.device)
        return torch.cat([self.input_ids, query_ids.reshape(1, -1)], dim=-1)


def _model_dtype_device(model) -> tuple[torch.dtype, torch.device]:
    p = next(base_model(model).parameters())
    return p.dtype, p.device


def prefill(model, cubes, *, recompute: str = "none", tokenizer=None) -> Prefix:
    """Splice ``cubes`` into a fresh KV cache for ``model``.

    Args:
        model: the transformers model (PEFT-wrapped or not) the cubes were built for.
        cubes: a MemCube or a list of them, injected in order.
        recompute: "none" (pure splice with re-rotated keys). More modes arrive with composition.
        tokenizer: if given, also checked against the tokenizer the cubes were built with.

    Returns:
        Prefix(cache, input_ids, spans, names).

    Raises:
        FingerprintMismatch: a cube belongs to another model, weights, tokenizer or adapter.
        CubeError: bad arguments, dtype mismatch, anchors that differ.

    Example:
        >>> prefix = kvmem.prefill(model, [cube])
        >>> out = model.generate(prefix.extend(query_ids), past_key_values=prefix.cache, max_new_tokens=32)
    """
    if isinstance(cubes, MemCube):
        cubes = [cubes]
    try:
        cubes = list(cubes)
    except TypeError:
        raise CubeError(f"cubes must be a MemCube or a list of MemCubes, got {type(cubes).__name__}") from None
    if not cubes:
        raise CubeError("no cubes to inject: pass at least one MemCube (or call model.generate without kvmem)")
    for c in cubes:
        if not isinstance(c, MemCube):
            raise CubeError(f"cubes must be MemCubes, got {type(c).__name__} (load files with MemCube.load(path))")
    if recompute not in RECOMPUTE_MODES:
        raise CubeError(f"recompute={recompute!r} is not a mode; choose one of {', '.join(RECOMPUTE_MODES)}")

    actual = fingerprint_fields(model, tokenizer)
    dtype, device = _model_dtype_device(model)
    for c in cubes:
        check_fields(c.fingerprint_fields, actual, what=f"cube {c.name!r}")
        if c.dtype != dtype:
            raise CubeError(f"cube {c.name!r} holds {c.dtype} KV but the model runs in {dtype}: build the cube with "
                            f"the model in {dtype}, or load it with MemCube.load(path, dtype={dtype}) "
                            "(a cast is an approximation)")

    if len(cubes) == 1:
        c = cubes[0]
        kv = [(k.to(device, non_blocking=True)[None], v.to(device, non_blocking=True)[None]) for k, v in c.kv]
        ids = c.all_ids.to(device)
        return Prefix(new_cache(model, kv), ids, [(c.anchor_len, c.anchor_len + c.num_tokens)], [c.name])
    return _compose(model, cubes, device)


def _compose(model, cubes: list[MemCube], device) -> Prefix:
    """Shared anchor once, then each cube's own tokens, keys re-rotated to where they now sit."""
    anchor = cubes[0].anchor_ids
    for c in cubes[1:]:
        if not torch.equal(c.anchor_ids, anchor):
            raise CubeError(f"cubes {cubes[0].name!r} and {c.name!r} were built after different anchors "
                            f"({cubes[0].anchor_len} vs {c.anchor_len} tokens); build every cube you compose "
                            "with the same anchor (kvmem.wrap(...).build_cube does)")
    rope = rope_facts(model)
    a = cubes[0].anchor_len
    parts_k, parts_v = [[k[:, :a]] for k, _ in cubes[0].kv], [[v[:, :a]] for _, v in cubes[0].kv]
    ids, spans, offset = [anchor[0]], [], a
    for c in cubes:
        delta = offset - c.anchor_len  # the cube's own tokens were built starting at position anchor_len
        for layer, (k, v) in enumerate(c.kv):
            own_k, own_v = k[:, c.anchor_len:], v[:, c.anchor_len:]
            if delta:
                own_k = rerotate_reference(own_k, delta, rope.inv_freq, interleaved=rope.interleaved)
            parts_k[layer].append(own_k)
            parts_v[layer].append(own_v)
        ids.append(c.input_ids[0])
        spans.append((offset, offset + c.num_tokens))
        offset += c.num_tokens
    kv = [(torch.cat(ks, dim=1).to(device)[None], torch.cat(vs, dim=1).to(device)[None])
          for ks, vs in zip(parts_k, parts_v)]
    return Prefix(new_cache(model, kv), torch.cat(ids)[None].to(device), spans, [c.name for c in cubes])
