"""KvmemConnector behind vLLM's OpenAI server, two servers sharing one Redis store: cubes named in the request
body, a cube added through one machine served by the other, bad cubes answered as if without kvmem (and logged),
namespaces that never share prefix-cache blocks (a seeded fuzz), and a cube saved by one server served by the other.

Each server keeps the blobs it reads in its own local folder; Redis (Debian's redis-server) holds the catalog and
the bytes. Both servers start at once and serve the whole module.
"""

from __future__ import annotations

import os
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
from vllm_helpers import NOTES, Server, corrupt_bytes  # noqa: E402


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
    # both replicas read one salt secret from the environment, as a fleet behind a prefix-aware router would
    extra = {"auto": False, "namespaces": ["default", *TENANTS], "salt_secret": "env:KVMEM_TEST_SALT"}
    # server two also keeps every prompt of >= 384 tokens as a cube, within room for two of them (autosave)
    # (each cube's key blocks, set in Redis beside it, count too: without them room for three)
    autosave = {"one": {}, "two": {"autosave_tokens": 384, "autosave_bytes": int(2.5 * AUTO_STORED_BYTES)}}
    # server two binds its forward pass to the first CPU only, leaving the rest to other work (as vLLM's own
    # binding does on a machine with cores to spare): its connector's threads run there (loader_cpus)
    first = str(min(os.sched_getaffinity(0)))
    bind = {"one": {}, "two": {"VLLM_CPU_OMP_THREADS_BIND": first}}
    started = [Server(ckpt, {**extra, **autosave[name], "store": machine(redis_url, tmp_path_factory, name)},
                      logs / f"{name}.log", role="kv_both",
                      env={"KVMEM_TEST_SALT": "a-test-secret-" + "0" * 20, **bind[name]})
               for name in ("one", "two")]
    try:
        yield [s.wait_ready() for s in started]
    finally:
        for s in started:
            s.stop()


TENANTS = ("t0", "t1", "t2", "t3")
AUTO_CUBE_BYTES = 384 * 30 * 2 * 3 * 64 * 4  # a 384-token SmolLM2-135M cube in float32: tokens x layers x K,V x H x D
AUTO_STORED_BYTES = AUTO_CUBE_BYTES * 3 // 2  # and its key blocks (the keys again, 3 whole blocks of 128)


def ask(server, ids, cubes=None, *, salt=True, kvmem_params=None):
    """(text, cached prompt tokens) of one completion; ``salt``: True for a fresh cache salt (no prefix cache
    reuse), a string for that salt, False for none; ``kvmem_params``: more of kv_transfer_params["kvmem"]."""
    body = {"prompt": list(ids)}
    spec = dict(kvmem_params or {}, **({"cubes": cubes} if cubes is not None else {}))
    if spec:
        body["kv_transfer_params"] = {"kvmem": spec}
    if salt:
        body["cache_salt"] = uuid.uuid4().hex if salt is True else salt
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
    import time

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
    # read from Redis; server two's local copy is fetched once the request is done (not during its forward pass)
    copy, deadline = tmp_path_factory.getbasetemp() / "machine-two" / f"{rec.blob}.safetensors", time.time() + 60
    while not copy.is_file():
        assert time.time() < deadline, two.text()[-3000:]
        time.sleep(0.2)
    got, cached = ask(one, ids, ["late"])
    assert cached == 384 and got == full


@pytest.mark.parametrize("name, why", [("corrupt", "checksum mismatch"), ("foreign", "weights"),
                                       ("missing", "no cube 'missing'")])
def test_bad_cube_answers_as_without_kvmem_and_logs_why(servers, memory, name, why):
    one, two = servers
    for server in (one, two):
        full, _ = full_answer(server, prompt(memory))
        got, cached = ask(server, prompt(memory), [name])
        assert got == full
        assert "prefilled without cubes" in server.text() and why in server.text()
        if name == "corrupt":  # its header is intact: the damaged KV is found as its layer is read, and recomputed
            assert "reported to vLLM as load errors" in server.text()
        else:  # refused when the request arrives
            assert cached == 0


