"""The bundle file: memories of a namespace (plaintext with meta, MemCubes, AdapterCubes) in one signed file.

A bundle (``x.kvmem``) is a plain uncompressed POSIX tar that ``tar tf`` lists, laid out canonically:

    kvmem-bundle.json     the manifest: canonical JSON (sorted keys, no spaces, ASCII); every unit's kind, id,
                          size, sha256, the model it is bound to, its source text's sha256, format version, lineage
    kvmem-bundle.sig      (signed bundles) {"algorithm": "ed25519", "public_key": "ssh-ed25519 AAAA...",
                          "signature": ...}: Ed25519 over ``kvmem.bundle.v1\\0`` + the manifest's bytes
    units/000000.json     a memory: {"id", "text", "meta", "created"}
    units/000001.safetensors   its MemCube (or an AdapterCube), exactly as `save` wrote it
    ...                   then tar's end: two zero blocks, zero padding to a 10240-byte record

Every byte of the file is checked: each tar header must equal the one this module writes for that member (so a
name, mode, size or type field cannot change), each unit's bytes must hash to the manifest's sha256, padding must be
zero and the file must end exactly where the manifest says. The signature covers the manifest, the manifest covers
the units: a flipped byte anywhere fails. Sizes come from the manifest and are checked against the file's real size
before anything is read, nothing is ever decompressed (a compressed file is refused), and member names are never
used as paths: a unit's name is ``units/<its index>``, and installs write through the store's own API.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..errors import CubeError
from .manifest import (FORMAT, FORMAT_VERSION, KINDS, MTIME_MAX, Unit, canonical_json, canonical_json_or_none,
                       check_manifest)
from .signing import PublicKey, SigningKey

MANIFEST, SIGNATURE = "kvmem-bundle.json", "kvmem-bundle.sig"
BLOCK, RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE
MAX_MANIFEST_BYTES = 256 << 20     # ~1M units of metadata; a larger "manifest" is a forgery, refused unread
MAX_SIGNATURE_BYTES = 4096
_CHUNK = 4 << 20                   # bytes hashed per read
_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd",
          b"PK\x03\x04": "zip", b"PK\x05\x06": "zip"}


def tar_header(name: str, size: int, mtime: int) -> bytes:
    """The 512-byte ustar header kvmem writes for a member (regular file, mode 0644, owner 0, no user names)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.type = size, mtime, 0o644, tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def _padded(size: int) -> int:
    return size + (-size % BLOCK)


def _end(offset: int) -> int:
    """The file size once tar's end (two zero blocks, then zeros to a whole record) follows ``offset``."""
    total = offset + 2 * BLOCK
    return total + (-total % RECORD)


@dataclass
class Bundle:
    """A bundle whose layout, manifest and signature were checked (`open_bundle`); its units' bytes are checked by
    `check_units`. ``signer`` is the key that signed it (None: unsigned); whether it is trusted is the installer's
    question. ``digest``: sha256 of the manifest bytes, which names this exact bundle."""

    path: Path
    manifest: dict
    manifest_bytes: bytes
    signer: PublicKey | None
    units: list[Unit]
    size: int
    _offset: int = 0        # where the first unit's header starts

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.manifest_bytes).hexdigest()

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def sequence(self) -> int:
        return self.manifest["sequence"]

    def memories(self) -> list[Unit]:
        return [u for u in self.units if u.kind == "text"]

    def cube_of(self, memory_id: str) -> Unit | None:
        return next((u for u in self.units if u.kind == "memcube" and u.id == memory_id), None)


