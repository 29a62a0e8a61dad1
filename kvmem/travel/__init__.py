"""kvmem.travel: memory that leaves its author. Signed bundles, a marketplace that is a folder or a bucket, and
migration to another model.

signing.py (Ed25519 keys, the trust list), bundle.py (the bundle file: canonical tar, manifest, every byte checked),
manifest.py (its fields and their rules), pack.py (a namespace -> a bundle), install.py (verify, trust, replay and
model checks, then all units or none as one store batch under the namespace's lock), journal.py (the replay
ledger, and recovery of killed installs),
provenance.py (where each memory came from, reserved namespaces, adapter folders),
market.py (index.json at any fsspec URL: publish, search, fetch), migrate.py (rebuild a namespace's cubes for
another model from their texts).

Names load on first use, so ``import kvmem.travel`` imports neither torch nor cryptography.
"""

_PUBLIC = {
    "generate_key": ".signing", "load_signing_key": ".signing", "read_public_key": ".signing",
    "TrustList": ".signing", "SigningKey": ".signing", "PublicKey": ".signing",
    "Bundle": ".bundle", "open_bundle": ".bundle", "verify_bundle": ".bundle", "write_bundle": ".bundle",
    "pack_namespace": ".pack",
    "install_bundle": ".install", "InstallReport": ".install", "recover_installs": ".journal",
    "PROVENANCE": ".provenance", "describe_provenance": ".provenance",
    "publish_bundle": ".market", "search_bundles": ".market", "fetch_bundle": ".market", "read_index": ".market",
    "migrate_namespace": ".migrate", "MigrationReport": ".migrate",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'kvmem.travel' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
