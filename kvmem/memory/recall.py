"""Recall: which memories a request gets, and in which form (a cube from a tier, or text in the prompt).

For ``generate(prompt, cubes="auto")``: the index ranks the store's memories for the prompt; hits below the
relevance threshold, gone from the store, or over the token allowance are dropped (and reported with the
reason); each kept memory comes as a cube from the scheduler's fastest tier when it has one, or as plain text
prefilled with the request when it has none (its cube is built after the answer, once the index keeps
retrieving it: never on the request's path) or when it is so short that a cube cannot save anything.

Ids: one store view sees several namespaces, and the same memory id may exist in more than one of them. The
index and the scheduler therefore key every memory by its qualified id ``namespace/id``.

Forgetting: every hit is read from the store again before use (a deleted, edited or expired memory is dropped), and
its cube is served only if made from the memory's current text (the scheduler checks the version). A cube built
after the answer records the version it was built from and is refused by the store if the memory changed
meanwhile. `check_adapter` says whether an AdapterCube may serve a request (kvmem/store/lineage.py `usable_for`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .._deprecation import renamed_function
from ..cubes.memcube import MemCube
from ..errors import CubeError
from ..inject.prefill import RECOMPUTE_MODES
from ..store.lineage import source_entry, text_sha256, unusable_reasons
from ..store.records import qualify, split_id
from .embedding_cache import store_cache_path

# A memory this short goes in as text: a later cube's first tokens are recomputed anyway (prefill's default
# "leading" mode recomputes its budget of them), so its cube saves nothing over prefilling the text.
TEXT_BELOW_TOKENS = RECOMPUTE_MODES["leading"][0]
# Per request: cubes are used only when they spare the request at least this many tokens of prefill (their tokens
# less the TEXT_BELOW_TOKENS recomputed at the start of every later cube); below it, one forward over the text is cheaper than
# loading, splicing and recomputing. See bench/auto_overhead.py.
MIN_SAVED_TOKENS = 64
# A hit is relevant only with evidence of it: a word in common with the question (in the memory or its window of
# neighbouring turns, BM25 > 0), a date the question names, or a MiniLM cosine of at least this much (unrelated
# sentences sit around 0-0.15 with all-MiniLM-L6-v2). Rank fusion alone ranks every memory, related or not.
MIN_DENSE_SIMILARITY = 0.2


def relevant(scores: dict, i: int) -> bool:
    """Whether memory ``i`` has evidence of relevance in `MemoryIndex.scores` output (see MIN_DENSE_SIMILARITY)."""
    lexical = any(float(scores[c][i]) > 0 for c in ("lexical", "lexical_window", "date") if c in scores)
    return lexical or any(float(scores[c][i]) >= MIN_DENSE_SIMILARITY for c in ("dense", "dense_window")
                          if c in scores)


def _signature(rec) -> tuple:
    """What the index and the tiers hold of a record: when it changes, both must be refreshed."""
    return rec.text, rec.blob, rec.fingerprint, repr(sorted(rec.meta.items()))


@dataclass
class Recalled:
    """What `Recall.recall` chose for one request."""

    cubes: list[MemCube] = field(default_factory=list)   # in rank order; they go first, after the anchor
    texts: list[str] = field(default_factory=list)       # in rank order; prefilled with the request
    memories: list[dict] = field(default_factory=list)   # one report per kept memory, in rank order
    dropped: list[dict] = field(default_factory=list)    # one report per hit left out, with the reason
    considered: list[str] = field(default_factory=list)  # qualified ids of every hit (for prefetch)
    as_text: list[tuple[str, bool]] = field(default_factory=list)  # (qualified id, has a stored cube) of texts


class Recall:
    """Plaintext memory for one model: a store view, an index over it and the scheduler of its cubes.

    Args:
        view: a `StoreView`.
        index: a `MemoryIndex` (its ids are qualified ids; new memories are added to it here).
        scheduler_factory: ``factory(view_for_scheduler, builder) -> MemScheduler``.
        build_cube: ``build_cube(text, name) -> MemCube`` (the model's own anchor).
        count_tokens: ``count_tokens(text) -> int`` for memories stored without a cube.
        cube_tokens: the most memory tokens one cube may hold (the model's context less the anchor), if known.
    """

    def __init__(self, view, index, scheduler_factory: Callable, build_cube: Callable[[str, str], MemCube],
                 count_tokens: Callable[[str], int], cube_tokens: int | None = None):
        self.view, self.index, self.cube_tokens = view, index, cube_tokens
        self.build_cube, self.count_tokens = build_cube, count_tokens
        self.scheduler = scheduler_factory(view, self.build_memory_cube)  # the view reads qualified ids as they are
        self.allow_quantized = False  # quantized cubes are approximate: used only when the caller allows it
        self._seen: dict[str, tuple] = {}  # qualified id -> what the index holds of it (to see changes)
        self._version = None
        self.sync()

    @classmethod
    def over(cls, view, *, index=None, scheduler=None, device="cpu", build_cube, count_tokens, cube_tokens=None,
             **scheduler_kwargs) -> "Recall":
        """Recall over ``view`` with a default index (embeddings cached in the store's folder) and scheduler
        (on ``device``, with ``scheduler_kwargs``) where none is given."""
        from .index import MemoryIndex
        from .scheduler import MemScheduler

        if index is None:
            index = MemoryIndex(embedding_cache=store_cache_path(view))

        def make_scheduler(scheduler_view, builder):
            if scheduler is None:
                return MemScheduler(scheduler_view, device=device, builder=builder, **scheduler_kwargs)
            scheduler.view, scheduler.builder = scheduler_view, builder  # its tiers are keyed by qualified ids
            return scheduler

        return cls(view, index, make_scheduler, build_cube, count_tokens, cube_tokens)

    # ---------------------------------------------------------------- keeping up with the store
    def sync(self) -> int:
        """Bring the index and the tiers up to date with the store (other processes may have written to it).

        One small catalog query when nothing changed (the store's change log); else the listing is compared
        with what the index holds. Returns how many memories were added, replaced or removed."""
        if self._version is not None:
            version, changes = self.view.changes_since(self._version)
            if changes == []:
                self._version = version
                return 0
        version = self.view.version()
        now = {qualify(r.namespace, r.id): r for r in self.view.ls()}
        changed = 0
        for qid in [q for q in self._seen if q not in now]:
            self._drop(qid)
            changed += 1
        for qid, rec in now.items():
            key = _signature(rec)
            if self._seen.get(qid) == key:
                continue
            if qid in self._seen:
                self.scheduler.forget(qid)
            self.index.add(qid, rec.text, {**rec.meta, "namespace": rec.namespace})
            self._seen[qid] = key
            changed += 1
        self._version = version
        return changed

    def _drop(self, qid: str) -> list[str]:
        self.index.remove(qid)
        self._seen.pop(qid, None)
        return self.scheduler.forget(qid)

    def forget(self, memory_id: str):
        """Delete ``memory_id`` from the own namespace with everything derived from it (`StoreView.forget`), and
        drop it and the removed units from this process's index and memory tiers. Returns the `Receipt`, whose
        ``scheduler`` lists what the tiers dropped."""
        receipt = self.view.forget(memory_id)
        for qid in [receipt.memory] + [d["memory"] for d in receipt.dependants]:
            if qid in self._seen:
                receipt.scheduler += [f"{qid}: {tier}" for tier in self._drop(qid) or ()]
        return receipt

    def check_adapter(self, adapter_meta: dict, recalled: "Recalled | None" = None, *, strict: bool = False
                      ) -> list[dict]:
        """Why an AdapterCube (its ``meta``) must not serve the request that ``recalled`` answers (empty: it may):
        it learned a memory since deleted or expired, or an old version of a memory this request retrieved
        (`kvmem.store.lineage.unusable_reasons`)."""
        retrieved = [qualify(m["namespace"], m["id"]) for m in recalled.memories] if recalled is not None else []
        return unusable_reasons(adapter_meta, self.view.store.catalog, retrieved, strict=strict)

    # ---------------------------------------------------------------- writing
    def remember(self, text: str, memory_id: str | None = None, *, meta: dict | None = None,
                 cube: bool = False) -> str:
        """Add a plaintext memory to the own namespace (and build its cube now if ``cube``). Returns its id."""
        if memory_id is None:
            memory_id = self.view.mint_id(text)
        if cube and isinstance(text, str):  # before anything is written: a cube past the context is refused
            self.check_cube_length(text)
        rec = self.view.add(memory_id, text, meta)  # checks id, text and meta before anything is written
        qid = qualify(rec.namespace, rec.id)
        self.scheduler.forget(qid)
        self.index.add(qid, text, {**rec.meta, "namespace": rec.namespace})
        if cube:
            self.build_memory_cube(qid)
        rec = self.view.get(memory_id)
        self._seen[qid] = _signature(rec)
        return memory_id

    promote = property(lambda self: renamed_function(self.build_memory_cube, "promote"))  # old name, one release

    def check_cube_length(self, text: str) -> None:
        """CubeError if a cube of ``text`` could not be built within the model's context (`MemCube.from_ids`
        refuses it; checking first keeps the store unchanged)."""
        n = self.count_tokens(text)
        if self.cube_tokens is not None and n > self.cube_tokens:
            raise CubeError(f"a cube of this memory would hold {n} tokens, past the {self.cube_tokens} the model's "
                            "context leaves after the anchor; remember it as text (cube=False) or split it")

    def build_memory_cube(self, qid: str) -> MemCube:
        """Build the cube of a plaintext memory; kept in the store when the memory is in the own namespace
        (shared namespaces are read-only: then the cube lives in the memory tiers only)."""
        namespace, memory_id = split_id(qid)
        rec = self.view.get(qid)
        if rec is None:
            raise CubeError(f"memory {qid!r} is gone from the store")
        cube = self.build_cube(rec.text, memory_id).with_meta({"derived_from": [source_entry(rec)]})
        if namespace == self.view.namespace:  # refused if the memory was edited or deleted while it was built
            self.view.put_cube(memory_id, cube, text=rec.text, derived_from=[source_entry(rec)])
            rec = self.view.get(memory_id)
            self._seen[qid] = _signature(rec)
        return cube

    # ---------------------------------------------------------------- reading
    def recall(self, prompt: str, *, max_tokens: int, k: int, min_score: float | None = None,
               evidence: bool = True) -> Recalled:
        """The memories for ``prompt``: the index's top ``k`` with a score of at least ``min_score`` and (with
        ``evidence``) some evidence of relevance (`relevant`), in rank order, while their tokens fit
        ``max_tokens``."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise CubeError(f"max_memory_tokens must be a positive int, got {max_tokens!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise CubeError(f"k must be a positive int, got {k!r}")
        if min_score is not None and (isinstance(min_score, bool) or not isinstance(min_score, (int, float))):
            raise CubeError(f"min_score must be a number or None, got {min_score!r}")
        self.sync()
        out, used, kept = Recalled(), 0, []
        scores, ids = self.index.scores(prompt), self.index.ids
        top = scores["fused"].topk(min(k, len(ids))) if ids else None
        for score, i in zip(top.values.tolist(), top.indices.tolist()) if top is not None else ():
            qid = ids[i]
            out.considered.append(qid)
            namespace, memory_id = split_id(qid)
            entry = {"id": memory_id, "namespace": namespace, "score": round(float(score), 4)}
            if min_score is not None and score < min_score:
                out.dropped.append({**entry, "reason": f"score below min_score={min_score}"})
                continue
            if evidence and not relevant(scores, i):
                out.dropped.append({**entry, "reason": "no evidence of relevance: no word in common with the "
                                                       "question, no date it names, MiniLM similarity "
                                                       f"< {MIN_DENSE_SIMILARITY}"})
                continue
            rec = self.view.get(qid)
            if rec is None:  # deleted (or expired) since the last sync
                self._drop(qid)
                out.dropped.append({**entry, "reason": "deleted from the store (or expired)"})
                continue
            entry["tokens"] = tokens = rec.tokens or self.count_tokens(rec.text)
            if used + tokens > max_tokens:
                out.dropped.append({**entry, "reason": f"over max_memory_tokens={max_tokens} "
                                                       f"({used} used, needs {tokens})"})
                continue
            kept.append((qid, rec, entry))
            used += tokens
        with_cube = {qid for qid, rec, entry in kept if self._worth_a_cube(qid, rec, entry["tokens"])}
        saved = sum(e["tokens"] for q, _, e in kept if q in with_cube) - TEXT_BELOW_TOKENS * max(0, len(with_cube) - 1)
        if with_cube and saved < MIN_SAVED_TOKENS:  # composing would cost more than prefilling the text
            for qid, _, entry in kept:
                if qid in with_cube:
                    entry["note"] = f"prefilled as text: its cube would save {saved} tokens (< {MIN_SAVED_TOKENS})"
            with_cube = set()
        for qid, rec, entry in kept:
            cube, source = self._fetch(qid, rec, entry) if qid in with_cube else (None, "text")
            if cube is not None:
                out.cubes.append(cube)
            else:
                out.texts.append(rec.text)
                out.as_text.append((qid, rec.blob is not None))
            out.memories.append({**entry, "source": source})
        return out

    def _worth_a_cube(self, qid: str, rec, tokens: int) -> bool:
        """Whether the memory has a cube (resident or stored) long enough to save anything over its text."""
        if tokens <= TEXT_BELOW_TOKENS:
            return False
        return rec.blob is not None or self.scheduler.holds(qid)

    def _fetch(self, qid: str, rec, entry: dict) -> tuple[MemCube | None, str]:
        """The memory's cube (made from ``rec``'s text) and the tier that served it, or (None, "text") to prefill
        it as text."""
        try:
            cube, tier = self.scheduler.fetch(qid, text_sha256=text_sha256(rec.text))
        except CubeError as exc:  # a damaged or foreign cube: the text still answers, and says why
            entry["note"] = f"cube unusable, prefilled as text: {exc}".splitlines()[0]
            return None, "text"
        if cube is not None and cube.quantization and not self.allow_quantized:
            q = cube.quantization
            entry["note"] = (f"its cube is quantized ({q['scheme']}, measured next-token KL {q['error']['kl_mean']:.2g} "
                             "nats): prefilled as text; mm.attach(..., allow_quantized=True) uses it")
            return None, "text"
        return (cube, tier) if cube is not None else (None, "text")

    def after_answer(self, recalled: Recalled) -> None:
        """Work kept off the request's path: count each memory's use in the store, count the text memories' retrievals (promoting the ones retrieved
        often enough into cubes: the scheduler's ``promote_after``), warm the CPU tier with the other top hits."""
        for memory in recalled.memories:  # use counts are a catalog write each: not before the first token
            self.view.touch(qualify(memory["namespace"], memory["id"]))
        for qid, has_cube in recalled.as_text:
            self.scheduler.retrieved(qid, has_cube)
        used = {qualify(m["namespace"], m["id"]) for m in recalled.memories}
        self.scheduler.prefetch([q for q in recalled.considered if q not in used])
