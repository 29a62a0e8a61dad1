"""Migrate a namespace's activation memory to another model: rebuild every MemCube from its memory's text.

A MemCube is the KV cache of one model: it cannot be converted, only recomputed. The memory's text is what travels:
each memory with a cube gets a new cube built by the target model after the target's own chat anchor (exactly what
`kvmem.wrap(model, tokenizer).build_cube(text)` builds, so the migrated cube answers as the target model's full
prefill of the same prompt does). Ids, namespaces, meta and provenance are kept; the provenance records the migration
(from which model, to which, when, on which device and dtype) and the old cube joins the memory's lineage.

An AdapterCube (LoRA weights) is trained for its base model and cannot be recomputed from text: it is listed as not
migrated. A killed migration is resumed by running it again (memories already on the target model are skipped).
A migration holds the store's lock of its namespaces (kvmem/store/batch.py), so it and an install into them take
turns: a migration never writes an old text back over a memory an install just replaced.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable

from ..cubes.adaptercube import AdapterCube
from ..cubes.fingerprint import fingerprint_fields, fingerprint_id
from ..cubes.memcube import MemCube
from ..errors import CubeError
from ..model.devices import model_device
from ..prompt import ChatLayout
from ..store.batch import LOCK_WAIT_S, lock
from .journal import recover_installs
from .provenance import PROVENANCE, adapter_folder, as_store, check_namespace


@dataclass
class MigrationReport:
    """What `migrate_namespace` did, per memory id: ``migrated`` (a new cube on the target model), ``already`` (its
    cube was on the target model), ``text_only`` (no activation memory: nothing to rebuild), ``not_migrated``
    (``(name, why)``: AdapterCubes, bound to their base model)."""

    namespace: str
    to_namespace: str
    fingerprint: str
    migrated: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    text_only: list[str] = field(default_factory=list)
    not_migrated: list[tuple[str, str]] = field(default_factory=list)


def migrate_namespace(store, namespace: str, model, tokenizer, *, to_namespace: str | None = None,
                      system_prompt: str | None = None, adapters=None,
                      progress: Callable[[str, int, int], None] | None = None,
                      lock_wait: float = LOCK_WAIT_S) -> MigrationReport:
    """Rebuild the MemCubes of ``namespace`` for ``model`` from their memories' texts.

    Args:
        store: a `CubeStore` or its location.
        namespace: the namespace to migrate (its own memories).
        model, tokenizer: the target model (any device and dtype: both are recorded in each memory's provenance).
        to_namespace: write the migrated memories there (default: in place, replacing the old cubes; the old
            model then has none: migrate into another namespace to keep both).
        system_prompt: the system prompt the target's anchor opens with (as given to `kvmem.wrap`).
        adapters: the namespace's AdapterCube folder (default ``<store>/adapters/<namespace>``), listed as not
            migrated.
        progress: called as ``progress("migrate", done, total)`` after each memory.
        lock_wait: seconds to wait for an install into ``namespace`` or ``to_namespace`` to finish (then CubeError).

    Returns:
        MigrationReport.
    """
    store = as_store(store)
    namespace = check_namespace(namespace)
    to_namespace = check_namespace(to_namespace or namespace)
    with ExitStack() as held:
        for name in sorted({namespace, to_namespace}):  # one order everywhere: two migrations never deadlock
            held.enter_context(lock(store, name, wait=lock_wait))
        return _migrate(store, namespace, to_namespace, model, tokenizer, system_prompt=system_prompt,
                        adapters=adapters, progress=progress)


def _migrate(store, namespace, to_namespace, model, tokenizer, *, system_prompt, adapters, progress):
    recover_installs(store)
    fields = fingerprint_fields(model, tokenizer)
    target = fingerprint_id(fields)
    anchor = ChatLayout(tokenizer, system_prompt).anchor
    source, dest = store.view(namespace), store.view(to_namespace)
    report = MigrationReport(namespace, to_namespace, target)
    records = source.ls()
    facts = fields["model"]
    where = {"to": target, "to_model": f"{facts.get('model_type')} {facts.get('architectures')}",
             "device": str(model_device(model)), "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    for i, rec in enumerate(records):
        old = source.load_cube(rec.id) if rec.kind == "memcube" else None
        if old is None:
            if to_namespace != namespace:
                dest.add(rec.id, rec.text, rec.meta)
            report.text_only.append(rec.id)
        elif old.fingerprint == target and to_namespace == namespace:
            report.already.append(rec.id)
        else:
            done = dest.get(rec.id)
            if to_namespace != namespace and done is not None and done.fingerprint == target and done.text == rec.text:
                report.already.append(rec.id)  # a resumed migration into another namespace
            else:
                cube = MemCube.from_text(model, tokenizer, rec.text, name=rec.id, anchor=anchor)
                dest.put_cube(rec.id, cube, text=rec.text, meta=_migrated_meta(rec.meta, old, where))
                report.migrated.append(rec.id)
        if progress is not None:
            progress("migrate", i + 1, len(records))
    folder = adapter_folder(store, namespace, adapters)
    for path in sorted(folder.glob("*.safetensors")) if folder is not None and folder.is_dir() else []:
        if path.name.startswith("."):
            continue
        try:
            base = AdapterCube.load(path).fingerprint
            why = (f"a LoRA adapter trained for base model {base}: its weights cannot be recomputed from text for "
                   "another model; train (or distill) it again on the new model")
        except CubeError as exc:
            why = f"not a valid AdapterCube ({exc})"
        report.not_migrated.append((path.stem, why))
    return report


def _migrated_meta(meta: dict, old: MemCube, where: dict) -> dict:
    """``meta`` with its provenance extended by this migration; the old cube becomes a lineage entry."""
    prov = dict(meta.get(PROVENANCE) or {})
    step = {"from": old.fingerprint, **where, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    old_model = old.fingerprint_fields.get("model") or {}
    prov["migrated"] = [*(prov.get("migrated") or []), step]
    prov["lineage"] = [*(prov.get("lineage") or []), {
        "fingerprint": old.fingerprint, "model": f"{old_model.get('model_type')} {old_model.get('architectures')}",
        "tokens": old.num_tokens, "anchor": old.anchor, "dtype": str(old.dtype).replace("torch.", "")}]
    prov["fingerprint"] = where["to"]
    return {**meta, PROVENANCE: prov}
