"""cubes="auto": what a request gets (cubes from tiers, text for the rest), what it drops and why, and a store
that other processes change under it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import kvmem
from helpers import tiny_model
import kvmem.memory.recall
from kvmem.memory.recall import MIN_SAVED_TOKENS, TEXT_BELOW_TOKENS

# long enough (> TEXT_BELOW_TOKENS tokens) that a cube can save something
LONG = {
    "beagle": "Toast the beagle sleeps in a wicker basket by the kitchen door, under a blue blanket that "
              "Grandma knitted, and she will not sleep anywhere else, not even on the sofa in winter.",
    "car": "The family car is a green estate from 2011 with a roof box for camping trips; it needs new tyres "
           "before the long drive to the coast in August, and the boot latch sticks in the cold.",
    "garden": "The vegetable garden has six raised beds: tomatoes, beans, courgettes, leeks, carrots and a "
              "strawberry patch that the blackbirds raid every June despite the netting over it.",
}
EXTRA = (" Everyone in the house knows this, and the neighbours have heard the story at least twice, usually over "
         "dinner on a Sunday when the conversation turns to pets, cars and gardens and who forgot what last year.")
LONG = {name: text + EXTRA for name, text in LONG.items()}
SHORT = {"cat": "Miso the cat hates the vacuum cleaner.", "bike": "The bike has a flat rear tyre.",
         "toast": "Toast the beagle snores."}
QUESTION = "Where does Toast the beagle sleep?"


def _mm(tmp_path, tokenizer, namespace="me", **kwargs):
    model = tiny_model("llama")
    view = kvmem.CubeStore(tmp_path / "s").view(namespace)
    return kvmem.wrap(model, tokenizer).attach(view, index=kvmem.MemoryIndex(dense=False), **kwargs)


def test_long_memories_come_as_cubes_short_ones_as_text(tmp_path, tokenizer):
    mm = _mm(tmp_path, tokenizer, promote_after=0)
    for memory_id, text in LONG.items():
        mm.remember(text, memory_id, cube=True)
    for memory_id, text in SHORT.items():
        mm.remember(text, memory_id, cube=True)
    lengths = [len(tokenizer(t, add_special_tokens=False).input_ids) for t in LONG.values()]
    assert min(lengths) > TEXT_BELOW_TOKENS and min(lengths) >= MIN_SAVED_TOKENS  # one cube alone is worth it
    out = mm.generate(QUESTION, cubes="auto", evidence=False, k=10, max_new_tokens=3, do_sample=False)
    chosen = {m["id"]: m["source"] for m in mm.last.memories}
    assert chosen["beagle"] == "disk" and [m["id"] for m in mm.last.memories if m["source"] != "text"][0] == "beagle"
    assert all(chosen[m] == "text" for m in SHORT if m in chosen)
    assert all(chosen[m] in ("disk", "device", "cpu") for m in LONG if m in chosen)
    # the prompt holds the cubes, then the texts, then the request; and equals a full prefill's tokens
    cubes = [mm.store.load_cube(m["id"]) for m in mm.last.memories if m["source"] != "text"]
    texts = [mm.store.get(m["id"]).text for m in mm.last.memories if m["source"] == "text"]
    ids = mm.prompt_ids(QUESTION, cubes, texts)
    assert torch.equal(out[0, :ids.shape[1]], ids[0])
    assert mm.last.prefilled_tokens == ids.shape[1] - (mm.last.spans[-1][1] if mm.last.spans else 0)
    mm.generate(QUESTION, cubes="auto", evidence=False, k=10, max_new_tokens=1)
    assert {m["id"]: m["source"] for m in mm.last.memories}["beagle"] == "device"  # second time: fastest tier


def test_one_cube_plus_text_equals_a_full_prefill(tmp_path, tokenizer):
    """With one cube the splice is exact: the auto request's greedy tokens equal a full prefill of its ids."""
    mm = _mm(tmp_path, tokenizer, promote_after=0)
    mm.remember(LONG["beagle"], "beagle", cube=True)
    mm.remember(SHORT["toast"], "toast")
    out = mm.generate(QUESTION, cubes="auto", max_new_tokens=8, do_sample=False)
    assert [m["source"] for m in mm.last.memories] == ["disk", "text"] and mm.last.injected
    ids = out[:, :mm.last.prompt_tokens]
    full = mm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    assert torch.equal(out, full)


def test_dropped_memories_say_why(tmp_path, tokenizer):
    mm = _mm(tmp_path, tokenizer, promote_after=0)
    for memory_id, text in LONG.items():
        mm.remember(text, memory_id)
    tokens = len(tokenizer(LONG["beagle"], add_special_tokens=False).input_ids)
    mm.generate(QUESTION, cubes="auto", max_memory_tokens=tokens, evidence=False, max_new_tokens=1)
    assert [m["id"] for m in mm.last.memories] == ["beagle"]
    reasons = {d["id"]: d["reason"] for d in mm.last.dropped}
    assert reasons and all("max_memory_tokens" in r for r in reasons.values())

    top = mm.index.search(QUESTION, k=1)[0][1]
    mm.generate(QUESTION, cubes="auto", min_score=top + 1.0, evidence=False, max_new_tokens=1)
    assert mm.last.memories == [] and not mm.last.injected
    assert all("min_score" in d["reason"] for d in mm.last.dropped) and len(mm.last.dropped) == len(LONG)


