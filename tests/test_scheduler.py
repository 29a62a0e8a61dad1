"""The scheduler: tier budgets under a random trace, LRU/LFU eviction, demotion, promotion and prefetch."""

from __future__ import annotations

import random
import time

import pytest

import kvmem
from kvmem.memory.scheduler import MemScheduler

from helpers import FakeCube, FakeView


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_budgets_hold_under_random_trace(policy):
    rng = random.Random(0)
    sizes = {f"m{i}": rng.randint(1, 40) for i in range(60)}
    sched = MemScheduler(FakeView(sizes), device_capacity_bytes=100, cpu_capacity_bytes=250, policy=policy)
    for _ in range(3000):
        key = f"m{min(59, int(rng.paretovariate(1.2)) - 1)}" if rng.random() < 0.9 else "absent"
        cube = sched.get(key)
        assert (cube is None) == (key == "absent")
        for tier in sched.tiers.values():
            assert tier.used == sum(tier.sizes.values()) <= tier.capacity
    stats = sched.stats()
    assert stats["hits_device"] > stats["hits_disk"] > 0 and stats["misses"] > 0
    assert abs(sum(stats[f"hit_rate_{t}"] for t in ("device", "cpu", "disk")) + stats["misses"] / 3000 - 1) < 1e-9


def test_lru_and_lfu_evict_what_they_should():
    sizes = {k: 10 for k in "abcd"}
    for policy, expected_gone in (("lru", "a"), ("lfu", "b")):
        sched = MemScheduler(FakeView(sizes), device_capacity_bytes=30, cpu_capacity_bytes=0, policy=policy)
        for key in "aaab":
            sched.get(key)
        sched.get("c")
        sched.get("a")  # a is now the most recent (LRU keeps it) and the most used (LFU keeps it)
        sched.get("b")
        sched.get("d")  # one must go
        gone = set("abcd") - set(sched.tiers["device"].items)
        assert gone == {"c"} if policy == "lru" else gone == {"c"}
    # a pure frequency/recency disagreement
    lru = MemScheduler(FakeView(sizes), device_capacity_bytes=20, cpu_capacity_bytes=0, policy="lru")
    lfu = MemScheduler(FakeView(sizes), device_capacity_bytes=20, cpu_capacity_bytes=0, policy="lfu")
    for sched in (lru, lfu):
        for key in "aaabc":  # a used 3x long ago, b once recently, then c arrives
            sched.get(key)
    assert set(lru.tiers["device"].items) == {"b", "c"}
    assert set(lfu.tiers["device"].items) == {"a", "c"}


def test_lfu_counts_fade_and_follow_the_cube():
    sizes = {k: 10 for k in "abcdef"}
    trace = "a" * 8 + "bc" * 6
    kept = {}
    for halve_every in (0, 4):
        sched = MemScheduler(FakeView(sizes), device_capacity_bytes=20, cpu_capacity_bytes=0, policy="lfu",
                             lfu_halve_every=halve_every)
        for key in trace:
            sched.get(key)
        kept[halve_every] = set(sched.tiers["device"].items)
    assert kept[0] == {"a", "c"}  # counts that never fade: a, hot long ago, holds its slot for ever
    assert kept[4] == {"b", "c"}  # halved counts: the slot goes to what is requested now
    # one count per request, shared by the tiers: a demoted cube keeps its history, misses count nothing
    sched = MemScheduler(FakeView(sizes), device_capacity_bytes=10, cpu_capacity_bytes=20, policy="lfu",
                         lfu_halve_every=0)
    for key in "aaab":
        sched.get(key)
    assert sched.uses == {"a": 3, "b": 1}
    assert "a" in sched.tiers["cpu"].items and "b" in sched.tiers["device"].items  # b pushed a down
    sched.get("a")  # a CPU hit goes back up; b (1 use) is the victim, not a (4)
    assert sched.uses["a"] == 4 and "a" in sched.tiers["device"].items and "b" in sched.tiers["cpu"].items
    sched.get("absent")
    assert "absent" not in sched.uses
    sched.forget("a")
    assert "a" not in sched.uses
    aged = MemScheduler(FakeView(sizes), device_capacity_bytes=10, cpu_capacity_bytes=0, lfu_halve_every=2)
    for key in "abcdef":
        aged.get(key)
    assert len(aged.uses) <= 2  # counts halved to zero are dropped: the table stays small
    with pytest.raises(kvmem.CubeError, match="lfu_halve_every"):
        MemScheduler(FakeView(sizes), lfu_halve_every=-1)


def test_demotion_and_oversized_items():
    view = FakeView({"huge": 100, "big": 50, "a": 10, "b": 10, "c": 10})
    sched = MemScheduler(view, device_capacity_bytes=20, cpu_capacity_bytes=60)
    sched.get("huge")  # fits no memory tier: served from disk, kept nowhere
    assert not any(t.items for t in sched.tiers.values())
    sched.get("big")  # too big for the device tier: lands in the CPU tier
    assert list(sched.tiers["cpu"].items) == ["big"] and not sched.tiers["device"].items
    for key in ("a", "b", "c"):  # c pushes a (LRU) out of the device tier, down into the CPU tier
        sched.get(key)
    assert list(sched.tiers["device"].items) == ["b", "c"] and "a" in sched.tiers["cpu"].items
    assert sched.stats()["demotions"] == 1
    assert sched.get("a").device == "cpu" and sched.stats()["hits_cpu"] == 1  # served, and moved up again
    assert "a" in sched.tiers["device"].items and "b" in sched.tiers["cpu"].items


def test_promotion_after_retrievals_and_prefetch():
    built = []
    view = FakeView({"hot": 10})
    sched = MemScheduler(view, promote_after=3, builder=lambda m: built.append(m) or FakeCube(10))
    assert [sched.retrieved("cold", has_cube=False) for _ in range(2)] == [False, False]
    assert sched.retrieved("cold", has_cube=False) and built == ["cold"]
    assert "cold" in sched.tiers["cpu"].items and sched.stats()["promotions"] == 1
    assert not sched.retrieved("hot", has_cube=True)  # already a cube: nothing to promote
    assert sched.prefetch(["hot", "missing"]) == 1 and sched.stats().get("hits_cpu", 0) == 0
    sched.get("hot")
    assert sched.stats()["hits_cpu"] == 1 and view.loads == 1

    bg = MemScheduler(view, promote_after=1, builder=lambda m: time.sleep(0.2) or FakeCube(5), background=True)
    assert bg.retrieved("x", has_cube=False)
    bg.drain()
    assert "x" in bg.tiers["cpu"].items
