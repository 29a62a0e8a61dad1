"""Reading a MemCube file layer by layer: `CubeFile`.

`MemCube.load` reads the whole file and verifies its checksum before anything is trusted: right for a model that
needs every layer at once, but a server that loads a cube while the model computes wants the cheap parts now (the
header, the metadata, the token ids: what a request is matched and checked with) and each layer's keys and values
only when that layer is written into its cache. `CubeFile.open` reads and verifies the header, the metadata and
the ids, and checks every declared shape and dtype (`kvmem.cubes.memcube.check_parts`, the checks `MemCube.load`
makes); `CubeFile.read_layer` reads one layer's bytes from their safetensors offsets into a caller's reusable
buffer and verifies them against their own checksum (``part_checksums``, `kvmem.cubes.format`) before returning
them. Nothing unverified ever leaves this module.

The file is held open from `open` on: a store that atomically replaces the file meanwhile (a rename) does not
change what this reader reads, so the layers read later are those of the header verified now. `CubeFile.over`
reads any byte source the same way (a Redis store's blob, whose names are never reused).
"""

from __future__ import annotations

import copy
import json
import os
import weakref
from pathlib import Path

import torch

from ..errors import CubeError
from .format import (FORMAT_VERSION, HEADER_PART, MAX_HEADER_BYTES, header_digest, part_digest, part_hasher,
                     read_error)
from .memcube import FORMAT, CubeFacts, check_parts

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}
_IOV_MAX = 1024  # buffers one preadv takes (Linux's IOV_MAX)
_CHUNK = 128 << 10  # bytes read per preadv, hashed right after, while they are still in the CPU's L2 cache
# (a 4k SmolLM2 cube read into a paged cache: 61 ms of CPU at 128 KiB, 71 ms at 1 MiB, bench/README.md)


class NotLayered(CubeError):
    """The file cannot be read layer by layer (written before ``part_checksums``, or quantized): read it whole
    with `MemCube.load`. Not a sign of damage."""


class Scratch:
    """Reusable byte buffers, one per key, grown to the largest size asked for and never shrunk: a loader that
    reads cube after cube through them allocates only when a cube's layer is larger than any before."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, key: str, nbytes: int) -> torch.Tensor:
        """A uint8 tensor [nbytes] (a view of buffer ``key``; its old contents are garbage)."""
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = self._buffers[key] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buf[:nbytes]

    def take_as(self, key: str, shape, dtype: torch.dtype) -> torch.Tensor:
        """Buffer ``key`` viewed as a tensor of ``shape`` and ``dtype``."""
        n = 1
        for s in shape:
            n *= int(s)
        return self.take(key, n * torch.empty((), dtype=dtype).element_size()).view(dtype).view(*shape)


class FileBytes:
    """A cube's bytes in an open file: ``size`` and ``read_into(view, offset)`` (what `CubeFile` reads through;
    a Redis store's blob is another such source, `kvmem.integrations.serving`)."""

    def __init__(self, fd: int, path: Path | None = None):
        self.fd, self.path = fd, path
        self.size = os.fstat(fd).st_size

    def read_into(self, view: memoryview, offset: int) -> int:
        """Read up to ``len(view)`` bytes at ``offset`` into ``view``; the number read (0 at the end)."""
        if self.fd is None:  # unpickled in another process (an engine's worker): open the file by its path
            self.fd = os.open(self.path, os.O_RDONLY)
        return os.preadv(self.fd, [view], offset)

    def read_into_many(self, views: list[memoryview], offset: int) -> int:
        """Read consecutive bytes at ``offset`` into ``views`` in order (one ``preadv``); the number read."""
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        return os.preadv(self.fd, views, offset)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __getstate__(self):
        # another process gets the path: a file replaced there since holds other bytes, which fail the checksums
        # verified here, so a load never mixes two files
        return {"fd": None, "path": self.path, "size": self.size}


