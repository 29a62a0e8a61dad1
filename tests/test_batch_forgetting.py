"""A store batch (bundle installs) that replaces a memory's text is an edit: the cascade of kvmem/store/forgetting.py
removes what derives from the old text, as StoreView.add does (issue 25's batches meet issue 26's lineage)."""

from __future__ import annotations

import kvmem
from helpers import random_ids, tiny_model
from kvmem.integrations.serving import precompose
from kvmem.store.batch import Batch
from kvmem.store.lineage import sources_of

ANCHOR = random_ids(3, seed=7)


def _store(tmp_path):
    model = tiny_model("llama")
    view = kvmem.CubeStore(tmp_path / "s").view("me")
    for seed, (memory_id, text) in enumerate({"a": "Ada has a red kite.", "b": "Bo sells green tea."}.items()):
        view.add(memory_id, text)
        view.put_cube(memory_id, kvmem.MemCube.from_ids(model, random_ids(10 + seed, seed=seed), anchor_ids=ANCHOR,
                                                        text=text))
    cubes = [view.load_cube("a"), view.load_cube("b")]
    view.put_cube("ab", precompose(model, cubes, recompute="leading"), derived_from=sources_of(cubes))
    return view


def test_a_batch_that_edits_a_memory_removes_its_derived_units(tmp_path):
    view = _store(tmp_path)
    files = set(view.store.blobs.names())
    batch = Batch(view.store, label="edit a")
    batch.add("me", "a", "Ada has a blue kite now.")
    batch.commit()
    assert view.store.catalog.get(("me",), "ab") is None  # the row itself, not only hidden at read time
    assert view.get("ab") is None and view.load_cube("ab") is None
    assert view.get("a").text == "Ada has a blue kite now." and view.get("b") is not None
    assert len(set(view.store.blobs.names()) & files) == 1  # b's cube stays; a's and ab's files are gone


def test_a_batch_that_rewrites_the_same_text_keeps_derived_units(tmp_path):
    view = _store(tmp_path)
    batch = Batch(view.store, label="same a")
    batch.add("me", "a", "Ada has a red kite.")
    batch.commit()
    assert view.load_cube("ab") is not None
