"""EvolvePolicy: moves a namespace's memories between the three kinds as they are used. Off by default: nothing
in kvmem creates one; a deployment that wants it makes one and calls `step` (or `start` for a background thread).

Each `step` looks at the namespace's own memories (the store counts uses: ``hits``, ``last_used``) and:

- **distils** the memories that are *hot* (used at least ``hot_uses`` times) and *stable* (text unchanged for
  ``stable_s`` seconds, as this policy observed it) into one LoRA AdapterCube (`kvmem.distill`), saved under
  ``adapter_dir``, once at least ``min_new`` of them are not yet in the current adapter;
- **keeps cubes** for what is new or changing: a memory whose text changed starts its ``stable_s`` again, and an
  adapter that learned an older version of any memory (or a deleted one) is *stale*: `route` stops using it at
  once, and the next distillation leaves the changed memory out until it is stable again;
- **demotes** what goes cold (no use for ``cold_s`` seconds): its cube leaves the scheduler's tiers and the
  store (the memory becomes text-only; its text, meta and id stay).

Every move is reported in `stats` (counts and a log of the latest moves). A request asks `route` which adapter to
use and which of its retrieved memories still need their cube or text in the context.

Why a stale adapter is refused for every request, not only for requests that retrieve the changed memory: a
deleted memory is never retrieved again, so that narrower rule would let the adapter keep answering from the
deleted text (issue 26's forgetting target).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..cubes.adaptercube import AdapterCube
from ..errors import CubeError
from ..store.lineage import DERIVED_KEY, stale_sources, text_sha256


@dataclass
class Route:
    """What a request uses: ``adapter`` (None: the base model) and the retrieved memories that still need their
    cube or text in the context (``inject``), in the order given; ``learned``: those the adapter answers for."""

    adapter: AdapterCube | None
    inject: list[str]
    learned: list[str] = field(default_factory=list)


class EvolvePolicy:
    """Moves a namespace's memories between plaintext, cubes and a distilled adapter (see the module docstring).

    Args:
        view: the namespace's `StoreView` (only its own namespace's memories are moved).
        scheduler: the `MemScheduler` whose tiers hold the cubes (``mm.scheduler``), or None.
        model, tokenizer: the base model (not a PeftModel: ``mm.adapters.base``) and its tokenizer.
        hot_uses: uses (the store's ``hits``) that make a memory hot.
        stable_s: seconds a memory's text must stay unchanged before it is distilled.
        cold_s: seconds without use after which a memory's cube is demoted (None: never demote).
        min_new: hot, stable memories not yet learned that trigger a distillation.
        adapter_dir: where adapters are saved (default ``<store>/adapters``; required for a Redis store).
        distill_options: keyword arguments for `kvmem.distill` (default ``{"steps": 100}``).
        clock: the time source (``time.time``; tests pass a fake clock).
        keep_moves: how many moves `stats` lists.
    """

    def __init__(self, view, scheduler, model, tokenizer, *, hot_uses: int = 5, stable_s: float = 3600.0,
                 cold_s: float | None = 7 * 86400.0, min_new: int = 1, adapter_dir=None,
                 distill_options: dict | None = None, clock: Callable[[], float] = time.time,
                 keep_moves: int = 100):
        for value, what in ((hot_uses, "hot_uses"), (min_new, "min_new"), (keep_moves, "keep_moves")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CubeError(f"{what} must be an int >= 1, got {value!r}")
        for value, what in ((stable_s, "stable_s"), (cold_s, "cold_s")):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise CubeError(f"{what} must be a number of seconds >= 0, got {value!r}")
        if stable_s is None:
            raise CubeError("stable_s must be a number of seconds >= 0 (0: distil as soon as a memory is hot)")
        if adapter_dir is None:
            root = getattr(view.store, "root", None)
            if root is None:
                raise CubeError("this store has no local folder (Redis): pass adapter_dir= for the adapters")
            adapter_dir = Path(root) / "adapters"
        self.view, self.scheduler, self.model, self.tokenizer = view, scheduler, model, tokenizer
        self.hot_uses, self.stable_s, self.cold_s, self.min_new = hot_uses, stable_s, cold_s, min_new
        self.adapter_dir = Path(adapter_dir)
        self.distill_options = {"steps": 100, "progress": False, **(distill_options or {})}
        self.clock = clock
        self.adapter: AdapterCube | None = None
        self.adapter_path: Path | None = None
        self.learned: list[str] = []   # qualified ids the current adapter learned (its derived_from, in order)
        self.counters = Counter()
        self.moves: deque[dict] = deque(maxlen=keep_moves)
        self._versions: dict[str, tuple[str, float]] = {}  # qualified id -> (text sha256, first seen at)
        self._lock = threading.RLock()
        self._stale_seen: set[tuple[str, str]] = set()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.last_error: Exception | None = None

    # ---------------------------------------------------------------- the moves
    def step(self) -> list[dict]:
        """One pass over the namespace: note changes, distil, demote. Returns the moves it made."""
        with self._lock:
            now = self.clock()
            records = [r for r in self.view.ls() if r.namespace == self.view.namespace]
            moves = self._observe(records, now)
            moves += self._check_adapter()
            moves += self._distil(records, now)
            moves += self._demote(records, now)
            return moves

    def _move(self, kind: str, **details) -> dict:
        move = {"move": kind, "at": self.clock(), **details}
        self.counters[kind] += 1
        self.moves.append(move)
        return move

    def _observe(self, records, now: float) -> list[dict]:
        moves, current = [], {}
        for rec in records:
            sha = text_sha256(rec.text)
            seen = self._versions.get(rec.qualified)
            if seen is None or seen[0] != sha:
                current[rec.qualified] = (sha, now)
                if seen is not None:
                    moves.append(self._move("changed", memory=rec.qualified))
            else:
                current[rec.qualified] = seen
        self._versions = current
        return moves

    def _stale(self) -> list[dict]:
        if self.adapter is None:
            return []
        return stale_sources(self.view.store.catalog, self.adapter.meta[DERIVED_KEY])

    def _check_adapter(self) -> list[dict]:
        moves = []
        for entry in self._stale():
            key = (entry["memory"], entry["text_sha256"])
            if key not in self._stale_seen:
                self._stale_seen.add(key)
                moves.append(self._move("adapter_stale", memory=entry["memory"], reason=entry["reason"],
                                        adapter=str(self.adapter_path)))
        return moves

    def _distil(self, records, now: float) -> list[dict]:
        ready = [r for r in records if r.hits >= self.hot_uses
                 and now - self._versions[r.qualified][1] >= self.stable_s
                 and not self._is_cold(r, now)]
        stale = {e["memory"] for e in self._stale()}
        new = [r.qualified for r in ready if r.qualified not in self.learned or r.qualified in stale]
        if len(new) < self.min_new and not stale:
            return []
        if not ready:
            return []
        t0 = time.monotonic()
        from .distill import distill

        cube = distill(self.model, self.tokenizer, ready, name=f"{self.view.namespace}-evolved",
                       **self.distill_options)
        self.adapter_dir.mkdir(parents=True, exist_ok=True)
        n = self.counters["distill"] + 1
        path = Path(cube.save(self.adapter_dir / f"{self.view.namespace}-{n}.safetensors"))
        self.adapter, self.adapter_path = cube, path
        self.learned = [e["memory"] for e in cube.meta[DERIVED_KEY]]
        return [self._move("distill", memories=list(self.learned), adapter=str(path),
                           seconds=round(time.monotonic() - t0, 3), steps=cube.meta["distill"]["steps"])]

    def _is_cold(self, rec, now: float) -> bool:
        return self.cold_s is not None and now - (rec.last_used or rec.created) >= self.cold_s

    def _demote(self, records, now: float) -> list[dict]:
        moves = []
        for rec in records:
            if rec.kind == "memcube" and self._is_cold(rec, now):
                if self.scheduler is not None:
                    self.scheduler.forget(rec.qualified)
                self.view.add(rec.id, rec.text, rec.meta)  # text-only again: the cube file is deleted
                moves.append(self._move("demote", memory=rec.qualified, idle_s=round(now - (rec.last_used
                                                                                          or rec.created), 3)))
        return moves

    # ---------------------------------------------------------------- requests
    def route(self, memory_ids) -> Route:
        """The adapter a request that retrieved ``memory_ids`` (qualified ids) uses, and which of them it must
        still inject. A stale adapter (it learned a version of a memory that was since edited or deleted) is
        never used."""
        with self._lock:
            ids = list(memory_ids)
            if self.adapter is None or self._stale():
                return Route(None, ids)
            learned = set(self.learned)
            return Route(self.adapter, [i for i in ids if i not in learned], [i for i in ids if i in learned])

    # ---------------------------------------------------------------- background
    def start(self, *, interval_s: float = 60.0) -> "EvolvePolicy":
        """Run `step` every ``interval_s`` seconds in a daemon thread (errors are counted, not raised)."""
        if self._thread is not None:
            return self
        self._stop.clear()

        def loop():
            while not self._stop.wait(interval_s):
                try:
                    self.step()
                except Exception as exc:  # a failed pass must not end the thread; it is counted and shown
                    self.counters["errors"] += 1
                    self.last_error = exc

        self._thread = threading.Thread(target=loop, name="kvmem-evolve", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the background thread (waits for a pass in progress)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def stats(self) -> dict:
        """Counts of every kind of move (distill, changed, adapter_stale, demote, errors), the current adapter,
        what it learned, whether it is stale, and the latest moves, oldest first."""
        with self._lock:
            return {**{k: self.counters[k] for k in ("distill", "changed", "adapter_stale", "demote", "errors")},
                    "adapter": str(self.adapter_path) if self.adapter_path else None,
                    "learned": list(self.learned), "adapter_is_stale": bool(self._stale()),
                    "moves": list(self.moves)}
