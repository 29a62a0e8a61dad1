"""Reading a cube file layer by layer (kvmem.cubes.cubefile): the same KV as MemCube.load, verified piece by
piece, nothing damaged ever returned, older files read whole. Tiny random llamas."""

from __future__ import annotations

import random

import pytest
import torch

import kvmem
from helpers import random_ids, split_file, join_file, tiny_model
from kvmem.cubes.cubefile import CubeFile, NotLayered, Scratch


@pytest.fixture(scope="module")
def cube():
    model = tiny_model("llama")
    return kvmem.MemCube.from_ids(model, random_ids(40, seed=2), name="a", anchor_ids=random_ids(3, seed=1))


@pytest.fixture
def path(tmp_path, cube):
    return tmp_path / "a.safetensors"


def test_layers_read_one_by_one_equal_the_whole_load(cube, path):
    cube.save(path)
    f = CubeFile.open(path)
    whole = kvmem.MemCube.load(path)
    assert torch.equal(f.all_ids, whole.all_ids) and f.meta == whole.meta and f.nbytes == whole.nbytes
    assert f.kv_shapes == whole.kv_shapes and f.dtype == whole.dtype and f.num_layers == len(whole.kv)
    scratch = Scratch()
    storage = set()
    for i, (k, v) in enumerate(whole.kv):
        fk, fv = f.read_layer(i, scratch=scratch)
        assert torch.equal(fk, k) and torch.equal(fv, v)
        storage.add((fk.untyped_storage().data_ptr(), fv.untyped_storage().data_ptr()))
    assert len(storage) == 1  # every layer read into the same two reused buffers
    fresh = f.read_layer(0)   # without a scratch: tensors of its own
    assert torch.equal(fresh[0], whole.kv[0][0]) and fresh[0].untyped_storage().data_ptr() not in storage.pop()


def test_a_file_replaced_after_open_is_still_read_as_opened(cube, path, tmp_path):
    cube.save(path)
    f = CubeFile.open(path)
    other = kvmem.MemCube.from_ids(tiny_model("llama", seed=3), cube.input_ids, name="a", anchor_ids=cube.anchor_ids)
    other.save(path)  # atomic rename over the opened file
    assert torch.equal(f.read_layer(1)[0], cube.kv[1][0])


def test_no_flipped_byte_is_ever_returned(cube, path):
    """Flip single bytes anywhere in the file: open or the layer read refuses, or what it returns is the
    original KV (a flip in the unread whole-file checksum string changes nothing that is served)."""
    cube.save(path)
    raw = path.read_bytes()
    rng = random.Random(0)
    refused = 0
    for at in rng.sample(range(len(raw)), 150) + [len(raw) - 1, 8, 9]:
        bad = bytearray(raw)
        bad[at] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(bad))
        try:
            f = CubeFile.open(path)
            got = [f.read_layer(i) for i in range(f.num_layers)]
        except NotLayered:  # the flip hit the part_checksums key: read whole, where MemCube.load checks it all
            refused += 1
            continue
        except kvmem.CubeError:
            refused += 1
            continue
        assert torch.equal(f.all_ids, cube.all_ids)
        assert all(torch.equal(k, ck) and torch.equal(v, cv) for (k, v), (ck, cv) in zip(got, cube.kv))
    assert refused >= 140  # nearly every byte matters


def test_older_files_without_part_checksums_are_read_whole(cube, path):
    cube.save(path)
    header, payload = split_file(path.read_bytes())
    del header["__metadata__"]["part_checksums"]
    path.write_bytes(join_file(header, payload))
    with pytest.raises(NotLayered, match="older kvmem"):
        CubeFile.open(path)
    assert torch.equal(kvmem.MemCube.load(path).kv[0][0], cube.kv[0][0])  # still a valid cube

    from kvmem.integrations.serving import CubeSource

    (path.parent / "ns").mkdir()
    path.rename(path.parent / "ns" / "a.safetensors")
    assert isinstance(CubeSource(folder=str(path.parent)).load("ns", "a", layered=True), kvmem.MemCube)