def test_budget_tokens_still_works_with_a_deprecation_warning(tmp_path, tokenizer):
    mm = _mm(tmp_path, tokenizer)
    mm.remember(LONG["beagle"], "beagle")
    with pytest.warns(DeprecationWarning, match="max_memory_tokens"):
        mm.generate(QUESTION, cubes="auto", budget_tokens=5, max_new_tokens=1)
    assert mm.last.memories == [] and "max_memory_tokens=5" in mm.last.dropped[0]["reason"]


def test_text_memories_are_promoted_after_the_answer_not_before(tmp_path, tokenizer):
    mm = _mm(tmp_path, tokenizer, promote_after=1)
    mm.remember(LONG["beagle"], "beagle")
    mm.generate(QUESTION, cubes="auto", max_new_tokens=1)
    assert mm.last.memories[0]["source"] == "text"  # no cube was built on the request's path
    assert mm.store.get("beagle").kind == "memcube"  # ... but after the answer
    mm.generate(QUESTION, cubes="auto", max_new_tokens=1)
    assert mm.last.memories[0]["source"] in ("cpu", "device") and mm.last.injected


def test_a_damaged_cube_falls_back_to_text(tmp_path, tokenizer):
    mm = _mm(tmp_path, tokenizer, promote_after=0)
    mm.remember(LONG["beagle"], "beagle", cube=True)
    path = mm.store.store.blobs.local_path(mm.store.get("beagle").blob)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    mm.generate(QUESTION, cubes="auto", max_new_tokens=1)
    (memory,) = mm.last.memories
    assert memory["source"] == "text" and "checksum" in memory["note"] and not mm.last.injected


def _other_process(root, code: str) -> None:
    """Run ``code`` with a store view ``view`` over ``root`` in another Python process."""
    script = f"import kvmem\nview = kvmem.CubeStore({str(root)!r}).view('me')\n" + textwrap.dedent(code)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


def test_changes_by_another_process_are_seen(tmp_path, tokenizer):
    """A memory replaced, added or deleted by another process: the next request sees the store as it is now."""
    mm = _mm(tmp_path, tokenizer, promote_after=0)
    mm.remember(LONG["beagle"], "dog", cube=True)
    mm.generate(QUESTION, cubes="auto", max_new_tokens=1)
    assert mm.last.memories[0]["source"] == "disk"
    new_text = LONG["beagle"].replace("wicker basket by the kitchen door", "dog bed in the hallway")
    _other_process(tmp_path / "s", f"""
        view.add("dog", {new_text!r})
        view.add("car", {LONG['car']!r})
    """)
    out = mm.generate("Where does Toast sleep, and what car does the family have?", cubes="auto", max_new_tokens=1)
    used = {m["id"]: m for m in mm.last.memories}
    assert set(used) == {"dog", "car"}
    assert used["dog"]["source"] == "text"  # the old cube (device tier) was dropped with the old text
    new_ids = tokenizer(new_text, add_special_tokens=False).input_ids
    assert any(out[0, i:i + len(new_ids)].tolist() == new_ids for i in range(out.shape[1]))
    _other_process(tmp_path / "s", 'view.rm("car")')
    mm.generate("What car does the family have?", cubes="auto", max_new_tokens=1)
    assert "car" not in {m["id"] for m in mm.last.memories}


def _shared_with_family(tmp_path, tokenizer):
    """A store where namespace "family" (memory "pets": the beagle text) granted "me" read access, and a model
    attached to the view of "me" with "family" shared."""
    store = kvmem.CubeStore(tmp_path / "s")
    store.view("family").add("pets", LONG["beagle"])
    store.grant("family", "me")
    mm = kvmem.wrap(tiny_model("llama"), tokenizer).attach(store.view("me", shared=["family"]),
                                                           index=kvmem.MemoryIndex(dense=False), promote_after=0)
    return store, mm


def test_the_same_id_in_two_namespaces_stays_two_memories(tmp_path, tokenizer):
    store, mm = _shared_with_family(tmp_path, tokenizer)
    mm.remember(SHORT["cat"], "pets")
    mm.generate(QUESTION, cubes="auto", evidence=False, max_new_tokens=1)
    first = mm.last.memories[0]
    assert (first["namespace"], first["id"]) == ("family", "pets")  # the beagle text, from its own namespace
    mm.generate("Which appliance does Miso the cat hate?", cubes="auto", evidence=False, max_new_tokens=1)
    first = mm.last.memories[0]
    assert (first["namespace"], first["id"]) == ("me", "pets")
    assert {(m["namespace"], m["id"]) for m in mm.last.memories} == {("me", "pets"), ("family", "pets")}


