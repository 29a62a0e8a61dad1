"""Forgetting reaches what derives from a memory (issue 26 part 4): lineage recorded in every stored cube, the
cascade on delete and edit, precomposed cubes, stale adapters, the receipt, and the scheduler's tiers."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import kvmem
from helpers import random_ids, tiny_model
from kvmem.cli import app
from kvmem.errors import CubeError
from kvmem.integrations.serving import precompose
from kvmem.memory.scheduler import MemScheduler
from kvmem.store import expiry
from kvmem.store.forgetting import stale_adapters
from kvmem.store.lineage import (source_entry, sources_of, stale_sources, text_sha256, unusable_reasons,
                                 usable_for)

ANCHOR = random_ids(3, seed=99)
TEXTS = {"a": "Ada keeps the spare key under the blue flowerpot.", "b": "Bo parks the van behind the bakery.",
         "c": "Cy feeds the cat at seven."}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _cube(model, text: str, seed: int) -> kvmem.MemCube:
    return kvmem.MemCube.from_ids(model, random_ids(12 + seed, seed=seed), anchor_ids=ANCHOR, text=text)


@pytest.fixture
def view(tmp_path, model):
    view = kvmem.CubeStore(tmp_path / "s").view("me")
    for seed, (memory_id, text) in enumerate(TEXTS.items()):
        view.add(memory_id, text)
        view.put_cube(memory_id, _cube(model, text, seed))
    return view


def _files(view) -> set[str]:
    return set(view.store.blobs.names())


def test_own_cube_records_its_memory_version_in_row_and_file(view, model):
    entry = {"memory": "me/a", "text_sha256": text_sha256(TEXTS["a"])}
    assert view.load_cube("a").meta["derived_from"] == [entry]
    assert "derived_from" not in view.get("a").meta  # the row is the memory itself: it names no other
    view.put_cube("c", _cube(model, TEXTS["c"], 2), quantize="int8")  # quantized: the same path
    assert view.load_cube("c").quantization
    assert view.load_cube("c").meta["derived_from"] == [{"memory": "me/c", "text_sha256": text_sha256(TEXTS["c"])}]
    assert stale_sources(view.store.catalog, view.load_cube("a").meta["derived_from"]) == []


def _precomposed(view, model, memory_id="ab", sources=("a", "b")):
    cubes = [view.load_cube(s) for s in sources]
    pc = precompose(model, cubes, recompute="leading")
    return view.put_cube(memory_id, pc, derived_from=sources_of(cubes))


def test_a_composed_cube_must_say_what_it_was_made_from(view, model):
    # cubes from outside any store record no sources: their composition cannot be traced, so it is refused
    loose = precompose(model, [_cube(model, TEXTS["a"], 0), _cube(model, TEXTS["b"], 1)], recompute="leading")
    with pytest.raises(CubeError, match="composed from 2 cubes.*derived_from"):
        view.put_cube("ab", loose)
    assert view.get("ab") is None
    # precompose records its store cubes' sources itself (lineage.sources_of): stored as it is
    pc = precompose(model, [view.load_cube("a"), view.load_cube("b")], recompute="leading")
    assert pc.meta["derived_from"] == sources_of([view.load_cube("a"), view.load_cube("b")])
    rec = view.put_cube("ab", pc)
    assert {e["memory"] for e in rec.meta["derived_from"]} == {"me/ab", "me/a", "me/b"}
    assert view.load_cube("ab").text == TEXTS["a"] + TEXTS["b"]


@pytest.mark.parametrize("how", ["rm", "edit", "edit-by-cube"])
def test_forgetting_a_source_removes_precomposed_cubes_and_their_dependants(view, model, how):
    _precomposed(view, model)
    _precomposed(view, model, "abc", ("ab", "c"))  # derived from a derived unit
    _precomposed(view, model, "ac", ("a", "c"))    # not derived from b
    derived = {m: view.get(m).blob for m in ("ab", "abc", "b")}
    if how == "rm":
        receipt = view.forget("b")
        assert receipt and receipt.memory == "me/b" and receipt.reason == "deleted"
        assert {d["memory"] for d in receipt.dependants} == {"me/ab", "me/abc"}
        assert {f"cubes/{blob}.safetensors" for blob in derived.values()} <= set(receipt.cube_files)
        assert any("removed derived me/abc" in line for line in receipt.lines())
    elif how == "edit":
        view.add("b", "Bo now parks the van at the station.")
    else:
        view.put_cube("b", _cube(model, "Bo sold the van.", 7))
    for memory_id in ("ab", "abc"):  # row and file gone, by any read
        assert view.get(memory_id) is None and view.load_cube(memory_id) is None
        assert view.store.catalog.get(("me",), memory_id) is None
        assert derived[memory_id] not in _files(view)
    assert derived["b"] not in _files(view)  # b's own old cube file too
    assert view.load_cube("ac") is not None and view.load_cube("a").text == TEXTS["a"]  # the rest stands


def test_a_cube_built_from_a_version_that_changed_meanwhile_is_refused(view, model):
    rec = view.get("a")                      # what a background promotion read
    view.add("a", "Ada moved the key to the shed.")  # edited while the cube was being built
    with pytest.raises(CubeError, match="me/a, which was edited"):
        view.put_cube("a", _cube(model, rec.text, 0), text=rec.text, derived_from=[source_entry(rec)])
    assert view.get("a").text == "Ada moved the key to the shed." and view.get("a").kind == "text"
    _precomposed(view, model, "bc", ("b", "c"))
    stale = view.load_cube("bc")
    view.rm("b")
    with pytest.raises(CubeError, match="me/b, which was deleted"):  # a loaded cube made from a deleted memory
        view.put_cube("bc2", stale)


def test_a_copy_of_a_memory_is_a_memory_of_its_own(view, model):
    """A cube or meta copied under another id (a journal's backup, a bundle install, a migration) is not derived
    from the original: editing or deleting the original leaves the copy."""
    original = view.load_cube("a")
    view.put_cube("backup-a", original)
    view.add("text-copy-a", TEXTS["a"], view.get("a").meta)
    assert view.load_cube("backup-a").meta["derived_from"] == [{"memory": "me/backup-a",
                                                               "text_sha256": text_sha256(TEXTS["a"])}]
    assert "derived_from" not in view.get("backup-a").meta and "derived_from" not in view.get("text-copy-a").meta
    receipt = view.forget("a")
    assert receipt.dependants == [] and view.load_cube("backup-a") is not None and view.get("text-copy-a")


def test_stale_derived_rows_are_invisible_before_any_cascade(view, model, tmp_path):
    _precomposed(view, model)
    # another writer (an older kvmem, a crash mid-cascade) changed b without the cascade: reads still refuse
    view.store.catalog.upsert(kvmem.store.Record("me", "b", "changed behind our back", "text", {}))
    assert view.get("ab") is None and view.load_cube("ab") is None and "ab" not in {r.id for r in view.ls()}
    assert view.store.catalog.get(("me",), "ab") is not None
    report = view.store.gc(grace_s=0)  # gc finishes the cascade
    assert [d["memory"] for d in report.invalidated] == ["me/ab"] and view.store.catalog.get(("me",), "ab") is None


def test_units_in_other_namespaces_are_reached(tmp_path, model):
    store = kvmem.CubeStore(tmp_path / "s")
    store.grant("team", "me")
    team, me = store.view("team"), store.view("me", shared=["team"])
    team.add("t", TEXTS["a"])
    team.put_cube("t", _cube(model, TEXTS["a"], 0))
    me.add("m", TEXTS["b"])
    me.put_cube("m", _cube(model, TEXTS["b"], 1))
    cubes = [me.load_cube("team/t"), me.load_cube("m")]
    me.put_cube("tm", precompose(model, cubes, recompute="leading"), derived_from=sources_of(cubes))
    receipt = team.forget("t")
    assert [d["memory"] for d in receipt.dependants] == ["me/tm"] and me.get("tm") is None


def _adapter(tmp_path, store, namespace, name, sources):
    import peft

    base = tiny_model("llama")
    torch.manual_seed(1)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                     init_lora_weights=False))
    lora.save_pretrained(tmp_path / f"peft-{name}")
    plain = kvmem.AdapterCube.from_peft(tmp_path / f"peft-{name}", name=name, base_model=tiny_model("llama"))
    cube = kvmem.AdapterCube(plain.state_dict, {**plain.meta, "derived_from": sources})
    folder = store.root / "adapters" / namespace
    folder.mkdir(parents=True, exist_ok=True)
    return kvmem.AdapterCube.load(cube.save(folder / f"{name}.safetensors"))


def test_adapters_that_learned_a_memory_are_stale_and_refused_where_it_matters(view, tmp_path):
    sources = [source_entry(view.get("a")), source_entry(view.get("b"))]
    acube = _adapter(tmp_path, view.store, "me", "ab-distilled", sources)
    catalog = view.store.catalog
    assert stale_adapters(view.store, "me") == [] and usable_for(acube.meta, catalog, ["me/a", "me/b"])
    view.add("b", "Bo now parks the van at the station.")  # edited: refused where the new version is retrieved
    assert usable_for(acube.meta, catalog, ["me/a"]) and not usable_for(acube.meta, catalog, ["me/b"])
    assert not usable_for(acube.meta, catalog, [], strict=True)
    assert [s["reason"] for s in unusable_reasons(acube.meta, catalog, ["me/b"])] == ["edited"]
    receipt = view.forget("a")  # deleted: refused for every request
    assert not usable_for(acube.meta, catalog, [])
    assert [a["name"] for a in receipt.stale_adapters] == ["ab-distilled"]
    assert {s["reason"] for s in receipt.stale_adapters[0]["stale"]} == {"deleted"}  # (b's edit is older news)
    result = CliRunner().invoke(app, ["ls", "--store", str(view.store.root), "-n", "me"])
    assert result.exit_code == 0 and "STALE" in result.output and "me/a (deleted)" in result.output
    report = view.store.gc(grace_s=0)
    assert [a["name"] for a in report.stale_adapters] == ["ab-distilled"]


def test_rm_receipt_cli(view, model):
    _precomposed(view, model)
    runner = CliRunner()
    args = ["--store", str(view.store.root), "-n", "me"]
    out = runner.invoke(app, ["rm", "a", "--receipt", *args])
    assert out.exit_code == 0, out.output
    assert "deleted memory me/a" in out.output and "removed derived me/ab" in out.output
    assert out.output.count("removed cube file cubes/") == 2
    out = runner.invoke(app, ["rm", "b", "--json", *args])
    receipt = json.loads(out.output)
    assert receipt["memory"] == "me/b" and receipt["found"] and len(receipt["cube_files"]) == 1
    out = runner.invoke(app, ["rm", "b", "--receipt", *args])
    assert out.exit_code == 1 and out.output.startswith("kvmem: no memory")
    out = runner.invoke(app, ["inspect", str(view.store.root / view.get("c").path)])
    assert "derived from" in out.output and "me/c (text sha256 " + text_sha256(TEXTS["c"])[:12] in out.output


@pytest.mark.parametrize("change", ["rm", "edit", "recube", "expire"])
def test_a_cube_held_in_a_tier_is_never_served_after_its_memory_changed(tmp_path, model, change, monkeypatch):
    store = kvmem.CubeStore(tmp_path / "s")
    mine, other = store.view("me"), store.view("me")  # the other writer: another view (another process's)
    mine.add("a", TEXTS["a"], ttl=60)
    mine.put_cube("a", _cube(model, TEXTS["a"], 0))
    sched = MemScheduler(mine, device_capacity_bytes=10**9)
    assert sched.fetch("a")[1] == "disk" and sched.fetch("a")[1] == "device"  # held now
    if change == "rm":
        other.rm("a")
    elif change == "edit":
        other.add("a", "Ada moved the key.")
    elif change == "recube":
        other.put_cube("a", _cube(model, "Ada moved the key.", 5))
    else:
        now = expiry.now()
        monkeypatch.setattr(expiry, "now", lambda: now + 61)
    cube, tier = sched.fetch("a")
    if change == "recube":
        assert tier == "disk" and cube.text == "Ada moved the key."
    else:
        assert (cube, tier) == (None, "miss")
    assert sched.stats()["forgotten"] == 1


def test_a_held_cube_of_another_version_is_not_served_without_a_change_log(model):
    class Plain:  # any object with load_cube: no change log to follow, the version passed in decides
        def __init__(self):
            self.text = TEXTS["a"]

        def load_cube(self, memory_id, device=None):
            return _cube(model, self.text, len(self.text) % 7)

    plain = Plain()
    sched = MemScheduler(plain, device_capacity_bytes=10**9)
    sched.fetch("a")
    assert sched.fetch("a", text_sha256=text_sha256(TEXTS["a"]))[1] == "device"
    plain.text = "Ada moved the key."
    cube, tier = sched.fetch("a", text_sha256=text_sha256(plain.text))
    assert tier == "disk" and cube.text == plain.text
