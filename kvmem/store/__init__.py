"""kvmem.store: memories kept for many processes and machines.

cubestore.py (CubeStore: views, grants, gc), view.py (StoreView: reads, writes, change detection), repair.py
(`kvmem repair`: a catalog rebuilt from what is left), stamp.py (what a cube file records about its memory),
records.py (the record rules: names, ids, meta; the backend protocols), local.py (SQLite catalog), folder.py (a
store folder's cube files and marker), redis_backend.py + redis_blobs.py (one Redis every machine shares),
sqlite_db.py (how kvmem opens SQLite files), lineage.py (what a derived unit was made from), forgetting.py (the
cascade a delete or edit sets off, stale adapters, the receipt), expiry.py (memories' lifetimes).

Names load on first use, so importing the record rules never imports torch.
"""

from .._lazy import lazy_names

_PUBLIC = {
    "CubeStore": ".cubestore", "StoreView": ".view", "GCReport": ".cubestore", "RebuildReport": ".repair",
    "StoreVersion": ".records", "Batch": ".batch",
    "Record": ".records", "CatalogBackend": ".records", "BlobBackend": ".records", "check_meta": ".records",
    "split_id": ".records", "Receipt": ".forgetting", "stale_adapters": ".forgetting",
}

__all__ = list(_PUBLIC)


__getattr__, __dir__ = lazy_names(__name__, _PUBLIC)
