"""The on-disk form of cubes: one safetensors file, JSON metadata, a checksum over both; atomic saves.

Layout of the safetensors header metadata (all strings):
    format          "kvmem.memcube" (or another cube kind)
    format_version  "1"; "2" for quantized cubes (packed KV, scales and minimums: kvmem.cubes.quantize)
    meta            JSON: everything about the cube (fingerprint fields, positions, text, ...)
    checksum        xxh3-128 over format, version, meta and every tensor's name, dtype, shape and bytes
    part_checksums  JSON {"__header__": xxh3-128 over format, version and meta; each tensor's name: xxh3-128 over
                    its name, dtype, shape and bytes}; optional (older files
                    lack it and stay readable). It lets a reader verify a cube piece by piece: header and ids first,
                    each layer's KV as it reads it (`kvmem.cubes.cubefile`), instead of reading the whole file
                    before anything is trusted. Together the parts cover everything ``checksum`` covers; a damaged
                    ``part_checksums`` can only make a piecewise read refuse, never accept a damaged part.

The checksums guard against corruption (truncation, bit flips, edits), not against an adversary who can
rewrite the file and its checksums together.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import safetensors.torch
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CubeError

FORMAT_VERSION = 1
# quantized cubes (kvmem.cubes.quantize) are version 2, so a kvmem that cannot dequantize refuses them by version
# instead of misreading packed bytes; full-width cubes stay version 1, readable by every kvmem
QUANTIZED_VERSION = 2


def checksum(fmt: str, version: str, meta_json: str, tensors: dict[str, torch.Tensor]) -> str:
    """xxh3-128 over the header strings and every tensor (name, dtype, shape, bytes), in name order."""
    h = xxhash.xxh3_128()
    for part in (fmt, version, meta_json):
        h.update(part.encode())
        h.update(b"\0")
    for name in sorted(tensors):
        t = tensors[name]
        _update_tensor(h, name, t.dtype, t.shape, _tensor_bytes(t))
    return h.hexdigest()


HEADER_PART = "__header__"


def _update_tensor(h, name: str, dtype: torch.dtype, shape, data) -> None:
    h.update(f"{name}:{dtype}:{tuple(shape)}\0".encode())
    if len(data):
        h.update(data)


def _tensor_bytes(t: torch.Tensor):
    # bytes as stored; viewing as uint8 works for every dtype numpy lacks (bfloat16)
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else b""


def header_digest(fmt: str, version: str, meta_json: str) -> str:
    """xxh3-128 over a cube's header strings: the ``__header__`` part of ``part_checksums``."""
    h = xxhash.xxh3_128()
    for part in (fmt, version, meta_json):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def part_digest(name: str, dtype: torch.dtype, shape, data) -> str:
    """xxh3-128 over one tensor's name, dtype, shape and raw bytes ``data`` (a buffer): its ``part_checksums``
    entry. ``data`` may be bytes read straight from the file, before any tensor is made of them."""
    h = part_hasher(name, dtype, shape)
    if len(data):
        h.update(data)
    return h.hexdigest()


def part_hasher(name: str, dtype: torch.dtype, shape):
    """An xxh3-128 hasher primed with one tensor's name, dtype and shape: ``update`` it with the tensor's bytes in
    order, in as many pieces as they are read in (e.g. straight into a paged cache's blocks); its ``hexdigest`` is
    then `part_digest`'s."""
    h = xxhash.xxh3_128()
    _update_tensor(h, name, dtype, shape, b"")
    return h


def part_checksums(fmt: str, version: str, meta_json: str, tensors: dict[str, torch.Tensor]) -> str:
    """The ``part_checksums`` header string: JSON of `header_digest` and every tensor's `part_digest`."""
    parts = {HEADER_PART: header_digest(fmt, version, meta_json)}
    for name in sorted(tensors):
        t = tensors[name]
        parts[name] = part_digest(name, t.dtype, t.shape, _tensor_bytes(t))
    return json.dumps(parts, sort_keys=True)


