"""What a derived memory unit was made from, and whether that is still the memory's current content.

A *derived* unit is anything computed from memories: a memory's own cube, a precomposed cube of several memories,
a quantized cube, an AdapterCube distilled from memories. It records its sources under ``meta["derived_from"]``: a
list of entries ``{"memory": "namespace/id", "text_sha256": "<64 hex>"}`` (`source_entry`). A memory's *version*
is its text's sha256: editing the text makes every unit derived from the old text stale; deleting the memory makes
it stale too, and so does its expiry (`stale_sources`). Whoever uses a derived unit checks it first; whoever edits
or deletes a memory finds what derives from it through the same entries (`dependants`; the store's cascade is
kvmem/store/forgetting.py). An AdapterCube that learned a memory is checked per request with `usable_for`.
docs/forgetting.md tells the whole lifecycle.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

from ..errors import CubeError
from .expiry import is_expired
from .records import DERIVED_KEY, Record, check_sources, split_id  # noqa: F401 (check_sources: its name here)

REASONS = ("deleted", "edited", "expired")  # why a source is stale


def text_sha256(text: str) -> str:
    """A memory's version: the sha256 of its text (UTF-8), hex."""
    if not isinstance(text, str):
        raise CubeError(f"a memory's text must be a string, got {type(text).__name__}")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def source_entry(rec: Record) -> dict:
    """The lineage entry a unit derived from memory ``rec`` records: which memory, which version of its text."""
    return {"memory": rec.qualified, "text_sha256": text_sha256(rec.text)}


def stale_sources(catalog, entries: Iterable[dict], *, at: float | None = None) -> list[dict]:
    """The entries of ``entries`` whose memory is gone, expired (at ``at``, default now) or whose text changed
    since, each with a ``reason`` ("deleted", "expired" or "edited"); empty when the derived unit still matches
    every memory it was made from."""
    stale = []
    for entry in check_sources(list(entries)):
        namespace, plain = split_id(entry["memory"])
        rec = catalog.get((namespace,), plain)
        if rec is None:
            stale.append({**entry, "reason": "deleted"})
        elif is_expired(rec.meta, at):
            stale.append({**entry, "reason": "expired"})
        elif text_sha256(rec.text) != entry["text_sha256"]:
            stale.append({**entry, "reason": "edited"})
    return stale


def merge_sources(*lists) -> list[dict]:
    """The entries of several ``derived_from`` lists as one, each (memory, version) once, first seen first (what
    a unit composed of several derived units records: e.g. a precomposed cube, from its cubes' entries)."""
    out, seen = [], set()
    for entries in lists:
        for entry in check_sources(list(entries or [])):
            key = (entry["memory"], entry["text_sha256"])
            if key not in seen:
                seen.add(key)
                out.append(entry)
    return out


def sources_of(cubes) -> list[dict]:
    """The lineage a unit made from ``cubes`` (MemCubes, AdapterCubes or their meta dicts) records: the union of
    their ``derived_from`` entries. A cube that records none (built from a text outside any store) adds nothing.

    Example (a precomposed cube that the store can invalidate):
        >>> pc = precompose(model, [view.load_cube("a"), view.load_cube("b")])
        >>> view.put_cube("a-b", pc, derived_from=sources_of([ca, cb]))
    """
    metas = [c if isinstance(c, dict) else c.meta for c in cubes]
    return merge_sources(*(m.get(DERIVED_KEY) for m in metas))


def names(entries: Iterable[dict], qualified: str) -> bool:
    """Whether ``entries`` name the memory ``qualified`` ("ns/id")."""
    return any(e.get("memory") == qualified for e in entries or ())


def dependants(records: Iterable[Record], memories) -> list[Record]:
    """The records among ``records`` whose ``derived_from`` names one of ``memories`` (qualified ids), a record's
    own entry aside (a memory's own cube names its memory; it is not another unit's dependant)."""
    memories = set(memories)
    out = []
    for rec in records:
        entries = rec.meta.get(DERIVED_KEY) if isinstance(rec.meta, dict) else None
        if isinstance(entries, list) and any(isinstance(e, dict) and e.get("memory") in memories
                                             and e.get("memory") != rec.qualified for e in entries):
            out.append(rec)
    return out


def foreign_sources(rec: Record) -> list[dict]:
    """The entries of ``rec``'s ``derived_from`` that name other memories than ``rec`` itself (its own entry is
    checked at every load by the cube file's stamp, kvmem/store/stamp.py)."""
    entries = rec.meta.get(DERIVED_KEY) if isinstance(rec.meta, dict) else None
    if not isinstance(entries, list):
        return []
    return [e for e in entries if not (isinstance(e, dict) and e.get("memory") == rec.qualified)]


def unusable_reasons(adapter_meta: dict, catalog, retrieved_ids: Iterable = (), *, strict: bool = False,
                     at: float | None = None) -> list[dict]:
    """Why an AdapterCube (its ``meta``) must not serve a request that retrieved ``retrieved_ids`` (qualified ids,
    or records): its stale sources that matter for it, each with its ``reason``. Empty: usable.

    A source deleted or expired disqualifies the adapter for every request (it still holds content the user
    forgot). A source edited disqualifies it for requests that retrieve the memory's new version (the adapter
    would contradict it); with ``strict`` for every request too."""
    retrieved = {r.qualified if isinstance(r, Record) else r for r in retrieved_ids}
    entries = (adapter_meta or {}).get(DERIVED_KEY) or []
    return [s for s in stale_sources(catalog, entries, at=at)
            if s["reason"] != "edited" or strict or s["memory"] in retrieved]


def usable_for(adapter_meta: dict, catalog, retrieved_ids: Iterable = (), *, strict: bool = False,
               at: float | None = None) -> bool:
    """Whether an AdapterCube with ``adapter_meta`` may serve a request that retrieved ``retrieved_ids`` (see
    `unusable_reasons`, which says why not). The scheduler's policy and recall call it before using an adapter.

    Example:
        >>> usable_for(acube.meta, view.store.catalog, [f"{m['namespace']}/{m['id']}" for m in mm.last.memories])
    """
    return not unusable_reasons(adapter_meta, catalog, retrieved_ids, strict=strict, at=at)
