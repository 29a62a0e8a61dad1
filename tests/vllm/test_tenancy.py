"""Tenant salts, engine-saved cubes and the paged-cache layout reader, without an engine: tiny random llamas and a
fake attention op. Runs in the main test stage (no vLLM needed); the vLLM stage tests the same paths in a server."""

from __future__ import annotations

import pytest
import torch

import kvmem
from helpers import random_ids, tiny_model
from kvmem.cubes.fingerprint import fingerprint_fields
from kvmem.integrations.saving import build_cube, parse_save, write_cube
from kvmem.integrations.serving import CubePlanner, CubeSource, precompose
from kvmem.integrations.tenancy import Tenancy, cube_digest, read_secret
from kvmem.integrations.vllm_pages import PagedLayout

BLOCK = 16
SECRET = b"s" * 32


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def anchor():
    return random_ids(5, seed=1)


def cube_of(model, anchor, seed, name="m", n=27):
    return kvmem.MemCube.from_ids(model, random_ids(n, seed=seed), name=name, anchor_ids=anchor)


# ---------------------------------------------------------------- salts
def test_salts_split_namespaces_and_keep_one_namespace_together(model, anchor):
    t = Tenancy(SECRET)
    assert t.salt("alice") == t.salt("alice")                     # one namespace shares its blocks
    assert t.salt("alice") != t.salt("bob")                       # two never do
    assert t.salt("alice", request_salt="x") != t.salt("bob", request_salt="x")  # a client's salt cannot bridge
    assert t.salt("alice", request_salt="x") != t.salt("alice")   # and keeps its own partition inside one
    digest = cube_digest(cube_of(model, anchor, 2))
    assert t.salt("alice", digests=[digest]) != t.salt("alice")   # a cube's blocks: apart from the plain prompt
    assert t.salt(None) != t.salt(None)                           # an unreadable namespace: shared with nothing
    assert Tenancy(b"t" * 32).salt("alice") != t.salt("alice")    # replicas salt alike only with one secret
    assert Tenancy(SECRET).salt("alice") == t.salt("alice")


def test_an_edited_memory_gets_a_new_salt_and_an_unchanged_one_keeps_its_own(model, anchor, tmp_path):
    """Forgetting (issue 26) relies on this: after an edit, no request can be salted like the old cube's blocks."""
    store = kvmem.CubeStore(str(tmp_path / "store"))
    view = store.view("default")
    old = cube_of(model, anchor, 2, n=43)  # anchor + 43 = 48 ids: 3 blocks
    view.put_cube("m", old, text="the old text")
    planner = CubePlanner(CubeSource(store=str(tmp_path / "store")), fields=fingerprint_fields(model),
                          dtype=torch.float32, block_size=BLOCK)
    t = Tenancy(SECRET)

    def salt_of(cube):
        ids = cube.all_ids[0].tolist() + [7, 8, 9]
        plan = planner.plan(ids, {"kvmem": {"cubes": ["m"]}})
        return t.salt(plan.namespace, digests=plan.digests), plan

    first, plan = salt_of(old)
    assert plan.exact and salt_of(old)[0] == first  # read again: the same salt (its blocks are shared)
    edited = cube_of(model, anchor, 3, n=43)
    view.put_cube("m", edited, text="the edited text")
    assert salt_of(edited)[0] != first


@pytest.mark.parametrize("option, why", [
    ("env:KVMEM_NO_SUCH_VAR", "not set"), ("file:/nonexistent/secret", "cannot be read"), ("short", "at least 16"),
    (42, "must be a string"),
])
def test_a_bad_salt_secret_says_how_to_fix_it(option, why):
    with pytest.raises(kvmem.CubeError, match=why):
        read_secret(option)


def test_salt_secret_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("KVMEM_SALT_SECRET", raising=False)
    a, where = read_secret(None)
    assert len(a) == 32 and "random" in where and read_secret(None)[0] != a  # random per server start
    monkeypatch.setenv("KVMEM_SALT_SECRET", "e" * 20)
    assert read_secret(None) == (b"e" * 20, "$KVMEM_SALT_SECRET")
    (tmp_path / "secret").write_text("f" * 24 + "\n")
    assert read_secret(f"file:{tmp_path / 'secret'}")[0] == b"f" * 24
    monkeypatch.setenv("FLEET_SECRET", "g" * 16)
    assert read_secret("env:FLEET_SECRET")[0] == b"g" * 16


# ---------------------------------------------------------------- saving
class WordTokenizer:
    """Stands in for the served tokenizer: one id per word (ids 100 + word length), decode joins words."""

    def __call__(self, text, add_special_tokens=False):
        class Out:
            input_ids = [100 + len(w) for w in text.split()]
        return Out()

    def decode(self, ids):
        return " ".join("x" * (i - 100) for i in ids)


