"""A bundle's manifest: its canonical JSON form and the rules every field must pass, whoever signed it.

The manifest lists the bundle and its units (kvmem/travel/bundle.py lays them out in the file). Per unit: its kind
(``text``: a memory's record, ``memcube``, ``adaptercube``), id, file name (``units/<index>.<ext>``, never a path
the bundle chooses), size and sha256, the sha256 of the memory text it was built from, the fingerprint of the model
it is bound to, its file's format version, when it was made and its lineage (the units it was made from).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ..errors import CubeError
from ..store.records import check_name

FORMAT, FORMAT_VERSION = "kvmem.bundle", 1
KINDS = {"text": "json", "memcube": "safetensors", "adaptercube": "safetensors"}   # unit kind -> file extension
MAX_TEXT_CHARS = 4096              # name, author, license, description
MTIME_MAX = 8 ** 11 - 1            # what a ustar header's mtime field holds
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FINGERPRINT = re.compile(r"^[0-9a-f]{16}$")


def canonical_json(value) -> bytes:
    """The one byte form of a JSON value kvmem signs and compares: sorted keys, no spaces, ASCII, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def canonical_json_or_none(value) -> bytes | None:
    try:
        return canonical_json(value)
    except (TypeError, ValueError, RecursionError):
        return None


@dataclass(frozen=True)
class Unit:
    """One unit of a bundle as its manifest lists it (``entry``: the manifest's dict for it)."""

    index: int
    kind: str
    id: str
    file: str
    bytes: int
    sha256: str
    entry: dict = field(repr=False, hash=False, compare=False)


_TOP = {"format", "format_version", "name", "description", "author", "license", "sequence", "created",
        "created_unix", "namespace", "kvmem_version", "model", "units"}
_UNIT = {"kind", "id", "file", "bytes", "sha256", "text_sha256", "fingerprint", "format_version", "lineage",
         "created"}


def _text(value, what: str, *, empty: bool = True) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT_CHARS or (not empty and not value):
        raise CubeError(f"{what} must be a string of at most {MAX_TEXT_CHARS} characters, got {value!r:.60}")
    return value


def _int(value, what: str, *, high: int = 1 << 62) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise CubeError(f"{what} must be an int in [0, {high}], got {value!r:.40}")
    return value


def check_manifest(manifest: dict) -> list[Unit]:
    """The manifest's units, after checking every field a reader relies on (CubeError naming the first bad one).

    A trusted signer may still be careless or hostile: names must pass the store's name rule (no ``/``, no ``..``),
    kinds and sizes must be sane, every MemCube must belong to a memory of the bundle, and nothing is listed twice.
    """
    if not isinstance(manifest, dict):
        raise CubeError("the manifest is not a JSON object")
    unknown = set(manifest) - _TOP
    if unknown or manifest.get("format") != FORMAT:
        raise CubeError(f"not a {FORMAT} manifest (format {manifest.get('format')!r:.40}, unknown fields "
                        f"{sorted(unknown)[:3]})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CubeError(f"bundle format version {manifest.get('format_version')!r:.20}; this kvmem reads version "
                        f"{FORMAT_VERSION} (upgrade kvmem, or ask for a bundle of version {FORMAT_VERSION})")
    check_name(manifest.get("name"), "the bundle name")
    for key in ("description", "author", "license", "created", "kvmem_version"):
        _text(manifest.get(key, ""), key)
    if "namespace" in manifest:
        check_name(manifest["namespace"], "the bundle's namespace")
    _int(manifest.get("sequence"), "sequence")
    _int(manifest.get("created_unix"), "created_unix", high=MTIME_MAX)
    model = manifest.get("model")
    if model is not None and (not isinstance(model, dict) or not _is_fingerprint(model.get("fingerprint"))):
        raise CubeError("model must be an object with the fingerprint of the model the cubes are bound to")
    entries = manifest.get("units")
    if not isinstance(entries, list):
        raise CubeError("units must be a list")
    units, seen = [], set()
    for index, entry in enumerate(entries):
        units.append(_check_unit(index, entry, seen))
    memories = {u.id for u in units if u.kind == "text"}
    for u in units:
        if u.kind == "memcube" and u.id not in memories:
            raise CubeError(f"MemCube unit {u.id!r} belongs to no memory of the bundle")
    return units


def _is_fingerprint(value) -> bool:
    return isinstance(value, str) and bool(_FINGERPRINT.match(value))


def _check_unit(index: int, entry, seen: set) -> Unit:
    where = f"unit {index}"
    if not isinstance(entry, dict) or set(entry) - _UNIT:
        raise CubeError(f"{where} is not an object of known fields")
    kind = entry.get("kind")
    if kind not in KINDS:
        raise CubeError(f"{where} has kind {kind!r:.30}; kinds are {sorted(KINDS)}")
    unit_id = check_name(entry.get("id"), f"{where}'s id")
    if (kind, unit_id) in seen:
        raise CubeError(f"{where}: {kind} {unit_id!r} is listed twice")
    seen.add((kind, unit_id))
    file = entry.get("file")
    if file != f"units/{index:06d}.{KINDS[kind]}":
        raise CubeError(f"{where} is named {file!r:.60}; unit files are named by their index (units/{index:06d}."
                        f"{KINDS[kind]}), never by a path a bundle chooses")
    size = _int(entry.get("bytes"), f"{where}'s bytes")
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not _HEX64.match(digest):
        raise CubeError(f"{where}'s sha256 must be 64 hex digits")
    text_digest = entry.get("text_sha256")
    if kind != "adaptercube" and (not isinstance(text_digest, str) or not _HEX64.match(text_digest)):
        raise CubeError(f"{where}'s text_sha256 must be 64 hex digits")
    if kind != "text":
        if not _is_fingerprint(entry.get("fingerprint")):
            raise CubeError(f"{where} ({kind}) must name the fingerprint of the model it is bound to")
        _int(entry.get("format_version"), f"{where}'s format_version", high=1000)
    lineage = entry.get("lineage", [])
    if not isinstance(lineage, list) or not all(isinstance(x, dict) for x in lineage):
        raise CubeError(f"{where}'s lineage must be a list of objects")
    if "created" in entry:
        _text(entry["created"], f"{where}'s created")
    return Unit(index, kind, unit_id, file, size, digest, entry)
