"""Injection: turn cubes into a fresh transformers Cache that a plain `model.generate` continues from.

One cube is exact: its KV is what a full prefill of its ids computes. Several cubes built after the same anchor
share that anchor once and are laid end to end, each re-rotated to its new positions. They never attended to
each other, so that is an approximation, opt-in by passing several. By default (`recompute="auto"`) the
composition gate (`kvmem.inject.gate`) takes the cheapest setting this model's calibration (`kvmem.calibrate`)
measured to answer like a full prefill, else recomputes every later token (exact, a full prefill's cost). Without
a calibration, the first 32 tokens of every later cube are recomputed (`"leading"`), chosen by
bench/compose_quality.py:
on SmolLM2-135M fact QA over 2/4/8 cubes it halves or better the next-token KL against a full prefill
(0.07/0.49/0.51 nats vs the pure splice's 0.40/1.00/1.15) at 93.4% less TTFT than a full prefill (pure splice:
97.4%) for 4 cubes x 1.5k tokens on a CPU. `recompute="none"` is the fastest, `"selective"` the costliest.
The gate also weighs "blend" and "query" (the tokens the request's query attends to most); `Prefix.adjusted`
adds APE's attention adjustment (`kvmem.model.ape`) to one request's generate.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field

import torch

from .._deprecation import renamed_function
from ..cubes.fingerprint import check_fields, fingerprint_fields
from ..cubes.memcube import MemCube, as_cubes
from ..errors import CubeError
from ..model import ape
from ..model.cache import kv_shapes, new_cache
from ..model.devices import layer_devices
from ..model.facts import check_context, text_config
from ..model.resolve import resolve
from ..model.rope import LENGTH_DEPENDENT, rope_facts, rope_types
from .gate import gate
from .recompute import recompute as _recompute
from .splice_cubes import dequantized_kv, quantized_report, splice_cubes

# mode -> (default budget, what the budget means)
RECOMPUTE_MODES = {
    "none": (None, "pure splice: re-rotated keys, no recompute"),
    "leading": (32, "tokens recomputed at the start of every cube after the first (EPIC)"),
    "selective": (0.15, "fraction of later cubes' tokens recomputed, those whose KV deviate most (CacheBlend)"),
    "blend": (64, "tokens recomputed per later cube: its first half-budget plus its highest-deviation ones"),
    "deep": (64, "as blend, with the deviation measured at layers 1-3 instead of layer 1"),
    "query": (64, "tokens recomputed per later cube: its first half-budget plus those the query attends to most"),
}
DEFAULT_RECOMPUTE = "leading"  # measured: see the module docstring and bench/README.md; "auto" without a calibration


@dataclass
class Prefix:
    """What `prefill` returns: a fresh cache, the ids it holds, and where each cube sits.

    Attributes:
        cache: a transformers Cache (fresh each call; generating from it never changes a cube).
        input_ids: LongTensor [1, n] on the model's device, one id per KV entry, in order.
        spans: [(start, end), ...] the positions of each cube's own tokens in ``input_ids``.
        names: the cube names, in order.
        quantized: for each quantized cube: name, scheme and its measured error (kl_mean, kl_max, greedy_same...).
    """

    cache: object
    input_ids: torch.Tensor
    spans: list[tuple[int, int]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    recomputed: int = 0
    quantized: list[dict] = field(default_factory=list)
    composition: str = ""  # recompute="auto": the gate's choice and why (kvmem.inject.gate)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def adjusted(self, model, *, temperature: float, scale: float, decode: bool = True, query_len: int | None = None):
        """A context manager running ``model`` with the APE adjustment (`kvmem.model.ape.adjusted`) for a request
        continuing this prefix: the query's logits toward the cubes' tokens divided by ``temperature``, their
        weight multiplied by ``scale``, the anchor as the sink. ``decode=False`` adjusts only the request's
        ``query_len`` tokens, not the generated ones. One cube, or T = S = 1: nothing changes (bit-exact)."""
        start = self.num_tokens
        if len(self.spans) < 2:  # one cube is exact: there is no parallel context to adjust
            return ape.adjusted(model, context=(start, start), query_start=start)
        end = None if query_len is None else start + int(query_len)
        return ape.adjusted(model, context=(self.spans[0][0], self.spans[-1][1]), query_start=start,
                            temperature=temperature, scale=scale, decode=decode, query_end=end)

    def extend(self, query_ids: torch.Tensor) -> torch.Tensor:
        """``torch.cat([input_ids, query_ids], -1)``: the ids to pass to generate with this cache."""
        # a host tensor copied without blocking: a blocking copy to a GPU waits for every queued kernel
        query_ids = torch.as_tensor(query_ids).to(self.input_ids.device, non_blocking=True)
        return torch.cat([self.input_ids, query_ids.reshape(1, -1)], dim=-1)


def prefill(model, cubes, *, recompute: str = "auto", budget: int | float | None = None,
            tokenizer=None, query_ids=None) -> Prefix:
    """Splice ``cubes`` into a fresh KV cache for ``model``.

    Args:
        model: the transformers model (PEFT-wrapped or not) the cubes were built for.
        cubes: a MemCube or a list of them, injected in order.
        recompute: how several cubes recover the attention they never paid each other: "auto" (the default: the
            cheapest setting this model's calibration (`kvmem.calibrate`) measured to meet the fidelity target,
            else every later token recomputed, exact; without a calibration "leading" and a one-time notice;
            ``Prefix.composition`` says which and why), "leading" (recompute each later cube's first ``budget``
            tokens, default 32), "none" (pure splice, re-rotated keys: the fastest),
            "selective" (recompute the ``budget`` fraction, default 0.15, of later cubes' tokens whose KV
            deviate most) or "blend" (per later cube its first ``budget``/2 tokens and its ``budget``/2
            highest-deviation ones, default 64), "deep" (as "blend", deviation at layers 1-3) or "query" (per
            later cube its first ``budget``/2 tokens and
            the ``budget``/2 that ``query_ids`` attend to most, default 64). A single cube is exact and never
            recomputed.
        budget: the recompute mode's knob (see above); None takes the mode's default (with "auto": the gate's); a
            budget with "auto" is the default mode's ("leading") budget, no gate.
        tokenizer: if given, also checked against the tokenizer the cubes were built with.
        query_ids: [q] the request's tokens that will follow the prefix, for recompute="query" (None: the last
            cube's last 32 tokens stand in for the query).

    Returns:
        Prefix(cache, input_ids, spans, names).

    Raises:
        FingerprintMismatch: a cube belongs to another model, weights, tokenizer or adapter.
        CubeError: bad arguments, dtype mismatch, anchors that differ, a cube whose KV shapes are not the ones this
            model caches, or several cubes on a model whose cubes cannot be moved exactly (the message names the
            layer and the reason: RoPE not linear in position, queries scaled by absolute position, chunked
            attention, a rotary layout kvmem cannot reproduce).

    Exactness: one cube gives the KV a full prefill of its ids computes. In float32 the logits agree to a few
    ulps (another summation order) and greedy tokens agree; in bfloat16/float16 the cache is what transformers'
    own prefix reuse (prefill in two steps) leaves, so greedy tokens may diverge where two candidates tie within
    the rounding, exactly as they do with transformers' own cache reuse. RoPE whose frequencies change with the
    sequence length (dynamic NTK, longrope) makes even that approximate once a sequence crosses the model's
    original context length: kvmem warns (once per model family) rather than call it exact.

    Example:
        >>> prefix = kvmem.prefill(model, [cube])
        >>> out = model.generate(prefix.extend(query_ids), past_key_values=prefix.cache, max_new_tokens=32)
    """
    cubes = as_cubes(cubes)
    if not cubes:
        raise CubeError("no cubes to inject: pass at least one MemCube (or call model.generate without kvmem)")
    auto = recompute == "auto" and budget is None  # a budget alone is the default mode's knob, as before "auto"
    if recompute == "auto":
        recompute = DEFAULT_RECOMPUTE  # validated below; with auto, replaced by the gate's choice once cubes check
    if recompute not in RECOMPUTE_MODES:
        raise CubeError(f"recompute={recompute!r} is not a mode; choose one of {', '.join(['auto', *RECOMPUTE_MODES])}")
    budget = RECOMPUTE_MODES[recompute][0] if budget is None else budget
    if recompute in ("leading", "blend", "deep", "query") and not (isinstance(budget, int) and not isinstance(budget, bool)
                                                          and budget >= 0):
        raise CubeError(f"budget for recompute={recompute!r} is a token count >= 0, got {budget!r}")
    if recompute == "selective" and not (isinstance(budget, (int, float)) and not isinstance(budget, bool)
                                         and 0 < budget <= 1):
        raise CubeError(f"budget for recompute='selective' is a fraction in (0, 1], got {budget!r}")

    facts = resolve(model)  # once per request: one pass over the model's watch, no weight read
    actual = fingerprint_fields(model, tokenizer, facts=facts)
    dtype, device = facts.dtype, facts.device
    for c in cubes:
        check_fields(c.fingerprint_fields, actual, what=f"cube {c.name!r}")
        if c.dtype != dtype:
            raise CubeError(f"cube {c.name!r} holds {c.dtype} KV but the model runs in {dtype}: build the cube with "
                            f"the model in {dtype}, or load it with MemCube.load(path, dtype={dtype}) "
                            "(a cast is an approximation)")
        if _KEPT.get(c, (None,))[0] is not facts:  # checked once per cube and model generation
            _check_kv_shapes(model, c)
            _KEPT[c] = (facts, None)
    facts.remember("length_warning", lambda: _warn_length_dependent(model))
    check_context(model, cubes[0].anchor_len + sum(c.num_tokens for c in cubes), "the composed prefix",
                  "inject fewer or shorter cubes")

    n_layers = len(cubes[0].kv_shapes) if cubes[0].packed is not None else len(cubes[0].kv)
    devices = facts.remember(("kv_devices", n_layers), lambda: _kv_devices(model, n_layers, device))
    if len(cubes) == 1:
        c = cubes[0]
        kv = _KEPT[c][1] if c.packed is None else None
        if kv is None:
            # the cube's own tensors (a view with a batch axis; no copy where they already sit on the layer's
            # device): the cache's first update copies them into storage of its own; a quantized cube is
            # dequantized here
            full = c.kv if c.packed is None else dequantized_kv(c, device=device, dtype=dtype)
            kv = [(k.to(d, non_blocking=True)[None], v.to(d, non_blocking=True)[None])
                  for (k, v), d in zip(full, devices)]
            if c.packed is None and all(a.data_ptr() == k.data_ptr() for (a, _), (k, _) in zip(kv, full)):
                _KEPT[c] = (facts, kv)  # views only, no copy: the next request of this generation takes them
        ids = c.all_ids.to(device, non_blocking=True)  # host ids: a blocking copy would wait for the GPU
        prefix = Prefix(new_cache(model, kv, facts=facts, source=c), ids, [(c.anchor_len, c.anchor_len + c.num_tokens)],
                        [c.name])
        prefix.quantized = quantized_report(cubes)
        return prefix
    rope = rope_facts(model)  # CubeError naming family, layer and reason where moving cubes cannot be exact,
    composition = ""        # before the gate: a refused model gets no misleading notice about its calibration
    if auto:
        choice = gate(model, len(cubes), default=(recompute, budget), fields=actual)
        recompute, budget = choice.prefill_args([c.num_tokens for c in cubes])
        composition = f"{choice.mode}: {choice.reason}"
        if recompute == "query" and query_ids is None:  # calibrated with the question; said, not hidden
            composition += "; no query_ids given: the last cube's last tokens stood in for the query"
    prefix = _compose(model, cubes, facts, devices, recompute, budget, rope=rope, query_ids=query_ids)
    prefix.composition = composition
    prefix.quantized = quantized_report(cubes)
    return prefix


# Per cube (held weakly: an entry goes with its cube), what a request derives from it and this model generation's
# facts and may keep, a cube being immutable: (facts its KV shapes were checked against, its KV as batch-axis views
# on the layers' devices or None). Views are kept only where they needed no copy (the cube already sits on those
# devices), so an entry holds no memory of its own.
_KEPT: "weakref.WeakKeyDictionary[MemCube, tuple]" = weakref.WeakKeyDictionary()


def _kv_devices(model, n_layers: int, device: torch.device) -> list[torch.device]:
    """Where each of ``n_layers`` cache layers' KV must sit: ``device`` (the model's) for a model in one place; for
    one dispatched with accelerate (device_map, CPU/disk offload), the device each layer's attention runs on."""
    if not resolve(model).dispatched:
        return [device] * n_layers  # not dispatched: no module walk
    return [device if d.type == "meta" else d for d in layer_devices(model, n_layers)]