def test_a_namespace_never_hits_another_namespace_cached_memory(servers, memory):
    one, _ = servers
    # namespace t0's memory (no cube: the prompt itself, cached by vLLM); t1 sends the very same ids
    ids = memory["a"].all_ids[0].tolist() + memory["b"].input_ids[0].tolist() + memory["query"] + [13]
    full, _ = full_answer(one, ids)
    t0 = {"namespace": "t0"}
    assert ask(one, ids, salt=False, kvmem_params=t0) == (full, 0)
    assert ask(one, ids, salt=False, kvmem_params=t0) == (full, 384)  # t0's repeat hits its own blocks
    assert ask(one, ids, salt=False, kvmem_params={"namespace": "t1"}) == (full, 0)  # t1: a full prefill
    assert ask(one, ids, salt=False, kvmem_params={"namespace": "t1"}) == (full, 384)
    # a client's own cache_salt cannot reach another namespace's partition either
    assert ask(one, ids, salt="guess", kvmem_params={"namespace": "t2"}) == (full, 0)
    assert ask(one, ids, salt="guess", kvmem_params={"namespace": "t3"}) == (full, 0)
    assert "prefix-cache blocks keyed by namespace (salt secret: $KVMEM_TEST_SALT)" in one.text()


def lcp(x, y) -> int:
    n = 0
    for a, b in zip(x, y):
        if a != b:
            break
        n += 1
    return n


