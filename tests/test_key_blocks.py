"""A cube's keys in the paged cache's block layout (kvmem.integrations.key_blocks): read straight into the blocks,
the same bytes the backend's op writes; a sidecar of another cube version, block size or a damaged one never
serves its keys."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch

import kvmem
from helpers import random_ids, tiny_model
from kvmem.cubes.cubefile import CubeFile
from kvmem.integrations.key_blocks import key_blocks_path, open_key_blocks, write_key_blocks
from kvmem.integrations.serving import FileKV
from kvmem.integrations.vllm_pages import BlockPlacement, LayerWriter, Load
from test_cubefile import CpuLikeLayer


@pytest.fixture(scope="module")
def cube():
    model = tiny_model("llama")
    return kvmem.MemCube.from_ids(model, random_ids(40, seed=2), name="a", anchor_ids=random_ids(3, seed=1))


@pytest.fixture
def path(tmp_path, cube):
    cube.save(tmp_path / "a.safetensors")
    return tmp_path / "a.safetensors"


def _load(f, blocks_file, window, first, *, block_ids=(6, 1, 4, 2), readers=1):
    """Load cube window ``window`` at slot offset ``first`` into fresh CPU-like layers; (layers, slots, errors)."""
    heads, _, dim = f.kv_shapes[0][0]
    lo, hi = window
    n = hi - lo
    blocks = list(block_ids[:-(-(first + n) // 16)])
    slots = torch.tensor([blocks[(first + p) // 16] * 16 + (first + p) % 16 for p in range(n)])
    layers = [(i, f"model.layers.{i}.attn", CpuLikeLayer(heads, dim)) for i in range(f.num_layers)]
    writer = LayerWriter(block_size=16, readers=readers)
    total = f.anchor_len + f.num_tokens
    writer.start([Load("r1", FileKV(f, 0, total, key_blocks=blocks_file).window(lo, hi), slots, blocks)], layers)
    errors = writer.finish()
    reasons = list(writer.reasons)
    writer.close()
    return layers, slots, errors, reasons


@pytest.mark.parametrize("readers", [1, 2])
@pytest.mark.parametrize("window, first", [((0, 43), 0), ((16, 43), 0), ((0, 32), 0), ((16, 32), 0), ((3, 35), 3)])
def test_key_blocks_land_as_the_op_writes_them(cube, path, window, first, readers, monkeypatch):
    """Keys read from the sidecar straight into the blocks are the op's bytes to the bit, for windows that are
    whole blocks, end inside one (the cube's last, padded block) or start inside one; the sidecar is read."""
    write_key_blocks(path, block_size=16)
    f = CubeFile.open(path)
    blocks_file = open_key_blocks(f, 16)
    assert blocks_file is not None and blocks_file.block_size == 16
    used = []
    real = BlockPlacement.read_key_blocks
    monkeypatch.setattr(BlockPlacement, "read_key_blocks", lambda self, *a, **k: (used.append(a[1]), real(self, *a, **k)))
    lo, hi = window
    layers, slots, errors, _ = _load(f, blocks_file, window, first, readers=readers)
    assert errors == set()
    for i, _, layer in layers:
        want = CpuLikeLayer(*cube.kv_shapes[0][0][::2])
        want.do_kv_cache_update(want, cube.kv[i][0][:, lo:hi].transpose(0, 1), cube.kv[i][1][:, lo:hi].transpose(0, 1),
                                want.kv_cache, slots)
        assert torch.equal(layer.kv_cache, want.kv_cache)
    assert sorted(used) == sorted(f"kb.{i}" for i in range(f.num_layers))


def test_a_window_off_the_block_grid_is_copied_not_read_into_blocks(cube, path, monkeypatch):
    write_key_blocks(path, block_size=16)
    f = CubeFile.open(path)
    monkeypatch.setattr(BlockPlacement, "read_key_blocks", lambda *a, **k: pytest.fail("must not be used"))
    layers, slots, errors, _ = _load(f, open_key_blocks(f, 16), (3, 35), 0)
    assert errors == set()
    want = CpuLikeLayer(*cube.kv_shapes[0][0][::2])
    want.do_kv_cache_update(want, cube.kv[0][0][:, 3:35].transpose(0, 1), cube.kv[0][1][:, 3:35].transpose(0, 1),
                            want.kv_cache, slots)
    assert torch.equal(layers[0][2].kv_cache, want.kv_cache)


@pytest.mark.parametrize("readers", [1, 2])
def test_a_damaged_sidecar_layer_is_a_load_error(cube, path, readers):
    """Keys land before their checksum is known: damaged ones make the request's blocks load errors."""
    side = write_key_blocks(path, block_size=16)
    raw = bytearray(side.read_bytes())
    raw[-3] ^= 0x10  # in the last tensor the file holds
    side.write_bytes(bytes(raw))
    f = CubeFile.open(path)
    _, _, errors, reasons = _load(f, open_key_blocks(f, 16), (0, 32), 0, readers=readers)
    assert errors == {6, 1}
    assert reasons and "checksum mismatch of kb." in reasons[0]


def test_a_sidecar_of_another_cube_or_block_size_is_not_used(cube, path, tmp_path):
    write_key_blocks(path, block_size=16)
    f = CubeFile.open(path)
    assert open_key_blocks(f, 32) is None  # no sidecar for blocks of 32
    other = kvmem.MemCube.from_ids(tiny_model("llama"), random_ids(40, seed=9), name="a",
                                   anchor_ids=random_ids(3, seed=1))
    other.save(path)  # the cube replaced: the old sidecar is stale
    assert open_key_blocks(CubeFile.open(path), 16) is None
    key_blocks_path(path, 16).write_bytes(b"not a sidecar")
    assert open_key_blocks(CubeFile.open(path), 16) is None
    assert key_blocks_path(path, 16).name == "a.keys-b16"  # not *.safetensors: never listed as a cube


def test_the_cube_itself_is_unchanged(cube, path):
    before = path.read_bytes()
    write_key_blocks(path, block_size=16)
    assert path.read_bytes() == before
    loaded = kvmem.MemCube.load(path)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(loaded.kv, cube.kv))
    with pytest.raises(kvmem.CubeError, match="block_size must be a positive integer"):
        write_key_blocks(path, block_size=0)


