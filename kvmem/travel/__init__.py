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

from .._lazy import lazy_names

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


__getattr__, __dir__ = lazy_names(__name__, _PUBLIC)