# ---------------------------------------------------------------------------------------------- writing
def write_bundle(out: str | os.PathLike, header: dict, units: Iterable[tuple[dict, Path]], *,
                 key: SigningKey | None = None) -> Bundle:
    """Write a bundle atomically (temp file in the same folder, fsync, rename).

    Args:
        out: the bundle file to write.
        header: the manifest's bundle-level fields (name, description, author, license, sequence, namespace,
            model, ...); ``format``, ``format_version``, ``created`` and ``units`` are filled in here.
        units: ``(entry, file)`` per unit, in order: ``entry`` holds the unit's kind, id and its other manifest
            fields; its ``file``, ``bytes`` and ``sha256`` are filled in from ``file``'s bytes.
        key: signs the manifest (None: an unsigned bundle, which installs only with ``allow_unsigned``).

    Returns:
        The written `Bundle` (as `open_bundle` reads it).
    """
    out = Path(out)
    entries, files = [], []
    for index, (entry, path) in enumerate(units):
        kind = entry.get("kind")
        if kind not in KINDS:
            raise CubeError(f"unit kind must be one of {sorted(KINDS)}, got {kind!r}")
        size, digest = _hash_file(path)
        entries.append({**entry, "file": f"units/{index:06d}.{KINDS[kind]}", "bytes": size, "sha256": digest})
        files.append(Path(path))
    created = int(header.get("created_unix") or time.time())
    manifest = {**header, "format": FORMAT, "format_version": FORMAT_VERSION, "created_unix": created,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)), "units": entries}
    manifest_bytes = canonical_json(manifest)
    check_manifest(json.loads(manifest_bytes))  # never write what a reader refuses
    members = [(MANIFEST, manifest_bytes)]
    if key is not None:
        members.append((SIGNATURE, signature_bytes(key, manifest_bytes)))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for name, data in members:
                f.write(tar_header(name, len(data), created) + data + bytes(-len(data) % BLOCK))
            for entry, path in zip(entries, files):
                f.write(tar_header(entry["file"], entry["bytes"], created))
                with open(path, "rb") as src:
                    copied = _copy(src, f, entry["bytes"])
                if copied != entry["sha256"]:
                    raise CubeError(f"{path} changed while the bundle was written; pack again")
                f.write(bytes(-entry["bytes"] % BLOCK))
            end = f.tell()
            f.write(bytes(_end(end) - end))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return open_bundle(out)


def signature_bytes(key: SigningKey, manifest_bytes: bytes) -> bytes:
    """The signature member: canonical JSON of the algorithm, the signer's public key line and the signature."""
    import base64

    # the key alone, without the name after it: nothing in a bundle goes unsigned (names come from the trust list)
    return canonical_json({"algorithm": "ed25519", "public_key": PublicKey(key.public.raw).line(),
                           "signature": base64.b64encode(key.sign(manifest_bytes)).decode()})


def _hash_file(path) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(_CHUNK), b""):
                h.update(block)
                size += len(block)
    except OSError as exc:
        raise CubeError(f"cannot read {path} for the bundle: {exc}") from None
    return size, h.hexdigest()


def _copy(src, dst, size: int) -> str:
    """Copy exactly ``size`` bytes of ``src`` to ``dst``; returns their sha256."""
    h, left = hashlib.sha256(), size
    while left:
        block = src.read(min(_CHUNK, left))
        if not block:
            break
        h.update(block)
        dst.write(block)
        left -= len(block)
    return h.hexdigest() if not left else ""


# ---------------------------------------------------------------------------------------------- reading
def _bad(path, why: str) -> CubeError:
    return CubeError(f"{path} is not a valid kvmem bundle: {why}; nothing was installed (get the bundle again from "
                     "its author: it is damaged, edited or not a bundle)")


