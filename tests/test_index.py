"""The memory index: hybrid (BM25 + dense) retrieval, its documented scoring recipe, the neighbour bonus,
incremental add/remove, embeddings persisted in the store, and bad settings."""

from __future__ import annotations

import pytest
import torch

import kvmem

from helpers import CONVERSATION, QUESTIONS


@pytest.fixture(scope="module")
def hybrid_index():
    index = kvmem.MemoryIndex(dense=True, device="cpu")
    for memory_id, text in CONVERSATION:
        index.add(memory_id, text)
    return index


def test_hybrid_retrieval_finds_paraphrased_facts(hybrid_index):
    lexical = kvmem.MemoryIndex(dense=False)
    for memory_id, text in CONVERSATION:
        lexical.add(memory_id, text)
    recall = lambda index: sum(any(m == want for m, _ in index.search(q, k=2)) for q, want in QUESTIONS)  # noqa: E731
    assert recall(hybrid_index) == len(QUESTIONS)
    assert recall(hybrid_index) > recall(lexical)  # paraphrases ("dog" vs "beagle") need the dense side
    scores = hybrid_index.search("What is my dog called?", k=8)
    assert [s for _, s in scores] == sorted((s for _, s in scores), reverse=True)


def test_index_incremental_add_and_remove():
    index = kvmem.MemoryIndex(dense=False)
    index.add("a", "apples are red")
    assert index.search("apples")[0][0] == "a"
    index.add("b", "bananas are yellow")
    index.add("a", "apricots are orange")  # replaces
    assert index.search("apples")[0][1] == 0.0 and index.search("bananas")[0][0] == "b"
    assert index.remove("b") and not index.remove("b") and len(index) == 1
    with pytest.raises(kvmem.CubeError, match="k must"):
        index.search("x", k=0)


def test_index_scores_follow_the_documented_recipe(hybrid_index):
    """Default scoring = z-scored BM25 and best-sentence cosine mixed 0.1/0.9, recomputed here from the parts."""
    from kvmem.index import split_sentences

    index = kvmem.MemoryIndex(dense=True, device="cpu")
    texts = {"long": "Busy week, the printer at the office jammed twice. Also, our kitten Miso learned to open "
                     "doors! The weather was grey and the trains were late all week.",
             **dict(CONVERSATION)}
    for memory_id, text in texts.items():
        index.add(memory_id, text)
    q = "What is my cat called?"
    got = index.scores(q)
    encode = hybrid_index._encoder
    qv = encode([q])[0]
    best = torch.stack([(encode(split_sentences(t)) @ qv).max() for t in texts.values()])
    assert torch.allclose(got["dense"], best, atol=1e-5)
    whole = encode(list(texts.values())) @ qv
    assert got["dense"][0] > whole[0] + 0.05  # the fact's sentence scores above its diluted whole turn
    z = lambda s: (s - s.mean()) / s.std(correction=0)  # noqa: E731
    assert torch.allclose(got["fused"], 0.1 * z(got["lexical"]) + 0.9 * z(best), atol=1e-4)
    index.dense_unit = "memory"
    assert torch.allclose(index.scores(q)["dense"], whole, atol=1e-5)


def test_index_neighbor_bonus_follows_session_and_turn(hybrid_index):
    index = kvmem.MemoryIndex(dense=True, device="cpu")
    index._encoder = hybrid_index._encoder  # share the loaded model
    rows = [("a2", "We named him Toast.", "s1", 2), ("b1", "Congratulations on the new puppy!", "s1", 3),
            ("a1", "The bakery was closed today.", "s1", 1), ("c1", "I repainted the kitchen.", "s2", 4),
            ("d1", "My knee hurts after running.", None, None)]
    for memory_id, text, session, turn in rows:
        index.add(memory_id, text, {} if session is None else {"session": session, "turn": turn})
    q = "What did we call the puppy?"
    index.neighbor_weight = 0.0
    plain = index.scores(q)["fused"]
    index.neighbor_weight = 0.2
    bonus = index.scores(q)["fused"]
    f = dict(zip(index._ids, plain.tolist()))
    want = {"a1": max(0, f["a2"]), "a2": max(0, f["a1"], f["b1"]), "b1": max(0, f["a2"]), "c1": 0.0, "d1": 0.0}
    for i, memory_id in enumerate(index._ids):  # neighbours by turn order within a session, not insertion order
        assert bonus[i].item() == pytest.approx(f[memory_id] + 0.2 * want[memory_id], abs=1e-5), memory_id
    index.remove("a2")  # a1 and b1 become neighbours
    f = dict(zip(index._ids, _without_bonus(index, q).tolist()))
    got = dict(zip(index._ids, index.scores(q)["fused"].tolist()))
    assert got["a1"] == pytest.approx(f["a1"] + 0.2 * max(0, f["b1"]), abs=1e-5)