def test_read_threads_is_checked():
    with pytest.raises(kvmem.CubeError, match="read_threads must be an integer from 1 to 8"):
        LayerWriter(readers=0)
    with pytest.raises(kvmem.CubeError, match="read_threads"):
        LayerWriter(readers=True)


def test_a_folder_cube_saved_by_the_server_gets_its_key_blocks(cube, tmp_path):
    """The server's save path writes the sidecar before it publishes the cube; deleting the cube deletes it."""
    from kvmem.integrations.saving import SaveSpec, delete_cube, write_cube
    from kvmem.integrations.serving import CubeSource

    source = CubeSource(folder=str(tmp_path))
    spec = SaveSpec(name="notes", namespace="ns", ids=tuple(cube.all_ids[0].tolist()), anchor=cube.anchor_len,
                    text=None)
    where = write_cube(source, spec, cube, key_block_size=16)
    f = CubeFile.open(where)
    assert open_key_blocks(f, 16) is not None
    assert sorted(p.name for p in (tmp_path / "ns").iterdir()) == ["notes.keys-b16", "notes.safetensors"]
    # what autosave's capacity counts beside the cube: the sidecar's bytes, and none where none is written
    assert where.key_blocks_bytes == (tmp_path / "ns" / "notes.keys-b16").stat().st_size > 0
    assert write_cube(source, replace(spec, name="bare"), cube).key_blocks_bytes == 0
    delete_cube(source, "ns", "bare")
    assert list(source.versions("ns")) == ["notes"]
    delete_cube(source, "ns", "notes")
    assert list((tmp_path / "ns").iterdir()) == []


def test_readers_may_change_between_loads(cube, path):
    """One writer, its read threads changed between loads (as a bench's A/B does): every load exact."""
    write_key_blocks(path, block_size=16)
    f = CubeFile.open(path)
    heads, total, dim = cube.kv_shapes[0][0]
    writer = LayerWriter(block_size=16)
    slots = torch.arange(32) + 16
    for readers in (1, 3, 1, 2):
        writer.readers = readers
        layers = [(i, f"l{i}", CpuLikeLayer(heads, dim)) for i in range(f.num_layers)]
        writer.start([Load("r", FileKV(f, 0, total, key_blocks=open_key_blocks(f, 16)).window(0, 32), slots, [1, 2])],
                     layers)
        assert writer.finish() == set()
        for i, _, layer in layers:
            want = CpuLikeLayer(heads, dim)
            want.do_kv_cache_update(want, cube.kv[i][0][:, :32].transpose(0, 1), cube.kv[i][1][:, :32].transpose(0, 1),
                                    want.kv_cache, slots)
            assert torch.equal(layer.kv_cache, want.kv_cache)
    writer.close()


