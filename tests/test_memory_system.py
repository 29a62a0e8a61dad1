"""Memory that picks itself: the cube store (namespaces, concurrency, crashes), the index, the scheduler."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import kvmem
from conftest import random_ids, tiny_model
from kvmem.scheduler import MemScheduler


@pytest.fixture(scope="module")
def cube_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cube") / "c.safetensors"
    kvmem.MemCube.from_ids(tiny_model("llama"), random_ids(16), text="sixteen random tokens").save(path)
    return path


# ---------------------------------------------------------------- store
def test_store_round_trip_and_namespaces(tmp_path, cube_file):
    store = kvmem.CubeStore(tmp_path / "s")
    alice, bob = store.view("alice"), store.view("bob", shared=["public"])
    public = store.view("public")
    cube = kvmem.MemCube.load(cube_file)
    alice.add("secret", "Alice's PIN is 4417.")
    alice.put_cube("secret", cube, text="Alice's PIN is 4417.")
    bob.add("note", "Bob likes tea.")
    public.add("faq", "The office opens at nine.")

    assert alice.get("secret").kind == "memcube" and alice.load_cube("secret").fingerprint == cube.fingerprint
    # isolation at the store API: bob cannot see, load, list, search or delete alice's memory
    assert bob.get("secret") is None and bob.load_cube("secret") is None
    assert {r.id for r in bob.ls()} == {"note", "faq"} and bob.rm("secret") is False
    assert alice.get("secret") is not None
    index = kvmem.MemoryIndex.from_store(bob, dense=False)
    assert "secret" not in index and [m for m, _ in index.search("PIN 4417 Alice", k=5)] != ["secret"]
    assert all(m != "secret" for m, _ in index.search("PIN 4417 Alice", k=5))
    # shared namespaces are read-only through another view
    assert bob.get("faq").namespace == "public" and bob.rm("faq") is False and public.get("faq") is not None
    # same id in two namespaces: each view sees its own first
    bob.add("faq", "Bob's own faq.")
    assert bob.get("faq").text == "Bob's own faq." and public.get("faq").text == "The office opens at nine."
    assert alice.rm("secret") and alice.get("secret") is None
    assert not any((tmp_path / "s" / "cubes").glob("*.safetensors"))  # its cube file went with it


def test_store_rejects_bad_names(tmp_path):
    store = kvmem.CubeStore(tmp_path / "s")
    for bad in ("", "../x", "a/b", "x" * 200, None):
        with pytest.raises(kvmem.CubeError, match="namespace"):
            store.view(bad)
        with pytest.raises(kvmem.CubeError, match="memory id"):
            store.view("ok").add(bad, "text")
    with pytest.raises(kvmem.CubeError, match="non-empty"):
        store.view("ok").add("m", "   ")


def _writer(root, cube_file, worker, n):
    store = kvmem.CubeStore(root)
    view = store.view(f"w{worker % 2}")
    cube = kvmem.MemCube.load(cube_file)
    for i in range(n):
        view.add(f"m{worker}-{i}", f"memory {i} of worker {worker}")
        view.put_cube(f"m{worker}-{i}", cube)
        view.put_cube("shared-id", cube)  # everyone rewrites one id too: last writer wins, nothing torn


def test_concurrent_writers_lose_nothing(tmp_path, cube_file):
    root = tmp_path / "s"
    kvmem.CubeStore(root)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(root, cube_file, w, 6)) for w in range(4)]
    for p in procs:
        p.start()
    store = kvmem.CubeStore(root)
    reads = 0
    while any(p.is_alive() for p in procs):  # read while they write: never a partial or invalid cube
        for ns in ("w0", "w1"):
            for rec in store.view(ns).ls():
                if store.view(ns).load_cube(rec.id) is not None:
                    reads += 1
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    for ns, workers in (("w0", (0, 2)), ("w1", (1, 3))):
        ids = {r.id for r in store.view(ns).ls()}
        assert ids == {f"m{w}-{i}" for w in workers for i in range(6)} | {"shared-id"}
        for memory_id in ids:
            assert store.view(ns).load_cube(memory_id) is not None
    files = {p.name for p in (root / "cubes").glob("*.safetensors")}
    assert len(files) == len(store.catalog.paths()) == 2 * 13  # replaced versions were removed


def test_killed_writer_leaves_store_consistent(tmp_path, cube_file):
    root = tmp_path / "s"
    script = textwrap.dedent(f"""
        import kvmem
        view = kvmem.CubeStore({str(root)!r}).view("k")
        cube = kvmem.MemCube.load({str(cube_file)!r})
        i = 0
        while True:
            view.put_cube(f"m{{i % 5}}", cube, text=f"memory {{i}}")
            i += 1
            print(i, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for _ in range(8):  # wait until it is writing in earnest (imports take a while), then kill it mid-loop
        assert proc.stdout.readline(), "the writer died on its own"
    time.sleep(0.137)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = kvmem.CubeStore(root)
    recs = store.view("k").ls()
    assert recs, "the writer never got going"
    for rec in recs:
        assert store.view("k").load_cube(rec.id) is not None  # every row's file is whole and valid
    named = store.catalog.paths()
    for f in (root / "cubes").iterdir():  # anything else is an orphan or temp file that gc may remove
        os.utime(f, (0, 0))
    store.gc()
    assert {f"cubes/{f.name}" for f in (root / "cubes").iterdir()} == named


# ---------------------------------------------------------------- scheduler
class FakeCube:
    def __init__(self, nbytes, device="cpu"):
        self.nbytes, self.device = nbytes, device

    def to(self, device):
        return FakeCube(self.nbytes, str(device))


class FakeView:
    def __init__(self, sizes):
        self.sizes, self.loads = sizes, 0

    def load_cube(self, memory_id, device=None):
        if memory_id not in self.sizes:
            return None
        self.loads += 1
        return FakeCube(self.sizes[memory_id])


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_budgets_hold_under_random_trace(policy):
    rng = random.Random(0)
    sizes = {f"m{i}": rng.randint(1, 40) for i in range(60)}
    sched = MemScheduler(FakeView(sizes), device_budget_bytes=100, cpu_budget_bytes=250, policy=policy)
    for _ in range(3000):
        key = f"m{min(59, int(rng.paretovariate(1.2)) - 1)}" if rng.random() < 0.9 else "absent"
        cube = sched.get(key)
        assert (cube is None) == (key == "absent")
        for tier in sched.tiers.values():
            assert tier.used == sum(tier.sizes.values()) <= tier.budget
    stats = sched.stats()
    assert stats["hits_device"] > stats["hits_disk"] > 0 and stats["misses"] > 0
    assert abs(sum(stats[f"hit_rate_{t}"] for t in ("device", "cpu", "disk")) + stats["misses"] / 3000 - 1) < 1e-9


def test_lru_and_lfu_evict_what_they_should():
    sizes = {k: 10 for k in "abcd"}
    for policy, expected_gone in (("lru", "a"), ("lfu", "b")):
        sched = MemScheduler(FakeView(sizes), device_budget_bytes=30, cpu_budget_bytes=0, policy=policy)
        for key in "aaab":
            sched.get(key)
        sched.get("c")
        sched.get("a")  # a is now the most recent (LRU keeps it) and the most used (LFU keeps it)
        sched.get("b")
        sched.get("d")  # one must go
        gone = set("abcd") - set(sched.tiers["device"].items)
        assert gone == {"c"} if policy == "lru" else gone == {"c"}
    # a pure frequency/recency disagreement
    lru = MemScheduler(FakeView(sizes), device_budget_bytes=20, cpu_budget_bytes=0, policy="lru")
    lfu = MemScheduler(FakeView(sizes), device_budget_bytes=20, cpu_budget_bytes=0, policy="lfu")
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
        sched = MemScheduler(FakeView(sizes), device_budget_bytes=20, cpu_budget_bytes=0, policy="lfu",
                             lfu_halve_every=halve_every)
        for key in trace:
            sched.get(key)
        kept[halve_every] = set(sched.tiers["device"].items)
    assert kept[0] == {"a", "c"}  # counts that never fade: a, hot long ago, holds its slot for ever
    assert kept[4] == {"b", "c"}  # halved counts: the slot goes to what is requested now
    # one count per request, shared by the tiers: a demoted cube keeps its history, misses count nothing
    sched = MemScheduler(FakeView(sizes), device_budget_bytes=10, cpu_budget_bytes=20, policy="lfu",
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
    aged = MemScheduler(FakeView(sizes), device_budget_bytes=10, cpu_budget_bytes=0, lfu_halve_every=2)
    for key in "abcdef":
        aged.get(key)
    assert len(aged.uses) <= 2  # counts halved to zero are dropped: the table stays small
    with pytest.raises(kvmem.CubeError, match="lfu_halve_every"):
        MemScheduler(FakeView(sizes), lfu_halve_every=-1)


def test_demotion_and_oversized_items():
    view = FakeView({"huge": 100, "big": 50, "a": 10, "b": 10, "c": 10})
    sched = MemScheduler(view, device_budget_bytes=20, cpu_budget_bytes=60)
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


# ---------------------------------------------------------------- index and the wrapped model
CONVERSATION = [
    ("s1", "I finally adopted a beagle puppy last weekend, we named him Toast."),
    ("s2", "Work has been hectic; I switched teams and now build data pipelines."),
    ("s3", "We moved out of Lisbon. The new flat in Oslo has a view of the fjord."),
    ("s4", "My sister Lena is getting married in June in Porto."),
    ("s5", "I started learning the cello, lessons are on Tuesday evenings."),
    ("s6", "Doctor said my knee is fine, just no marathons this year."),
    ("s7", "The quarterly report is due on the 14th, my manager reminded me."),
    ("s8", "Dinner idea: mushroom risotto again, it is my favourite dish."),
]
QUESTIONS = [("What is my dog called?", "s1"), ("Which city do I live in now?", "s3"),
             ("When is my sister's wedding?", "s4"), ("What instrument am I learning?", "s5"),
             ("What do I do at work these days?", "s2"), ("What food do I like most?", "s8")]


@pytest.fixture(scope="module")
def hybrid_index():
    index = kvmem.MemoryIndex(dense=True, device="cpu")
    for memory_id, text in CONVERSATION:
        index.add(memory_id, text)
    return index


def test_hybrid_retrieval_finds_paraphrased_facts(hybrid_index):
    lexical = kvmem.MemoryIndex(dense=False)
    for memory_id, text in CONVERSATION:
        lexical.add(memory_id, text)
    recall = lambda index: sum(any(m == want for m, _ in index.search(q, k=2)) for q, want in QUESTIONS)  # noqa: E731
    assert recall(hybrid_index) == len(QUESTIONS)
    assert recall(hybrid_index) > recall(lexical)  # paraphrases ("dog" vs "beagle") need the dense side
    scores = hybrid_index.search("What is my dog called?", k=8)
    assert [s for _, s in scores] == sorted((s for _, s in scores), reverse=True)


def test_index_incremental_add_and_remove():
    index = kvmem.MemoryIndex(dense=False)
    index.add("a", "apples are red")
    assert index.search("apples")[0][0] == "a"
    index.add("b", "bananas are yellow")
    index.add("a", "apricots are orange")  # replaces
    assert index.search("apples")[0][1] == 0.0 and index.search("bananas")[0][0] == "b"
    assert index.remove("b") and not index.remove("b") and len(index) == 1
    with pytest.raises(kvmem.CubeError, match="k must"):
        index.search("x", k=0)


def test_index_scores_follow_the_documented_recipe(hybrid_index):
    """Default scoring = z-scored BM25 and best-sentence cosine mixed 0.1/0.9, recomputed here from the parts."""
    from kvmem.index import split_sentences

    index = kvmem.MemoryIndex(dense=True, device="cpu")
    texts = {"long": "Busy week, the printer at the office jammed twice. Also, our kitten Miso learned to open "
                     "doors! The weather was grey and the trains were late all week.",
             **dict(CONVERSATION)}
    for memory_id, text in texts.items():
        index.add(memory_id, text)
    q = "What is my cat called?"
    got = index.scores(q)
    encode = hybrid_index._encoder
    qv = encode([q])[0]
    best = torch.stack([(encode(split_sentences(t)) @ qv).max() for t in texts.values()])
    assert torch.allclose(got["dense"], best, atol=1e-5)
    whole = encode(list(texts.values())) @ qv
    assert got["dense"][0] > whole[0] + 0.05  # the fact's sentence scores above its diluted whole turn
    z = lambda s: (s - s.mean()) / s.std(correction=0)  # noqa: E731
    assert torch.allclose(got["fused"], 0.1 * z(got["lexical"]) + 0.9 * z(best), atol=1e-4)
    index.dense_unit = "memory"
    assert torch.allclose(index.scores(q)["dense"], whole, atol=1e-5)


def test_index_neighbor_bonus_follows_session_and_turn(hybrid_index):
    index = kvmem.MemoryIndex(dense=True, device="cpu")
    index._encoder = hybrid_index._encoder  # share the loaded model
    rows = [("a2", "We named him Toast.", "s1", 2), ("b1", "Congratulations on the new puppy!", "s1", 3),
            ("a1", "The bakery was closed today.", "s1", 1), ("c1", "I repainted the kitchen.", "s2", 4),
            ("d1", "My knee hurts after running.", None, None)]
    for memory_id, text, session, turn in rows:
        index.add(memory_id, text, {} if session is None else {"session": session, "turn": turn})
    q = "What did we call the puppy?"
    index.neighbor_weight = 0.0
    plain = index.scores(q)["fused"]
    index.neighbor_weight = 0.2
    bonus = index.scores(q)["fused"]
    f = dict(zip(index._ids, plain.tolist()))
    want = {"a1": max(0, f["a2"]), "a2": max(0, f["a1"], f["b1"]), "b1": max(0, f["a2"]), "c1": 0.0, "d1": 0.0}
    for i, memory_id in enumerate(index._ids):  # neighbours by turn order within a session, not insertion order
        assert bonus[i].item() == pytest.approx(f[memory_id] + 0.2 * want[memory_id], abs=1e-5), memory_id
    index.remove("a2")  # a1 and b1 become neighbours
    f = dict(zip(index._ids, _without_bonus(index, q).tolist()))
    got = dict(zip(index._ids, index.scores(q)["fused"].tolist()))
    assert got["a1"] == pytest.approx(f["a1"] + 0.2 * max(0, f["b1"]), abs=1e-5)


def _without_bonus(index, q):
    weight, index.neighbor_weight = index.neighbor_weight, 0.0
    try:
        return index.scores(q)["fused"]
    finally:
        index.neighbor_weight = weight


def test_index_remove_and_replace_keep_embeddings_aligned(hybrid_index):
    index = kvmem.MemoryIndex(dense=True, device="cpu")
    index._encoder = hybrid_index._encoder
    for memory_id, text in CONVERSATION:
        index.add(memory_id, text)
    index.search("warm up the embeddings")
    index.remove("s3")
    index.add("s1", "I bought a red bicycle. It has twelve gears.")  # replaced: re-embedded at the next search
    fresh = kvmem.MemoryIndex(dense=True, device="cpu")
    fresh._encoder = hybrid_index._encoder
    for memory_id in index._ids:
        fresh.add(memory_id, index._texts[index._ids.index(memory_id)])
    q = "What kind of bike do I ride?"
    assert torch.allclose(index.scores(q)["fused"], fresh.scores(q)["fused"], atol=1e-5)
    assert index.search(q, k=1)[0][0] == "s1"
    assert torch.allclose(index.memory_embeddings(), fresh.memory_embeddings(), atol=1e-6)


def _count_encodes(index):
    calls, encode = [], index._encoder.model.encode
    index._encoder.model.encode = lambda texts, **kw: (calls.append(list(texts)), encode(texts, **kw))[1]
    return calls


def test_index_embeddings_persist_in_the_store(tmp_path):
    import sqlite3

    view = kvmem.CubeStore(tmp_path / "s").view("me")
    for memory_id, text in CONVERSATION:
        view.add(memory_id, text)
    q = "Which city do I live in now?"
    first = kvmem.MemoryIndex.from_store(view, device="cpu")
    embedded = _count_encodes(first)
    want = first.scores(q)["fused"]
    assert (tmp_path / "s" / "embeddings.sqlite").is_file()
    assert len(first._encoder.cache) == len({t for batch in embedded[:-1] for t in batch}) > len(CONVERSATION)

    second = kvmem.MemoryIndex.from_store(view, device="cpu")  # a new process would do the same
    embedded = _count_encodes(second)
    assert torch.allclose(second.scores(q)["fused"], want, atol=1e-6)
    assert embedded == [[q]]  # only the query: every memory vector came from the cache

    from kvmem.embedding_cache import text_key
    with sqlite3.connect(tmp_path / "s" / "embeddings.sqlite") as db:  # a damaged row is recomputed, not trusted
        db.execute("UPDATE embeddings SET vec = x'0000' WHERE key = ?", (text_key(CONVERSATION[2][1]),))
    third = kvmem.MemoryIndex.from_store(view, device="cpu")
    embedded = _count_encodes(third)
    assert torch.allclose(third.scores(q)["fused"], want, atol=1e-6)
    assert embedded == [[CONVERSATION[2][1]], [q]]

    (tmp_path / "junk.sqlite").write_bytes(b"this is not a database" * 200)
    with pytest.raises(kvmem.CubeError, match="embedding cache .*junk.sqlite"):
        kvmem.MemoryIndex(dense=True, device="cpu", embedding_cache=tmp_path / "junk.sqlite")


@pytest.mark.parametrize("kwargs, match", [({"fusion": "max"}, "fusion must"), ({"dense_unit": "token"}, "dense_unit"),
                                           ({"alpha": 1.5}, "alpha must"), ({"neighbor_weight": -0.1}, "neighbor_weight"),
                                           ({"alpha": "0.5"}, "alpha must")])
def test_index_rejects_bad_settings(kwargs, match):
    with pytest.raises(kvmem.CubeError, match=match):
        kvmem.MemoryIndex(dense=False, **kwargs)


def test_index_rejects_bad_turn_meta():
    index = kvmem.MemoryIndex(dense=False)
    with pytest.raises(kvmem.CubeError, match="turn"):
        index.add("m", "text", {"session": "s", "turn": "third"})
    assert len(index) == 0


def test_generate_auto_picks_serves_and_promotes(tmp_path, tokenizer):
    model = tiny_model("llama")
    mm = kvmem.wrap(model, tokenizer).attach(kvmem.CubeStore(tmp_path / "s").view("me"),
                                             index=kvmem.MemoryIndex(dense=False), promote_after=2)
    for memory_id, text in CONVERSATION:
        mm.remember(text, memory_id)
    mm.remember("Toast the beagle sleeps in a basket by the door.", "s9", cube=True)
    out = mm.generate("Where does Toast the beagle sleep?", cubes="auto", budget_tokens=40, max_new_tokens=2)
    chosen = mm.last.memories
    assert chosen[0]["id"] == "s9" and chosen[0]["source"] in ("device", "cpu", "disk")
    assert sum(m["tokens"] for m in chosen) <= 40 and mm.last.injected
    first_ids = [m["id"] for m in chosen]
    ids = mm.prompt_ids("Where does Toast the beagle sleep?", [mm.scheduler.get(m) or mm.build_cube(
        mm.store.get(m).text, name=m) for m in first_ids])
    assert torch.equal(out[0, :ids.shape[1]], ids[0])  # the prompt really holds the chosen memories, in order
    mm.generate("Where does Toast the beagle sleep?", cubes="auto", budget_tokens=40, max_new_tokens=2)
    sources = {m["id"]: m["source"] for m in mm.last.memories}
    assert sources["s9"] == "device"  # second time from the fastest tier
    assert "promoted" in sources.values()  # plaintext memories retrieved twice became cubes
    assert any(r.kind == "memcube" and r.id != "s9" for r in mm.store.ls())
    with pytest.raises(kvmem.CubeError, match="no store"):
        kvmem.wrap(model, tokenizer).generate("x", cubes="auto")
    n = len(mm.store.ls())
    with pytest.raises(kvmem.CubeError, match=r"meta\['turn'\]"):
        mm.remember("A memory with a bad turn.", "bad", meta={"session": "s", "turn": "3rd"})
    assert len(mm.store.ls()) == n and mm.store.get("bad") is None and "bad" not in mm.index


def test_generate_auto_prefetches_the_other_top_hits(tmp_path, tokenizer):
    mm = kvmem.wrap(tiny_model("llama"), tokenizer).attach(kvmem.CubeStore(tmp_path / "s").view("me"),
                                                            index=kvmem.MemoryIndex(dense=False), promote_after=0)
    mm.remember("Toast the beagle sleeps in a basket.", "a", cube=True)
    mm.remember("Toast the beagle eats salmon biscuits.", "b", cube=True)
    mm.scheduler.forget("a"), mm.scheduler.forget("b")
    budget = mm.store.get("a").tokens  # room for one of the two
    mm.generate("Where does Toast the beagle sleep?", cubes="auto", budget_tokens=budget, max_new_tokens=1)
    assert [m["id"] for m in mm.last.memories] == ["a"] and mm.last.memories[0]["source"] == "disk"
    assert "b" in mm.scheduler.tiers["cpu"].items and mm.scheduler.stats()["prefetched"] == 1
