"""What travel keeps in a store besides memories: each memory's provenance (a reserved key of its meta, so no schema
changes and a rebuilt catalog keeps it: `put_cube` writes meta into the cube file too), the namespaces kvmem reserves
for itself, and where a namespace's AdapterCubes live."""

from __future__ import annotations

from pathlib import Path

from ..errors import CubeError
from ..store.cubestore import CubeStore
from ..store.records import check_name

PROVENANCE = "kvmem:provenance"     # reserved key of a memory's meta: where the memory came from
RESERVED = "kvmem."                 # namespaces kvmem keeps for itself (install journals, backups, the ledger)


def as_store(store) -> CubeStore:
    """``store`` itself, or the `CubeStore` at the location it names."""
    return store if isinstance(store, CubeStore) else CubeStore(store)


def check_namespace(namespace: str) -> str:
    """``namespace`` if it is a valid namespace a user may write; CubeError for kvmem's own."""
    check_name(namespace, "namespace")
    if namespace.startswith(RESERVED):
        raise CubeError(f"namespaces starting with {RESERVED!r} are kvmem's own (install journals, backups): choose "
                        "another namespace")
    return namespace


def adapter_folder(store: CubeStore, namespace: str, folder=None) -> Path | None:
    """Where a namespace's AdapterCubes live: ``folder`` if given, else ``<store folder>/adapters/<namespace>``
    for a local store (None for a Redis store: give a folder)."""
    if folder is not None:
        return Path(folder).expanduser()
    return store.root / "adapters" / namespace if store.root is not None else None


def lineage_of(meta: dict) -> list[dict]:
    """A memory's earlier provenance (installed from a bundle, migrated) as lineage entries for a new unit."""
    prov = meta.get(PROVENANCE)
    if not isinstance(prov, dict):
        return []
    keep = ("bundle", "sequence", "digest", "signer", "author", "license", "unit_sha256", "cube_sha256",
            "fingerprint", "migrated")
    return [*(x for x in prov.get("lineage") or [] if isinstance(x, dict)), {k: prov[k] for k in keep if k in prov}]


def describe_provenance(meta: dict) -> str:
    """One line saying where a memory came from (``kvmem ls --provenance``)."""
    prov = meta.get(PROVENANCE)
    if not isinstance(prov, dict):
        return "written here (not installed from a bundle)"
    parts = []
    if prov.get("bundle"):
        who = prov.get("signer_name") or prov.get("signer") or "UNSIGNED"
        trust = "trusted" if prov.get("trusted") else "NOT trusted: installed with --allow-unsigned"
        parts.append(f"bundle {prov['bundle']}#{prov.get('sequence')} by {prov.get('author') or '?'}, signed by {who} "
                     f"({trust}), license {prov.get('license') or '-'}, from {prov.get('source')} at "
                     f"{prov.get('installed')}")
    for step in prov.get("migrated") or []:
        if isinstance(step, dict):
            parts.append(f"migrated {step.get('from')} -> {step.get('to')} ({step.get('to_model')}, {step.get('dtype')} "
                         f"on {step.get('device')}) at {step.get('at')}")
    if prov.get("lineage"):
        parts.append(f"lineage: {len(prov['lineage'])} earlier unit(s)")
    return "; ".join(parts) or "unknown"


def inspect_rows(cube_meta: dict) -> list[tuple[str, str]]:
    """``[("provenance", line)]`` for `kvmem inspect` when a cube file records where it came from: an AdapterCube
    installed from a bundle (its own meta), or a store's cube file (the memory's meta that `put_cube` records)."""
    memory = cube_meta.get("memory")
    meta = memory.get("meta") if isinstance(memory, dict) and isinstance(memory.get("meta"), dict) else cube_meta
    return [("provenance", describe_provenance(meta))] if isinstance(meta.get(PROVENANCE), dict) else []