def test_key_blocks_travel_to_another_process_by_their_path(cube, path):
    """vLLM's OpenAI server plans in one process and loads in its worker: the plan's key blocks are pickled with
    their verified header and reopened there by path."""
    import pickle

    write_key_blocks(path, block_size=16)
    f = CubeFile.open(path)
    kv = pickle.loads(pickle.dumps(FileKV(f, 0, 43, key_blocks=open_key_blocks(f, 16)).window(0, 32)))
    assert kv.key_blocks is not None and kv.key_blocks.block_size == 16
    heads, _, dim = cube.kv_shapes[0][0]
    layers = [(i, f"l{i}", CpuLikeLayer(heads, dim)) for i in range(f.num_layers)]
    writer = LayerWriter(block_size=16)
    slots = torch.arange(32) + 16
    writer.start([Load("r", kv, slots, [1, 2])], layers)
    assert writer.finish() == set()
    want = CpuLikeLayer(heads, dim)
    want.do_kv_cache_update(want, cube.kv[0][0][:, :32].transpose(0, 1), cube.kv[0][1][:, :32].transpose(0, 1),
                            want.kv_cache, slots)
    assert torch.equal(layers[0][2].kv_cache, want.kv_cache)
    writer.close()


def test_deleting_a_cube_deletes_its_key_blocks_only(cube, tmp_path):
    """Names may hold dots and dashes: deleting cube "a" must not take cube "a.keys-b16" or that cube's sidecar."""
    from kvmem.integrations.saving import SaveSpec, delete_cube, write_cube
    from kvmem.integrations.serving import CubeSource

    source = CubeSource(folder=str(tmp_path))
    for name in ("a", "a.keys-b16"):
        spec = SaveSpec(name=name, namespace="ns", ids=tuple(cube.all_ids[0].tolist()), anchor=cube.anchor_len,
                        text=None)
        write_cube(source, spec, cube, key_block_size=16)
    delete_cube(source, "ns", "a")
    assert sorted(p.name for p in (tmp_path / "ns").iterdir()) == [
        "a.keys-b16.keys-b16", "a.keys-b16.safetensors"]


def test_a_sidecar_that_cannot_be_written_does_not_stop_the_save(cube, tmp_path, monkeypatch, caplog):
    """Key blocks only speed loads up: a failure writing them is logged and the cube is still published."""
    from kvmem.integrations import saving
    from kvmem.integrations.serving import CubeSource

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(saving, "write_key_blocks", full_disk)
    source = CubeSource(folder=str(tmp_path))
    spec = saving.SaveSpec(name="notes", namespace="ns", ids=tuple(cube.all_ids[0].tolist()),
                           anchor=cube.anchor_len, text=None)
    with caplog.at_level("WARNING", logger="vllm.kvmem"):
        where = saving.write_cube(source, spec, cube, key_block_size=16)
    assert sorted(p.name for p in (tmp_path / "ns").iterdir()) == ["notes.safetensors"]
    assert kvmem.MemCube.load(where).num_tokens == cube.num_tokens
    assert "key blocks for" in caplog.text and "No space left" in caplog.text


def _served_exactly(cube, f, blocks_file):
    """Load all of ``f`` through ``blocks_file`` (read into the blocks: checked) and compare every layer with the
    op's own write of ``cube``."""
    used = []
    real = BlockPlacement.read_key_blocks
    BlockPlacement.read_key_blocks = lambda self, *a, **k: (used.append(a[1]), real(self, *a, **k))
    try:
        layers, slots, errors, _ = _load(f, blocks_file, (0, 32), 0)
    finally:
        BlockPlacement.read_key_blocks = real
    assert errors == set() and len(used) == f.num_layers
    for i, _, layer in layers:
        want = CpuLikeLayer(*cube.kv_shapes[0][0][::2])
        want.do_kv_cache_update(want, cube.kv[i][0][:, :32].transpose(0, 1), cube.kv[i][1][:, :32].transpose(0, 1),
                                want.kv_cache, slots)
        assert torch.equal(layer.kv_cache, want.kv_cache)