def test_a_revoked_grant_takes_the_shared_memories_away(tmp_path, tokenizer):
    store, mm = _shared_with_family(tmp_path, tokenizer)
    mm.remember(LONG["car"], "car")
    mm.generate(QUESTION, cubes="auto", evidence=False, max_new_tokens=1)
    assert ("family", "pets") in {(m["namespace"], m["id"]) for m in mm.last.memories}
    store.revoke("family", "me")
    mm.generate(QUESTION, cubes="auto", evidence=False, max_new_tokens=1)
    assert {(m["namespace"], m["id"]) for m in mm.last.memories} == {("me", "car")}
    assert "family/pets" not in mm.index


def test_an_unchanged_store_is_not_listed_again(tmp_path, tokenizer, monkeypatch):
    """Keeping up with the store costs one change-log query per request, not a listing."""
    mm = _mm(tmp_path, tokenizer)
    mm.remember(LONG["beagle"], "beagle")
    mm.generate(QUESTION, cubes="auto", max_new_tokens=1)
    listed = []
    real_ls = type(mm.store).ls
    monkeypatch.setattr(type(mm.store), "ls", lambda self, *a, **k: listed.append(1) or real_ls(self, *a, **k))
    mm.generate(QUESTION, cubes="auto", max_new_tokens=1)
    assert listed == []
    kvmem.CubeStore(tmp_path / "s").view("me").add("car", LONG["car"])  # a change: now it looks again
    mm.generate(QUESTION, cubes="auto", max_new_tokens=1)
    assert listed == [1] and "me/car" in mm.index


def test_cubes_that_would_save_too_little_go_in_as_text(tmp_path, tokenizer, monkeypatch):
    """The per-request decision: composing costs recompute and a forward of its own, so cubes that spare fewer
    than MIN_SAVED_TOKENS tokens of prefill are not worth it, and the memories are prefilled as text."""
    mm = _mm(tmp_path, tokenizer, promote_after=0)
    mm.remember(LONG["beagle"], "beagle", cube=True)
    mm.remember(LONG["garden"], "garden", cube=True)
    tokens = {m: mm.store.get(m).tokens for m in ("beagle", "garden")}
    monkeypatch.setattr(kvmem.memory.recall, "MIN_SAVED_TOKENS", sum(tokens.values()))
    out = mm.generate(QUESTION, cubes="auto", evidence=False, max_new_tokens=1)
    assert [m["source"] for m in mm.last.memories] == ["text", "text"] and not mm.last.injected
    assert all("would save" in m["note"] for m in mm.last.memories)
    monkeypatch.setattr(kvmem.memory.recall, "MIN_SAVED_TOKENS", 1)
    out2 = mm.generate(QUESTION, cubes="auto", evidence=False, max_new_tokens=1)
    assert [m["source"] for m in mm.last.memories] == ["disk", "disk"] and mm.last.injected
    assert torch.equal(out[:, :-1], out2[:, :-1])  # the same ids either way: cubes first, then texts (none here)


def test_memories_without_evidence_of_relevance_are_dropped(tmp_path, tokenizer):
    """Rank fusion ranks every memory; one that shares no word with the question (lexical index) is not injected."""
    mm = _mm(tmp_path, tokenizer, promote_after=0)
    mm.remember(LONG["beagle"], "beagle")
    mm.remember("Quarterly invoices go to accounting before the fifth of each month.", "invoices")
    mm.generate("Where does Toast the beagle sleep?", cubes="auto", max_new_tokens=1)
    assert [m["id"] for m in mm.last.memories] == ["beagle"]
    assert [(d["id"], "no evidence" in d["reason"]) for d in mm.last.dropped] == [("invoices", True)]
    mm.generate("What is the capital of Peru?", cubes="auto", max_new_tokens=1)
    assert mm.last.memories == [] and not mm.last.injected and len(mm.last.dropped) == 2
    mm.generate("What is the capital of Peru?", cubes="auto", evidence=False, max_new_tokens=1)
    assert len(mm.last.memories) == 2  # the caller may opt out: then rank alone decides


def test_context_length_is_checked_before_anything_is_built_or_written(tmp_path, tokenizer):
    mm = _mm(tmp_path, tokenizer)  # the tiny model's context: 2048 positions
    huge = "The beagle sleeps in the basket. " * 400  # ~3,200 tokens
    with pytest.raises(kvmem.CubeError, match="context"):
        mm.remember(huge, "huge", cube=True)
    assert mm.store.get("huge") is None  # nothing was written
    with pytest.raises(kvmem.CubeError, match="max_position_embeddings"):
        mm.build_cube(huge)
    a = mm.build_cube(LONG["beagle"] * 6, name="a")
    b = mm.build_cube(LONG["car"] * 6, name="b")
    with pytest.raises(kvmem.CubeError, match="composed prefix"):
        kvmem.prefill(mm.model, [a, b, a, b, a, b])
    mm.remember(huge, "huge")  # as text it is fine; a request holding it in full is not
    with pytest.raises(kvmem.CubeError, match="the prompt"):
        mm.generate(QUESTION, cubes="auto", max_memory_tokens=10_000, max_new_tokens=1)
