"""EvolvePolicy end to end on a tiny model with a fake clock: hot, stable memories are distilled into an adapter,
an edit makes the adapter stale (never used again) and is left out of the next one, a delete too, cold cubes are
demoted to text, and every move shows in stats()."""

from __future__ import annotations

import time

import pytest

import kvmem
from helpers import tiny_model

pytest.importorskip("peft")

FAST = dict(steps=2, rank=2, questions_per_memory=2, max_answer_tokens=3, keep_prompts=(), progress=False)


class Clock:
    """Wall time plus a skew the test advances (the store stamps uses with the real time)."""

    def __init__(self):
        self.skew = 0.0

    def __call__(self) -> float:
        return time.time() + self.skew


def _moves(moves, kind):
    return [m for m in moves if m["move"] == kind]


def test_policy_moves_memory_between_kinds(tok, tmp_path):
    from kvmem.prompt import ChatLayout

    model = tiny_model("llama")
    view = kvmem.CubeStore(tmp_path / "s").view("alice")
    view.add("m0", "Alice Moreau lives in Tallinn.")
    view.add("m1", "Bruno Okafor keeps bees in Ghent.")
    cube = kvmem.MemCube.from_text(model, tok, "Chiara Rossi sails on Sundays.", anchor=ChatLayout(tok).anchor)
    view.put_cube("m2", cube)
    scheduler = kvmem.MemScheduler(view)
    scheduler.fetch("alice/m2")
    assert scheduler.holds("alice/m2")
    clock = Clock()
    policy = kvmem.EvolvePolicy(view, scheduler, model, tok, hot_uses=2, stable_s=100, cold_s=10_000,
                                distill_options=FAST, clock=clock)

    assert policy.step() == [] and policy.route(["alice/m0"]).adapter is None  # nothing hot yet
    for _ in range(2):
        view.touch("m0"), view.touch("m1")
    assert _moves(policy.step(), "distill") == []  # hot, but not yet stable for 100 s
    clock.skew += 150
    [move] = _moves(policy.step(), "distill")
    assert move["memories"] == ["alice/m0", "alice/m1"] and (tmp_path / "s" / "adapters").is_dir()
    route = policy.route(["alice/m0", "alice/m2"])
    assert route.adapter is policy.adapter and route.inject == ["alice/m2"] and route.learned == ["alice/m0"]
    loaded = kvmem.AdapterCube.load(move["adapter"])
    assert [e["memory"] for e in loaded.meta["derived_from"]] == ["alice/m0", "alice/m1"]
    mm = kvmem.wrap(model, tok)  # the policy's adapter is one mm.generate uses
    mm.generate("Where does Alice live?", adapter=route.adapter, max_new_tokens=2)
    assert policy.step() == []  # nothing changed: no move

    view.add("m0", "Alice Moreau moved to Porto.")  # an edit: the adapter learned the old text
    assert policy.route(["alice/m1"]).adapter is None  # stale at once, before any step
    moves = policy.step()
    assert [m["memory"] for m in _moves(moves, "changed")] == ["alice/m0"]
    assert [(m["memory"], m["reason"]) for m in _moves(moves, "adapter_stale")] == [("alice/m0", "edited")]
    [again] = _moves(moves, "distill")
    assert again["memories"] == ["alice/m1"]  # the changing memory keeps its text / cube path
    route = policy.route(["alice/m0", "alice/m1"])
    assert route.adapter is not None and route.inject == ["alice/m0"]
    clock.skew += 150  # the edited memory is stable again (and still hot: hits survive an edit)
    [relearn] = _moves(policy.step(), "distill")
    assert relearn["memories"] == ["alice/m0", "alice/m1"]

    view.rm("m1")  # a delete: the adapter that learned it is never used again, for any request
    assert policy.route(["alice/m0"]).adapter is None
    moves = policy.step()
    assert [(m["memory"], m["reason"]) for m in _moves(moves, "adapter_stale")] == [("alice/m1", "deleted")]
    assert _moves(moves, "distill")[0]["memories"] == ["alice/m0"]

    clock.skew += 20_000  # everything goes cold: the cube of m2 is demoted to text, nothing is distilled
    moves = policy.step()
    assert [m["memory"] for m in _moves(moves, "demote")] == ["alice/m2"] and not _moves(moves, "distill")
    rec = view.get("m2")
    assert rec.kind == "text" and rec.text == "Chiara Rossi sails on Sundays." and not scheduler.holds("alice/m2")

    stats = policy.stats()
    assert (stats["distill"], stats["changed"], stats["adapter_stale"], stats["demote"]) == (4, 1, 2, 1)
    assert stats["learned"] == ["alice/m0"] and not stats["adapter_is_stale"]
    assert [m["move"] for m in stats["moves"]].count("distill") == 4


def test_background_thread_runs_steps(tok, tmp_path):
    view = kvmem.CubeStore(tmp_path / "s").view("bob")
    view.add("m0", "Dmitri Haddad plays chess in Cork.")
    view.touch("m0")
    policy = kvmem.EvolvePolicy(view, None, tiny_model("llama"), tok, hot_uses=1, stable_s=0, cold_s=None,
                                distill_options=FAST).start(interval_s=0.01)
    try:
        deadline = time.time() + 60
        while policy.stats()["distill"] == 0 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        policy.stop()
    assert policy.stats()["distill"] >= 1 and policy.stats()["errors"] == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(hot_uses=0), "hot_uses"), (dict(stable_s=-1), "stable_s"), (dict(cold_s="x"), "cold_s"),
    (dict(min_new=True), "min_new"),
])
def test_bad_options(tok, tmp_path, kwargs, match):
    view = kvmem.CubeStore(tmp_path / "s").view("bob")
    with pytest.raises(kvmem.CubeError, match=match):
        kvmem.EvolvePolicy(view, None, None, tok, **kwargs)
