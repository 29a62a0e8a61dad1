"""The query forward after `kvmem.prefill`, compiled and (on CUDA) captured as CUDA graphs, when asked.

On a GPU a short query's forward is a few milliseconds of kernels behind tens of milliseconds of Python launching
them, layer by layer. `capture_query` compiles that forward once per query-length bucket with ``torch.compile``
(``mode="reduce-overhead"`` on CUDA: the compiled graph is captured and replayed as a CUDA graph, one launch),
over a static prefix cache that it keeps and refills in place (a captured graph needs the same addresses every
time). Shapes are fixed per bucket: the query is padded on the right to the bucket's length (the real tokens
never see the padding: it comes after them), the logits are taken at the last real token, and the cache is
rewound past the padding (its slots are written over by the next tokens; the mask hides them until then). So
every token is the uncompiled path's, to the compiler's float rounding (tests/test_capture.py).

Opt-in, never a default: compiling takes seconds to minutes per bucket, and the captured graphs hold memory.

    >>> captured = kvmem.inject.capture.capture_query(model)          # once per model
    >>> logits, prefix = captured(kvmem.prefill(model, cube), query_ids, max_new_tokens=32)
    >>> first = logits.argmax(-1, keepdim=True)                        # [1, 1]
    >>> model.generate(torch.cat([prefix.input_ids, first], -1), cache=prefix.cache, max_new_tokens=31)

Trust rule, as for kvmem's pools: the cache handed back is refilled by the next call of the same `CapturedQuery`;
finish a request (or copy what you keep) before the next one.
"""

from __future__ import annotations

import bisect
import dataclasses

import torch
from transformers.cache_utils import StaticLayer

from ..errors import CubeError
from ..model.cache import kv_from_cache
from ..model.resolve import resolve
from ..model.static_cache import PrefixStaticCache, fill_static_cache, refill_static_cache
from .prefill import Prefix

BUCKETS = (16, 32, 64, 128, 256, 512, 1024)  # query lengths compiled for (each its own graph, made on first use)
CACHE_STEP = 1024  # the kept cache grows in steps of this many tokens, so cubes of other lengths share its graphs


