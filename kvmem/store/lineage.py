"""What a derived memory unit was made from, and whether that is still the memory's current content.

A *derived* unit is anything computed from memories: a memory's own cube, a precomposed cube of several memories,
a quantized cube, an AdapterCube distilled from memories. It records its sources under ``meta["derived_from"]``: a
list of entries ``{"memory": "namespace/id", "text_sha256": "<64 hex>"}`` (`source_entry`). A memory's *version*
is its text's sha256: editing the text makes every unit derived from the old text stale; deleting the memory makes
it stale too (`stale_sources`). Whoever uses a derived unit checks it first; whoever edits or deletes a memory
finds what derives from it through the same entries.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

from ..errors import CubeError
from .records import Record, check_name, split_id

DERIVED_KEY = "derived_from"


def text_sha256(text: str) -> str:
    """A memory's version: the sha256 of its text (UTF-8), hex."""
    if not isinstance(text, str):
        raise CubeError(f"a memory's text must be a string, got {type(text).__name__}")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def source_entry(rec: Record) -> dict:
    """The lineage entry a unit derived from memory ``rec`` records: which memory, which version of its text."""
    return {"memory": rec.qualified, "text_sha256": text_sha256(rec.text)}


def check_sources(entries) -> list[dict]:
    """``entries`` as read from a unit's meta, checked: a list of ``{"memory": "ns/id", "text_sha256": hex}``."""
    if not isinstance(entries, list):
        raise CubeError(f"meta[{DERIVED_KEY!r}] must be a list of sources, got {type(entries).__name__}")
    out = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("memory"), str) \
                or not isinstance(entry.get("text_sha256"), str) or len(entry["text_sha256"]) != 64:
            raise CubeError(f"meta[{DERIVED_KEY!r}] entries must be {{'memory': 'ns/id', 'text_sha256': hex}}, "
                            f"got {entry!r:.80}")
        namespace, plain = split_id(entry["memory"])
        if namespace is None:
            raise CubeError(f"a lineage entry names its memory with its namespace ('ns/id'), got {entry['memory']!r}")
        check_name(plain, "memory id")
        out.append({"memory": entry["memory"], "text_sha256": entry["text_sha256"].lower()})
    return out


def stale_sources(catalog, entries: Iterable[dict]) -> list[dict]:
    """The entries of ``entries`` whose memory is gone or whose text changed since, each with a ``reason``
    ("deleted" or "edited"); empty when the derived unit still matches every memory it was made from."""
    stale = []
    for entry in check_sources(list(entries)):
        namespace, plain = split_id(entry["memory"])
        rec = catalog.get((namespace,), plain)
        if rec is None:
            stale.append({**entry, "reason": "deleted"})
        elif text_sha256(rec.text) != entry["text_sha256"]:
            stale.append({**entry, "reason": "edited"})
    return stale
