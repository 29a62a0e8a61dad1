"""kvmem.memory.lexical: incremental BM25 against bm25s itself, per memory and per window of neighbours."""

from __future__ import annotations

import random

import bm25s
import numpy as np
import pytest

from kvmem.memory.lexical import Postings, Tokenizer, bm25

WORDS = ("dog walk park rain coffee sister wedding pottery class bowl clay trail summit ticket concert band "
         "garden tomato recipe pasta train station").split()


def _corpus(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(n)]


def _bm25s(docs_tokens, query_tokens):
    model = bm25s.BM25()
    model.index(docs_tokens, show_progress=False)
    return model.get_scores(query_tokens)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_match_bm25s_after_incremental_adds(seed):
    tokenize = Tokenizer()
    docs = _corpus(seed, 37)  # not a round number
    postings = Postings()
    for i, doc in enumerate(docs):
        postings.append(tokenize([doc])[0])
        if i in (0, 5, 36):  # scores stay exact while memories are added one by one
            tokens = [tokenize([d])[0] for d in docs[:i + 1]]
            for query in ("walk the dog in the park", "pottery class bowl", "rain rain", "unknownword"):
                q = tokenize([query])[0]
                want = _bm25s(tokens, q) if q and any(t in {w for d in tokens for w in d} for t in q) else \
                    np.zeros(i + 1)
                np.testing.assert_allclose(bm25(postings, q), want, rtol=1e-5, atol=1e-6)


def test_window_scores_are_bm25s_over_the_window_texts():
    tokenize = Tokenizer()
    docs = _corpus(7, 11)
    postings = Postings()
    for doc in docs:
        postings.append(tokenize([doc])[0])
    n = len(docs)
    # two "sessions": 0..5 and 6..10 in order, 3 has no right neighbour across the pad
    neighbors = np.full((n, 2), n)
    for i in range(n):
        lo, hi = (0, 5) if i <= 5 else (6, 10)
        neighbors[i] = [i - 1 if i - 1 >= lo else n, i + 1 if i + 1 <= hi else n]
    windows = [tokenize([d])[0] for d in docs]
    windows = [sum((windows[j] for j in (neighbors[i][0], i, neighbors[i][1]) if j < n), []) for i in range(n)]
    q = tokenize(["coffee at the train station, then pasta"])[0]
    np.testing.assert_allclose(bm25(postings, q, neighbors), _bm25s(windows, q), rtol=1e-5, atol=1e-6)


def test_chatty_question_words_are_not_tokens():
    tokens = Tokenizer()(["What did you do with your sister when we were there?"])[0]
    assert tokens == ["sister"]