class CapturedQuery:
    """`capture_query`'s callable: ``(prefix, query_ids, *, max_new_tokens) -> (logits [1, vocab], Prefix)``.

    Attributes:
        model: the model it runs.
        buckets: the query lengths it compiles for, ascending.
        mode: the ``torch.compile`` mode ("reduce-overhead" on CUDA by default: CUDA graphs; None: plain compile).
        cache: the static prefix cache it refills (None before the first call).
    """

    def __init__(self, model, *, buckets, mode, backend, cache_step: int):
        self.model, self.buckets, self.mode, self.cache_step = model, tuple(sorted(buckets)), mode, cache_step
        self.cache: PrefixStaticCache | None = None
        kwarg = resolve(model).cache_kwarg

        def forward(ids, cache, keep):
            return model(input_ids=ids, logits_to_keep=keep, use_cache=True, **{kwarg: cache}).logits

        options = {"backend": backend} if backend is not None else {"mode": mode}
        self._forward = torch.compile(forward, dynamic=False, **options)

    def __call__(self, prefix: Prefix, query_ids: torch.Tensor, *, max_new_tokens: int = 0,
                 pad_id: int = 0) -> tuple[torch.Tensor, Prefix]:
        """The query forward over ``prefix`` through the compiled graph of the query's bucket.

        Args:
            prefix: a `kvmem.Prefix` from `kvmem.prefill` on this model (one row); neither it nor its cubes change.
            query_ids: [q] or [1, q] the request's tokens (on the model's device or not).
            max_new_tokens: tokens to be generated after the query (room kept in the cache).
            pad_id: the token id the padding uses (never seen by a real token; any id the vocabulary has).

        Returns:
            (logits [1, vocab] at the query's last token, Prefix whose ``input_ids`` are the prefix's and the
            query's and whose ``cache`` (this object's static cache) holds their KV).

        Raises:
            CubeError: an empty query, one longer than the largest bucket, or a batch.
        """
        facts = resolve(self.model)
        query = torch.as_tensor(query_ids)
        if query.dim() > 2 or (query.dim() == 2 and query.shape[0] != 1) or prefix.input_ids.shape[0] != 1:
            raise CubeError("capture_query runs one request at a time: pass one query [q] and a one-row prefix "
                            "(batches: kvmem.prefill_batch)")
        query = query.reshape(1, -1).to(prefix.input_ids.device, non_blocking=True)  # no wait on the GPU
        q = query.shape[-1]
        at = bisect.bisect_left(self.buckets, q)
        if q == 0 or at == len(self.buckets):
            raise CubeError(f"a {q}-token query has no bucket (buckets: {list(self.buckets)}); pass "
                            "capture_query(model, buckets=...) with one at least that long")
        bucket = self.buckets[at]
        n = prefix.num_tokens
        need = n + bucket + max_new_tokens
        kv = kv_from_cache(prefix.cache)
        if self.cache is None or self.cache.layers[0].max_cache_len < need:
            room = -(-need // self.cache_step) * self.cache_step
            self.cache = fill_static_cache(self.model, [kv], [n], max_cache_len=room)
            if not all(type(layer) is StaticLayer for layer in self.cache.layers):
                self.cache = None
                raise CubeError("capture_query needs a model whose every layer attends to the whole sequence: a "
                                "sliding-window layer would drop real entries for the query's padding; use "
                                "kvmem.prefill + the model's forward (uncompiled) for this model")
        else:
            refill_static_cache(self.cache, kv, n)
        ids = torch.nn.functional.pad(query, (0, bucket - q), value=pad_id).to(facts.device)
        keep = torch.full((1,), q - 1, device=facts.device)  # logits of the last real token only (no host copy)
        logits = self._forward(ids, self.cache, keep)[:, -1]
        self.cache.rewind(bucket - q, n + q)
        return logits, dataclasses.replace(prefix, cache=self.cache, input_ids=prefix.extend(query))


def capture_query(model, *, buckets=BUCKETS, mode: str | None = "auto", backend=None,
                  cache_step: int = CACHE_STEP) -> CapturedQuery:
    """A compiled query forward for ``model`` (see the module docstring); nothing is compiled until the first call.

    Args:
        model: a transformers model whose cache layers are all full-attention (PEFT-wrapped or not).
        buckets: query lengths to compile for; a query is padded to the smallest that holds it.
        mode: "auto" ("reduce-overhead", i.e. CUDA graphs, on CUDA; plain compile on the CPU), None (plain
            compile), or any ``torch.compile`` mode.
        backend: a ``torch.compile`` backend instead of inductor (then ``mode`` is not used); for tests.
        cache_step: the kept cache's length is a multiple of this (a longer prefix grows it, and recompiles).

    Raises:
        CubeError: "reduce-overhead" asked for a model not on CUDA (CUDA graphs need a CUDA device), or bad
            buckets.
    """
    device = resolve(model).device
    if mode == "auto":
        mode = "reduce-overhead" if device.type == "cuda" else None
    if mode in ("reduce-overhead", "max-autotune") and device.type != "cuda" and backend is None:
        raise CubeError(f"mode={mode!r} captures CUDA graphs, and this model runs on {device}: pass mode=None "
                        "(plain compile) or move the model to a CUDA device")
    if not buckets or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in buckets):
        raise CubeError(f"buckets are query lengths >= 1, got {buckets!r}")
    if not isinstance(cache_step, int) or cache_step < 1:
        raise CubeError(f"cache_step is a token count >= 1, got {cache_step!r}")
    return CapturedQuery(model, buckets=buckets, mode=mode, backend=backend, cache_step=cache_step)