class PartFile:
    """A kvmem safetensors file (``format``, ``format_version``, ``meta``, ``part_checksums`` in its header) read
    part by part: `open_parts` reads and verifies the header (a few KB); `read_part_into` reads one tensor's bytes
    into a caller's buffers and verifies them against their own checksum. `CubeFile` is the MemCube's; a serving
    engine's sidecar files use it directly (`kvmem.integrations.key_blocks`)."""

    def __init__(self, path, source, meta: dict, entries: dict, parts: dict, data_start: int):
        self.path, self._source, self._meta = path, source, meta
        self._entries, self._parts, self._data_start = entries, parts, data_start
        self._closer = weakref.finalize(self, source.close)

    def __getstate__(self):
        # sent to an engine's worker process with the verified header; the source reopens there on first read
        state = dict(self.__dict__)
        del state["_closer"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._closer = weakref.finalize(self, self._source.close)

    @classmethod
    def open_parts(cls, path: str | os.PathLike, *, fmt: str, version: str) -> "PartFile":
        """Open ``path``, a file of format ``fmt`` version ``version``, and verify its header and metadata.

        Raises:
            CubeError: missing, truncated, of another format or version, or its header fails its checksum."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise read_error(path, exc) from None
        return cls.over_parts(FileBytes(fd, path), where=path, fmt=fmt, version=version)

    @classmethod
    def over_parts(cls, source, *, where, fmt: str, version: str) -> "PartFile":
        """A file of format ``fmt`` version ``version`` read from byte source ``source`` (``size``,
        ``read_into(view, offset)``, ``close()``: `FileBytes`, a Redis store's blob), named ``where`` in messages,
        its header verified as `open_parts` verifies a file's. ``source`` is closed with it (or now, if refused)."""
        try:
            _, meta, entries, parts, data_start = _read_header(source, where, fmt=fmt, version=version)
        except BaseException:
            source.close()
            raise
        return cls(where, source, meta, entries, parts, data_start)

    @property
    def meta(self) -> dict:
        """The file's metadata (a copy)."""
        return copy.deepcopy(self._meta)

    def close(self) -> None:
        self._closer()

    def part_checksum(self, name: str) -> str:
        """Tensor ``name``'s verified ``part_checksums`` entry (``"__header__"``: the header's)."""
        return self._parts[name]

    def part_dtype_shape(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """Tensor ``name``'s (``"k.3"``, ``"v.3"``) dtype and shape as the file declares them (verified at open)."""
        dtype, shape, _, _ = self._entries[name]
        return dtype, shape

    def read_part_into(self, name: str, views: list[memoryview]) -> None:
        """Read tensor ``name``'s bytes, in file order, straight into ``views`` (writable byte buffers that do not
        overlap, together exactly the part's size: e.g. the blocks of a paged KV cache) and verify them against
        the part's checksum: one read (``preadv`` where the source can) per `_CHUNK` bytes (a source's own
        ``chunk`` where it has one), hashed right after, while they are still in the CPU's cache.

        Raises:
            CubeError: the views do not add up to the part, the read failed, or the bytes do not match their
            checksum: the views then hold unverified bytes, and the caller must not use them (a server reports
            the blocks they belong to as load errors).
        """
        dtype, shape, begin, end = self._entries[name]
        total = sum(len(v) for v in views)
        if total != end - begin:
            raise CubeError(f"{self.path}: {name} holds {end - begin} bytes, the buffers given take {total}")
        offset = self._data_start + begin
        h = part_hasher(name, dtype, shape)
        chunk = getattr(self._source, "chunk", _CHUNK)  # a remote source reads more per round trip
        batch, size = [], 0
        for v in _pieces(views, chunk):
            batch.append(v)
            size += len(v)
            if size >= chunk or len(batch) == _IOV_MAX:
                offset = self._read_batch(batch, size, offset, name, h)
                batch, size = [], 0
        if batch:
            self._read_batch(batch, size, offset, name, h)
        if h.hexdigest() != self._parts[name]:
            raise CubeError(f"{self.path}: checksum mismatch of {name}: the file was corrupted after it was saved; "
                            "rebuild it")

    def _read_batch(self, views: list[memoryview], size: int, offset: int, name: str, hasher) -> int:
        """Fill ``views`` (``size`` bytes) from ``offset`` and hash them while they are still in the CPU's cache."""
        many = getattr(self._source, "read_into_many", None)
        got = 0
        if many is not None:
            try:
                got = many(views, offset)
            except OSError as exc:
                raise CubeError(f"cannot read {name} of {self.path} ({exc})") from None
        if got < size:  # a short read (or a source without preadv): finish view by view
            done = 0
            for v in views:
                if done + len(v) > got:
                    start = max(got - done, 0)
                    _read_into(self._source, v[start:], offset + done + start, f"{name} of {self.path}")
                done += len(v)
        for v in views:
            hasher.update(v)
        return offset + size

    def _read(self, name: str, key: str, scratch: Scratch | None) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[name]
        buf = scratch.take(key, end - begin) if scratch is not None else torch.empty(end - begin, dtype=torch.uint8)
        self.read_part_into(name, [memoryview(buf.numpy())])
        return buf.view(dtype).view(shape)


def _read_header(source, path, *, fmt: str, version: str | None):
    """A kvmem safetensors header read from ``source`` and verified: (meta JSON, meta, entries {name: (dtype,
    shape, begin, end)}, part checksums, data start). ``version`` None: any (the caller checks it)."""
    def bad(why: str):
        return CubeError(f"{path}: {why}; the file is truncated, corrupted or another kind of file; rebuild it")

    size = source.size
    if size < 8:
        raise bad(f"only {size} bytes")
    declared = int.from_bytes(_read(source, 8, 0, path), "little")
    if declared > size - 8 or declared > MAX_HEADER_BYTES:
        raise bad(f"its header claims {declared} bytes, the file has {size}")
    try:
        header = json.loads(_read(source, declared, 8, path))
        strings = header.pop("__metadata__", None) or {}
        if not isinstance(header, dict) or not isinstance(strings, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, RecursionError) as exc:
        raise bad(f"not a valid safetensors header ({str(exc)[:120]})") from None
    if strings.get("format") != fmt:
        raise bad(f"not a {fmt} (format {strings.get('format')!r})")
    got_version, meta_json = strings.get("format_version"), strings.get("meta", "")
    if version is None:
        version = got_version
    if got_version != version:  # quantized (version 2) cubes are read whole; unknown versions too
        raise NotLayered(f"{path}: format version {got_version!r} is read whole (MemCube.load)")
    try:
        parts = json.loads(strings["part_checksums"])
        if not isinstance(parts, dict):
            raise ValueError
    except (KeyError, ValueError, TypeError):
        raise NotLayered(f"{path} has no per-part checksums (written by an older kvmem): it is read whole; "
                         "save it again with this kvmem to load it layer by layer") from None
    if parts.get(HEADER_PART) != header_digest(fmt, version, meta_json):
        raise bad("checksum mismatch of its header (format, version, metadata): it was edited or damaged")
    try:
        meta = json.loads(meta_json)
        if not isinstance(meta, dict):
            raise ValueError
    except (ValueError, RecursionError):
        raise bad("its metadata is not a JSON object") from None
    data_start = 8 + declared
    entries = {}
    for name, entry in header.items():
        try:
            dtype = _ST_DTYPES[entry["dtype"]]
            shape = [int(s) for s in entry["shape"]]
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has a malformed entry") from None
        n = 1
        for s in shape:
            n *= s
        if min(shape, default=1) < 0 or not 0 <= begin <= end <= size - data_start \
                or end - begin != n * torch.empty((), dtype=dtype).element_size():
            raise bad(f"tensor {name!r} ({entry['dtype']} {shape}) does not fit its offsets [{begin}, {end})")
        if name not in parts:
            raise bad(f"tensor {name!r} has no checksum in part_checksums")
        entries[name] = (dtype, tuple(shape), begin, end)
    return meta_json, meta, entries, parts, data_start


class CubeFile(PartFile, CubeFacts):
    """A MemCube file opened for reading layer by layer (see the module docstring).

    The attributes a server matches and checks a request with are those of `MemCube`: ``meta`` (a copy),
    ``all_ids``, ``input_ids``, ``anchor_len``, ``num_tokens``, ``name``, ``dtype``, ``fingerprint_fields``,
    ``quantization`` (always None), ``nbytes``, ``kv_shapes``, ``num_layers``.
    """

    #: where this cube's key-blocks sidecar is when it is not a file beside the cube: a byte source (a Redis
    #: store's key, `kvmem.integrations.sources`), set by whoever opened the cube; None: beside its file, if any
    key_blocks_source = None

    def __init__(self, path, source, meta: dict, ids: torch.Tensor, entries: dict, parts: dict, data_start: int):
        super().__init__(path, source, meta, entries, parts, data_start)
        self._ids = ids

    @classmethod
    def open(cls, path: str | os.PathLike) -> "CubeFile":
        """Open ``path`` and verify its header, metadata and ids (reading a few KB, not the KV).

        Raises:
            NotLayered: a valid-looking cube that lacks per-part checksums or is quantized (use `MemCube.load`).
            CubeError: the file is missing, truncated, corrupted, edited, of another kind or version.
        """
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise read_error(path, exc) from None
        return cls.over(FileBytes(fd, path), where=path)

    @classmethod
    def over(cls, source, *, where) -> "CubeFile":
        """A cube read from ``source`` (``size``, ``read_into(view, offset)``, ``close()``; see `FileBytes`),
        named ``where`` in messages; verified as `open` verifies a file. ``source`` is closed with the CubeFile (or
        now, if the cube is refused)."""
        try:
            return cls._verified(where, source)
        except BaseException:
            source.close()
            raise

    @classmethod
    def _verified(cls, path, source) -> "CubeFile":
        _, meta, entries, parts, data_start = _read_header(source, path, fmt=FORMAT,
                                                                   version=str(FORMAT_VERSION))
        if meta.get("quantization") is not None:
            raise NotLayered(f"{path} is a quantized cube: it is read whole (MemCube.load)")
        stubs = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (dtype, shape, _, _) in entries.items()}
        if "input_ids" in entries:
            dtype, shape, begin, end = entries["input_ids"]
            data = _read(source, end - begin, data_start + begin, path)
            if parts["input_ids"] != part_digest("input_ids", dtype, shape, data):
                raise CubeError(f"{path}: checksum mismatch of its token ids; the cube is truncated, corrupted or "
                                "another kind of file; rebuild it")
            stubs["input_ids"] = torch.frombuffer(data, dtype=dtype).reshape(shape) if data else \
                torch.empty(shape, dtype=dtype)
        check_parts(path, meta, stubs)  # every shape, dtype and count against the metadata, as MemCube.load
        return cls(path, source, meta, stubs["input_ids"], entries, parts, data_start)

    # ---------------------------------------------------------------- the layers
    def read_layer(self, index: int, *, scratch: Scratch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s (keys, values), each [kv_heads, anchor_len + num_tokens, head_dim], read from the file
        and verified against their checksums. With ``scratch`` they are views of its buffers ``"k"`` / ``"v"``
        (valid until the next read through it); without, fresh tensors.

        Raises:
            CubeError: the bytes do not match their checksum (the file was damaged after it was opened), or
            the read failed.
        """
        if not 0 <= index < self.num_layers:
            raise CubeError(f"{self.path}: layer {index} out of range (the cube has {self.num_layers})")
        return self._read(f"k.{index}", "k", scratch), self._read(f"v.{index}", "v", scratch)

    def read_part(self, name: str, *, scratch: Scratch | None = None) -> torch.Tensor:
        """Tensor ``name`` read and verified, as `read_layer` reads each of its two (a view of ``scratch``'s
        buffer ``name[0]`` when given)."""
        if name not in self._entries or name == "input_ids":
            raise CubeError(f"{self.path}: no KV tensor {name!r}")
        return self._read(name, name[0], scratch)

    # ---------------------------------------------------------------- what MemCube offers beyond CubeFacts
    @property
    def num_layers(self) -> int:
        return int(self._meta["num_layers"])

    @property
    def quantization(self) -> None:
        return None

    @property
    def dtype(self) -> torch.dtype:
        return self._entries["k.0"][0] if "k.0" in self._entries else _ST_DTYPES["F32"]

    @property
    def kv_shapes(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        return [(self._entries[f"k.{i}"][1], self._entries[f"v.{i}"][1]) for i in range(self.num_layers)]

    def layer_nbytes(self, index: int) -> int:
        """Bytes `read_layer` reads for layer ``index`` (keys and values)."""
        return sum(self._entries[n][3] - self._entries[n][2] for n in (f"k.{index}", f"v.{index}"))

    @property
    def nbytes(self) -> int:
        """Bytes of KV the file holds (what reading every layer reads)."""
        return sum(e - b for name, (_, _, b, e) in self._entries.items() if name != "input_ids")

    def __repr__(self) -> str:
        return f"CubeFile({str(self.path)!r}, tokens={self.num_tokens}, layers={self.num_layers})"


def _read_into(source, view: memoryview, offset: int, what) -> None:
    """Fill ``view`` from ``source`` at ``offset``; CubeError if the source ends early or the read fails."""
    done = 0
    try:
        while done < len(view):
            got = source.read_into(view[done:], offset + done)
            if got <= 0:
                raise CubeError(f"{what}: the cube ended {len(view) - done} bytes early: it was truncated or deleted "
                                "after it was opened; rebuild the cube")
            done += got
    except OSError as exc:
        raise CubeError(f"cannot read {what} ({exc})") from None


def _pieces(views: list[memoryview], size: int):
    """``views`` in order, each cut into pieces of at most ``size`` bytes."""
    for v in views:
        for at in range(0, len(v), size):
            yield v[at:at + size]


def _read(source, n: int, offset: int, what) -> bytearray:
    data = bytearray(n)
    _read_into(source, memoryview(data), offset, what)
    return data
