"""Lexical scoring for the memory index: BM25 that takes one more memory without a rebuild, over single memories
and over windows of neighbouring memories.

Tokens come from `bm25s`' tokenizer (its larger English stop-word list, English stemming with PyStemmer). Scores
are bm25s' own ("lucene" BM25, k1 = 1.5, b = 0.75; `tests/test_retrieval_lexical.py` checks them against
`bm25s.BM25` itself), computed from postings kept per term, so `add` costs one tokenization and a search only
reads the postings of the query's terms. A window of a memory is the memory with its neighbours (rows of
``neighbors``): it is scored as if the window's texts were one document, in a collection of all windows.
"""

from __future__ import annotations

import numpy as np

K1, B = 1.5, 0.75


def _stopwords() -> list[str]:
    from bm25s.stopwords import (
        STOPWORDS_EN_PLUS,  # 179 words: "what", "my", "did"... that chatty questions share
    )

    return list(STOPWORDS_EN_PLUS)


class Tokenizer:
    """Stop-word-free, stemmed tokens of texts, as `bm25s.tokenize` makes them."""

    def __init__(self):
        try:
            import Stemmer

            self.stemmer = Stemmer.Stemmer("english")
        except ImportError:  # PyStemmer is a kvmem dependency; without it tokens are only lower-cased
            self.stemmer = None
        self.stopwords = _stopwords()

    def __call__(self, texts: list[str]) -> list[list[str]]:
        import bm25s

        return bm25s.tokenize(texts, stopwords=self.stopwords, stemmer=self.stemmer, show_progress=False,
                              return_ids=False)


class Postings:
    """Term counts of memories at positions 0..n-1; positions follow the index's order of memories."""

    def __init__(self):
        self.lengths: list[int] = []               # tokens per memory
        self.terms: dict[str, tuple[list, list]] = {}  # term -> (positions, counts)

    def __len__(self) -> int:
        return len(self.lengths)

    def append(self, tokens: list[str]) -> None:
        pos = len(self.lengths)
        self.lengths.append(len(tokens))
        counts: dict[str, int] = {}
        for t in tokens:
            counts[t] = counts.get(t, 0) + 1
        for t, c in counts.items():
            where = self.terms.setdefault(t, ([], []))
            where[0].append(pos)
            where[1].append(c)

    def counts(self, term: str) -> np.ndarray:
        """[n] how often ``term`` occurs in each memory."""
        out = np.zeros(len(self.lengths), dtype=np.float32)
        where = self.terms.get(term)
        if where is not None:
            out[where[0]] = where[1]
        return out


def bm25(postings: Postings, query_tokens: list[str], neighbors: np.ndarray | None = None) -> np.ndarray:
    """[n] BM25 scores of every memory (``neighbors`` None) or of every window for the query's tokens.

    Args:
        postings: the memories' term counts.
        query_tokens: tokens from `Tokenizer`; a repeated token counts again, as in bm25s.
        neighbors: [n, w] positions of each memory's window neighbours, padded with n (no neighbour).
    """
    n = len(postings)
    if n == 0 or not query_tokens:
        return np.zeros(n, dtype=np.float32)
    lengths = np.asarray(postings.lengths, dtype=np.float32)
    if neighbors is not None:
        lengths = _windowed(lengths, neighbors)
    avg = max(float(lengths.mean()), 1e-9)
    norm = K1 * ((1 - B) + B * lengths / avg)  # [n]
    scores = np.zeros(n, dtype=np.float32)
    for term in query_tokens:
        tf = postings.counts(term)
        if neighbors is not None:
            tf = _windowed(tf, neighbors)
        df = int(np.count_nonzero(tf))
        if df == 0:
            continue
        idf = np.log(1 + (n - df + 0.5) / (df + 0.5))
        scores += idf * tf / (norm + tf)
    return scores


def _windowed(values: np.ndarray, neighbors: np.ndarray) -> np.ndarray:
    """values[i] + the values of i's neighbours ([n] -> [n]); row n of the padded copy is the missing neighbour."""
    padded = np.concatenate([values, np.zeros(1, values.dtype)])
    return values + padded[neighbors].sum(axis=1)