def write_cube_file(path: str | os.PathLike, fmt: str, meta: dict, tensors: dict[str, torch.Tensor], *,
                    version: int = FORMAT_VERSION) -> Path:
    """Write ``tensors`` + ``meta`` to ``path`` atomically: temp file in the same folder, fsync, rename.
    ``version``: the format version (`QUANTIZED_VERSION` for a quantized cube).

    No reader ever sees a partial file under ``path``; a crash leaves at most a hidden ``.*.tmp`` file.
    """
    path = Path(path)
    if path.is_dir():
        raise CubeError(f"{path} is a folder: give the cube a file name, e.g. {path / 'memory.safetensors'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    meta_json = json.dumps(meta, sort_keys=True, ensure_ascii=False)
    version = str(version)
    header = {
        "format": fmt,
        "format_version": version,
        "meta": meta_json,
        "checksum": checksum(fmt, version, meta_json, tensors),
        "part_checksums": part_checksums(fmt, version, meta_json, tensors),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        try:
            save_file(tensors, tmp, metadata=header)
        except Exception as exc:  # safetensors reports I/O failures as its own error type: one kind for callers
            if type(exc).__name__ == "SafetensorError" and "I/O error" in str(exc):
                raise OSError(f"cannot write {tmp}: {exc}") from None
            raise
        with open(tmp, "rb+") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # not mkstemp's 0600: as readable as any file the user makes
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, interrupted: the OS error itself says it best; no partial file stays
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def read_cube_file(path: str | os.PathLike, fmt: str, *, device: str | torch.device | None = None
                   ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify a cube file: returns (meta, tensors). Any problem raises CubeError saying what and why.

    Verified before returning: it is a complete safetensors file, of kind ``fmt`` and a known version, its
    metadata parses, and the checksum over metadata and tensors matches.
    """
    path = Path(path)
    device = _check_device(device)
    data = _read_file(path)
    try:
        # one read() and safetensors' bytes loader, not a mmap: under memory pressure faulting a mapped file in
        # page by page cost seconds where one sequential read costs milliseconds. The tensors come out in fresh
        # private buffers (copies out of ``data``), so the bytes checksummed here are the bytes the model reads,
        # whatever later happens to the file
        tensors = safetensors.torch.load(data)
        header = _header_metadata(data)
    except Exception as exc:  # safetensors raises several types for malformed files
        raise CubeError(f"{path} is not a valid safetensors file ({type(exc).__name__}: {exc}); it is truncated, "
                        "corrupted or another kind of file (kvmem never reads pickles); rebuild the cube") from None
    del data
    found = header.get("format")
    if found != fmt:
        kind = {"kvmem.memcube": "a MemCube (MemCube.load)", "kvmem.adaptercube": "an AdapterCube (AdapterCube.load)"}
        hint = f"it is {kind[found]}" if found in kind else "it has no kvmem header"
        raise CubeError(f"{path} is a safetensors file but not a {fmt} ({hint})")
    version = header.get("format_version")
    if version not in (str(FORMAT_VERSION), str(QUANTIZED_VERSION)):
        raise CubeError(f"{path} has {fmt} format version {version!r}; this kvmem reads versions {FORMAT_VERSION} "
                        f"and {QUANTIZED_VERSION} (quantized cubes). Rebuild the cube with this kvmem, or use the "
                        "kvmem version that wrote it")
    meta_json = header.get("meta", "")
    try:
        meta = json.loads(meta_json)
        if not isinstance(meta, dict):
            raise ValueError("metadata is not a JSON object")
    except (ValueError, RecursionError) as exc:
        why = str(exc)[:200] if isinstance(exc, ValueError) else "JSON nested too deeply"
        raise CubeError(f"{path}: cube metadata is damaged ({why}); rebuild the cube") from None
    expected = header.get("checksum")
    actual = checksum(fmt, version, meta_json, tensors)
    if expected != actual:
        raise CubeError(f"{path}: checksum mismatch (stored {expected}, computed {actual}): the file was corrupted "
                        "or edited after it was saved; rebuild the cube")
    if (version == str(QUANTIZED_VERSION)) != (meta.get("quantization") is not None):
        raise CubeError(f"{path}: format version {version} but the metadata "
                        f"{'declares no' if version == str(QUANTIZED_VERSION) else 'declares a'} quantization "
                        "(version 2 is exactly the quantized cubes); the cube is damaged or was written by "
                        "something else; rebuild it")
    if device is not None:
        try:
            tensors = {name: t.to(device) for name, t in tensors.items()}
        except (RuntimeError, TypeError, ValueError, AssertionError) as exc:
            raise CubeError(f"cannot put the cube on device {str(device)!r}: {exc}") from None
    return meta, tensors


# safetensors refuses headers over 100 MB itself; a cube's header is a few KB to a few MB (its text, its ids'
# metadata), so anything near this is a forgery or another kind of file
MAX_HEADER_BYTES = 100_000_000


def _read_file(path: Path) -> bytes:
    """The whole file, read in one go once its header's declared length is bounded by the file's real size (a
    forged length is refused before anything is allocated for it). CubeError for every way the read can fail."""
    try:  # the file may vanish or be replaced at any moment (a store swapping it): never a raw OSError
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise CubeError(f"{path} is {'empty' if size == 0 else f'only {size} bytes'}: not a cube "
                                "(a save that never finished, or the wrong file); rebuild it")
            declared = int.from_bytes(f.read(8), "little")
            if declared > size - 8 or declared > MAX_HEADER_BYTES:
                raise CubeError(f"{path} is not a valid safetensors file (its header claims {declared} bytes, the "
                                f"file has {size}): it is truncated, forged or another kind of file (kvmem never "
                                "reads pickles); rebuild the cube")
            f.seek(0)
            return f.read()
    except OSError as exc:
        raise read_error(path, exc) from None


def read_error(path: Path, exc: OSError) -> CubeError:
    """The CubeError for ``exc``, met opening or reading the cube file ``path`` (what is wrong and the fix)."""
    if isinstance(exc, FileNotFoundError):
        return CubeError(f"no cube at {path}: check the path (build one with `kvmem build`)")
    if isinstance(exc, IsADirectoryError):
        return CubeError(f"{path} is a folder, not a cube file")
    if isinstance(exc, PermissionError):
        return CubeError(f"permission denied reading {path}: the cube is not damaged, but this process may not "
                         "read it; ask its owner for read access (e.g. chmod g+r)")
    return CubeError(f"cannot read {path} ({exc}); check the disk and the path, then retry")


def _header_metadata(data: bytes) -> dict:
    """The ``__metadata__`` strings of a safetensors file's header (call after safetensors validated it)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    return header.get("__metadata__") or {}


def _check_device(device):
    """``device`` as a torch.device, checked against this build and machine (CubeError, not a raw assert)."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise CubeError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r} ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CubeError(f"device {str(device)!r}: this torch build or machine has no CUDA "
                        f"(torch {torch.__version__}); load with device='cpu' (or None)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CubeError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CubeError(f"device {str(device)!r}: MPS is not available here; load with device='cpu'")
    return device


def _umask() -> int:
    """The process umask (Linux: read without changing it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask



def peek_format(path: str | os.PathLike) -> str | None:
    """The ``format`` a cube file declares in its header (None if it declares none or cannot be read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception:
        return None