class RowsLayer:
    """A fake attention layer with a plain [slots, 2, H, D] cache."""

    def __init__(self, heads, dim):
        self.kv_cache = torch.zeros(64, 2, heads, dim)
        self.impl = self

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        kv_cache[slot_mapping, 0], kv_cache[slot_mapping, 1] = key, value


def _damage_last_tensor(path) -> None:
    """Flip one bit near the end of the cube file: in the last tensor it holds, v of the last layer."""
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x10
    path.write_bytes(bytes(raw))


def test_the_loader_writes_file_layers_and_reports_a_damaged_one(cube, path):
    from kvmem.integrations.serving import FileKV
    from kvmem.integrations.vllm_pages import LayerWriter, Load

    cube.save(path)
    _damage_last_tensor(path)
    f = CubeFile.open(path)
    heads, _, dim = cube.kv_shapes[0][0]
    layers = [(i, f"model.layers.{i}.attn", RowsLayer(heads, dim)) for i in range(f.num_layers)]
    writer = LayerWriter(layerwise=True)
    slots = torch.arange(10, 42)
    writer.start([Load("r1", FileKV(f, 0, 43).window(3, 35), slots, [7])], layers)
    for _, name, _ in layers:
        writer.wait(name)
    assert writer.finish() == {7}  # the damaged layer is a load error: vLLM recomputes the request's blocks
    for i, _, layer in layers[:-1]:
        k, v = cube.kv[i]
        assert torch.equal(layer.kv_cache[10:42, 0], k[:, 3:35].transpose(0, 1))
        assert torch.equal(layer.kv_cache[10:42, 1], v[:, 3:35].transpose(0, 1))
    assert not layers[-1][2].kv_cache.any()  # nothing of the damaged layer was written
    writer.close()


def test_a_new_replica_reads_a_redis_cube_layer_by_layer(cube, tmp_path):
    """A Redis store's cube with no local copy is read by byte ranges from Redis (header when opened, each layer
    when read), checked like a file; a local copy is fetched in the background for the requests after it."""
    import shutil
    import time
    import uuid

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (CI installs it)")
    pytest.importorskip("redis")
    from test_store_redis import redis_server

    from kvmem.integrations.serving import CubeSource

    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis") as url:
        prefix = f"{url}?prefix=t{uuid.uuid4().hex[:8]}"
        writer = kvmem.CubeStore(f"{prefix}&cache={tmp_path / 'writer'}")
        rec = writer.view("ns").put_cube("m", cube, text="memory m")
        source = CubeSource(store=f"{prefix}&cache={tmp_path / 'replica'}")
        got = source.load("ns", "m", layered=True)
        assert isinstance(got, CubeFile) and "blob" in str(got.path)  # read from Redis, not a local file
        assert torch.equal(got.all_ids, cube.all_ids)
        assert all(torch.equal(got.read_layer(i)[1], v) for i, (_, v) in enumerate(cube.kv))
        import pickle  # as vLLM's server sends it to its worker process, which connects to Redis itself

        assert torch.equal(pickle.loads(pickle.dumps(got)).read_layer(1)[0], cube.kv[1][0])
        # many views (as a part read into a paged cache's blocks): filled in order, one GETRANGE per batch
        v1 = cube.kv[1][1].contiguous()
        buf = torch.zeros(v1.numel() * 4, dtype=torch.uint8)
        cuts = list(range(0, buf.numel(), 300)) + [buf.numel()]
        got.read_part_into("v.1", [memoryview(buf[a:b].numpy()) for a, b in zip(cuts, cuts[1:])])
        assert torch.equal(buf.view(torch.float32).view(v1.shape), v1)
        deadline = time.time() + 30
        while not (tmp_path / "replica" / f"{rec.blob}.safetensors").is_file():
            assert time.time() < deadline, "the local copy was not fetched"
            time.sleep(0.05)
        again = source.load("ns", "m", layered=True)
        assert str(again.path).endswith(f"{rec.blob}.safetensors")  # the next request reads the local copy
        # damaged bytes in Redis: found when their layer is read
        client, key = writer.blobs.db.client, writer.blobs.db.key("blob", rec.blob)
        data = bytearray(client.get(key))
        data[-8] ^= 0xFF
        client.set(key, bytes(data))
        (tmp_path / "replica" / f"{rec.blob}.safetensors").unlink()
        damaged = source.load("ns", "m", layered=True)
        assert "blob" in str(damaged.path)
        with pytest.raises(kvmem.CubeError, match="checksum mismatch of v"):
            damaged.read_layer(damaged.num_layers - 1)


