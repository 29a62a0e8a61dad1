"""KvmemConnector behind vLLM's OpenAI server, two servers sharing one Redis store: cubes named in the request
body, a cube added through one machine served by the other, bad cubes answered as if without kvmem (and logged).

Each server keeps the blobs it reads in its own local folder; Redis (Debian's redis-server) holds the catalog and
the bytes. Both servers start at once and serve the whole module.
"""

from __future__ import annotations

import shutil
import uuid

import pytest

pytest.importorskip("vllm.config", reason="vLLM is not installed here (it runs in .venv-vllm; see .ci/run)")
pytest.importorskip("redis", reason="the redis client is not installed (pip install 'kvmem[redis]')")
if shutil.which("redis-server") is None:
    pytest.skip("redis-server is not installed (apt-get install redis-server); CI installs it", allow_module_level=True)
pytestmark = pytest.mark.vllm

import kvmem  # noqa: E402
from test_store_redis import redis_server  # noqa: E402
from vllm_helpers import Server, corrupt_bytes  # noqa: E402


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def machine(redis_url, tmp_path_factory, name: str) -> str:
    """The store URL as machine ``name`` opens it: one shared Redis, its own local folder of blob copies."""
    return f"{redis_url}?prefix=serve&cache={tmp_path_factory.getbasetemp() / ('machine-' + name)}"


@pytest.fixture(scope="module")
def store(redis_url, tmp_path_factory, memory):
    """The shared store as a writer machine sees it: default/{a, corrupt, foreign} (corrupt's bytes in Redis
    damaged after the put)."""
    store = kvmem.CubeStore(machine(redis_url, tmp_path_factory, "writer"))
    view = store.view("default")
    view.put_cube("a", memory["a"], text="memory a")
    rec = view.put_cube("corrupt", memory["a"], text="memory a, damaged in Redis")
    key = store.blobs.db.key("blob", rec.blob)
    store.blobs.db.client.set(key, corrupt_bytes(store.blobs.db.client.get(key)))
    view.put_cube("foreign", memory["foreign"], text="memory a, built by another model")
    return store


@pytest.fixture(scope="module")
def servers(ckpt, redis_url, tmp_path_factory, store):
    logs = tmp_path_factory.mktemp("server-logs")
    started = [Server(ckpt, {"store": machine(redis_url, tmp_path_factory, name), "auto": False}, logs / f"{name}.log")
               for name in ("one", "two")]
    try:
        yield [s.wait_ready() for s in started]
    finally:
        for s in started:
            s.stop()


def ask(server, ids, cubes=None, *, salt=True):
    """(text, cached prompt tokens) of one completion; ``salt``: a fresh cache salt (no prefix cache reuse)."""
    body = {"prompt": list(ids)}
    if cubes is not None:
        body["kv_transfer_params"] = {"kvmem": {"cubes": cubes}}
    if salt:
        body["cache_salt"] = uuid.uuid4().hex
    out = server.complete(body)
    details = (out.get("usage") or {}).get("prompt_tokens_details") or {}
    return out["choices"][0]["text"], details.get("cached_tokens") or 0


_FULL: dict = {}


def full_answer(server, ids):
    """The server's answer without kvmem (no cubes, a fresh salt), asked once per server and prompt."""
    key = (server.port, tuple(ids))
    if key not in _FULL:
        _FULL[key] = ask(server, ids)
        assert _FULL[key][1] == 0
    return _FULL[key]


def prompt(memory):
    return memory["a"].all_ids[0].tolist() + memory["query"]


def test_cube_named_in_the_request_body(servers, memory):
    one, _ = servers
    full, _ = full_answer(one, prompt(memory))
    got, cached = ask(one, prompt(memory), ["a"])
    assert cached == 256
    assert got == full
    assert "gets ['a'] from namespace 'default': 256 tokens" in one.text()


def test_a_cube_added_through_one_machine_is_served_by_the_other(servers, memory, hf, redis_url, tmp_path_factory):
    one, two = servers
    model, tok = hf
    a, b = memory["a"], memory["b"]
    ids = a.all_ids[0].tolist() + b.input_ids[0].tolist() + memory["query"]
    full, _ = full_answer(two, ids)
    got, cached = ask(two, ids, ["late"])
    assert cached == 0 and got == full  # not there yet
    # after both servers started, machine "one" (server one's folder) adds an exact cube of anchor + a + b
    late = kvmem.MemCube.from_ids(model, a.input_ids[0].tolist() + b.input_ids[0].tolist(), name="late",
                                  anchor_ids=a.anchor_ids, tokenizer=tok)
    rec = kvmem.CubeStore(machine(redis_url, tmp_path_factory, "one")).view("default").put_cube("late", late,
                                                                                                 text="late")
    got, cached = ask(two, ids, ["late"])
    assert cached == 384 and got == full
    assert (tmp_path_factory.getbasetemp() / "machine-two" / f"{rec.blob}.safetensors").is_file()
    got, cached = ask(one, ids, ["late"])
    assert cached == 384 and got == full


@pytest.mark.parametrize("name, why", [("corrupt", "checksum mismatch"), ("foreign", "weights"),
                                       ("missing", "no cube 'missing'")])
def test_bad_cube_answers_as_without_kvmem_and_logs_why(servers, memory, name, why):
    one, two = servers
    for server in (one, two):
        full, _ = full_answer(server, prompt(memory))
        got, cached = ask(server, prompt(memory), [name])
        assert cached == 0 and got == full
        assert "prefilled without cubes" in server.text() and why in server.text()
