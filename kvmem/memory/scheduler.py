"""MemScheduler: where activation memories live. Tiers device / CPU / disk, each within a byte capacity.

A request asks for a memory's cube: a device hit is ready; a CPU hit is copied to the device (from pinned
memory on CUDA); a disk hit is loaded and validated from the store. What is fetched is placed in the fastest
tier with room, evicting by the policy (LRU: least recently used; LFU: fewest uses, then oldest). Budgets are
never exceeded: a cube too large for a tier skips it.

LFU counts one use per request, shared by all tiers and kept when a cube is evicted or moves between tiers (so a
popular cube demoted to CPU memory competes with its history); every ``lfu_halve_every`` requests all counts
are halved, so popularity that has moved on fades. bench/zipf_trace.py (500 memories, device capacity 5% of their
bytes): on steady Zipf traces (s = 1.0-1.2) LFU serves 55-70% of requests from the device tier vs LRU's 40-60%;
when popularity drifts, 0.53 vs LRU's 0.49 (the same LFU without halving: 0.42, falling phase by phase).

Plaintext memories that the index keeps retrieving are promoted into activation cubes, one memory at a time
(``promote_after`` retrievals; on demand, or in a background thread with ``background=True``), instead of
MemOS's periodic batch rebuild. Counters report hits per tier, misses, bytes moved, promotions, evictions.

Forgetting: a cube held in a tier is never served after its memory was deleted, edited or expired. Every fetch
first reads the store's change log (`StoreView.changes_since`, one small query) and drops what changed; a tier hit
is also checked against the version of the text it was made from (``fetch(..., text_sha256=...)``, which recall
passes) and against the expiry its cube file recorded (docs/forgetting.md).
"""

from __future__ import annotations

import queue
import threading
from collections import Counter, OrderedDict
from typing import Callable

import torch

from .._deprecation import renamed
from ..errors import CubeError
from ..store import expiry
from ..store.expiry import expires_at
from ..store.lineage import text_sha256
from ..store.records import qualify

POLICIES = ("lru", "lfu")
TIERS = ("device", "cpu", "disk")


class _Tier:
    def __init__(self, name: str, capacity: int, policy: str, uses: Counter):
        self.name, self.capacity, self.policy = name, capacity, policy
        self.items: OrderedDict[str, object] = OrderedDict()  # least recently used first
        self.sizes: dict[str, int] = {}
        self.used = 0     # bytes held: sum(sizes.values()), kept as items come and go
        self.uses = uses  # the scheduler's: one count per request, shared by the tiers

    def add(self, key: str, cube, size: int) -> None:
        self.used += size - self.sizes.get(key, 0)  # replacing a key counts only the difference
        self.items[key], self.sizes[key] = cube, size

    def touch(self, key: str) -> None:
        self.items.move_to_end(key)

    def victim(self) -> str:
        if self.policy == "lru":
            return next(iter(self.items))
        order = {k: i for i, k in enumerate(self.items)}
        return min(self.items, key=lambda k: (self.uses[k], order[k]))  # fewest uses, then least recent

    def pop(self, key: str):
        self.used -= self.sizes.pop(key)
        return self.items.pop(key)