def _check_kv_shapes(model, cube: MemCube) -> None:
    """The cube's per-layer KV shapes must be the ones this model really caches (measured, not read from config)."""
    layout = kv_shapes(model)
    shapes = cube.kv_shapes  # from the metadata for a quantized cube: no dequantizing to check
    if len(shapes) != len(layout):
        raise CubeError(f"cube {cube.name!r} holds {len(shapes)} KV layers but this model caches {len(layout)}: "
                        "it was written for another cache shape of this model; rebuild it with this model")
    for i, ((k, v), (k_shape, v_shape)) in enumerate(zip(shapes, layout)):
        got = ((k[0], k[2]), (v[0], v[2]))
        if got != (k_shape, v_shape):
            raise CubeError(f"cube {cube.name!r} layer {i} holds keys/values of (heads, dim) {got[0]}/{got[1]} "
                            f"but this model caches {k_shape}/{v_shape}: it was written for another cache shape of "
                            "this model; rebuild it with this model")


_WARNED: set[tuple[str, str]] = set()


def _warn_length_dependent(model) -> None:
    """Warn once per family and RoPE type when the RoPE's frequencies depend on the sequence length."""
    kinds = rope_types(model) & LENGTH_DEPENDENT
    if not kinds:
        return
    key = (text_config(model).model_type, "/".join(sorted(kinds)))
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(f"kvmem: this {key[0]} model uses {key[1]} RoPE, whose frequencies change with the sequence length: "
                  "a cube's KV (like transformers' own reused prefix) differs slightly from a full prefill once a "
                  "sequence passes original_max_position_embeddings, so injection is not exact there; several "
                  "cubes are refused", stacklevel=3)