def test_parse_save_checks_what_it_keeps():
    tok = WordTokenizer()
    prompt = [1, 2, 103, 105, 104, 9, 9]
    assert parse_save({"cubes": ["a"]}, prompt, default="d", served=["d"]) is None
    spec = parse_save({"save": "m"}, prompt, default="d", served=["d"], tokenizer=tok)
    assert (spec.name, spec.namespace, spec.ids, spec.anchor, spec.text) == ("m", "d", tuple(prompt), 0, None)
    spec = parse_save({"save": "m", "tokens": 5, "anchor": 2, "text": "abc abcde abcd"}, prompt, default="d",
                      served=["d"], tokenizer=tok)
    assert spec.ids == (1, 2, 103, 105, 104) and spec.text == spec.record_text == "abc abcde abcd"
    for bad, why in [({"text": "ab"}, "not the memory's"), ({"tokens": 8}, r"\[1, 7\]"), ({"anchor": 5}, r"\[0, 4\]"),
                     ({"namespace": "x"}, "not served"), ({"save": "a/b"}, "cube name"), ({"text": ""}, "non-empty")]:
        with pytest.raises(kvmem.CubeError, match=why):
            parse_save({"save": "m", "tokens": 5, "anchor": 2, **bad}, prompt, default="d", served=["d"],
                       tokenizer=tok)


def test_an_engine_built_cube_is_a_normal_cube(model, anchor, tmp_path):
    ref = cube_of(model, anchor, 2)
    prompt = ref.all_ids[0].tolist() + [5, 6]
    spec = parse_save({"save": "saved", "tokens": ref.all_ids.shape[1], "anchor": ref.anchor_len}, prompt,
                      default="default", served=["default"])
    cube = build_cube(ref.kv, spec, fields=fingerprint_fields(model), engine="test")
    where = write_cube(CubeSource(folder=str(tmp_path)), spec, cube)
    back = kvmem.MemCube.load(where)
    assert torch.equal(back.all_ids, ref.all_ids) and back.anchor_len == ref.anchor_len
    assert back.fingerprint == ref.fingerprint and back.meta["built_by"] == "test"
    assert all(torch.equal(k, rk) and torch.equal(v, rv) for (k, v), (rk, rv) in zip(back.kv, ref.kv))
    assert not list(tmp_path.glob("default/.*"))  # no staging file left behind
    # it serves: the planner takes it like a transformers-built cube
    planner = CubePlanner(CubeSource(folder=str(tmp_path)), fields=fingerprint_fields(model), dtype=torch.float32,
                          block_size=BLOCK)
    assert planner.plan(prompt).names == ("saved",)
    with pytest.raises(kvmem.CubeError, match="not the 32 to save"):
        build_cube([(k[:, :5], v[:, :5]) for k, v in ref.kv], spec, fields=fingerprint_fields(model), engine="t")


def test_a_cube_saved_into_a_store_gets_a_record_text(model, anchor, tmp_path):
    ref = cube_of(model, anchor, 2)
    spec = parse_save({"save": "saved", "anchor": ref.anchor_len}, ref.all_ids[0].tolist(), default="default",
                      served=["default"], tokenizer=WordTokenizer())
    write_cube(CubeSource(store=str(tmp_path / "s")), spec, build_cube(ref.kv, spec, fields=ref.fingerprint_fields,
                                                                         engine="test"))
    view = kvmem.CubeStore(str(tmp_path / "s")).view("default")
    assert torch.equal(view.load_cube("saved").all_ids, ref.all_ids)
    assert view.get("saved").text == spec.record_text


