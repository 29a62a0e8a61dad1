"""Forgetting that reaches what derives from a memory: the store's cascade, stale adapters, and the receipt.

When a memory is deleted (`StoreView.forget` / ``rm``), edited (``add`` / ``put_cube`` with a new text) or expires
(`CubeStore.gc`), every stored unit whose ``derived_from`` names it (kvmem/store/lineage.py) and no longer matches
its memories is removed (row and cube file), and so is, in turn, whatever derives from those. AdapterCubes in
``<store>/adapters/<namespace>/`` cannot be un-trained: they are reported stale (`stale_adapters`) and refused per
request by `lineage.usable_for`. A memory's own cube goes with its row (the catalog names it; the file is deleted).
docs/forgetting.md tells what this reaches and what it cannot.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import CubeError
from .lineage import DERIVED_KEY, dependants, foreign_sources, stale_sources
from .records import check_blob, is_valid_blob

ADAPTERS = "adapters"  # <store folder>/adapters/<namespace>/*.safetensors: a namespace's AdapterCubes
_log = logging.getLogger("kvmem.store")


@dataclass
class Receipt:
    """What forgetting a memory removed or invalidated (`StoreView.forget`, ``kvmem rm --receipt``).

    Attributes:
        memory: the memory, ``"namespace/id"``; reason: "deleted", "edited" or "expired".
        found: whether there was such a memory (a Receipt is truthy exactly then, as ``rm`` returned True).
        cube_files: cube files deleted (``cubes/<blob>.safetensors``): the memory's own and its dependants'.
        dependants: stored units derived from it that were removed: ``{"memory", "reason", "source"}`` each
            (``source``: the stale entry that condemned it; a dependant of a dependant names that one).
        stale_adapters: AdapterCubes that learned it (they stay on disk, refused by `lineage.usable_for`):
            ``{"adapter": path, "name", "stale": [entries with reason]}`` each.
        scheduler: what a process's memory tiers dropped (`Recall.forget` fills it: ``"ns/id: device"``); a
            store-level forget cannot see other processes' tiers (they drop it at their next request).
    """

    memory: str
    reason: str = "deleted"
    found: bool = False
    cube_files: list[str] = field(default_factory=list)
    dependants: list[dict] = field(default_factory=list)
    stale_adapters: list[dict] = field(default_factory=list)
    scheduler: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.found

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """The receipt in words, one line per thing removed or invalidated."""
        if not self.found:
            return [f"no memory {self.memory}: nothing removed"]
        out = [f"{self.reason} memory {self.memory}"]
        out += [f"removed cube file {name}" for name in self.cube_files]
        out += [f"removed derived {d['memory']} (it was made from {d['source']['memory']}, now "
                f"{d['source']['reason']})" for d in self.dependants]
        out += [f"stale adapter {a['adapter']} (learned " + ", ".join(f"{s['memory']} ({s['reason']})"
                                                                      for s in a["stale"]) + "): not used for "
                "requests it would contradict (lineage.usable_for); retrain or delete it" for a in self.stale_adapters]
        out += [f"dropped from this process's memory tier: {entry}" for entry in self.scheduler]
        return out


def delete_blob(store, name: str | None, receipt: Receipt | None = None) -> None:
    """Delete a cube file the catalog no longer names (a misnamed one is never touched: gc reports it)."""
    if not name:
        return
    try:
        store.blobs.delete(check_blob(name))
    except CubeError as exc:
        _log.warning("not deleting %r: %s", name, exc)
        return
    if receipt is not None:
        receipt.cube_files.append(f"cubes/{name}.safetensors")


def invalidate(store, memories, receipt: Receipt, *, at: float | None = None, everything: bool = False) -> None:
    """Remove every stored unit derived from ``memories`` (qualified ids just deleted, edited or expired) that no
    longer matches its sources, then what derives from those, recording each in ``receipt``. Every namespace of
    the store is searched: a unit another namespace composed from a shared memory goes too. ``everything``:
    check every unit that records sources, whatever it names (gc: a cascade cut short is finished)."""
    pending, done = list(dict.fromkeys(memories)), set(memories)
    first = True
    while pending or (first and everything):
        rows = store.catalog.list_derived()
        found = [r for r in rows if foreign_sources(r)] if first and everything else dependants(rows, pending)
        pending, first = [], False
        for rec in found:
            if rec.qualified in done:
                continue
            stale = stale_sources(store.catalog, foreign_sources(rec), at=at)
            if not stale:  # rebuilt from the current versions since: it stands
                continue
            now = store.catalog.get((rec.namespace,), rec.id)
            if now is None or now.meta.get(DERIVED_KEY) != rec.meta.get(DERIVED_KEY):
                continue  # rewritten by another writer since the listing: its own lineage is checked at read
            gone = store.catalog.delete(rec.namespace, rec.id)
            if gone is None:
                continue
            done.add(rec.qualified)
            pending.append(rec.qualified)
            receipt.dependants.append({"memory": rec.qualified, "reason": stale[0]["reason"], "source": stale[0]})
            delete_blob(store, gone.blob if is_valid_blob(gone.blob) else None, receipt)


def adapter_folders(store, namespace: str | None = None) -> list[Path]:
    """The AdapterCube folders of a local store: ``<store>/adapters/<namespace>`` (every namespace's when None).
    A Redis store keeps no adapters in the store (none)."""
    root = getattr(store, "root", None)
    if root is None:
        return []
    base = Path(root) / ADAPTERS  # the rule kvmem/travel/provenance.py adapter_folder follows
    if namespace is not None:
        return [base / namespace] if (base / namespace).is_dir() else []
    return sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []


def adapter_meta(path: Path) -> dict | None:
    """The metadata in an AdapterCube file's header (not validated: for reports; a request validates the adapter
    it loads, `AdapterCube.load`, and checks that meta with `lineage.usable_for`). None when unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        meta = json.loads(header.get("meta") or "{}")
    except Exception:  # safetensors' own error types, OSError, JSON
        return None
    return meta if isinstance(meta, dict) and header.get("format") == "kvmem.adaptercube" else None


def stale_adapters(store, namespace: str | None = None, *, memories=None, at: float | None = None) -> list[dict]:
    """The AdapterCubes in ``<store>/adapters/<namespace>/`` (every namespace's when None) that learned a memory
    since deleted, edited or expired: ``{"adapter": path, "name", "stale": [entries with reason]}`` each. With
    ``memories`` (qualified ids), only those that learned one of them."""
    out = []
    for folder in adapter_folders(store, namespace):
        for path in sorted(folder.glob("*.safetensors")):
            meta = adapter_meta(path)
            entries = (meta or {}).get(DERIVED_KEY)
            if not entries:
                continue
            try:
                stale = stale_sources(store.catalog, entries, at=at)
            except CubeError as exc:  # a damaged lineage: never trusted as fresh
                stale = [{"memory": "?", "text_sha256": "", "reason": f"damaged lineage ({exc})"}]
            if memories is not None:
                stale = [s for s in stale if s["memory"] in set(memories)]
            if stale:
                out.append({"adapter": str(path), "name": meta.get("name"), "stale": stale})
    return out