def splice_plan(cubes: list[MemCube]):
    """Where each of ``cubes`` (built after one shared anchor) lands when composed: the shared anchor once, then
    each cube's own tokens end to end. Returns (src_start, dst_start, length, delta, spans) as `splice` takes them
    (delta: how far each cube's keys move), with spans [(start, end)] of each cube's own tokens."""
    a = cubes[0].anchor_len
    src_start, dst_start, length, delta, spans = [], [], [], [], []
    offset = 0
    for i, c in enumerate(cubes):
        skip = 0 if i == 0 else a  # the first cube brings the shared anchor
        src_start.append(skip)
        dst_start.append(offset)
        length.append(c.anchor_len + c.num_tokens - skip)
        delta.append(offset - skip)
        offset += length[-1]
        spans.append((offset - c.num_tokens, offset))
    return src_start, dst_start, length, delta, spans


def compose_kv(cubes: list[MemCube], rope, *, dtype: torch.dtype, device=None):
    """The one composer: the shared anchor once, then each cube's own tokens end to end, spliced into one buffer on
    ``device`` with keys re-rotated to where they now sit (one kernel launch on CUDA). `prefill` and the serving
    engines (`kvmem.integrations.serving`) both lay cubes out through it.

    Args:
        cubes: MemCubes built after one anchor.
        rope: `kvmem.model.rope.RopeFacts` of the model (its inverse frequencies, pair order, rotated slot).
        dtype, device: of the buffers (device None: the CPU).

    Returns:
        (keys [layers, kv_heads, T, key_dim], values [layers, kv_heads, T, value_dim], ids [T], spans)
        where spans [(start, end)] are each cube's own tokens in ``ids``.

    Raises:
        CubeError: cubes built after different anchors, or layers whose KV the splice cannot lay into one buffer.
    """
    device = torch.device("cpu") if device is None else device
    anchor = cubes[0].anchor_ids
    for c in cubes[1:]:
        if not torch.equal(c.anchor_ids, anchor):
            raise CubeError(f"cubes {cubes[0].name!r} and {c.name!r} were built after different anchors "
                            f"({cubes[0].anchor_len} vs {c.anchor_len} tokens); build every cube you compose "
                            "with the same anchor (kvmem.wrap(...).build_cube does)")
    k_shapes = {tuple(k[::2]) for c in cubes for k, _ in c.kv_shapes}
    v_shapes = {tuple(v[::2]) for c in cubes for _, v in c.kv_shapes}
    if len(k_shapes) != 1 or len(v_shapes) != 1 or next(iter(k_shapes))[0] != next(iter(v_shapes))[0]:
        raise CubeError(f"composing cubes on this {rope.family} model is not supported: its layers cache keys of "
                        f"(heads, dim) {sorted(k_shapes)} and values of {sorted(v_shapes)}, which kvmem's splice "
                        "cannot lay into one buffer; inject one cube at a time")
    src_start, dst_start, length, delta, spans = splice_plan(cubes)
    offset = dst_start[-1] + length[-1]
    (heads, dim), (_, dim_v) = next(iter(k_shapes)), next(iter(v_shapes))
    n_layers = len(cubes[0].kv_shapes)
    dst_k = torch.empty(n_layers, heads, offset, dim, dtype=dtype, device=device)
    dst_v = torch.empty(n_layers, heads, offset, dim_v, dtype=dtype, device=device)
    # full-width cubes through the splice, quantized ones through the dequantizing splice (one launch per kind)
    splice_cubes(dst_k, dst_v, cubes, src_start=src_start, dst_start=dst_start, length=length, delta=delta,
                 inv_freq=rope.inv_freq, interleaved=rope.interleaved, rotated_slot=rope.rotated_slot)
    ids = torch.cat([anchor[0]] + [c.input_ids[0] for c in cubes])
    return dst_k, dst_v, ids, spans