def test_fuzz_interleaved_namespaces_share_only_within_themselves(servers, hf):
    """Seeded: 4 namespaces (two client salts each) send prompts that share 1-3 blocks of one text, in random
    order. Every request's cached tokens must be exactly what the earlier requests of its own namespace and salt
    left in the prefix cache: 0 cross-namespace hits, and hits within a namespace still happen."""
    import random

    one, _ = servers
    _, tok = hf
    rng = random.Random(24)
    text = tok(NOTES.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    block = 128
    seen: list[tuple[str, str | None, list[int]]] = []
    cross_chances = own_hits = 0
    for _ in range(20):
        ns, salt = rng.choice(TENANTS), rng.choice([None, "client-salt"])
        blocks = rng.randint(1, 3)
        # a tail of 5-60 random ids keeps the prompt and its 10 answer tokens inside the last, partial block
        ids = text[:blocks * block] + [rng.randrange(1000, 40000) for _ in range(rng.randint(5, 60))]

        def cacheable(prev):  # what an earlier prompt can give this one: its full blocks that this prompt starts with
            return min(lcp(ids, prev), len(prev) // block * block, len(ids) - 1) // block * block

        expected = max([cacheable(p) for n, s, p in seen if (n, s) == (ns, salt)], default=0)
        other = max([cacheable(p) for n, s, p in seen if (n, s) != (ns, salt)], default=0)
        cross_chances += other > expected
        own_hits += expected > 0
        _, cached = ask(one, ids, salt=salt or False, kvmem_params={"namespace": ns})
        assert cached == expected, f"namespace {ns}, salt {salt}: {cached} cached tokens, expected {expected}"
        seen.append((ns, salt, ids))
    assert cross_chances >= 5 and own_hits >= 3  # the fuzz did test both: others' blocks there, and its own


def test_a_cube_saved_by_one_server_is_served_by_the_other(servers, memory, redis_url, tmp_path_factory):
    import time

    import redis

    one, two = servers
    a = memory["a"]
    ids = prompt(memory)
    full, _ = full_answer(two, prompt(memory))
    got, _ = ask(one, ids, kvmem_params={"save": "from-vllm", "tokens": 256, "anchor": a.anchor_len})
    assert got == full
    deadline = time.time() + 120
    while True:  # the cube is written off the request's path: served once Redis holds it
        got, cached = ask(two, ids, ["from-vllm"])
        if cached or time.time() > deadline:
            break
        time.sleep(1)
    assert cached == 256 and got == full
    while "saved cube 'from-vllm' (256 tokens" not in one.text():  # logged once its key blocks are stored too
        assert time.time() < deadline, one.text()[-2000:]
        time.sleep(0.5)
    # its key blocks too (float32 on vLLM CPU keeps keys as columns), beside its blob in Redis: a replica reading
    # the cube from Redis reads them into its blocks (tests/test_key_blocks.py)
    reader = kvmem.CubeStore(machine(redis_url, tmp_path_factory, "reader"))
    blob = reader.view("default").get("from-vllm").blob
    assert redis.Redis.from_url(redis_url).strlen(reader.blobs.db.key("keyblocks", blob)) > 0


def metrics(server) -> dict[str, float]:
    """vLLM's /metrics as {sample line without its value: value}, kvmem's samples only."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=60) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("vllm:kvmem_"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def sample(found: dict[str, float], name: str, label: str = "") -> float:
    """The sum of ``name``'s samples whose labels include ``label`` (e.g. 'kind="exact"')."""
    return sum(v for k, v in found.items() if k.split("{")[0] == name and label in k)


def test_kvmem_counters_are_in_vllm_prometheus_metrics(servers, memory):
    import time

    one, _ = servers
    ask(one, prompt(memory), ["a"])         # one more exact cube, one more refusal, then let vLLM log its stats
    ask(one, prompt(memory), ["missing"])
    deadline = time.time() + 60
    while True:
        found = metrics(one)
        if sample(found, "vllm:kvmem_refusals_total", 'reason="missing"') >= 1 or time.time() > deadline:
            break
        time.sleep(2)
    assert sample(found, "vllm:kvmem_cubes_served_total", 'kind="exact"') >= 2
    for reason in ("corrupt", "foreign_model", "missing"):
        assert sample(found, "vllm:kvmem_refusals_total", f'reason="{reason}"') >= 1, (reason, found)
    assert sample(found, "vllm:kvmem_cube_loads_total") >= 2
    assert sample(found, "vllm:kvmem_cube_bytes_read_total") >= 2 * memory["a"].nbytes
    assert sample(found, "vllm:kvmem_cubes_saved_total", 'result="saved"') == 1
    assert sample(found, "vllm:kvmem_salted_namespaces") == 5  # default, t0..t3
    assert sample(found, "vllm:kvmem_salted_requests_total") >= 30


def test_autosave_keeps_long_prompts_and_evicts_the_oldest(servers, hf, redis_url, tmp_path_factory):
    import time

    import torch
    import xxhash

    _, two = servers
    _, tok = hf
    text = tok(NOTES.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    prompts = [text[i * 50:i * 50 + 384] + [13, 42 + i] for i in range(3)]  # 3 different 3-block prompts + a tail
    names = ["auto-" + xxhash.xxh3_64(torch.tensor(p[:384], dtype=torch.int64).numpy().tobytes()).hexdigest()
             for p in prompts]
    for ids, name in zip(prompts, names):
        ask(two, ids, kvmem_params={"namespace": "t3"})
        deadline = time.time() + 120
        while f"saved cube '{name}'" not in two.text():  # in order: the first saved is the first evicted
            assert time.time() < deadline, two.text()[-2000:]
            time.sleep(0.5)
    view = kvmem.CubeStore(machine(redis_url, tmp_path_factory, "reader")).view("t3")
    kept = sorted(r.id for r in view.ls(kind="memcube"))
    assert kept == sorted(names[1:])  # room for two: the first prompt's cube was deleted
    assert f"auto-saved cube t3/{names[0]} deleted" in two.text()
    # the last prompt's cube is what vLLM computes for those blocks: served exact, the same answer
    got, cached = ask(two, prompts[-1], [names[-1]], kvmem_params={"namespace": "t3"})
    assert cached == 384 and got == full_answer(two, prompts[-1])[0]


def test_the_loader_runs_on_the_cores_no_forward_thread_is_bound_to(servers, memory):
    """vLLM binds its CPU worker's OpenMP threads to cores, the worker's main thread to the first, and a thread
    started from it inherits that one core; the connector's loading threads run instead on the worker's cores that
    no forward thread is bound to (kvmem.integrations.cpu_affinity), and stay beside the forward pass where none is
    spare: read off the worker's threads in /proc, against the binding vLLM itself logs."""
    import re
    from pathlib import Path

    from kvmem.integrations.cpu_affinity import parse_cpu_list

    machine_cpus = set(os.sched_getaffinity(0))  # what the servers inherit
    for server in servers:
        ask(server, prompt(memory), ["a"])  # a cube load: the loader and reader threads exist
        text = server.text()
        bound = re.search(r"local_rank=0, core ids=\[([\d, ]+)\]", text)  # vLLM's own log of its binding
        assert bound is not None, text[-3000:]
        omp = parse_cpu_list(bound[1])
        lines = [line for line in text.splitlines() if "kvmem: cube loads and saves run" in line]
        assert len(lines) == 1 and lines[0].startswith("(Worker pid="), lines
        pid = int(lines[0].split("pid=")[1].split(")")[0])
        masks = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            line = next(x for x in (task / "status").read_text().splitlines() if x.startswith("Cpus_allowed_list"))
            masks.append(parse_cpu_list(line.split(":", 1)[1]))
        spare = machine_cpus - omp
        if not spare:  # every CPU runs the forward pass: the loader stays beside its first thread
            assert f"its OpenMP threads take CPUs {','.join(map(str, sorted(omp)))}, no other is spare" in lines[0]
            assert all(len(m) == 1 for m in masks), masks
            continue
        said = re.search(r"run on CPUs ([\d,]+) \(the forward pass's OpenMP threads: CPUs ([\d,]+)\)", lines[0])
        assert said is not None, lines[0]
        assert parse_cpu_list(said[1]) == spare and parse_cpu_list(said[2]) == omp
        # the worker's own threads (its main thread, gloo's) sit on single forward cores; kvmem's on the spare ones
        assert masks.count(spare) >= 2, (spare, omp, masks)
