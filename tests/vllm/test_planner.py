"""kvmem.integrations.serving without an engine: which cubes a request gets, their KV as the engine will receive
it, cache salts, refusals, and precompose. Tiny random llamas; runs in the main test stage (no vLLM needed)."""

from __future__ import annotations

import pytest
import torch

import kvmem
from helpers import random_ids, tiny_model
from kvmem.cubes.fingerprint import fingerprint_fields
from kvmem.integrations.serving import CubePlanner, CubeSource, Refused, composition_salt, precompose
from kvmem.model.rope import rope_facts

BLOCK = 16


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def cubes(model):
    anchor = random_ids(5, seed=1)
    a = kvmem.MemCube.from_ids(model, random_ids(27, seed=2), name="a", anchor_ids=anchor)   # 32 ids with anchor
    b = kvmem.MemCube.from_ids(model, random_ids(16, seed=3), name="b", anchor_ids=anchor)
    longer = kvmem.MemCube.from_ids(model, torch.cat([a.input_ids[0], random_ids(16, seed=4)]), name="longer",
                                    anchor_ids=anchor)                                          # a's ids, then 16
    return {"a": a, "b": b, "longer": longer, "anchor": anchor}


@pytest.fixture
def folder(tmp_path, cubes):
    for name in ("a", "b", "longer"):
        cubes[name].save(tmp_path / "default" / f"{name}.safetensors")
    cubes["a"].save(tmp_path / "other" / "private.safetensors")
    return tmp_path


def planner(model, folder, **kw):
    return CubePlanner(CubeSource(folder=str(folder)), fields=fingerprint_fields(model), dtype=torch.float32,
                       block_size=BLOCK, rope=rope_facts(model), **kw)


def ids_of(cubes, *names, query=7):
    ids = cubes[names[0]].all_ids[0].tolist()
    for n in names[1:]:
        ids += cubes[n].input_ids[0].tolist()
    return ids + random_ids(query, seed=9).tolist()


def test_one_named_cube_is_exact_and_block_aligned(model, folder, cubes):
    plan = planner(model, folder).plan(ids_of(cubes, "a"), {"kvmem": {"cubes": ["a"]}})
    assert plan.exact and plan.salt is None and plan.names == ("a",) and plan.num_tokens == 32
    for (k, v), (ck, cv) in zip(plan.kv, cubes["a"].kv):
        assert torch.equal(k, ck[:, :32]) and torch.equal(v, cv[:, :32])
    # the last prompt token always stays with the engine: a prompt of exactly the cube's ids loads one block less
    plan = planner(model, folder).plan(cubes["a"].all_ids[0].tolist(), {"kvmem": {"cubes": ["a"]}})
    assert plan.num_tokens == 16


def test_plain_request_gets_the_longest_exact_prefix_cube_of_its_namespace(model, folder, cubes):
    p = planner(model, folder)
    assert p.plan(ids_of(cubes, "longer")).names == ("longer",)
    assert p.plan(ids_of(cubes, "a")).names == ("a",)
    assert p.plan(random_ids(40, seed=5).tolist()) is None
    assert p.plan(ids_of(cubes, "longer"), {"kvmem": {"auto": False}}) is None
    # the other namespace's copy of a is not offered to default requests, and default's cubes not to 'other'
    q = planner(model, folder, namespaces=["default", "other"])
    assert q.plan(ids_of(cubes, "longer"), {"kvmem": {"namespace": "other"}}).names == ("private",)


def test_two_cubes_compose_like_kvmem_pure_splice(model, folder, cubes):
    plan = planner(model, folder).plan(ids_of(cubes, "a", "b"), {"kvmem": {"cubes": ["a", "b"]}})
    ref = kvmem.prefill(model, [cubes["a"], cubes["b"]], recompute="none")
    assert not plan.exact and plan.salt.startswith("kvmem-") and plan.num_tokens == 48
    for (k, v), layer in zip(plan.kv, ref.cache.layers):
        torch.testing.assert_close(k, layer.keys[0, :, :48], rtol=0, atol=1e-6)
        torch.testing.assert_close(v, layer.values[0, :, :48], rtol=0, atol=0)


def test_salts_keep_compositions_apart(model, folder, cubes):
    ab = planner(model, folder).plan(ids_of(cubes, "a", "b"), {"kvmem": {"cubes": ["a", "b"]}})
    again = planner(model, folder).plan(ids_of(cubes, "a", "b"), {"kvmem": {"cubes": ["a", "b"]}})
    user = planner(model, folder).plan(ids_of(cubes, "a", "b"), {"kvmem": {"cubes": ["a", "b"]}}, salt="tenant-1")
    assert ab.salt == again.salt  # the same composition may share its (salted) blocks
    assert user.salt not in (ab.salt, "tenant-1")
    assert composition_salt([cubes["a"], cubes["b"]], torch.float32) != composition_salt([cubes["a"], cubes["b"]],
                                                                                         torch.bfloat16)


def test_a_cast_is_an_approximation(model, folder, cubes):
    p = CubePlanner(CubeSource(folder=str(folder)), fields=fingerprint_fields(model), dtype=torch.bfloat16,
                    block_size=BLOCK, rope=rope_facts(model))
    plan = p.plan(ids_of(cubes, "a"), {"kvmem": {"cubes": ["a"]}})
    assert not plan.exact and plan.salt is not None and "cast from torch.float32" in plan.notes[0]
    assert plan.kv[0][0].dtype == torch.bfloat16
    assert p.plan(ids_of(cubes, "a")) is None  # never by automatic match


