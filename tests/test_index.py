"""The memory index: hybrid (BM25 + dense) retrieval, incremental add/remove, embeddings persisted in the store,
and bad settings. The default recipe itself (windows, dates, speakers, fusion) is tested in test_retrieval_*.py."""

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
    assert index.scores("apples")["lexical"].max() == 0.0 and index.search("bananas")[0][0] == "b"
    assert index.remove("b") and not index.remove("b") and len(index) == 1
    with pytest.raises(kvmem.CubeError, match="k must"):
        index.search("x", k=0)


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
    assert len(first._encoder.cache) == len({t for batch in embedded[:-1] for t in batch}) == len(CONVERSATION)

    second = kvmem.MemoryIndex.from_store(view, device="cpu")  # a new process would do the same
    embedded = _count_encodes(second)
    assert torch.allclose(second.scores(q)["fused"], want, atol=1e-6)
    assert embedded == [[q]]  # only the query: every memory vector came from the cache

    from kvmem.memory.embedding_cache import text_key
    with sqlite3.connect(tmp_path / "s" / "embeddings.sqlite") as db:  # a damaged row is recomputed, not trusted
        db.execute("UPDATE embeddings SET vec = x'0000' WHERE key = ?", (text_key(CONVERSATION[2][1]),))
    third = kvmem.MemoryIndex.from_store(view, device="cpu")
    embedded = _count_encodes(third)
    assert torch.allclose(third.scores(q)["fused"], want, atol=1e-6)
    assert embedded == [[CONVERSATION[2][1]], [q]]

    (tmp_path / "junk.sqlite").write_bytes(b"this is not a database" * 200)
    with pytest.raises(kvmem.CubeError, match="embedding cache .*junk.sqlite"):
        kvmem.MemoryIndex(dense=True, device="cpu", embedding_cache=tmp_path / "junk.sqlite")


@pytest.mark.parametrize("kwargs, match", [({"fusion": "max"}, "fusion must"), ({"rrf_k": "60"}, "rrf_k must"),
                                           ({"weights": {"dense": "1"}}, "weights"), ({"window": -1}, "window must")])
def test_index_rejects_bad_settings(kwargs, match):
    with pytest.raises(kvmem.CubeError, match=match):
        kvmem.MemoryIndex(dense=False, **kwargs)


def test_index_rejects_bad_turn_meta():
    index = kvmem.MemoryIndex(dense=False)
    with pytest.raises(kvmem.CubeError, match="turn"):
        index.add("m", "text", {"session": "s", "turn": "third"})
    assert len(index) == 0
