"""Memories that expire: ``ttl`` / ``expires`` checked and stored as one form, honoured by every read at once and
removed by gc with what derives from them; the CLI's ``add --ttl / --expires``."""

from __future__ import annotations

import datetime

import pytest
from typer.testing import CliRunner

import kvmem
from helpers import random_ids, tiny_model
from kvmem.cli import app
from kvmem.errors import CubeError
from kvmem.integrations.serving import precompose
from kvmem.memory.index import MemoryIndex
from kvmem.store import expiry
from kvmem.store.lineage import sources_of
from kvmem.store.records import check_meta


class Clock:
    """Stands in for `kvmem.store.expiry.now` so a test moves time instead of sleeping."""

    def __init__(self, start: float):
        self.t = start

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock(expiry.now())
    monkeypatch.setattr(expiry, "now", c)
    return c


@pytest.mark.parametrize("meta, why", [
    ({"ttl": 0}, "must be > 0"), ({"ttl": -5}, "must be > 0"), ({"ttl": True}, "finite number"),
    ({"ttl": "1h"}, "finite number"), ({"ttl": float("nan")}, "finite number"),
    ({"expires": "next tuesday"}, "ISO datetime"), ({"expires": [1]}, "finite number"),
    ({"ttl": 5, "expires": 10}, "not both"),
    ({"derived_from": [{"memory": "a", "text_sha256": "0" * 64}]}, "namespace"),
])
def test_bad_lifetimes_are_refused_with_the_rule(meta, why):
    with pytest.raises(CubeError, match=why):
        check_meta(meta)


def test_lifetimes_are_stored_as_epoch_seconds(tmp_path, clock):
    view = kvmem.CubeStore(tmp_path / "s").view("me")
    assert view.add("a", "A.", ttl=30).meta == {"expires": clock.t + 30}
    assert view.add("b", "B.", {"ttl": 30, "turn": 1}).meta == {"expires": clock.t + 30, "turn": 1}
    naive, zoned = "2031-02-03T04:05:06", "2031-02-03T05:05:06+01:00"
    epoch = datetime.datetime(2031, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc).timestamp()
    assert view.add("c", "C.", expires=naive).meta["expires"] == epoch  # UTC unless a zone is named
    assert view.add("d", "D.", {"expires": zoned}).meta["expires"] == epoch
    assert view.add("e", "E.", {"ttl": 5}, expires=epoch).meta == {"expires": epoch}  # the keyword wins
    assert view.get("a").meta == {"expires": clock.t + 30}  # as stored, not recomputed at read


def test_an_expired_memory_is_invisible_to_every_read_and_gc_removes_it(tmp_path, clock):
    model = tiny_model("llama")
    anchor = random_ids(3, seed=5)
    view = kvmem.CubeStore(tmp_path / "s").view("me")
    texts = {"soon": "The bakery voucher expires on Friday.", "stays": "The bakery opens at six every day."}
    view.add("soon", texts["soon"], ttl=60)
    view.add("stays", texts["stays"])
    for i, (memory_id, text) in enumerate(texts.items()):
        view.put_cube(memory_id, kvmem.MemCube.from_ids(model, random_ids(10, seed=i), anchor_ids=anchor, text=text))
    cubes = [view.load_cube("soon"), view.load_cube("stays")]
    view.put_cube("both", precompose(model, cubes, recompute="leading"), derived_from=sources_of(cubes))
    blobs = {r.id: r.blob for r in view.ls()}
    assert view.put_cube("soon", cubes[0]).meta["expires"] == clock.t + 60  # a new cube keeps the lifetime
    blobs["soon"] = view.get("soon").blob
    assert view.get("soon") and {r.id for r in view.ls()} == {"soon", "stays", "both"}

    clock.t += 61
    assert view.get("soon") is None and view.load_cube("soon") is None
    assert view.get("both") is None and view.load_cube("both") is None  # derived from an expired memory
    assert {r.id for r in view.ls()} == {"stays"} and view.stats()["memories"] == 1
    index = MemoryIndex.from_store(view, dense=False)
    assert [q for q, _ in index.search("bakery voucher Friday", k=5)] == ["me/stays"]
    assert view.store.catalog.get(("me",), "soon") is not None  # still in the catalog until gc

    report = view.store.gc(grace_s=0)
    assert report.expired == ["me/soon"] and [d["memory"] for d in report.invalidated] == ["me/both"]
    assert {f"cubes/{blobs[m]}.safetensors" for m in ("soon", "both")} <= set(report.removed)
    assert set(view.store.blobs.names()) == {blobs["stays"]}
    assert view.store.catalog.get(("me",), "soon") is None and view.store.catalog.get(("me",), "both") is None
    assert view.store.gc(grace_s=0).expired == []


def test_recall_drops_an_expired_memory_and_its_cube(tmp_path, tokenizer, clock):
    mm = kvmem.wrap(tiny_model("llama"), tokenizer).attach(kvmem.CubeStore(tmp_path / "s").view("me"),
                                                           index=MemoryIndex(dense=False), promote_after=0)
    long = ("Toast the beagle sleeps in a wicker basket by the kitchen door under a blue blanket that Grandma "
            "knitted, and she will not sleep anywhere else, not even on the sofa in winter, nor in summer. ") * 2
    mm.remember(long, "beagle", cube=True)
    mm.store.add("beagle", long, ttl=10)  # the same text, now with a lifetime (its cube was dropped: rebuild)
    mm.recall.build_memory_cube("me/beagle")
    mm.generate("Where does Toast sleep?", cubes="auto", evidence=False, max_new_tokens=1)
    mm.generate("Where does Toast sleep?", cubes="auto", evidence=False, max_new_tokens=1)
    assert [m["source"] for m in mm.last.memories] == ["device"]  # held in a tier
    clock.t += 11
    mm.generate("Where does Toast sleep?", cubes="auto", evidence=False, max_new_tokens=1)
    assert mm.last.memories == [] and mm.last.dropped[0]["reason"].startswith("deleted from the store (or expired)")
    assert not mm.scheduler.holds("me/beagle")


def test_cli_add_ttl_and_expires(tmp_path, clock):
    runner, store = CliRunner(), str(tmp_path / "s")
    out = runner.invoke(app, ["add", "Short-lived note.", "--id", "n", "--ttl", "90", "--store", store])
    assert out.exit_code == 0 and "expires 20" in out.output
    assert kvmem.CubeStore(store).view("default").get("n").meta["expires"] == clock.t + 90
    out = runner.invoke(app, ["add", "Dated note.", "--id", "d", "--expires", "2031-01-01T00:00", "--store", store])
    assert out.exit_code == 0 and "expires 2031-01-01T00:00:00Z" in out.output
    out = runner.invoke(app, ["ls", "--store", store])
    assert "expires: 2031-01-01T00:00:00Z" in out.output
    out = runner.invoke(app, ["add", "Bad.", "--expires", "someday", "--store", store])
    assert out.exit_code != 0 and out.output.startswith("kvmem: ") and "ISO datetime" in out.output
    assert len(out.output.strip().splitlines()) == 1
    clock.t += 91
    assert "n " not in runner.invoke(app, ["ls", "--store", store]).output
    assert "expired default/n: removed" in runner.invoke(app, ["gc", "--grace", "0", "--store", store]).output