class MemScheduler:
    """Tiers for activation cubes over a store view.

    Args:
        view: a `StoreView` (the disk tier), or any object with ``load_cube(memory_id, device=None)``.
        device: the model's device (the device tier).
        device_capacity_bytes, cpu_capacity_bytes: the bytes each memory tier may hold (formerly *_budget_bytes).
        policy: "lfu" (default: fewest uses, counts halved every ``lfu_halve_every`` requests) or "lru".
        lfu_halve_every: requests between halvings of the LFU counts (0: never; then old popularity never fades).
            About twice the number of memories in use is a good value (bench/zipf_trace.py).
        promote_after: retrievals of a plaintext memory before it is built into a cube (0: never).
        builder: ``builder(memory_id) -> MemCube`` that builds and stores a memory's cube (needed to promote).
        background: promote in a worker thread instead of on the request's path.
    """

    def __init__(self, view, *, device="cpu", device_capacity_bytes: int = 2 * 2**30, cpu_capacity_bytes: int = 8 * 2**30,
                 policy: str = "lfu", lfu_halve_every: int = 1000, promote_after: int = 3,
                 builder: Callable | None = None, background: bool = False, **deprecated):
        if not callable(getattr(view, "load_cube", None)):
            raise CubeError(f"MemScheduler needs a store view (kvmem.CubeStore(path).view(namespace)) or an object "
                            f"with load_cube(memory_id), got {type(view).__name__}")
        device_capacity_bytes = renamed(deprecated, "device_budget_bytes", "device_capacity_bytes",
                                        device_capacity_bytes, where="MemScheduler()")
        cpu_capacity_bytes = renamed(deprecated, "cpu_budget_bytes", "cpu_capacity_bytes", cpu_capacity_bytes,
                                     where="MemScheduler()")
        if deprecated:
            raise TypeError(f"MemScheduler() got unexpected keyword arguments {sorted(deprecated)}")
        if policy not in POLICIES:
            raise CubeError(f"policy must be one of {POLICIES}, got {policy!r}")
        for name, b in (("device_capacity_bytes", device_capacity_bytes), ("cpu_capacity_bytes", cpu_capacity_bytes),
                        ("lfu_halve_every", lfu_halve_every)):
            if isinstance(b, bool) or not isinstance(b, int) or b < 0:
                raise CubeError(f"{name} must be an int >= 0, got {b!r}")
        self.view, self.device = view, torch.device(device)
        self.uses: Counter = Counter()
        self.lfu_halve_every, self._requests = lfu_halve_every, 0
        self.tiers = {"device": _Tier("device", device_capacity_bytes, policy, self.uses),
                      "cpu": _Tier("cpu", cpu_capacity_bytes, policy, self.uses)}
        self.promote_after, self.builder = promote_after, builder
        self.retrievals: Counter = Counter()
        self.counters = Counter()
        self._lock = threading.RLock()
        self.made_from: dict[str, tuple[str | None, float | None]] = {}  # key -> (text sha256, expires) held
        self._version = None  # where in the store's change log this scheduler last looked
        self._queue: queue.Queue | None = None
        if background:
            self._queue = queue.Queue()
            threading.Thread(target=self._worker, daemon=True, name="kvmem-promoter").start()

    # ---------------------------------------------------------------- placement
    def _place(self, key: str, cube, size: int, start: str) -> str | None:
        """Put ``cube`` in the fastest tier from ``start`` with room; returns the tier or None (disk only).

        A key already held anywhere is taken out first: one key, one copy, counted once (a shared memory that
        is promoted again, or a prefetch racing a fetch, must not add its bytes twice)."""
        for tier in self.tiers.values():
            if key in tier.items:
                tier.pop(key)
        names = list(self.tiers)
        for name in names[names.index(start):]:
            tier = self.tiers[name]
            if size > tier.capacity:
                continue
            while tier.used + size > tier.capacity:
                victim = tier.victim()
                evicted = tier.pop(victim)
                self.counters[f"evictions_{name}"] += 1
                nxt = names.index(name) + 1
                if nxt < len(names):  # demote rather than drop, if the next tier can take it
                    self._place(victim, self._move(evicted, names[nxt]), tier_size(evicted), names[nxt])
                    self.counters["demotions"] += 1
            tier.add(key, cube, size)
            tier.touch(key)
            self.made_from[key] = _made_from(cube)  # the version it holds (a demoted cube: the same)
            return name
        return None

    def _move(self, cube, tier: str):
        if tier == "device":
            return cube.to(self.device)
        if tier == "cpu":
            moved = cube.to("cpu")
            if self.device.type == "cuda" and hasattr(moved, "pin_memory"):
                moved = moved.pin_memory()
            return moved
        return cube

    def _count_use(self, memory_id: str) -> None:
        self.uses[memory_id] += 1
        self._requests += 1
        if self.lfu_halve_every and self._requests % self.lfu_halve_every == 0:
            for key, n in list(self.uses.items()):  # old popularity fades; forgotten keys leave the table
                if n // 2:
                    self.uses[key] = n // 2
                else:
                    del self.uses[key]

    def get(self, memory_id: str):
        """The cube of ``memory_id`` on the model's device (None if it has none), counting where it was found."""
        return self.fetch(memory_id)[0]

    def fetch(self, memory_id: str, *, text_sha256: str | None = None):
        """``(cube, tier)``: the cube of ``memory_id`` on the model's device and the tier that served it
        ("device", "cpu" or "disk"), or ``(None, "miss")`` when it has no cube. Counted as `get` counts.

        A held cube is served only if its memory has not changed in the store since it was placed (the change
        log), has not expired, and (with ``text_sha256``, the memory's current version) was made from that
        version; otherwise it is dropped and the store's current cube is loaded. (Given ``text_sha256``, read
        from the store just before, the version says all the change log would: no query is added.)"""
        if text_sha256 is None:
            self.sync()
        with self._lock:
            self._drop_outdated(memory_id, text_sha256)
            for name in ("device", "cpu"):
                tier = self.tiers[name]
                if memory_id in tier.items:
                    self._count_use(memory_id)
                    self.counters[f"hits_{name}"] += 1
                    tier.touch(memory_id)
                    cube = tier.items[memory_id]
                    if name == "cpu":  # moved up to the device tier if it fits
                        size = tier.sizes[memory_id]
                        if size <= self.tiers["device"].capacity:
                            tier.pop(memory_id)
                            cube = self._move(cube, "device")
                            self.counters["bytes_cpu_to_device"] += size
                            self._place(memory_id, cube, size, "device")
                        else:
                            cube = cube.to(self.device)
                            self.counters["bytes_cpu_to_device"] += size
                    return cube, name
        cube = self.view.load_cube(memory_id)
        with self._lock:
            if cube is None:
                self.counters["misses"] += 1
                return None, "miss"
            self._count_use(memory_id)
            self.counters["hits_disk"] += 1
            size = tier_size(cube)
            self.counters["bytes_disk_read"] += size
            placed = self._place(memory_id, self._move(cube, "device") if size <= self.tiers["device"].capacity
                                 else self._move(cube, "cpu"), size, "device")
            return (self.tiers[placed].items[memory_id].to(self.device) if placed else cube.to(self.device)), "disk"

    def holds(self, memory_id: str) -> bool:
        """Whether a memory tier (device or CPU) holds ``memory_id``'s cube."""
        with self._lock:
            return any(memory_id in t.items for t in self.tiers.values())

    def prefetch(self, memory_ids) -> int:
        """Load the given memories' cubes into the CPU tier ahead of use (not counted as hits). Returns how many."""
        n = 0
        self.sync()
        for memory_id in memory_ids:
            if self.holds(memory_id):
                continue
            cube = self.view.load_cube(memory_id)
            if cube is None:
                continue
            with self._lock:
                size = tier_size(cube)
                if self._place(memory_id, self._move(cube, "cpu"), size, "cpu"):
                    self.counters["prefetched"] += 1
                    self.counters["bytes_disk_read"] += size
                    n += 1
        return n

    def forget(self, memory_id: str) -> list[str]:
        """Drop ``memory_id`` from the memory tiers (after it was replaced or deleted in the store). Returns the
        tiers that held it."""
        with self._lock:
            held = []
            for name, tier in self.tiers.items():
                if memory_id in tier.items:
                    tier.pop(memory_id)
                    held.append(name)
            self.uses.pop(memory_id, None)  # a replaced memory starts again
            self.made_from.pop(memory_id, None)
            self.retrievals.pop(memory_id, None)
            if held:
                self.counters["forgotten"] += 1
            return held

    def _drop_outdated(self, memory_id: str, text_sha: str | None) -> None:
        """Forget a held cube of ``memory_id`` made from another version than ``text_sha`` or expired."""
        if memory_id not in self.made_from:
            return
        sha, expires = self.made_from[memory_id]
        if (text_sha is not None and sha != text_sha) or (expires is not None and expires <= expiry.now()):
            self.forget(memory_id)

    def _still_current(self, key: str) -> bool:
        get = getattr(self.view, "get", None)
        rec = get(key) if get is not None else None
        return rec is not None and self.made_from.get(key, (None,))[0] == text_sha256(rec.text)

    def sync(self) -> int:
        """Drop every held cube whose memory changed in the store (added, rebuilt, deleted, repaired; a revoked
        grant drops that namespace's) since the last look; everything when the change log cannot say. Views
        without a change log (plain ``load_cube`` objects) are not synced. Returns how many cubes were dropped."""
        changes_since = getattr(self.view, "changes_since", None)
        if changes_since is None:
            return 0
        if self._version is None:
            self._version = self.view.version()
            return 0
        version, changes = changes_since(self._version)
        with self._lock:
            held = {k for t in self.tiers.values() for k in t.items}
            if changes is None:
                doomed = held
            else:
                own = getattr(self.view, "namespace", None)
                changed = set()
                for namespace, memory_id, op in changes:
                    if op == "revoke":  # the owner's memories may no longer be read here
                        changed |= {k for k in held if k.startswith(namespace + "/")}
                    elif op != "grant":
                        changed |= {qualify(namespace, memory_id)} | ({memory_id} if namespace == own else set())
                # a changed memory's held cube stays only if the memory is still there with the text it was made
                # from (a cube this scheduler promoted is itself a change: "cube")
                doomed = {k for k in changed & held if not self._still_current(k)}
            dropped = sum(bool(self.forget(k)) for k in doomed & held)
            self._version = version
        return dropped

    # ---------------------------------------------------------------- promotion
    def retrieved(self, memory_id: str, has_cube: bool) -> bool:
        """Note that the index retrieved ``memory_id``; promote it to a cube once retrieved often enough.
        Returns True when a promotion was started."""
        with self._lock:
            self.retrievals[memory_id] += 1
            due = (not has_cube and self.promote_after and self.builder is not None
                   and self.retrievals[memory_id] >= self.promote_after)
        if not due:
            return False
        if self._queue is not None:
            self._queue.put(memory_id)
        else:
            try:
                self._promote(memory_id)
            except CubeError as exc:  # e.g. the memory changed while its cube was built: counted, not raised
                self.counters["promotion_errors"] += 1
                self.last_error = exc
        return True

    def _promote(self, memory_id: str) -> None:
        cube = self.builder(memory_id)
        with self._lock:
            self.counters["promotions"] += 1
            self.retrievals.pop(memory_id, None)
            if cube is not None:
                self._place(memory_id, self._move(cube, "cpu"), tier_size(cube), "cpu")

    def _worker(self):
        while True:
            memory_id = self._queue.get()
            try:
                self._promote(memory_id)
            except Exception as exc:  # a failed promotion must not kill the worker; it is counted and shown
                self.counters["promotion_errors"] += 1
                self.last_error = exc
            finally:
                self._queue.task_done()

    def drain(self) -> None:
        """Wait until background promotions are done."""
        if self._queue is not None:
            self._queue.join()

    # ---------------------------------------------------------------- reporting
    def stats(self) -> dict:
        with self._lock:
            out = dict(self.counters)
            for name, tier in self.tiers.items():
                out[f"{name}_items"], out[f"{name}_bytes"], out[f"{name}_capacity"] = len(tier.items), tier.used, tier.capacity
            lookups = sum(self.counters[f"hits_{t}"] for t in TIERS) + self.counters["misses"]
            for t in TIERS:
                out[f"hit_rate_{t}"] = self.counters[f"hits_{t}"] / lookups if lookups else 0.0
            return out


def _made_from(cube) -> tuple[str | None, float | None]:
    """(sha256 of the text a cube was made from, when its memory expires) as its file records them: a store's
    cube records its memory's text and meta (kvmem/store/stamp.py); a cube built in memory, its own text."""
    stamp = cube.meta.get("memory") if isinstance(getattr(cube, "meta", None), dict) else None
    stamp = stamp if isinstance(stamp, dict) else {}
    text = stamp.get("text") or getattr(cube, "text", None)
    return (text_sha256(text) if isinstance(text, str) else None), expires_at(stamp.get("meta"))


def tier_size(cube) -> int:
    """Bytes a cube takes in a memory tier: a quantized cube's packed bytes (scales included), which is what the
    tier holds and what moves to the device; it is dequantized only where it is spliced."""
    return int(cube.nbytes)
