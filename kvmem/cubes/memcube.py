"""MemCube: activation memory. The KV cache of a memory text, computed once, saved as one safetensors file.

A cube holds the KV of ``anchor_ids + input_ids`` at positions ``[0, anchor_len + num_tokens)``. The anchor
is the text the memory continues (a chat template's system header, or the tokenizer's BOS): building after
it is what lets the cube drop into a real prompt exactly, and lets several cubes share one attention sink.
"""

from __future__ import annotations

import copy
import os
import time
import weakref
from typing import Sequence

import torch
import xxhash

from .._version import __version__
from ..errors import CubeError
from ..model.devices import dtype_device
from ..model.facts import check_context, text_config
from .compute import _as_ids, compute_kv  # noqa: F401  (compute_kv: also importable from here)
from .fingerprint import check_fields, fingerprint_fields, fingerprint_id
from .format import QUANTIZED_VERSION, read_cube_file, write_cube_file
from .quantize import (
    PACKED_NAMES,
    SCHEMES,
    check_packed,
    dequantize_kv,
    packed_tensors,
    quantization_meta,
    quantize_kv,
)

FORMAT = "kvmem.memcube"
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}



def cube_meta(kv, fields: dict, *, name: str | None, text: str | None, anchor: str | None, anchor_len: int,
              num_tokens: int, **extra) -> dict:
    """The metadata every new MemCube records, whoever computed its KV (`MemCube.from_ids`, a serving engine's save):
    ``kv`` per layer (keys, values) [kv_heads, tokens, head_dim], ``fields`` the model's fingerprint fields;
    ``extra`` keys (e.g. ``built_by``) are added after the common ones."""
    return {
        "name": name,
        "text": text,
        "anchor": anchor,
        "anchor_len": anchor_len,
        "num_tokens": num_tokens,
        "position_start": 0,
        "dtype": str(kv[0][0].dtype),
        "num_layers": len(kv),
        "kv_shapes": [[list(k.shape), list(v.shape)] for k, v in kv],
        "fingerprint": fingerprint_id(fields),
        "fingerprint_fields": fields,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kvmem_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        **extra,
    }


class CubeFacts:
    """What a cube says of itself from its metadata and token ids alone (``_meta``, ``_ids``): shared by `MemCube`
    and `kvmem.cubes.cubefile.CubeFile`, which reads the KV later, layer by layer."""

    @property
    def input_ids(self) -> torch.Tensor:
        """LongTensor [1, num_tokens]: the memory's own ids (anchor excluded)."""
        return self._ids[self.anchor_len:][None]

    @property
    def anchor_ids(self) -> torch.Tensor:
        """LongTensor [1, anchor_len]: the ids the memory continues (their KV is in the cube too)."""
        return self._ids[:self.anchor_len][None]

    @property
    def all_ids(self) -> torch.Tensor:
        """LongTensor [1, anchor_len + num_tokens]: one id per KV entry, in order."""
        return self._ids[None]

    @property
    def anchor_len(self) -> int:
        return self._meta["anchor_len"]

    @property
    def num_tokens(self) -> int:
        return self._meta["num_tokens"]

    @property
    def name(self) -> str:
        return self._meta["name"]

    @property
    def text(self) -> str | None:
        return self._meta.get("text")

    @property
    def anchor(self) -> str | None:
        return self._meta.get("anchor")

    @property
    def fingerprint(self) -> str:
        """Short id of the model, weights and adapter the cube was built for."""
        return self._meta["fingerprint"]

    @property
    def fingerprint_fields(self) -> dict:
        return self._meta["fingerprint_fields"]

    @property
    def meta(self) -> dict:
        """A copy of the cube's metadata (the cube itself cannot be changed through it)."""
        return copy.deepcopy(self._meta)