def _without_bonus(index, q):
    weight, index.neighbor_weight = index.neighbor_weight, 0.0
    try:
        return index.scores(q)["fused"]
    finally:
        index.neighbor_weight = weight


def test_index_remove_and_replace_keep_embeddings_aligned(hybrid_index):
    index = kvmem.MemoryIndex(dense=True, device="cpu")
    index._encoder = hybrid_index._encoder
    for memory_id, text in CONVERSATION:
        index.add(memory_id, text)
    index.search("warm up the embeddings")
    index.remove("s3")
    index.add("s1", "I bought a red bicycle. It has twelve gears.")  # replaced: re-embedded at the next search
    fresh = kvmem.MemoryIndex(dense=True, device="cpu")
    fresh._encoder = hybrid_index._encoder
    for memory_id in index._ids:
        fresh.add(memory_id, index._texts[index._ids.index(memory_id)])
    q = "What kind of bike do I ride?"
    assert torch.allclose(index.scores(q)["fused"], fresh.scores(q)["fused"], atol=1e-5)
    assert index.search(q, k=1)[0][0] == "s1"
    assert torch.allclose(index.memory_embeddings(), fresh.memory_embeddings(), atol=1e-6)


def _count_encodes(index):
    calls, encode = [], index._encoder.model.encode
    index._encoder.model.encode = lambda texts, **kw: (calls.append(list(texts)), encode(texts, **kw))[1]
    return calls


def test_index_embeddings_persist_in_the_store(tmp_path):
    import sqlite3

    view = kvmem.CubeStore(tmp_path / "s").view("me")
    for memory_id, text in CONVERSATION:
        view.add(memory_id, text)
    q = "Which city do I live in now?"
    first = kvmem.MemoryIndex.from_store(view, device="cpu")
    embedded = _count_encodes(first)
    want = first.scores(q)["fused"]
    assert (tmp_path / "s" / "embeddings.sqlite").is_file()
    assert len(first._encoder.cache) == len({t for batch in embedded[:-1] for t in batch}) > len(CONVERSATION)

    second = kvmem.MemoryIndex.from_store(view, device="cpu")  # a new process would do the same
    embedded = _count_encodes(second)
    assert torch.allclose(second.scores(q)["fused"], want, atol=1e-6)
    assert embedded == [[q]]  # only the query: every memory vector came from the cache

    from kvmem.embedding_cache import text_key
    with sqlite3.connect(tmp_path / "s" / "embeddings.sqlite") as db:  # a damaged row is recomputed, not trusted
        db.execute("UPDATE embeddings SET vec = x'0000' WHERE key = ?", (text_key(CONVERSATION[2][1]),))
    third = kvmem.MemoryIndex.from_store(view, device="cpu")
    embedded = _count_encodes(third)
    assert torch.allclose(third.scores(q)["fused"], want, atol=1e-6)
    assert embedded == [[CONVERSATION[2][1]], [q]]

    (tmp_path / "junk.sqlite").write_bytes(b"this is not a database" * 200)
    with pytest.raises(kvmem.CubeError, match="embedding cache .*junk.sqlite"):
        kvmem.MemoryIndex(dense=True, device="cpu", embedding_cache=tmp_path / "junk.sqlite")


@pytest.mark.parametrize("kwargs, match", [({"fusion": "max"}, "fusion must"), ({"dense_unit": "token"}, "dense_unit"),
                                           ({"alpha": 1.5}, "alpha must"), ({"neighbor_weight": -0.1}, "neighbor_weight"),
                                           ({"alpha": "0.5"}, "alpha must")])
def test_index_rejects_bad_settings(kwargs, match):
    with pytest.raises(kvmem.CubeError, match=match):
        kvmem.MemoryIndex(dense=False, **kwargs)


def test_index_rejects_bad_turn_meta():
    index = kvmem.MemoryIndex(dense=False)
    with pytest.raises(kvmem.CubeError, match="turn"):
        index.add("m", "text", {"session": "s", "turn": "third"})
    assert len(index) == 0