# ---------------------------------------------------------------- reading the paged cache
class PackedLayer:
    """A fake attention layer whose cache write packs like a CPU backend: blocks [heads, 2 * block, D/2, 2]-ish
    (token pairs interleaved along the head dim, keys then values), not the [token, head, dim] order it is given."""

    num_kv_heads, head_size = 3, 8

    class impl:
        kv_cache_dtype = "auto"
        scale = 1.0

        @classmethod
        def do_kv_cache_update(cls, layer, key, value, kv_cache, slot_mapping):
            nb, heads, bs, _ = kv_cache.shape  # vLLM's CPU layout: [num_blocks, H, block_size, 2 * D]
            rows = kv_cache.view(nb, heads, 2 * bs, -1)
            for row, slot in enumerate(slot_mapping.tolist()):
                b, t = divmod(slot, bs)
                for half, x in ((0, key[row]), (1, value[row])):
                    # pair tokens (t//2) and interleave the pair along the dim: a VNNI-like packing
                    view = rows[b, :, half * bs:(half + 1) * bs].reshape(heads, bs // 2, -1)
                    view[:, t // 2, (t % 2)::2] = x * cls.scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_learned_layout_reads_back_what_the_op_wrote(dtype):
    layer, bs = PackedLayer(), 4
    cache = torch.zeros(6, 3, bs, 2 * 8, dtype=dtype)  # 6 blocks
    layout = PagedLayout.learn(layer, cache, block_size=bs)
    keys, values = torch.randn(10, 3, 8).to(dtype), torch.randn(10, 3, 8).to(dtype)
    blocks = [4, 1, 5]
    slots = torch.tensor([blocks[p // bs] * bs + p % bs for p in range(10)])
    layer.impl.do_kv_cache_update(layer, keys, values, cache, slots)
    k, v = layout.read(cache, blocks, 10)
    assert torch.equal(k, keys.transpose(0, 1)) and torch.equal(v, values.transpose(0, 1))
    plain = cache.view(6, 3, 2 * bs, 8)[4, :, :bs].transpose(0, 1)  # rows read as [token, head, dim]: wrong
    assert not torch.equal(plain, keys[:4])
    with pytest.raises(kvmem.CubeError, match="need 3 blocks"):
        layout.read(cache, blocks[:2], 10)


def test_a_scaled_cache_is_refused(monkeypatch):
    monkeypatch.setattr(PackedLayer.impl, "scale", 0.5)
    with pytest.raises(kvmem.CubeError, match="one-to-one"):
        PagedLayout.learn(PackedLayer(), torch.zeros(2, 3, 4, 16), block_size=4)


# ---------------------------------------------------------------- lineage
def test_a_precomposed_cube_derives_from_its_sources(model, anchor):
    a = cube_of(model, anchor, 2, name="a").with_meta({"derived_from": [{"memory": "d/a", "text_sha256": "1" * 64}]})
    b = cube_of(model, anchor, 3, name="b", n=16).with_meta(
        {"derived_from": [{"memory": "d/b", "text_sha256": "2" * 64}]})
    c = precompose(model, [a, b], recompute="none")
    assert c.meta["derived_from"] == [{"memory": "d/a", "text_sha256": "1" * 64},
                                      {"memory": "d/b", "text_sha256": "2" * 64}]


class RowsLayer:
    """A fake attention layer with a plain [slots, H, D] x 2 cache, whose write can be made to fail."""

    num_kv_heads, head_size = 2, 4

    def __init__(self, fail=False):
        self.kv_cache = torch.zeros(8, 2, 2, 4)  # 8 slots, keys/values, H, D
        self.impl, self.fail = self, fail

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        if self.fail:
            raise RuntimeError("disk on fire")
        kv_cache[slot_mapping, 0], kv_cache[slot_mapping, 1] = key, value


@pytest.mark.parametrize("layerwise", [True, False])
def test_the_layer_writer_writes_every_layer_and_reports_failed_blocks(layerwise):
    from kvmem.integrations.vllm_pages import LayerWriter, Load

    layers = [(i, f"model.layers.{i}.attn", RowsLayer(fail=(i == 2))) for i in range(3)]
    kv = [(torch.randn(2, 3, 4), torch.randn(2, 3, 4)) for _ in layers]
    writer = LayerWriter(layerwise=layerwise)
    writer.start([Load("r1", kv, torch.tensor([5, 6, 7]), [1])], layers)
    for _, name, _ in layers:
        writer.wait(name)  # returns once that layer is written (or failed)
    assert writer.finish() == {1}  # layer 2's write failed: the request's block is a load error, not garbage
    for (i, _, layer), (k, v) in zip(layers[:2], kv[:2]):
        assert torch.equal(layer.kv_cache[5:8, 0], k.transpose(0, 1))
        assert torch.equal(layer.kv_cache[5:8, 1], v.transpose(0, 1))
    assert writer.finish() == set()
    writer.close()
    with pytest.raises(kvmem.CubeError, match="JSON boolean"):
        LayerWriter(layerwise="false")


def test_autosave_keeps_long_prompts_within_its_capacity(model, anchor, tmp_path):
    from kvmem.integrations.saving import AutoSave

    auto = AutoSave(tokens=32, capacity=250, block_size=BLOCK)
    assert auto.spec(list(range(100, 131)), "d") is None                      # 31 tokens: too short
    spec = auto.spec(list(range(100, 140)), "d")                              # 40 tokens: its 2 whole blocks
    assert spec.auto and spec.tokens == 32 and spec.name.startswith("auto-") and spec.namespace == "d"
    assert auto.spec(list(range(100, 140)) + [1, 2], "d").name == spec.name   # the same blocks, the same cube
    assert auto.spec(list(range(100, 140)), "d", exists=lambda ns, name: True) is None
    source = CubeSource(folder=str(tmp_path))
    names = []
    for seed in range(3):
        ref = cube_of(model, anchor, seed + 10)
        s = auto.spec(ref.all_ids[0].tolist(), "d")
        write_cube(source, s, build_cube(ref.kv, s, fields=ref.fingerprint_fields, engine="t"))
        names.append(s.name)
        evicted = auto.admit(source, s, 100)
    assert evicted == [f"d/{names[0]}"]                                       # 300 bytes > 250: the oldest goes
    assert sorted(p.stem for p in (tmp_path / "d").glob("*.safetensors")) == sorted(names[1:])
    for bad, why in [({"tokens": 8}, "autosave_tokens"), ({"capacity": 0}, "autosave_bytes")]:
        with pytest.raises(kvmem.CubeError, match=why):
            AutoSave(**{"tokens": 32, "capacity": 1, **bad}, block_size=BLOCK)