@pytest.mark.parametrize("params, prompt, why", [
    ({"kvmem": {"cubes": ["nope"]}}, "a", "no cube 'nope'"),
    ({"kvmem": {"cubes": ["b"]}}, "a", "does not start with the ids"),
    ({"kvmem": {"cubes": ["a"], "namespace": "other"}}, "a", "namespace 'other' is not served"),
    ({"kvmem": {"cubes": "../a"}}, "a", "cube name must be"),
    ({"kvmem": {"cube": ["a"]}}, "a", "unknown keys"),
    ({"kvmem": ["a"]}, "a", "must be an object"),
])
def test_refusals_say_why(model, folder, cubes, params, prompt, why):
    with pytest.raises(Refused, match=why):
        planner(model, folder).plan(ids_of(cubes, prompt), params)


def test_foreign_and_corrupt_cubes_are_refused(model, folder, cubes):
    other = tiny_model("llama", seed=1)  # same architecture, other weights
    kvmem.MemCube.from_ids(other, cubes["a"].input_ids, name="x", anchor_ids=cubes["anchor"]).save(
        folder / "default" / "foreign.safetensors")
    raw = bytearray((folder / "default" / "a.safetensors").read_bytes())
    raw[-10] ^= 0xFF
    (folder / "default" / "corrupt.safetensors").write_bytes(bytes(raw))
    p = planner(model, folder)
    with pytest.raises(kvmem.FingerprintMismatch, match="weights"):
        p.plan(ids_of(cubes, "a"), {"kvmem": {"cubes": ["foreign"]}})
    # damaged KV bytes are found when their layer is read (the loader, as the engine writes it): that read raises,
    # which the connector reports to vLLM as a load error; the layers before it are intact
    plan = p.plan(ids_of(cubes, "a"), {"kvmem": {"cubes": ["corrupt"]}})
    last = len(plan.kv) - 1
    assert all(torch.equal(plan.kv[i][0], cubes["a"].kv[i][0][:, :32]) for i in range(last))
    with pytest.raises(kvmem.CubeError, match=f"checksum mismatch of v.{last}"):
        plan.kv[last]
    # a damaged header or metadata is refused when the request is planned, before anything is loaded
    raw = bytearray((folder / "default" / "a.safetensors").read_bytes())
    at = raw.index(b'"num_tokens')
    raw[at + 1:at + 4] = b"NUM"
    (folder / "default" / "corrupt.safetensors").write_bytes(bytes(raw))
    with pytest.raises(kvmem.CubeError, match="checksum mismatch of its header"):
        p.plan(ids_of(cubes, "a"), {"kvmem": {"cubes": ["corrupt"]}})
    assert p.plan(ids_of(cubes, "longer")).names == ("longer",)  # automatic match skips both, keeps working


def test_precompose_is_kvmem_prefill_as_one_cube(model, folder, cubes, tmp_path):
    cube = precompose(model, [cubes["a"], cubes["b"]], recompute="leading", budget=4)
    ref = kvmem.prefill(model, [cubes["a"], cubes["b"]], recompute="leading", budget=4)
    assert torch.equal(cube.all_ids, ref.input_ids.cpu())
    for (k, v), layer in zip(cube.kv, ref.cache.layers):
        assert torch.equal(k, layer.keys[0]) and torch.equal(v, layer.values[0])
    cube.save(folder / "default" / "ab.safetensors")
    loaded = kvmem.MemCube.load(folder / "default" / "ab.safetensors")
    assert loaded.meta["composed_from"] == ["a", "b"] and loaded.meta["recompute"]["mode"] == "leading"
    p = planner(model, folder)
    plan = p.plan(ids_of(cubes, "a", "b"), {"kvmem": {"cubes": ["ab"]}})
    assert not plan.exact and plan.salt is not None and "precomposed" in plan.notes[0]
    assert p.plan(ids_of(cubes, "a", "b")).names == ("a",)  # an approximate cube is never matched automatically
    with pytest.raises(kvmem.CubeError, match="at least two"):
        precompose(model, [cubes["a"]])


def test_an_unreachable_store_refuses_requests_and_recovers(model, tmp_path, cubes):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    source = CubeSource(store=f"redis://127.0.0.1:{port}/0?cache={tmp_path / 'c'}")  # opening is lazy: no error yet
    p = CubePlanner(source, fields=fingerprint_fields(model), dtype=torch.float32, block_size=BLOCK)
    pytest.importorskip("redis")
    with pytest.raises(kvmem.CubeError, match="unreachable"):
        p.plan(ids_of(cubes, "a"), {"kvmem": {"cubes": ["a"]}})
    with pytest.raises(kvmem.CubeError, match="unreachable"):
        p.plan(ids_of(cubes, "a"))  # automatic matching too: the connector logs it and prefills normally
    source.location = str(tmp_path / "store")  # "back up": the next request opens the store again
    kvmem.CubeStore(source.location).view("default").put_cube("a", cubes["a"], text="a")
    assert p.plan(ids_of(cubes, "a"), {"kvmem": {"cubes": ["a"]}}).names == ("a",)
