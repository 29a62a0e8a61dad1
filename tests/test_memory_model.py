"""The wrapped model with a store: generate(cubes="auto") picks, serves, promotes and prefetches memories."""

from __future__ import annotations

import pytest
import torch

import kvmem

from helpers import CONVERSATION, tiny_model


def test_generate_auto_picks_serves_and_promotes(tmp_path, tokenizer):
    model = tiny_model("llama")
    mm = kvmem.wrap(model, tokenizer).attach(kvmem.CubeStore(tmp_path / "s").view("me"),
                                             index=kvmem.MemoryIndex(dense=False), promote_after=2)
    for memory_id, text in CONVERSATION:
        mm.remember(text, memory_id)
    mm.remember("Toast the beagle sleeps in a basket by the door.", "s9", cube=True)
    out = mm.generate("Where does Toast the beagle sleep?", cubes="auto", budget_tokens=40, max_new_tokens=2)
    chosen = mm.last.memories
    assert chosen[0]["id"] == "s9" and chosen[0]["source"] in ("device", "cpu", "disk")
    assert sum(m["tokens"] for m in chosen) <= 40 and mm.last.injected
    first_ids = [m["id"] for m in chosen]
    ids = mm.prompt_ids("Where does Toast the beagle sleep?", [mm.scheduler.get(m) or mm.build_cube(
        mm.store.get(m).text, name=m) for m in first_ids])
    assert torch.equal(out[0, :ids.shape[1]], ids[0])  # the prompt really holds the chosen memories, in order
    mm.generate("Where does Toast the beagle sleep?", cubes="auto", budget_tokens=40, max_new_tokens=2)
    sources = {m["id"]: m["source"] for m in mm.last.memories}
    assert sources["s9"] == "device"  # second time from the fastest tier
    assert "promoted" in sources.values()  # plaintext memories retrieved twice became cubes
    assert any(r.kind == "memcube" and r.id != "s9" for r in mm.store.ls())
    with pytest.raises(kvmem.CubeError, match="no store"):
        kvmem.wrap(model, tokenizer).generate("x", cubes="auto")
    n = len(mm.store.ls())
    with pytest.raises(kvmem.CubeError, match=r"meta\['turn'\]"):
        mm.remember("A memory with a bad turn.", "bad", meta={"session": "s", "turn": "3rd"})
    assert len(mm.store.ls()) == n and mm.store.get("bad") is None and "bad" not in mm.index


def test_generate_auto_prefetches_the_other_top_hits(tmp_path, tokenizer):
    mm = kvmem.wrap(tiny_model("llama"), tokenizer).attach(kvmem.CubeStore(tmp_path / "s").view("me"),
                                                            index=kvmem.MemoryIndex(dense=False), promote_after=0)
    mm.remember("Toast the beagle sleeps in a basket.", "a", cube=True)
    mm.remember("Toast the beagle eats salmon biscuits.", "b", cube=True)
    mm.scheduler.forget("a"), mm.scheduler.forget("b")
    budget = mm.store.get("a").tokens  # room for one of the two
    mm.generate("Where does Toast the beagle sleep?", cubes="auto", budget_tokens=budget, max_new_tokens=1)
    assert [m["id"] for m in mm.last.memories] == ["a"] and mm.last.memories[0]["source"] == "disk"
    assert "b" in mm.scheduler.tiers["cpu"].items and mm.scheduler.stats()["prefetched"] == 1