def _compose(model, cubes: list[MemCube], facts, devices, mode: str, budget, *, rope, query_ids=None) -> Prefix:
    """`compose_kv` on the model's device, then the recompute mode's tokens refreshed in place; each layer's KV
    is then moved to its own device (``devices``: where a dispatched model runs it)."""
    device, dtype = facts.device, facts.dtype
    if mode != "none" and len({(d.type, d.index or 0) for d in [device, *devices]}) > 1:  # "cuda" is "cuda:0"
        raise CubeError(f"recompute={mode!r} on a model whose layers run on several devices "
                        f"({', '.join(sorted({str(d) for d in devices}))}) is not supported yet: the recompute pass "
                        "writes every layer's KV into one buffer on the model's device; compose with "
                        "recompute='none', or inject one cube at a time")
    dst_k, dst_v, ids, spans = compose_kv(cubes, rope, dtype=dtype, device=device)
    ids = ids[None].to(device, non_blocking=True)
    n = _recompute(model, dst_k, dst_v, ids, spans, mode=mode, budget=budget, query_ids=query_ids)
    kv = [(dst_k[i][None].to(d), dst_v[i][None].to(d)) for i, d in zip(range(dst_k.shape[0]), devices)]
    return Prefix(new_cache(model, kv, facts=facts), ids, spans, [c.name for c in cubes], recomputed=n)


layout_plan = renamed_function(splice_plan, "layout_plan")  # the flat layout's name, for one release
