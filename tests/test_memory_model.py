"""The wrapped model with a store: generate(cubes="auto") picks, serves, promotes and prefetches memories."""

from __future__ import annotations

import pytest
import torch

import kvmem

from helpers import CONVERSATION, tiny_model


def _long(text: str) -> str:
    """``text`` grown past kvmem.memory.recall's TEXT_BELOW_TOKENS and MIN_SAVED_TOKENS, so its cube is worth splicing."""
    return text + " I wrote this down in my notebook on a rainy afternoon, between two phone calls and a coffee, so " \
                  "that I would not forget it again next week when someone asks me about it, as people tend to do at the " \
                  "end of long meetings, when everybody is tired and nobody remembers who said what to whom."


def test_generate_auto_picks_serves_and_promotes(tmp_path, tokenizer):
    model = tiny_model("llama")
    mm = kvmem.wrap(model, tokenizer).attach(kvmem.CubeStore(tmp_path / "s").view("me"),
                                             index=kvmem.MemoryIndex(dense=False), promote_after=2)
    for memory_id, text in CONVERSATION:
        mm.remember(_long(text), memory_id)
    mm.remember(_long("Toast the beagle sleeps in a basket by the door."), "s9", cube=True)
    question, room = "Where does Toast the beagle sleep?", 3 * mm.store.get("s9").tokens
    out = mm.generate(question, cubes="auto", max_memory_tokens=room, max_new_tokens=2)
    chosen = mm.last.memories
    assert chosen[0]["id"] == "s9" and chosen[0]["source"] in ("device", "cpu", "disk")
    assert sum(m["tokens"] for m in chosen) <= room and mm.last.injected and len(chosen) > 1
    assert all(m["source"] == "text" for m in chosen[1:])  # no cube yet: prefilled as text, never built here
    ids = mm.prompt_ids(question, [mm.scheduler.get(f"me/{chosen[0]['id']}")],
                        [mm.store.get(m["id"]).text for m in chosen[1:]])
    assert torch.equal(out[0, :ids.shape[1]], ids[0])  # the prompt really holds the chosen memories, in order
    mm.generate(question, cubes="auto", max_memory_tokens=room, max_new_tokens=2)
    sources = {m["id"]: m["source"] for m in mm.last.memories}
    assert sources["s9"] == "device"  # second time from the fastest tier
    promoted = [r.id for r in mm.store.ls() if r.kind == "memcube" and r.id != "s9"]
    assert promoted and set(promoted) <= {m["id"] for m in chosen}  # retrieved twice: cubes built after the answer
    mm.generate(question, cubes="auto", max_memory_tokens=room, max_new_tokens=2)
    sources = {m["id"]: m["source"] for m in mm.last.memories}
    assert all(sources[p] in ("device", "cpu") for p in promoted if p in sources)
    with pytest.raises(kvmem.CubeError, match="no store"):
        kvmem.wrap(model, tokenizer).generate("x", cubes="auto")
    n = len(mm.store.ls())
    with pytest.raises(kvmem.CubeError, match=r"meta\['turn'\]"):
        mm.remember("A memory with a bad turn.", "bad", meta={"session": "s", "turn": "3rd"})
    assert len(mm.store.ls()) == n and mm.store.get("bad") is None and "me/bad" not in mm.index


def test_generate_auto_prefetches_the_other_top_hits(tmp_path, tokenizer):
    mm = kvmem.wrap(tiny_model("llama"), tokenizer).attach(kvmem.CubeStore(tmp_path / "s").view("me"),
                                                            index=kvmem.MemoryIndex(dense=False), promote_after=0)
    mm.remember(_long("Toast the beagle sleeps in a basket."), "a", cube=True)
    mm.remember(_long("Toast the beagle eats salmon biscuits."), "b", cube=True)
    mm.scheduler.forget("me/a"), mm.scheduler.forget("me/b")
    budget = mm.store.get("a").tokens  # room for one of the two
    mm.generate("Where does Toast the beagle sleep?", cubes="auto", max_memory_tokens=budget, max_new_tokens=1)
    assert [m["id"] for m in mm.last.memories] == ["a"] and mm.last.memories[0]["source"] == "disk"
    assert "me/b" in mm.scheduler.tiers["cpu"].items and mm.scheduler.stats()["prefetched"] == 1