class BlockLayer:
    """A fake attention layer with a [blocks, block_size, 2, H, D] cache; ``flat=True`` makes its op read the rows'
    raw memory as if contiguous (ignoring strides), as a hand-written kernel might."""

    def __init__(self, heads, dim, *, flat=False, block_size=16):
        self.kv_cache = torch.zeros(8, block_size, 2, heads, dim)
        self.impl, self.flat, self.block_size = self, flat, block_size

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        if self.flat:  # the storage read in row order, whatever the view's strides say
            key = torch.as_strided(key, key.shape, (key.shape[1] * key.shape[2], key.shape[2], 1))
            value = torch.as_strided(value, value.shape, (value.shape[1] * value.shape[2], value.shape[2], 1))
        rows = kv_cache.view(-1, *kv_cache.shape[2:])
        rows[slot_mapping, 0], rows[slot_mapping, 1] = key, value


@pytest.mark.parametrize("flat", [False, True])
def test_the_loader_skips_the_copy_only_for_an_op_that_reads_strides(cube, path, flat):
    from kvmem.integrations.serving import FileKV
    from kvmem.integrations.vllm_pages import LayerWriter, Load

    cube.save(path)
    f = CubeFile.open(path)
    heads, _, dim = cube.kv_shapes[0][0]
    layers = [(i, f"model.layers.{i}.attn", BlockLayer(heads, dim, flat=flat)) for i in range(f.num_layers)]
    writer = LayerWriter(block_size=16)
    writer.start([Load("r1", FileKV(f, 0, 32), torch.arange(16, 48), [1, 2])], layers)
    assert writer.finish() == set()
    for i, _, layer in layers:
        rows = layer.kv_cache.view(-1, *layer.kv_cache.shape[2:])
        assert torch.equal(rows[16:48, 0], cube.kv[i][0][:, :32].transpose(0, 1))  # exact either way
        assert torch.equal(rows[16:48, 1], cube.kv[i][1][:, :32].transpose(0, 1))
    assert list(writer.strided.values()) == [not flat]  # the copy is skipped only where the op reads strides
    writer.close()


def test_an_opened_cube_travels_to_another_process_by_its_path(cube, path, tmp_path):
    """vLLM's server sends the connector's plans to its worker process (pickled): a CubeFile goes with its verified
    header and reopens the file there; a file replaced meanwhile fails the layer checksums instead of mixing."""
    import pickle

    cube.save(path)
    f = CubeFile.open(path)
    copy = pickle.loads(pickle.dumps(f))
    assert torch.equal(copy.read_layer(1)[0], cube.kv[1][0]) and torch.equal(copy.all_ids, cube.all_ids)
    other = kvmem.MemCube.from_ids(tiny_model("llama", seed=3), cube.input_ids, name="a", anchor_ids=cube.anchor_ids)
    moved = pickle.loads(pickle.dumps(f))
    other.save(path)  # replaced before the worker opened it
    with pytest.raises(kvmem.CubeError, match="checksum mismatch of k.0"):
        moved.read_layer(0)


class CpuLikeLayer:
    """An attention layer whose write op places a block's keys as columns ([D, block_size] per head) and its values
    as rows ([block_size, D] per head), as vLLM's CPU backend does for float32 ([blocks, H, 2 * block_size, D])."""

    def __init__(self, heads, dim, *, block_size=16, blocks=8):
        self.num_kv_heads, self.head_size, self.bs = heads, dim, block_size
        self.kv_cache = torch.zeros(blocks, heads, 2 * block_size, dim)
        self.impl = self
        self.calls = 0

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        self.calls += 1
        bs = self.bs
        for i, slot in enumerate(slot_mapping.tolist()):
            b, t = divmod(slot, bs)
            kv_cache[b, :, :bs].view(-1, self.head_size * bs).view(-1, self.head_size, bs)[:, :, t] = key[i]
            kv_cache[b, :, bs + t] = value[i]


