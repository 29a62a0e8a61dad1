"""Pack a namespace of a store into a bundle: its memories (text + meta), their MemCubes, its AdapterCubes.

Each memory becomes a JSON record unit; its cube is saved as the store validated it (without the store's own
bookkeeping key), and the manifest records for every unit what it is bound to and where it came from. A memory that
was itself installed from a bundle or migrated carries its provenance into the new unit's lineage, so the chain of
authors survives re-sharing.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from .._version import __version__
from ..cubes.adaptercube import AdapterCube
from ..cubes.memcube import MemCube
from ..errors import CubeError
from ..store.batch import LOCK_WAIT_S, lock, recover_batches
from ..store.cubestore import MEMORY_KEY
from ..store.records import check_name
from .bundle import Bundle, write_bundle
from .provenance import PROVENANCE, adapter_folder, as_store, check_namespace, lineage_of
from .signing import SigningKey


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds or 0))


def _format_version(path: Path) -> int:
    """The format version a saved cube file declares (what a reader must support)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return int((f.metadata() or {}).get("format_version", 0))


def pack_namespace(store, namespace: str, out, *, key: SigningKey | None = None, name: str | None = None,
                   description: str = "", author: str = "", license: str = "", sequence: int | None = None,
                   adapters=None, lock_wait: float = LOCK_WAIT_S) -> Bundle:
    """Write the memories of ``namespace`` (own memories only, not shared ones) into the bundle file ``out``.

    Args:
        store: a `CubeStore` or its location.
        key: the `SigningKey` to sign with (None: an unsigned bundle).
        name: the bundle's name (default: the namespace); installs track updates by (signer, name).
        description, author, license: shown by `kvmem search-bundles` and kept in each installed memory's provenance.
        sequence: this bundle's version; an install refuses a bundle older than the one it holds (default: the
            current Unix time, so a later pack is newer).
        adapters: folder of AdapterCubes to include (default ``<store>/adapters/<namespace>`` if it exists).
        lock_wait: seconds to wait for an install into ``namespace`` to finish (then CubeError).

    Returns:
        The written `Bundle`.
    """
    store = as_store(store)
    namespace = check_namespace(namespace)
    name = check_name(name or namespace, "the bundle name")
    # under the namespace's lock, the memories, their cubes and the adapter files are read from one state: an
    # install committing meanwhile could pair an old memory's text with its new cube (a store one may only read
    # is packed without it)
    readonly = getattr(store.catalog, "readonly", False)
    with nullcontext() if readonly else lock(store, namespace, wait=lock_wait):
        return _pack(store, namespace, out, key=key, name=name, description=description, author=author,
                     license=license, sequence=sequence, adapters=adapters)


def _pack(store, namespace, out, *, key, name, description, author, license, sequence, adapters) -> Bundle:
    recover_batches(store)  # an install killed after its commit: its adapter files are moved in before reading
    view = store.view(namespace)
    records = view.ls()
    folder = adapter_folder(store, namespace, adapters)
    adapter_files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith(".")) \
        if folder is not None and folder.is_dir() else []
    if not records and not adapter_files:
        raise CubeError(f"namespace {namespace!r} of {store!r} holds no memories: nothing to pack")
    with tempfile.TemporaryDirectory(prefix="kvmem-pack-") as tmp:
        tmp = Path(tmp)
        units, models = [], {}
        for i, rec in enumerate(records):
            meta = {k: v for k, v in rec.meta.items() if k != PROVENANCE}
            lineage = lineage_of(rec.meta)
            record = tmp / f"{i}.json"
            record.write_text(json.dumps({"id": rec.id, "text": rec.text, "meta": meta, "created": _iso(rec.created)},
                                         sort_keys=True, ensure_ascii=False))
            entry = {"kind": "text", "id": rec.id, "text_sha256": _sha256(rec.text), "created": _iso(rec.created)}
            units.append(({**entry, "lineage": lineage} if lineage else entry, record))
            cube = view.load_cube(rec.id) if rec.kind == "memcube" else None
            if cube is None:
                continue
            plain = {k: v for k, v in cube.meta.items() if k != MEMORY_KEY}
            path = tmp / f"{i}.safetensors"
            MemCube(cube.kv, cube.all_ids[0], plain).save(path)
            models[cube.fingerprint] = cube.fingerprint_fields.get("model") or {}
            cube_lineage = [x for x in plain.get("lineage") or [] if isinstance(x, dict)]
            units.append(({"kind": "memcube", "id": rec.id, "text_sha256": _sha256(rec.text),
                           "fingerprint": cube.fingerprint, "format_version": _format_version(path),
                           "created": plain.get("created") or _iso(rec.created), "lineage": cube_lineage}, path))
        for path in adapter_files:
            cube = AdapterCube.load(path)
            unit_id = check_name(path.stem, f"the adapter file name {path.name}")
            units.append(({"kind": "adaptercube", "id": unit_id, "fingerprint": cube.fingerprint,
                           "format_version": _format_version(path), "created": cube.meta.get("created", ""),
                           "lineage": lineage_of(cube.meta)}, path))
        header = {"name": name, "description": description, "author": author, "license": license,
                  "sequence": int(time.time()) if sequence is None else sequence, "namespace": namespace,
                  "kvmem_version": __version__}
        if len(models) == 1:
            (fingerprint, facts), = models.items()
            header["model"] = {"fingerprint": fingerprint, "model_type": facts.get("model_type"),
                               "architectures": facts.get("architectures")}
        return write_bundle(out, header, units, key=key)