class MemCube(CubeFacts):
    """Activation memory: the KV cache of a memory text (post-RoPE keys and values of every layer).

    Cubes are immutable: injection works on a fresh cache, so a cube reused any number of times gives the same
    result. Build with `from_text` / `from_ids`, persist with `save` / `load`, inject with `kvmem.prefill`.
    """

    def __init__(self, kv: Sequence[tuple[torch.Tensor, torch.Tensor]], ids: torch.Tensor, meta: dict, *,
                 packed=None):
        # a quantized cube keeps only its packed KV (``packed``: per layer a kvmem.cubes.quantize.PackedLayer):
        # the bytes it holds in memory, moves and splices are the packed ones
        self._packed = tuple(packed) if packed is not None else None
        self._kv = () if packed is not None else tuple((k, v) for k, v in kv)
        self._ids = ids
        self._meta = meta
        self._source = None  # a weak reference to the model that built it (measures a quantization's error)

    # ---------------------------------------------------------------- building
    @classmethod
    def from_ids(cls, model, input_ids, name: str | None = None, anchor_ids=None, *, tokenizer=None,
                 text: str | None = None, anchor: str | None = None, chunk_size: int = 2048,
                 progress: bool | None = None) -> "MemCube":
        """Build a cube from token ids.

        Args:
            model: a transformers causal LM (PEFT-wrapped or not); the cube records its fingerprint.
            input_ids: the memory's token ids (list, 1-D or [1, n] LongTensor).
            name: a name for the cube (default: derived from its fingerprint and ids).
            anchor_ids: ids the memory continues (e.g. a chat template's system header); their KV is stored too.
            tokenizer: the tokenizer, if known: then loads check it as part of the fingerprint.
            text, anchor: the source texts, recorded in the metadata.
            chunk_size: prefill this many tokens per forward pass.
            progress: show a progress bar (default: when the input spans more than one chunk).

        Returns:
            MemCube.

        Example:
            >>> cube = kvmem.MemCube.from_ids(model, tokenizer("Alice lives in Oslo.").input_ids)
        """
        ids = _as_ids(input_ids, "input_ids")
        anchor_t = _as_ids(anchor_ids, "anchor_ids")
        if ids.numel() == 0:
            raise CubeError("input_ids is empty: a cube needs at least one token of memory")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise CubeError(f"chunk_size must be a positive int, got {chunk_size!r}")
        vocab = text_config(model).vocab_size
        all_ids = torch.cat([anchor_t, ids])
        if vocab and (int(all_ids.min()) < 0 or int(all_ids.max()) >= vocab):
            raise CubeError(f"token ids must lie in [0, {vocab}) for this model; got min {int(all_ids.min())}, "
                            f"max {int(all_ids.max())} (ids from another tokenizer?)")
        check_context(model, all_ids.numel(), "the cube (anchor + memory)",
                      "split the text into several memories and compose them")
        fields = fingerprint_fields(model, tokenizer)
        kv = compute_kv(model, all_ids, chunk_size=chunk_size, progress=progress)
        meta = cube_meta(kv, fields, name=name, text=text, anchor=anchor, anchor_len=int(anchor_t.numel()),
                         num_tokens=int(ids.numel()))
        if meta["name"] is None:
            meta["name"] = f"cube-{xxhash.xxh3_64(all_ids.numpy().tobytes()).hexdigest()[:12]}"
        cube = cls(kv, all_ids, meta)
        cube._source = weakref.ref(model)
        return cube

    @classmethod
    def from_text(cls, model, tokenizer, text: str, name: str | None = None, anchor: str | None = None, **kwargs
                  ) -> "MemCube":
        """Build a cube from a memory text.

        ``anchor`` is the text the memory continues, tokenized exactly as given (no special tokens added); with
        ``anchor=None`` the memory starts a sequence the way the tokenizer starts one (its BOS, if it adds one).
        Use ``kvmem.wrap(model, tokenizer).build_cube(text)`` to get the anchor of the chat template right.
        Other keyword arguments go to `from_ids`.
        """
        if not isinstance(text, str) or not text:
            raise CubeError(f"text must be a non-empty string, got {type(text).__name__} {text!r:.40} "
                            "(signature: MemCube.from_text(model, tokenizer, text))")
        if not callable(tokenizer) or not callable(getattr(tokenizer, "get_vocab", None)):
            raise CubeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__} "
                            "(signature: MemCube.from_text(model, tokenizer, text))")
        if anchor is not None and not isinstance(anchor, str):
            raise CubeError(f"anchor must be a string or None, got {type(anchor).__name__}")
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if anchor is None:
            anchor_ids = tokenizer("", add_special_tokens=True).input_ids
            bos = tokenizer.bos_token_id
            anchor_ids = [bos] if bos is not None and anchor_ids[:1] == [bos] else []
        else:
            anchor_ids = tokenizer(anchor, add_special_tokens=False).input_ids
        return cls.from_ids(model, ids, name=name, anchor_ids=anchor_ids, tokenizer=tokenizer, text=text,
                            anchor=anchor, **kwargs)

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike, *, quantize: str | None = None, model=None) -> str:
        """Save to one ``.safetensors`` file, atomically (a reader never sees a partial file). Returns the path.

        Args:
            quantize: "int8" or "int4" to save the cube quantized (`quantize`): about 0.53x / 0.28x the bytes
                of bfloat16, approximate, with its measured error in the file's metadata. None saves the cube as
                it is (a quantized cube stays quantized).
            model: the model the cube was built for, to measure the quantization's error (default: the model
                that built this cube in this process).
        """
        cube = self.quantize(quantize, model=model) if quantize is not None else self
        if cube._packed is not None:
            tensors = {"input_ids": cube._ids, **packed_tensors(cube._packed)}
            return str(write_cube_file(path, FORMAT, cube._meta, tensors, version=QUANTIZED_VERSION))
        tensors = {"input_ids": cube._ids}
        for i, (k, v) in enumerate(cube._kv):
            tensors[f"k.{i}"], tensors[f"v.{i}"] = k, v
        return str(write_cube_file(path, FORMAT, cube._meta, tensors))

    def quantize(self, scheme: str, *, model=None) -> "MemCube":
        """A quantized copy of the cube: "int8" or "int4" KV (keys per channel, values per token; see
        kvmem.cubes.quantize), which `kvmem.prefill` dequantizes inside the splice. Its measured error (mean and max
        next-token KL against this cube over probes of its own tokens, and whether greedy continuations change) is
        in ``meta['quantization']['error']``.

        Args:
            scheme: "int8" or "int4".
            model: the model the cube was built for (default: the model that built it in this process); it runs
                the probes.

        Raises:
            CubeError: an unknown scheme, no model to measure with, a cube already quantized another way.
            FingerprintMismatch: ``model`` is not the model the cube was built for.
        """
        if scheme not in SCHEMES:
            raise CubeError(f"quantize must be one of {', '.join(map(repr, SCHEMES))}, got {scheme!r}")
        if self._packed is not None:
            if self._meta["quantization"]["scheme"] == scheme:
                return self
            raise CubeError(f"cube {self.name!r} is already quantized ({self._meta['quantization']['scheme']}); "
                            f"quantizing it to {scheme} would add a second error: quantize the full-width cube")
        model = model if model is not None else (self._source() if self._source is not None else None)
        if model is None:
            raise CubeError(f"a quantized cube carries its measured error, which takes the model cube {self.name!r} "
                            f"was built for: pass model=..., e.g. cube.save(path, quantize={scheme!r}, model=model)")
        check_fields(self.fingerprint_fields, fingerprint_fields(model), what=f"cube {self.name!r}")
        dtype, device = dtype_device(model)
        if self.dtype != dtype:
            raise CubeError(f"cube {self.name!r} holds {self.dtype} KV but the model runs in {dtype}: quantize the "
                            f"cube with the model in {self.dtype}")
        packed = quantize_kv(self._kv, scheme=scheme, anchor_len=self.anchor_len)
        meta = dict(self._meta)
        meta["quantization"] = quantization_meta(model, self._kv, packed, self._ids, scheme=scheme,
                                                 anchor_len=self.anchor_len, dtype=dtype, device=device)
        return MemCube((), self._ids, meta, packed=packed)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None,
             dtype: torch.dtype | None = None) -> "MemCube":
        """Load and validate a cube (format, version, checksum, shapes, dtypes) before it can reach a model.

        Args:
            path: the cube file.
            device: where to put the KV (default: CPU; `prefill` moves it to the model's device).
            dtype: convert the KV to this dtype (an approximation unless it is the dtype the cube was built in;
                recorded in ``meta['cast_from']``).

        Raises:
            CubeError: the file is missing, truncated, corrupted, edited, of another kind or version.
        """
        meta, tensors = read_cube_file(path, FORMAT, device=device)
        kv, ids, packed = check_parts(path, meta, tensors)
        cube = cls(kv, ids, meta, packed=packed)
        return cube.to(dtype=dtype) if dtype is not None else cube

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "MemCube":
        """A copy of the cube on ``device`` and/or in ``dtype`` (this cube is left as it is); ``cube.to(dtype)``
        works as for a tensor."""
        if isinstance(device, torch.dtype) and dtype is None:
            device, dtype = None, device
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise CubeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError, ValueError):
                raise CubeError(f"device must be a torch device like 'cpu' or 'cuda:0', got {device!r}") from None
        meta = dict(self._meta)
        if dtype is not None and str(dtype) != meta["dtype"]:
            meta.setdefault("cast_from", meta["dtype"])
            meta["dtype"] = str(dtype)
        if self._packed is not None:  # the packed bytes move; dtype is what they dequantize to
            return MemCube((), self._ids, meta, packed=[layer.to(device) for layer in self._packed])
        try:
            kv = [(k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)) for k, v in self._kv]
        except (RuntimeError, AssertionError) as exc:  # a device this torch build or machine lacks
            raise CubeError(f"cannot move the cube to device {str(device)!r} ({exc})") from None
        return MemCube(kv, self._ids, meta)

    def with_meta(self, extra: dict) -> "MemCube":
        """A copy of the cube (sharing its tensors, packed or not) whose metadata also holds ``extra``."""
        return MemCube(self._kv, self._ids, {**self._meta, **extra}, packed=self._packed)

    @property
    def kv(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """Per layer (keys, values), each [kv_heads, anchor_len + num_tokens, head_dim]. Do not write into them.

        A quantized cube dequantizes them on each access (a full-width copy: `kvmem.prefill` never makes one, it
        dequantizes inside the splice)."""
        if self._packed is not None:
            return tuple(dequantize_kv(self._packed, scheme=self._meta["quantization"]["scheme"],
                                       n_tokens=self._ids.numel(), anchor_len=self.anchor_len, dtype=self.dtype))
        return self._kv

    @property
    def kv_shapes(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Per layer the (keys, values) shapes of `kv`, without dequantizing a quantized cube."""
        if self._packed is not None:
            return [(tuple(k), tuple(v)) for k, v in self._meta["kv_shapes"]]
        return [(tuple(k.shape), tuple(v.shape)) for k, v in self._kv]

    @property
    def quantization(self) -> dict | None:
        """None for a full-width cube; for a quantized one its scheme, sizes and measured error (a copy)."""
        q = self._meta.get("quantization")
        return copy.deepcopy(q) if q is not None else None

    @property
    def packed(self) -> tuple | None:
        """A quantized cube's packed KV: per layer a `kvmem.cubes.quantize.PackedLayer`; None for a full-width
        cube. Do not write into it."""
        return self._packed

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the KV (a quantized cube's: the dtype it dequantizes to)."""
        if self._packed is not None:
            return _DTYPES[self._meta["dtype"]]
        return self._kv[0][0].dtype

    @property
    def device(self) -> torch.device:
        return self._packed[0].k_q.device if self._packed is not None else self._kv[0][0].device

    @property
    def nbytes(self) -> int:
        """Bytes the cube's KV holds (a quantized cube's: its packed bytes, scales included)."""
        if self._packed is not None:
            return sum(layer.nbytes for layer in self._packed)
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self._kv)

    def __repr__(self) -> str:
        return (f"MemCube(name={self.name!r}, tokens={self.num_tokens}, anchor={self.anchor_len}, "
                f"layers={self._meta['num_layers']}, dtype={self.dtype}, fingerprint={self.fingerprint})")


def as_cubes(cubes) -> list[MemCube]:
    """``cubes`` (one MemCube, or an iterable of them) as a list; CubeError for anything else. None is the caller's
    to treat (no cubes)."""
    if isinstance(cubes, MemCube):
        return [cubes]
    try:
        cubes = list(cubes)
    except TypeError:
        raise CubeError(f"cubes must be a MemCube or a list of MemCubes, got {type(cubes).__name__}") from None
    for c in cubes:
        if not isinstance(c, MemCube):
            raise CubeError(f"cubes must be MemCubes, got {type(c).__name__} (load files with MemCube.load(path))")
    return cubes


def check_parts(path, meta: dict, tensors: dict[str, torch.Tensor]):
    """Check a cube file's tensors and metadata against each other; returns (kv, ids, packed): packed is None for a
    full-width cube, kv empty for a quantized one. CubeError on any inconsistency, including ones a forged checksum
    would let through. Only dtypes and shapes of the KV tensors are read (`kvmem.cubes.cubefile` passes tensors on
    the "meta" device before it reads their bytes); ``input_ids`` must hold its real values."""
    def bad(why: str):
        return CubeError(f"{path}: {why}; the cube is damaged or was written by something else; rebuild it")

    try:
        n_layers = int(meta["num_layers"])
        anchor_len, num_tokens = int(meta["anchor_len"]), int(meta["num_tokens"])
        dtype = _DTYPES[meta["dtype"]]
        shapes = meta["kv_shapes"]
        if not isinstance(shapes, list):
            raise TypeError("kv_shapes")
        fields, model = meta["fingerprint_fields"], meta["fingerprint_fields"]["model"]
        for key in ("name", "fingerprint"):
            if not isinstance(meta[key], str):
                raise TypeError(key)
        if not isinstance(model, dict) or not isinstance(fields, dict):
            raise TypeError("fingerprint_fields")
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise bad(f"metadata lacks or garbles {exc}") from None
    # bound every declared size by what the file holds before building anything from it (a forged header with a
    # recomputed checksum must fail here, not allocate): each layer needs two tensors, each token one id
    if not 0 <= n_layers <= len(tensors):
        raise bad(f"metadata declares {n_layers} KV layers but the file holds only {len(tensors)} tensors")
    ids = tensors.get("input_ids")
    if isinstance(ids, torch.Tensor) and not (0 <= anchor_len <= ids.numel() and 0 <= num_tokens <= ids.numel()):
        raise bad(f"input_ids is {ids.dtype} {tuple(ids.shape)}, metadata says int64 ({anchor_len + num_tokens},)")
    quantized = meta.get("quantization") is not None
    names = PACKED_NAMES if quantized else ("k", "v")
    expected = {"input_ids"} | {f"{p}.{i}" for i in range(n_layers) for p in names}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise bad(f"tensor set differs from the metadata (missing {missing[:4]}, unexpected {extra[:4]})")
    if len(shapes) != n_layers:
        raise bad(f"metadata lacks or garbles kv_shapes ({len(shapes)} entries for {n_layers} layers)")
    try:
        shapes = [[[int(x) for x in shape] for shape in pair] for pair in shapes]
        if len(shapes) != n_layers or any(len(pair) != 2 for pair in shapes):
            raise ValueError
    except (TypeError, ValueError):
        raise bad("metadata lacks or garbles kv_shapes") from None
    ids = tensors["input_ids"]
    total = anchor_len + num_tokens
    if ids.dtype != torch.long or tuple(ids.shape) != (total,) or num_tokens < 1 or anchor_len < 0:
        raise bad(f"input_ids is {ids.dtype} {tuple(ids.shape)}, metadata says int64 ({total},)")
    vocab = model.get("vocab_size")
    if isinstance(vocab, int) and total and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise bad(f"token ids outside [0, {vocab}) of the model the cube names")
    # Shapes are checked against each other here and against the cache the model really keeps at prefill
    # (kvmem.model.cache.kv_shapes): config fields do not describe every cache (multi-query Falcon, MLA).
    if quantized:
        return [], ids, check_packed(meta["quantization"], tensors, shapes, anchor_len=anchor_len, bad=bad)
    kv = []
    for i in range(n_layers):
        k, v = tensors[f"k.{i}"], tensors[f"v.{i}"]
        for name, t, shape in (("k", k, shapes[i][0]), ("v", v, shapes[i][1])):
            if t.dtype != dtype or list(t.shape) != list(shape) or t.dim() != 3 or t.shape[1] != total:
                raise bad(f"{name}.{i} is {t.dtype} {tuple(t.shape)}, metadata says {dtype} {tuple(shape)} "
                          f"with {total} tokens")
        kv.append((k, v))
    return kv, ids, None
