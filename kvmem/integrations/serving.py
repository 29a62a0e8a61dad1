"""Serving cubes from an engine: which cubes a request gets, checked and laid out as the engine's prefix KV.

Engine-agnostic (imports no engine): `kvmem.integrations.vllm` drives it from vLLM's KV-connector hooks.

- `CubeSource` (`kvmem.integrations.sources`): where cubes come from, per namespace: a kvmem store (`CubeStore`,
  a folder or a URL such as ``redis://host:port/0``) or a folder of cube files ``<folder>/<namespace>/<name>
  .safetensors``; a single exact cube's KV stays in its file (`FileKV`) until the engine writes it, layer by layer.
- `CubePlanner.plan(prompt_ids, params)`: the cubes a request names (or, for a plain request, the longest exact
  cube whose ids start the prompt), each loaded through kvmem's validation and checked against the served
  model's fingerprint, returned as a `Plan`: per layer KV of the first block-aligned tokens, in the serving
  dtype, and a cache salt when the prefix is approximate (composed, precomposed, or cast). Anything wrong raises
  `Refused` saying why: the engine then prefills the request normally.
- `precompose(model, cubes, ...)`: compose with recompute in transformers and keep the result as one cube, for
  the recompute modes an engine's "load one contiguous prefix" API cannot express.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..cubes.cubefile import CubeFile
from ..cubes.fingerprint import check_fields, fingerprint_fields
from ..cubes.memcube import MemCube
from ..errors import CubeError
from ..inject.gate import choose, load_calibration
from ..inject.prefill import compose_kv as compose
from ..inject.prefill import prefill
from ..model.cache import kv_from_cache
from ..model.rope import rope_facts
from ..store.lineage import DERIVED_KEY, sources_of
from .key_blocks import open_key_blocks
from .sources import CubeSource, FileKV, Refused, check_request_name  # noqa: F401  (CubeSource: importable here too)
from .tenancy import cube_digest, request_namespace


CONNECTOR_OPTIONS = ("store", "folder", "namespace", "namespaces", "auto", "tenant_salt", "salt_secret", "layerwise",
                     "read_threads", "key_blocks", "autosave_tokens", "autosave_bytes", "loader_cpus")
# what a request's kv_transfer_params["kvmem"] may hold: loading (cubes, namespace, auto), saving (kvmem.integrations.saving)
REQUEST_KEYS = ("cubes", "namespace", "auto", "save", "text", "tokens", "anchor")


def check_connector_options(extra) -> dict:
    """The connector's ``kv_connector_extra_config`` as a dict, every key one it knows (a typo is an error naming
    the known ones, not an option silently ignored); the values are checked by `CubeSource` and `CubePlanner`."""
    if not isinstance(extra, dict):
        raise CubeError(f"kv_connector_extra_config must be a JSON object, got {type(extra).__name__}")
    unknown = sorted(set(extra) - set(CONNECTOR_OPTIONS))
    if unknown:
        raise CubeError(f"kv_connector_extra_config has unknown keys {unknown} (known: {', '.join(CONNECTOR_OPTIONS)})")
    return dict(extra)


def _check_flag(value, what: str) -> bool:
    """A JSON boolean: the string "false" is truthy in Python, so anything but True/False is refused."""
    if not isinstance(value, bool):
        raise Refused(f"{what} must be true or false (a JSON boolean), got {value!r:.40}")
    return value


@dataclass
class Plan:
    """The prefix KV one request gets from kvmem.

    Attributes:
        names: the cubes, in order.
        namespace: the namespace they came from.
        num_tokens: how many leading prompt tokens ``kv`` covers (a multiple of the engine's block size).
        kv: per layer (keys, values), each [kv_heads, num_tokens, head_dim] in the serving dtype: a list, or a
            `FileKV` (one cube in the serving dtype, whose layers are read from its file when they are written).
        exact: True when ``kv`` is what the engine computes for those tokens (one cube, built by this model, in
            the serving dtype); False for compositions, precomposed cubes and dtype casts.
        salt: the cache salt that keeps an approximate prefix apart from the same plain tokens (None if exact).
        notes: the approximations applied, for the log.
        digests: each cube's content digest (`kvmem.integrations.tenancy.cube_digest`), for its tenant salt.
    """

    names: tuple[str, ...]
    namespace: str
    num_tokens: int
    kv: "list[tuple[torch.Tensor, torch.Tensor]] | FileKV"
    exact: bool
    salt: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    digests: tuple[str, ...] = field(default_factory=tuple)


def compose_kv(cubes: Sequence[MemCube], rope, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay ``cubes`` (built after one anchor) end to end, keys re-rotated to their new positions: kvmem's one
    composer (`kvmem.inject.prefill.compose_kv`), no recompute: what ``kvmem.prefill(..., recompute="none")`` holds.
    An engine's paged cache holds keys and values of one shape, rotated on the keys; anything else is refused.

    Returns:
        (keys, values) [layers, kv_heads, T, head_dim] in ``dtype``, and ids [T].
    """
    # kv_shapes: a quantized cube is not dequantized just to learn its shapes (the composer dequantizes it once)
    shapes = {tuple(shape[::2]) for c in cubes for kv in c.kv_shapes for shape in kv}
    if len(shapes) != 1 or getattr(rope, "rotated_slot", "keys") != "keys":
        raise Refused(f"composing needs every layer's keys and values shaped alike and RoPE on the keys (got heads x "
                      f"dim {sorted(shapes)}); name one cube, or a precomposed one")
    try:
        keys, values, ids, _ = compose(list(cubes), rope, dtype=dtype)
    except Refused:
        raise
    except CubeError as exc:
        raise Refused(str(exc)) from None
    return keys, values, ids


def served_model_facts(checkpoint: str, *, tokenizer: str | None = None):
    """(fingerprint fields, RoPE facts or None) of the checkpoint folder an engine serves: loaded once with
    transformers on the CPU in its own dtype, then dropped. RoPE facts are None when kvmem cannot move keys for
    this model (composition is then refused; single cubes still serve)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype="auto").eval()
    tok = AutoTokenizer.from_pretrained(tokenizer or checkpoint)
    fields = fingerprint_fields(model, tok)
    try:
        rope = rope_facts(model)
    except CubeError:
        rope = None
    del model
    return fields, rope


class CubePlanner:
    """Decides, per request, which cubes it gets and builds their KV (see the module docstring).

    Args:
        source: a `CubeSource`.
        fields: the served model's fingerprint fields (`served_model_facts` or `kvmem.cubes.fingerprint.fingerprint_fields`).
        dtype: the serving dtype (KV of cubes in another dtype is cast: an approximation, noted and salted).
        block_size: the engine's KV block size; a plan covers a multiple of it and leaves the last prompt token.
        rope: RoPE facts of the served model (needed to compose several cubes; None refuses composition).
        namespace: the namespace of requests that name none.
        namespaces: the namespaces requests may name (default: only ``namespace``). A request never sees another.
        auto: give plain requests the longest exact cube whose ids start their prompt.
        key_blocks: read a cube's keys from its key-blocks sidecar for ``block_size`` where it has one
            (`kvmem.integrations.key_blocks`; the loader uses it where the cache keeps keys in that layout).
    """

    def __init__(self, source: CubeSource, *, fields: dict, dtype: torch.dtype, block_size: int, rope=None,
                 namespace: str = "default", namespaces: Sequence[str] | None = None, auto: bool = True,
                 key_blocks: bool = True):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise CubeError(f"block_size must be a positive int (the engine's KV block size), got {block_size!r}")
        if not isinstance(dtype, torch.dtype):
            raise CubeError(f"dtype must be a torch.dtype (the serving dtype), got {dtype!r}")
        self.source = source
        self.fields = fields
        self.dtype = dtype
        self.block_size = int(block_size)
        self.rope = rope
        self.namespaces = self.served_namespaces(namespace, namespaces)
        self.namespace = namespace
        self.auto = _check_flag(auto, "auto")
        self.key_blocks = _check_flag(key_blocks, "key_blocks")
        self._index: dict[str, dict[str, tuple[object, tuple[int, ...] | None]]] = {}  # ns -> name -> (version, ids)
        self._just_loaded: dict[tuple[str, str, object], MemCube] = {}

    @staticmethod
    def served_namespaces(namespace: str, namespaces: Sequence[str] | None) -> tuple[str, ...]:
        """The served namespaces (default: only ``namespace``), checked, ``namespace`` among them."""
        check_request_name(namespace, "namespace")
        if namespaces is None:
            namespaces = [namespace]
        if isinstance(namespaces, (str, bytes)) or not isinstance(namespaces, (list, tuple)) or not namespaces:
            raise CubeError(f'namespaces must be a non-empty list of namespaces, e.g. ["alice", "bob"], got '
                            f"{namespaces!r:.80} (a single string would be read letter by letter)")
        served = tuple(dict.fromkeys(check_request_name(n, "namespace") for n in namespaces))
        if namespace not in served:
            raise CubeError(f"the default namespace {namespace!r} is not among the served namespaces "
                            f"{list(served)}: add it to namespaces, or set namespace to one of them")
        return served

    # ---------------------------------------------------------------- which cubes
    def _parse(self, params) -> tuple[str, list[str] | None, bool]:
        """(namespace, cube names or None, auto) from a request's kv_transfer_params."""
        if params is None:
            return self.namespace, None, self.auto
        if not isinstance(params, dict):
            raise Refused(f"kv_transfer_params must be a JSON object, got {type(params).__name__}")
        spec = params.get("kvmem")
        if spec is None:
            return self.namespace, None, self.auto
        try:
            namespace = request_namespace(spec, default=self.namespace, served=self.namespaces)
        except CubeError as exc:
            raise Refused(str(exc)) from None
        unknown = set(spec) - set(REQUEST_KEYS)
        if unknown:
            raise Refused(f'kv_transfer_params["kvmem"] has unknown keys {sorted(unknown)} (known: {", ".join(REQUEST_KEYS)})')
        names = spec.get("cubes")
        if names is not None:
            if isinstance(names, str):
                names = [names]
            if not isinstance(names, list) or not names:
                raise Refused(f'"cubes" must be a non-empty list of cube names, got {names!r}')
            names = [check_request_name(n, "cube name") for n in names]
        return namespace, names, _check_flag(spec.get("auto", self.auto), 'kv_transfer_params["kvmem"]["auto"]')

    def _load(self, namespace: str, name: str, *, layered: bool = True) -> MemCube | CubeFile:
        """The cube, checked against the served model; a `CubeFile` (its KV read later, layer by layer) when the
        file allows it and ``layered``."""
        cube = self.source.load(namespace, name, layered=layered)
        check_fields(cube.fingerprint_fields, self.fields, what=f"cube {namespace}/{name}")
        return cube

    def _refresh(self, namespace: str) -> dict:
        """The namespace's {name: (version, ids or None)}, (re)reading cubes that are new or changed."""
        index = self._index.setdefault(namespace, {})
        versions = self.source.versions(namespace)
        for name in set(index) - set(versions):
            del index[name]
        for name, version in versions.items():
            if name in index and index[name][0] == version:
                continue
            try:
                cube = self._load(namespace, name)
                exact = not cube.meta.get("composed_from") and not cube.quantization and cube.dtype == self.dtype
                index[name] = (version, tuple(cube.all_ids[0].tolist()) if exact else None)
                self._just_loaded = {(namespace, name, version): cube}
            except CubeError:  # unusable cubes are never matched; naming one explains why
                index[name] = (version, None)
        return index

    def _auto_match(self, namespace: str, prompt: tuple[int, ...]) -> tuple[str, MemCube] | None:
        best = None
        for name, (version, ids) in self._refresh(namespace).items():
            if ids is not None and len(ids) >= self.block_size and len(ids) <= len(prompt) and prompt[:len(ids)] == ids:
                if best is None or len(ids) > len(best[2]):
                    best = (name, version, ids)
        if best is None:
            return None
        name, version, ids = best
        cube = self._just_loaded.get((namespace, name, version)) or self._load(namespace, name)
        if tuple(cube.all_ids[0].tolist()) != ids:  # replaced since it was indexed: match again next time
            return None
        return name, cube

    # ---------------------------------------------------------------- the plan
    def plan(self, prompt_ids: Sequence[int], params: dict | None = None, *, salt: str | None = None) -> Plan | None:
        """The plan for a request with ``prompt_ids`` and kv_transfer_params ``params``; None when it gets none.

        ``params["kvmem"]`` (all optional): ``cubes`` (names, composed in order), ``namespace`` (one of the served
        ones), ``auto`` (False: no automatic match). ``salt`` is the request's own cache salt, kept inside ours.

        Raises:
            CubeError (Refused, FingerprintMismatch, ...): why the named cubes cannot be served.
        """
        try:
            namespace, names, auto = self._parse(params)
            prompt = tuple(int(t) for t in prompt_ids)
            if names is None:
                found = self._auto_match(namespace, prompt) if auto else None
                names, cubes = ([found[0]], [found[1]]) if found is not None else ([], [])
            else:
                cubes = [self._load(namespace, n) for n in names]
        finally:
            self._just_loaded = {}
        if not cubes:
            return None
        if len(cubes) > 1 or any(c.dtype != self.dtype for c in cubes):  # composed or cast: every layer at once
            cubes = [c if isinstance(c, MemCube) else self._load(namespace, n, layered=False)
                     for n, c in zip(names, cubes)]
        notes = []
        if len(cubes) == 1:
            cube = cubes[0]
            if cube.meta.get("composed_from"):
                notes.append(f"precomposed from {cube.meta['composed_from']} ({cube.meta.get('recompute')})")
        else:
            if self.rope is None:
                raise Refused("composing several cubes needs re-rotating keys, which kvmem does not support for this "
                              "model's RoPE; name one cube (or a precomposed one)")
            calibration = load_calibration(None, fields=self.fields, dtype=self.dtype)  # `kvmem calibrate`'s
            choice = choose(calibration, len(cubes), modes=("none",)) if calibration else None
            if choice is not None and choice.mode != "none":
                raise Refused(f"this model's calibration measured the pure splice of {len(cubes)} cubes below the "
                              f"fidelity target ({choice.reason}); name a precompose()d cube (recompute='auto') "
                              "or one cube")
            notes.append(f"composed {len(cubes)} cubes by pure splice (re-rotated keys, no recompute)")
        for c in cubes:
            if c.dtype != self.dtype:
                notes.append(f"cube {c.name!r} cast from {c.dtype} to the serving dtype {self.dtype}")
            if c.quantization:  # approximate: salted like any approximate prefix, its measured error in the log
                q = c.quantization
                notes.append(f"cube {c.name!r} quantized {q['scheme']} (measured next-token KL mean "
                             f"{q['error']['kl_mean']:.2g} nats)")
        n_ids = sum(c.num_tokens for c in cubes) + cubes[0].anchor_len
        if n_ids > len(prompt) or any(prompt[i] != t for i, t in enumerate(self._ids_of(cubes))):
            raise Refused(f"the prompt does not start with the ids of {names} "
                          f"({n_ids} tokens: anchor + cube tokens): build the prompt as cube text + query")
        n = min(n_ids, len(prompt) - 1) // self.block_size * self.block_size
        if n == 0:
            raise Refused(f"{names} cover {n_ids} tokens, less than one KV block "
                          f"({self.block_size}) before the last prompt token: nothing to load")
        if len(cubes) == 1 and isinstance(cubes[0], CubeFile):  # read layer by layer as the engine writes it
            blocks = open_key_blocks(cubes[0], self.block_size) if self.key_blocks else None
            kv = FileKV(cubes[0], 0, n, key_blocks=blocks)
        elif len(cubes) == 1:
            c = cubes[0]
            kv = [(k[:, :n].to(self.dtype), v[:, :n].to(self.dtype)) for k, v in c.kv]
        else:
            keys, values, _ = compose_kv(cubes, self.rope, self.dtype)
            kv = [(keys[i, :, :n], values[i, :, :n]) for i in range(keys.shape[0])]
        exact = not notes
        return Plan(tuple(names), namespace, n, kv, exact,
                    None if exact else composition_salt(cubes, self.dtype, salt), tuple(notes),
                    tuple(cube_digest(c) for c in cubes))

    @staticmethod
    def _ids_of(cubes: Sequence[MemCube]) -> list[int]:
        return cubes[0].all_ids[0].tolist() + [t for c in cubes[1:] for t in c.input_ids[0].tolist()]


def composition_salt(cubes: Sequence[MemCube], dtype: torch.dtype, salt: str | None = None) -> str:
    """A cache salt unique to this approximate prefix: the cubes (their full metadata: fingerprint, build time,
    recompute mode), their order and the serving dtype, plus the request's own salt. An engine's prefix cache then
    holds the approximate KV apart from the plain tokens, and apart from any other composition of them."""
    desc = json.dumps({"cubes": [c.meta for c in cubes], "dtype": str(dtype), "salt": salt}, sort_keys=True,
                      default=str)
    return "kvmem-" + hashlib.blake2b(desc.encode(), digest_size=12).hexdigest()


def precompose(model, cubes: Sequence[MemCube], *, recompute: str = "auto", budget=None, tokenizer=None,
               name: str | None = None) -> MemCube:
    """Compose ``cubes`` with ``kvmem.prefill`` (any recompute mode) and keep the result as one cube.

    An engine's KV-connector API loads one contiguous prefix and cannot recompute tokens in its middle; serve
    ``precompose(...)`` instead to get "leading" or "selective" quality. The result is approximate (it is not
    what a full prefill of its ids computes): its metadata says ``composed_from`` and ``recompute``, the vLLM
    connector serves it only when a request names it, under a cache salt, and never by automatic match.

    Args:
        model: the transformers model the cubes were built for (in the dtype you will serve).
        cubes: MemCubes built after one anchor, in order.
        recompute, budget: as for `kvmem.prefill` ("auto": the model's calibration picks, `kvmem.calibrate`).
        tokenizer: checked against the cubes' tokenizer, if given.
        name: the new cube's name (default: the names joined by "+").

    Returns:
        MemCube holding the composed KV of ``anchor + every cube's tokens``.

    Example:
        >>> precompose(model, [a, b], recompute="leading").save("store/default/a+b.safetensors")
    """
    cubes = list(cubes)
    if len(cubes) < 2:
        raise CubeError("precompose needs at least two cubes (one cube is served as it is)")
    prefix = prefill(model, cubes, recompute=recompute, budget=budget, tokenizer=tokenizer)
    kv = [(k[0].detach().cpu().contiguous(), v[0].detach().cpu().contiguous()) for k, v in kv_from_cache(prefix.cache)]
    first = cubes[0]
    meta = first.meta
    texts = [c.text for c in cubes]
    meta.update({
        "name": name or "+".join(c.name for c in cubes),
        "text": "".join(texts) if all(isinstance(t, str) for t in texts) else None,
        "num_tokens": int(prefix.input_ids.shape[1]) - first.anchor_len,
        "dtype": str(kv[0][0].dtype),
        "kv_shapes": [[list(k.shape), list(v.shape)] for k, v in kv],
        "composed_from": [c.name for c in cubes],
        "recompute": {"mode": recompute, "budget": budget, "recomputed_tokens": prefix.recomputed,
                      "composition": prefix.composition},  # "auto": the gate's choice and why
        "spans": [list(s) for s in prefix.spans],
        # what it was made from (kvmem.store.lineage): every source cube's entries, so forgetting finds it too
        DERIVED_KEY: sources_of(cubes),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    if tokenizer is not None and meta["fingerprint_fields"].get("tokenizer") is None:
        meta["fingerprint_fields"] = fingerprint_fields(model, tokenizer)
    return MemCube(kv, prefix.input_ids[0].detach().cpu(), meta)