def open_bundle(path: str | os.PathLike) -> Bundle:
    """Open a bundle: check its layout, manifest and signature (not yet its units' bytes: `check_units`).

    Raises:
        CubeError: not a bundle, compressed, truncated or extended, a header or the manifest edited, a signature
            that does not verify. (Whether the signer is trusted is for the installer to decide.)
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return _open(f, path, size)
    except FileNotFoundError:
        raise CubeError(f"no bundle at {path}: check the path") from None
    except IsADirectoryError:
        raise CubeError(f"{path} is a folder, not a bundle file") from None
    except PermissionError:
        raise CubeError(f"permission denied reading {path}") from None
    except OSError as exc:
        raise CubeError(f"cannot read {path} ({exc})") from None


def _member(f, path, name: str, mtime: int | None, limit: int, *, optional: bool = False) -> bytes | None:
    """Read the small member ``name`` (manifest or signature), whose header must be canonical. None if it is
    ``optional`` and the next header names something else (the file position is then restored)."""
    start = f.tell()
    header = f.read(BLOCK)
    if len(header) < BLOCK:
        raise _bad(path, "it ends inside a tar header")
    if header[:100].rstrip(b"\0") != name.encode():
        if optional:
            f.seek(start)
            return None
        raise _bad(path, f"its member at byte {start} is not {name}")
    try:
        size = int(header[124:136].rstrip(b"\0 ").decode("ascii") or "0", 8)
        stamp = int(header[136:148].rstrip(b"\0 ").decode("ascii") or "0", 8)
    except (UnicodeDecodeError, ValueError):
        raise _bad(path, f"the header of {name} is garbled") from None
    if not 0 <= size <= limit:
        raise _bad(path, f"{name} declares {size} bytes (at most {limit})")
    if not 0 <= stamp <= MTIME_MAX or header != tar_header(name, size, stamp if mtime is None else mtime):
        raise _bad(path, f"the tar header of {name} is not the one kvmem writes (edited)")
    data = f.read(size)
    pad = f.read(-size % BLOCK)
    if len(data) < size or len(pad) < -size % BLOCK:
        raise _bad(path, f"it ends inside {name} (truncated)")
    if pad.strip(b"\0"):
        raise _bad(path, f"the padding after {name} is not zero")
    return data


def _open(f, path: Path, size: int) -> Bundle:
    head = f.read(8)
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            raise _bad(path, f"it is {kind}-compressed (kvmem bundles are uncompressed tar files: a compressed file "
                             "can expand without bound, so kvmem never decompresses one)")
    if size < 3 * BLOCK or size % RECORD:
        raise _bad(path, f"its size ({size} bytes) is not that of a kvmem bundle (whole 10240-byte tar records)")
    f.seek(0)
    manifest_bytes = _member(f, path, MANIFEST, None, MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(manifest_bytes)
    except (ValueError, RecursionError):
        raise _bad(path, "the manifest is not JSON") from None
    if not isinstance(manifest, dict) or canonical_json_or_none(manifest) != manifest_bytes:
        raise _bad(path, "the manifest is not in canonical form (edited)")
    try:
        units = check_manifest(manifest)
    except CubeError as exc:
        raise _bad(path, f"its manifest is malformed ({exc})") from None
    mtime = manifest["created_unix"]
    # the manifest member's header carries the manifest's own time: check it now that the time is known
    f.seek(0)
    if f.read(BLOCK) != tar_header(MANIFEST, len(manifest_bytes), mtime):
        raise _bad(path, "the manifest's tar header is not the one kvmem writes (edited)")
    f.seek(BLOCK + _padded(len(manifest_bytes)))
    signer = None
    sig = _member(f, path, SIGNATURE, mtime, MAX_SIGNATURE_BYTES, optional=True)
    if sig is not None:
        signer = _check_signature(path, sig, manifest_bytes)
    offset = f.tell()
    expected = _end(offset + sum(BLOCK + _padded(u.bytes) for u in units))
    if size != expected:
        raise _bad(path, f"it is {size} bytes, its manifest lays out {expected} (truncated, extended or a unit's "
                         "size edited)")
    return Bundle(path, manifest, manifest_bytes, signer, units, size, offset)


def _check_signature(path, data: bytes, manifest_bytes: bytes) -> PublicKey:
    import base64
    import binascii

    from .signing import parse_public_key

    try:
        sig = json.loads(data)
        if not isinstance(sig, dict) or canonical_json_or_none(sig) != data:
            raise ValueError("not canonical")
        if set(sig) != {"algorithm", "public_key", "signature"} or sig["algorithm"] != "ed25519":
            raise ValueError("unknown fields or algorithm")
        key = parse_public_key(sig["public_key"])
        if key.name or key.line() != sig["public_key"]:
            raise ValueError("public key line not canonical")
        signature = base64.b64decode(sig["signature"], validate=True)
        if base64.b64encode(signature).decode() != sig["signature"]:  # base64 leaves spare bits: one spelling only
            raise ValueError("signature not in canonical base64")
    except (ValueError, TypeError, AttributeError, RecursionError, binascii.Error, CubeError) as exc:
        raise _bad(path, f"its signature member is malformed ({str(exc)[:80]})") from None
    if len(signature) != 64 or not key.verify(signature, manifest_bytes):
        raise _bad(path, f"its signature does not verify against the manifest (signer {key.describe()})")
    return key


def check_units(bundle: Bundle, *, extract_to: Path | None = None,
                progress: Callable[[int], None] | None = None) -> dict[str, Path]:
    """Read every unit of ``bundle`` once, checking its canonical header, its sha256, its padding and the file's end.

    Args:
        extract_to: a private folder to copy each unit into as it is hashed (``<index>.<ext>``); the copies are
            what an installer then reads, so the bundle file changing after this check cannot matter.
        progress: called with the number of bytes read, after each chunk.

    Returns:
        ``{unit.file: path of its copy}`` (empty without ``extract_to``).

    Raises:
        CubeError: a unit's bytes, header, padding or the end of the file differ from what the manifest says.
    """
    out = {}
    path = bundle.path
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    mtime = bundle.manifest["created_unix"]
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != bundle.size:
                raise _bad(path, "it changed size since it was opened")
            f.seek(bundle._offset)
            for unit in bundle.units:
                if f.read(BLOCK) != tar_header(unit.file, unit.bytes, mtime):
                    raise _bad(path, f"the tar header of {unit.file} is not the one kvmem writes (edited)")
                sink = None
                if extract_to is not None:
                    target = Path(extract_to) / unit.file.replace("/", "-")
                    sink = open(target, "wb")
                    out[unit.file] = target
                try:
                    digest = _hash_exactly(f, unit.bytes, view, sink, progress)
                finally:
                    if sink is not None:
                        sink.close()
                if digest != unit.sha256:
                    raise _bad(path, f"{unit.kind} unit {unit.id!r} ({unit.file}) does not match its sha256 in the "
                                     "manifest (damaged or swapped)")
                if f.read(-unit.bytes % BLOCK).strip(b"\0"):
                    raise _bad(path, f"the padding after {unit.file} is not zero")
            rest = f.read(bundle.size - f.tell() + 1)
            if len(rest) != bundle.size - bundle._offset - sum(BLOCK + _padded(u.bytes) for u in bundle.units) \
                    or rest.strip(b"\0"):
                raise _bad(path, "the end of the file is not tar's zero blocks (data appended or edited)")
    except OSError as exc:
        raise CubeError(f"cannot read {path} ({exc})") from None
    return out


def _hash_exactly(f, size: int, view: memoryview, sink, progress) -> str:
    h, left = hashlib.sha256(), size
    while left:
        n = f.readinto(view[:min(len(view), left)])
        if not n:
            return ""  # truncated under us
        h.update(view[:n])
        if sink is not None:
            sink.write(view[:n])
        left -= n
        if progress is not None:
            progress(n)
    return h.hexdigest()


def verify_bundle(path: str | os.PathLike, *, progress: Callable[[int], None] | None = None) -> Bundle:
    """`open_bundle` then `check_units`: every byte checked. Returns the Bundle (its ``signer``: who signed)."""
    bundle = open_bundle(path)
    check_units(bundle, progress=progress)
    return bundle
