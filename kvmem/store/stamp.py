"""What a cube file of a store records about its memory (its *stamp*): store id, namespace, id, text, meta and
when that version was written. `StoreView.put_cube` writes it into the cube's metadata; every load compares it
with the row that names the file (a file copied over another is never served as the other memory); `gc` and
`kvmem repair` read it to tell a superseded file from the last copy of a memory.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from ..errors import CubeError
from .records import check_name, qualify

MEMORY_KEY = "memory"       # the cube meta key of the stamp
RECOVERED = "recovered"     # namespace of cubes rebuilt from files that record no stamp (an older kvmem's)
FUTURE_SLACK_S = 300.0      # a write time further ahead than this (clock skew between machines) is not believed


@dataclass
class Stamp:
    """A cube file's stamp. ``store`` is None for files of a kvmem that did not record it; ``written`` is the
    file's write time (the newer of two copies of a memory is its later version)."""

    store: str | None
    namespace: str
    id: str
    text: str | None
    meta: dict
    created: float
    written: float

    @property
    def qualified(self) -> str:
        return qualify(self.namespace, self.id)


def make_stamp(*, store: str | None, namespace: str, memory_id: str, meta: dict, created: float, written: float,
               text: str | None = None) -> dict:
    """The stamp `put_cube` writes (``text`` only when it differs from the cube's own text)."""
    stamp = {"namespace": namespace, "id": memory_id, "meta": meta, "created": created, "written": written}
    if store:
        stamp["store"] = store
    if text is not None:
        stamp["text"] = text
    return stamp


def read_stamp(meta: dict, *, fallback_time: float) -> Stamp | None:
    """The stamp in a cube's ``meta`` (None: the file records none). Times that are missing, not numbers or not
    finite (NaN, inf) become ``fallback_time`` (the file's modification time). CubeError when it is damaged."""
    memory = meta.get(MEMORY_KEY)
    if memory is None:
        return None
    if not isinstance(memory, dict):
        raise CubeError(f"its {MEMORY_KEY!r} metadata is damaged ({type(memory).__name__}, not an object)")
    store = memory.get("store")
    if store is not None and not isinstance(store, str):
        raise CubeError(f"its store id is damaged ({store!r:.40})")
    text = memory.get("text") or meta.get("text")
    recorded = memory.get("meta")  # checked when it was written; read as it is (rules may have tightened since)
    if recorded is not None and not isinstance(recorded, dict):
        raise CubeError(f"its memory's meta is damaged ({type(recorded).__name__}, not an object)")
    return Stamp(store, check_name(memory.get("namespace"), "namespace"), check_name(memory.get("id"), "memory id"),
                 text if isinstance(text, str) else None, dict(recorded or {}),
                 seconds(memory.get("created"), fallback_time), seconds(memory.get("written"), fallback_time))


def peek_stamp(path, *, fallback_time: float) -> Stamp | None:
    """The stamp in a cube file's header, without reading its tensors (nor checking its checksum: for gc's
    bookkeeping, never for serving). CubeError when the file or its stamp cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta") or "{}")
    except Exception as exc:  # safetensors' own error types, OSError, JSON
        raise CubeError(f"cannot read the header of {path} ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict):
        raise CubeError(f"{path}: its meta is not an object")
    return read_stamp(meta, fallback_time=fallback_time)


def seconds(value, default: float) -> float:
    """``value`` as seconds if it is a finite number, else ``default``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return default


def mismatch(stamp: Stamp | None, *, store: str | None, namespace: str, memory_id: str, text: str,
             fingerprint: str | None, cube_fingerprint: str) -> str | None:
    """Why a loaded file is not the memory ``namespace/id`` whose row names it (None: it is)."""
    if stamp is not None:  # (an older kvmem's file has none: its fingerprint is all it can say)
        if store and stamp.store and stamp.store != store:
            return f"it belongs to another store (id {stamp.store})"
        if (stamp.namespace, stamp.id) != (namespace, memory_id):
            return f"it records memory {stamp.qualified}"
        if stamp.text is not None and stamp.text != text:
            return "it records another text (another version of the memory)"
    if fingerprint is not None and cube_fingerprint != fingerprint:
        return f"its fingerprint {cube_fingerprint[:16]} differs from the row's {fingerprint[:16]}"
    return None