@pytest.mark.parametrize("source", ["file", "memory"])
@pytest.mark.parametrize("window, first", [((0, 43), 0), ((3, 35), 0), ((16, 43), 5), ((0, 16), 0)])
def test_plain_copies_write_what_the_op_writes(cube, path, window, first, source):
    """Where the op's placement is rows / columns per head, the loader reads values straight from the file into
    the blocks and copies keys once, transposed, never calling the op: the cache holds the op's bytes exactly,
    for windows that start inside a block, end inside one, or leave cube tokens out on either side."""
    from kvmem.integrations.serving import FileKV
    from kvmem.integrations.vllm_pages import LayerWriter, Load

    cube.save(path)
    f = CubeFile.open(path)
    heads, total, dim = cube.kv_shapes[0][0]
    lo, hi = window
    n = hi - lo
    blocks = [6, 1, 4, 2][:-(-(first + n) // 16)]
    slots = torch.tensor([blocks[(first + p) // 16] * 16 + (first + p) % 16 for p in range(n)])
    layers = [(i, f"model.layers.{i}.attn", CpuLikeLayer(heads, dim)) for i in range(f.num_layers)]
    writer = LayerWriter(block_size=16)
    kv = FileKV(f, 0, total).window(lo, hi) if source == "file" else [(k[:, lo:hi], v[:, lo:hi]) for k, v in cube.kv]
    writer.start([Load("r1", kv, slots, blocks)], layers)
    assert writer.finish() == set()
    for i, _, layer in layers:
        want = CpuLikeLayer(heads, dim)
        want.do_kv_cache_update(want, cube.kv[i][0][:, lo:hi].transpose(0, 1), cube.kv[i][1][:, lo:hi].transpose(0, 1),
                                want.kv_cache, slots)
        assert torch.equal(layer.kv_cache, want.kv_cache)
    placement = writer.placement(layers[0][2])
    assert [form for form, _ in placement.forms] == ["cols", "rows"]
    assert all(layer.calls == 0 for _, _, layer in layers[1:])  # the op ran only to learn the layout (layer 0)
    writer.close()


def test_a_damaged_part_read_into_the_blocks_is_a_load_error(cube, path):
    """Values read straight into the blocks are checked after they land: a damaged part's blocks are reported as
    load errors (vLLM recomputes them or fails the request), never served as loaded."""
    from kvmem.integrations.serving import FileKV
    from kvmem.integrations.vllm_pages import LayerWriter, Load

    cube.save(path)
    _damage_last_tensor(path)
    f = CubeFile.open(path)
    heads, total, dim = cube.kv_shapes[0][0]
    layers = [(i, f"model.layers.{i}.attn", CpuLikeLayer(heads, dim)) for i in range(f.num_layers)]
    writer = LayerWriter(block_size=16)
    writer.start([Load("r1", FileKV(f, 0, total).window(0, 32), torch.arange(32, 64), [2, 3])], layers)
    assert writer.finish() == {2, 3}
    assert writer.reasons and f"checksum mismatch of v.{f.num_layers - 1}" in writer.reasons[0]
    writer.close()


def test_read_part_into_fills_the_views_in_file_order(cube, path):
    cube.save(path)
    f = CubeFile.open(path)
    k = cube.kv[1][0].contiguous()
    buf = torch.zeros(k.numel() * 4, dtype=torch.uint8)
    cuts = [0, 5, 1000, 1003, buf.numel()]  # uneven, odd-sized pieces
    f.read_part_into("k.1", [memoryview(buf[a:b].numpy()) for a, b in zip(cuts, cuts[1:])])
    assert torch.equal(buf.view(torch.float32).view(k.shape), k)
    with pytest.raises(kvmem.CubeError, match="buffers given take"):
        f.read_part_into("k.1", [memoryview(buf[:-1].numpy())])
    _damage_last_tensor(path)
    last = f"v.{f.num_layers - 1}"
    with pytest.raises(kvmem.CubeError, match="checksum mismatch"):
        CubeFile.open(path).read_part_into(last, [memoryview(buf[:cube.kv[-1][1].numel() * 4].numpy())])