def _spec(cube, name="notes"):
    from kvmem.integrations.saving import SaveSpec

    return SaveSpec(name=name, namespace="ns", ids=tuple(cube.all_ids[0].tolist()), anchor=cube.anchor_len,
                    text="the notes", record_text="the notes")


def test_a_local_store_cube_saved_by_the_server_gets_its_key_blocks(cube, tmp_path):
    """A store cube's key blocks lie beside its blob in cubes/, are served through, and go with the memory."""
    from kvmem.integrations.saving import write_cube
    from kvmem.integrations.serving import CubeSource

    source = CubeSource(store=str(tmp_path / "store"))
    written = write_cube(source, _spec(cube), cube, key_block_size=16)
    f = source.load("ns", "notes", layered=True)
    assert isinstance(f, CubeFile)
    sides = list((tmp_path / "store" / "cubes").glob("*.keys-b16"))
    assert [s.name for s in sides] == [key_blocks_path(f.path, 16).name]
    assert written.key_blocks_bytes == sides[0].stat().st_size > 0
    _served_exactly(cube, f, open_key_blocks(f, 16))
    write_cube(source, _spec(cube), cube, key_block_size=16)  # replaced: the old blob's key blocks go with it
    assert len(list((tmp_path / "store" / "cubes").glob("*.keys-b16"))) == 1
    source.store.view("ns").rm("notes")
    assert list((tmp_path / "store" / "cubes").glob("*.keys-b*")) == []


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A throwaway redis-server (test_store_redis's); skips without the binary or the client."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    pytest.importorskip("redis", reason="the redis client is not installed (pip install 'kvmem[redis]')")
    from test_store_redis import redis_server

    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def test_a_redis_cube_saved_by_one_server_is_read_with_its_key_blocks_by_another(cube, tmp_path, redis_url):
    """One server saves into Redis (cube and key blocks); a replica with no local copy reads both from Redis;
    damaged key blocks are a load error; deleting the memory deletes them."""
    import redis

    from kvmem.integrations.saving import write_cube
    from kvmem.integrations.serving import CubeSource
    from test_store_redis import store_url

    url = store_url(redis_url, tmp_path, tag="kb")
    written = write_cube(CubeSource(store=url), _spec(cube), cube, key_block_size=16)
    replica = CubeSource(store=url.replace("cache-m1", "cache-m2"))
    f = replica.load("ns", "notes", layered=True)
    assert f.key_blocks_source is not None  # read from Redis: the replica has no local copy
    blocks_file = open_key_blocks(f, 16)
    assert blocks_file is not None and blocks_file.block_size == 16
    _served_exactly(cube, f, blocks_file)
    assert open_key_blocks(f, 32) is None  # written for blocks of 16: not used for 32

    client = redis.Redis.from_url(redis_url)
    (key,) = [k for k in client.keys("*keyblocks*")]
    assert written.key_blocks_bytes == client.strlen(key) > 0  # what autosave's capacity counts beside the cube
    raw = bytearray(client.get(key))
    raw[-3] ^= 0x10
    client.set(key, bytes(raw))
    f = CubeSource(store=url.replace("cache-m1", "cache-m3")).load("ns", "notes", layered=True)  # no local copy
    assert f.key_blocks_source is not None
    _, _, errors, reasons = _load(f, open_key_blocks(f, 16), (0, 32), 0)
    assert errors == {6, 1} and "checksum mismatch of kb." in reasons[0]
    replica.store.view("ns").rm("notes")
    assert client.keys("*keyblocks*") == [] and client.keys("*:blob:*") == []


def test_a_server_replica_fetches_its_local_copy_only_once_the_request_is_done(cube, tmp_path, redis_url):
    """``defer_fetches`` (what the vLLM connector uses): a cube read from Redis by a replica with no local copy is
    not fetched in the background until `start_fetches` (the connector calls it when a request finishes), so the
    fetch never competes with that request's forward pass; loads meanwhile read from Redis, and after it from the
    copy, its key blocks beside it."""
    import time

    from kvmem.integrations.saving import write_cube
    from kvmem.integrations.serving import CubeSource
    from test_store_redis import store_url

    url = store_url(redis_url, tmp_path, tag="defer")
    write_cube(CubeSource(store=url), _spec(cube), cube, key_block_size=16)
    replica = CubeSource(store=url.replace("cache-m1", "cache-m2"), defer_fetches=True)
    cache = tmp_path / "cache-m2"
    for _ in range(2):
        f = replica.load("ns", "notes", layered=True)
        assert f.key_blocks_source is not None  # read from Redis
        f.close()
    time.sleep(0.3)
    assert not list(cache.glob("*.safetensors")) and not list(cache.glob("*.keys-b*"))  # nothing fetched yet
    assert replica.start_fetches() == 1  # one fetch of the blob, however often it was read meanwhile
    deadline = time.time() + 30
    while not (list(cache.glob("*.safetensors")) and list(cache.glob("*.keys-b16"))):
        assert time.time() < deadline, list(cache.iterdir())
        time.sleep(0.05)
    time.sleep(0.2)
    f = replica.load("ns", "notes", layered=True)
    assert f.key_blocks_source is None  # the local copy now, its key blocks read from beside it
    _served_exactly(cube, f, open_key_blocks(f, 16))
    assert replica.start_fetches() == 0  # a copy whose key blocks were just fetched: nothing more to fetch


def test_a_failed_background_fetch_is_logged_once_and_loads_go_on_from_redis(cube, tmp_path, redis_url, caplog):
    """A replica whose local copies cannot be fetched (here its cache folder was deleted under it) still serves the
    cube from Redis, and says why its copies are not made: one warning per reason, not one per request."""
    import logging
    import shutil
    import time

    from kvmem.integrations.saving import write_cube
    from kvmem.integrations.serving import CubeSource
    from test_store_redis import store_url

    url = store_url(redis_url, tmp_path, tag="nofetch")
    write_cube(CubeSource(store=url), _spec(cube), cube, key_block_size=16)
    replica = CubeSource(store=url.replace("cache-m1", "cache-m2"), defer_fetches=True)
    with caplog.at_level(logging.WARNING, logger="vllm.kvmem"):
        for _ in range(3):
            f = replica.load("ns", "notes", layered=True)
            shutil.rmtree(tmp_path / "cache-m2", ignore_errors=True)
            assert f.key_blocks_source is not None  # read from Redis: no local copy
            _served_exactly(cube, f, open_key_blocks(f, 16))
            f.close()
            assert replica.start_fetches() == 1
            deadline = time.time() + 30
            while replica._fetching:
                assert time.time() < deadline
                time.sleep(0.05)
    warned = [r.getMessage() for r in caplog.records if "fetching a local copy" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "was deleted while the store was open" in warned[0] and "read it from Redis meanwhile" in warned[0]


def test_key_blocks_of_a_blob_deleted_meanwhile_are_not_left_behind(cube, tmp_path, redis_url, monkeypatch):
    """The memory deleted (another replica's replace, `kvmem rm`) between its put and its key blocks: none stay
    where no delete or gc would ever find them, in Redis (another machine deleted it: this one still has its
    copy) or in a local store (deleted while they were written)."""
    import redis

    from kvmem.integrations import key_blocks as kb
    from kvmem.store import CubeStore
    from test_store_redis import store_url

    url = store_url(redis_url, tmp_path, tag="gone")
    here = CubeStore(url)
    blob = here.view("ns").put_cube("notes", cube, text="the notes").blob
    CubeStore(url.replace("cache-m1", "cache-m2")).view("ns").rm("notes")  # another machine deletes it
    with pytest.raises(kvmem.CubeError, match="deleted"):
        kb.store_key_blocks(here, blob, block_size=16, staging=tmp_path)
    assert redis.Redis.from_url(redis_url).keys(f"*keyblocks:{blob}") == []
    assert redis.Redis.from_url(redis_url).keys(f"{here.blobs.db.key('staging', '')}*") == []  # their upload too

    local = CubeStore(str(tmp_path / "store"))
    blob = local.view("ns").put_cube("notes", cube, text="the notes").blob
    write = kb.write_cube_file

    def deleted_meanwhile(*args, **kwargs):  # the cube read, its key blocks not written yet
        local.view("ns").rm("notes")
        return write(*args, **kwargs)

    monkeypatch.setattr(kb, "write_cube_file", deleted_meanwhile)
    with pytest.raises(kvmem.CubeError, match="deleted"):
        kb.store_key_blocks(local, blob, block_size=16, staging=tmp_path)
    assert list((tmp_path / "store" / "cubes").glob("*.keys-b*")) == []


def test_a_replica_keeps_the_key_blocks_of_its_local_copy(cube, tmp_path, redis_url):
    """A replica that read a cube from Redis fetches a local copy in the background, and its key blocks beside it:
    the next load reads the copy and its key blocks from the disk and is served exactly; once the memory is
    deleted, the cache's sweep removes both."""
    import os
    import time

    from kvmem.integrations.saving import write_cube
    from kvmem.integrations.serving import CubeSource
    from test_store_redis import store_url

    url = store_url(redis_url, tmp_path, tag="copy")
    write_cube(CubeSource(store=url), _spec(cube), cube, key_block_size=16)
    replica = CubeSource(store=url.replace("cache-m1", "cache-m2"))
    first = replica.load("ns", "notes", layered=True)
    assert first.key_blocks_source is not None  # from Redis: no local copy yet
    replica._fetcher.shutdown(wait=True)  # the background fetch of the copy (and its key blocks) ends
    replica._fetcher = None
    cache = tmp_path / "cache-m2"
    blob = replica.store.view("ns").get("notes").blob
    assert sorted(p.name for p in cache.glob(f"{blob}*")) == [f"{blob}.keys-b16", f"{blob}.safetensors"]
    again = replica.load("ns", "notes", layered=True)
    assert again.key_blocks_source is None and again.path == cache / f"{blob}.safetensors"
    blocks_file = open_key_blocks(again, 16)
    assert blocks_file is not None and blocks_file.path == cache / f"{blob}.keys-b16"
    _served_exactly(cube, again, blocks_file)
    again.close()
    blocks_file.close()
    old = time.time() - 3600
    for f in cache.glob(f"{blob}*"):
        os.utime(f, (old, old))
    replica.store.gc(grace_s=0)  # a live blob's copy and its key blocks stay, however old
    assert sorted(p.name for p in cache.glob(f"{blob}*")) == [f"{blob}.keys-b16", f"{blob}.safetensors"]
    replica.store.view("ns").rm("notes")
    replica.store.gc(grace_s=0)
    assert list(cache.glob(f"{blob}*")) == []


def test_a_copy_made_another_way_gets_its_key_blocks_at_its_first_load(cube, tmp_path, redis_url):
    """The saving server's own copy (made by its put, before the key blocks were stored in Redis) has none beside
    it: its first load fetches them in the background, so the loads after it read them from the disk."""
    from kvmem.integrations.saving import write_cube
    from kvmem.integrations.serving import CubeSource
    from test_store_redis import store_url

    # the fetch held back until start_fetches (as the vLLM connector does): otherwise it may end before the checks
    # of the first load below, which would then see the key blocks it fetched (a race this test once lost)
    source = CubeSource(store=store_url(redis_url, tmp_path, tag="own"), defer_fetches=True)
    write_cube(source, _spec(cube), cube, key_block_size=16)
    cache = tmp_path / "cache-m1"
    blob = source.store.view("ns").get("notes").blob
    assert list(cache.glob(f"{blob}.keys-b*")) == []
    first = source.load("ns", "notes", layered=True)
    assert first.key_blocks_source is None and open_key_blocks(first, 16) is None  # read from the copy: none yet
    first.close()
    assert source.start_fetches() == 1
    source._fetcher.shutdown(wait=True)
    source._fetcher = None
    again = source.load("ns", "notes", layered=True)
    blocks_file = open_key_blocks(again, 16)
    assert blocks_file is not None and blocks_file.path == cache / f"{blob}.keys-b16"
    _served_exactly(cube, again, blocks_file)


def test_gc_sweeps_key_blocks_whose_cube_is_gone(cube, tmp_path, redis_url):
    """Key blocks whose blob went by a path other than `delete` (a cube file removed by hand, a blob key deleted
    in Redis) are removed by gc: in a local store once older than the grace, in Redis at once; a live cube's key
    blocks, a fresh orphan within the grace, and a file that only looks like key blocks stay."""
    import os
    import time

    import redis

    from kvmem.integrations import key_blocks as kb
    from kvmem.store import CubeStore
    from test_store_redis import store_url

    local = CubeStore(str(tmp_path / "store"))
    cubes = tmp_path / "store" / "cubes"
    kept = local.view("ns").put_cube("kept", cube, text="kept").blob
    gone = local.view("ns").put_cube("gone", cube, text="gone").blob
    for blob in (kept, gone):
        kb.store_key_blocks(local, blob, block_size=16, staging=tmp_path)
    (cubes / "notes.keys-b16").write_bytes(b"not kvmem's")  # not a blob's name: never touched
    (cubes / f"{gone}.safetensors").unlink()  # removed by hand: its key blocks are orphans now
    assert (cubes / f"{gone}.keys-b16").exists()
    local.gc(grace_s=600)  # younger than the grace: left to a writer that may still be at work
    assert (cubes / f"{gone}.keys-b16").exists()
    old = time.time() - 3600
    for f in cubes.iterdir():
        os.utime(f, (old, old))
    report = local.gc(grace_s=600)
    assert f"{gone}.keys-b16" in report.swept
    assert sorted(p.name for p in cubes.glob("*.keys-b*")) == sorted([f"{kept}.keys-b16", "notes.keys-b16"])

    url = store_url(redis_url, tmp_path, tag="sweep")
    remote = CubeStore(url)
    kept = remote.view("ns").put_cube("kept", cube, text="kept").blob
    gone = remote.view("ns").put_cube("gone", cube, text="gone").blob
    for blob in (kept, gone):
        kb.store_key_blocks(remote, blob, block_size=16, staging=tmp_path)
    client = redis.Redis.from_url(redis_url)
    (blob_key,) = client.keys(f"*:blob:{gone}")
    client.delete(blob_key)  # the blob's key removed by hand
    # a store whose prefix is a glob pattern matching this one's ("t<tag>*" matches "t<tag>sweep..."): its gc
    # must not take this store's key blocks for its own orphans
    prefix = remote.blobs.db.key("x", "x").split(":")[0]
    wild = CubeStore(f"{redis_url}?prefix={prefix[:4]}*&cache={tmp_path / 'cache-wild'}")
    assert not any("keyblocks" in k for k in wild.gc(grace_s=600).swept)
    assert len(client.keys(f"*keyblocks:{gone}")) == 1 and len(client.keys(f"*keyblocks:{kept}")) == 1
    report = remote.gc(grace_s=600)
    assert [k for k in report.swept if "keyblocks" in k] == [kb.redis_key(remote.blobs.db, gone)]
    assert client.keys(f"*keyblocks:{gone}") == [] and len(client.keys(f"*keyblocks:{kept}")) == 1


def test_a_cache_with_gaps_between_blocks_is_written_by_its_op(cube, path):
    """A paged cache whose blocks are not back to back (padding after each block) cannot take plain reads through
    one flat view of its bytes (they would land in a copy): its op writes it, and it holds the op's bytes."""
    write_key_blocks(path, block_size=16)
    f = CubeFile.open(path)
    heads, _, dim = f.kv_shapes[0][0]
    slots = torch.tensor([6 * 16 + p for p in range(16)] + [1 * 16 + p for p in range(16)])
    got, want = [], []
    for gaps in (True, False):
        layers = []
        for i in range(f.num_layers):
            layer = CpuLikeLayer(heads, dim)
            if gaps:
                layer.kv_cache = torch.zeros(8, heads, 2 * 16 + 3, dim)[:, :, :2 * 16]
            layers.append((i, f"model.layers.{i}.attn", layer))
        writer = LayerWriter(block_size=16)
        writer.start([Load("r1", FileKV(f, 0, f.anchor_len + f.num_tokens, key_blocks=open_key_blocks(f, 16))
                           .window(0, 32), slots, [6, 1])], layers)
        assert writer.finish() == set()
        writer.close()
        (got if gaps else want).append([layer.kv_cache.clone() for _, _, layer in layers])
    for a, b in zip(got[0], want[0]):
        assert b.any() and torch.equal(a, b)
