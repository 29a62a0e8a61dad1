"""Quantized MemCubes (issue 23): the packing, the dequantizing splice against a float64 oracle (torch reference and
Triton under TRITON_INTERPRET=1), file round trips, the measured error, prefill, and refusals of damaged files."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import save_file

import kvmem
from kvmem import CubeError, FingerprintMismatch, MemCube
from kvmem.cubes.format import checksum
from kvmem.cubes.quant_error import measure_error, probe_windows
from kvmem.cubes.quantize import KEY_GROUP, SCHEMES, quantize_layer
from kvmem.kernels.dequant_splice import (dequant_splice_reference, dequant_splice_triton, dequantize, key_groups,
                                          unpack)
from kvmem.kernels.splice import splice_reference

from helpers import random_ids, read_parts, same_cube, split_file, tiny_model

BITS = [8, 4]


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


# ---------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,anchor", [(7, 0), (37, 3), (64, 32), (70, 35)])
def test_quantize_round_trip_within_half_a_step(bits, n, anchor):
    """Every value comes back within half a quantization step of its group's range (plus float16 rounding of the
    scale and min); keys per channel over token groups restarting at the anchor, values per token."""
    g = torch.Generator().manual_seed(n)
    k = torch.randn(2, n, 24, generator=g) * 3 + torch.randn(1, 1, 24, generator=g) * 20  # outlier channels
    v = torch.randn(2, n, 20, generator=g)
    layer = quantize_layer(k, v, bits=bits, anchor_len=anchor)
    rows = n if bits == 8 else (n + 1) // 2
    assert layer.k_q.shape == (2, rows, 24) and layer.v_q.shape == (2, rows, 20) and layer.k_q.dtype == torch.uint8
    assert layer.k_scale.shape == (2, key_groups(n, anchor, KEY_GROUP), 24) and layer.v_scale.shape == (2, n, 1)
    dk, dv = dequantize(layer.tensors(), bits=bits, group=KEY_GROUP, n_tokens=n, anchor_len=anchor,
                        dtype=torch.float64)
    step_k = layer.k_scale.double()[:, torch.where(torch.arange(n) < anchor, torch.arange(n) // KEY_GROUP,
                                                   -(-anchor // KEY_GROUP) + (torch.arange(n) - anchor) // KEY_GROUP)]
    assert ((dk - k.double()).abs() <= step_k / 2 + 1e-2 * step_k + 1e-3 * k.abs().double()).all()
    step_v = layer.v_scale.double()
    assert ((dv - v.double()).abs() <= step_v / 2 + 1e-2 * step_v + 1e-3 * v.abs().double()).all()
    # a group never spans the anchor boundary: a key group's range is its own tokens' range
    if anchor:
        first_memory_group = -(-anchor // KEY_GROUP)
        memory = k[:, anchor:anchor + KEY_GROUP]
        assert torch.allclose(layer.k_min[:, first_memory_group].float(), memory.amin(1), rtol=1e-3, atol=1e-2)


def test_int4_packs_two_tokens_a_byte():
    q = torch.randint(0, 16, (2, 5, 3), dtype=torch.uint8)
    k = q.float()  # levels as values: with the group's min 0 and max 15 the levels are the values themselves
    k[:, :, :] = q.float()
    layer = quantize_layer(torch.cat([k, torch.full((2, 1, 3), 15.0), torch.zeros(2, 1, 3)], 1),
                           torch.ones(2, 7, 3), bits=4, anchor_len=0, group=7)
    assert layer.k_q.shape == (2, 4, 3)
    assert torch.equal(unpack(layer.k_q, bits=4, n_tokens=7)[:, :5], q)


# ---------------------------------------------------------------- the dequantizing splice
def _case(bits, *, dim, rot, lens=(7, 13, 5), anchor=2, heads=3, layers=2, group=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    src, ref_k, ref_v = [], [], []
    for n in lens:
        packed, ks, vs = [], [], []
        for _ in range(layers):
            k = torch.randn(heads, n, dim, generator=g) * 3 + torch.randn(1, 1, dim, generator=g) * 5
            v = torch.randn(heads, n, dim, generator=g)
            layer = quantize_layer(k, v, bits=bits, anchor_len=anchor, group=group)
            dk, dv = dequantize(layer.tensors(), bits=bits, group=group, n_tokens=n, anchor_len=anchor,
                                dtype=torch.float64)
            packed.append(layer.tensors())
            ks.append(dk)
            vs.append(dv)
        src.append(packed)
        ref_k.append(ks)
        ref_v.append(vs)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    length = [lens[0]] + [n - anchor for n in lens[1:]]
    src_start = [0] + [anchor] * (len(lens) - 1)
    dst_start = [sum(length[:i]) for i in range(len(lens))]
    plan = dict(src_start=src_start, dst_start=dst_start, length=length,
                delta=[d - s for d, s in zip(dst_start, src_start)], inv_freq=inv_freq)
    quant = dict(n_tokens=list(lens), anchor_len=[anchor] * len(lens), bits=bits, group=group)
    shape = (layers, heads, sum(length) + 3, dim)
    return src, ref_k, ref_v, plan, quant, shape


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dim,rot,interleaved", [(16, 16, False), (24, 24, False), (24, 16, True)],
                         ids=["neox-pow2", "neox-24", "gptj-partial"])
@pytest.mark.parametrize("dst_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_dequant_splice_matches_float64_oracle(impl, dst_dtype, dim, rot, interleaved, bits):
    """The oracle: the packed KV dequantized in float64, then kvmem's float64 splice (rotation included)."""
    src, ref_k, ref_v, plan, quant, shape = _case(bits, dim=dim, rot=rot)
    k64, v64 = torch.full(shape, float("nan"), dtype=torch.float64), torch.full(shape, float("nan"), dtype=torch.float64)
    splice_reference(k64, v64, ref_k, ref_v, interleaved=interleaved, **plan)
    k, v = torch.full(shape, float("nan"), dtype=dst_dtype), torch.full(shape, float("nan"), dtype=dst_dtype)
    if impl == "triton":
        dequant_splice_triton(k, v, src, interleaved=interleaved, block_t=4, **quant, **plan)
    else:
        dequant_splice_reference(k, v, src, interleaved=interleaved, **quant, **plan)
    written = sum(plan["length"])
    tol = 8 * torch.finfo(dst_dtype).eps * 4
    torch.testing.assert_close(k[:, :, :written].double(), k64[:, :, :written], rtol=tol, atol=tol)
    torch.testing.assert_close(v[:, :, :written].double(), v64[:, :, :written], rtol=tol, atol=tol)
    assert torch.isnan(k[:, :, written:].float()).all() and torch.isnan(v[:, :, written:].float()).all()


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dst_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dequant_splice_on_gpu(bits, dst_dtype):
    """The kernel on a real GPU (dispatched by dequant_splice), Llama-like head, uneven lengths over many blocks."""
    from kvmem.kernels.dequant_splice import dequant_splice

    src, ref_k, ref_v, plan, quant, shape = _case(bits, dim=128, rot=128, lens=(300, 129, 77), heads=8, layers=4,
                                                  group=32)
    k64, v64 = torch.full(shape, float("nan"), dtype=torch.float64), torch.full(shape, float("nan"), dtype=torch.float64)
    splice_reference(k64, v64, ref_k, ref_v, **plan)
    cuda = [[tuple(t.cuda() for t in layer) for layer in cube] for cube in src]
    k = torch.full(shape, float("nan"), dtype=dst_dtype, device="cuda")
    v = torch.full(shape, float("nan"), dtype=dst_dtype, device="cuda")
    dequant_splice(k, v, cuda, **quant, **plan)
    n, tol = sum(plan["length"]), 8 * torch.finfo(dst_dtype).eps * 4
    torch.testing.assert_close(k[:, :, :n].double().cpu(), k64[:, :, :n], rtol=tol, atol=tol)
    torch.testing.assert_close(v[:, :, :n].double().cpu(), v64[:, :, :n], rtol=tol, atol=tol)


def test_dequant_splice_rejects_bad_arguments():
    src, _, _, plan, quant, shape = _case(8, dim=16, rot=16)
    k, v = torch.empty(shape), torch.empty(shape)
    with pytest.raises(ValueError, match="bits"):
        dequant_splice_reference(k, v, src, **{**quant, "bits": 3}, **plan)
    with pytest.raises(ValueError, match="packed layer"):
        dequant_splice_reference(k, v, src, **{**quant, "n_tokens": [8, 13, 5]}, **plan)
    with pytest.raises(ValueError, match="out of range"):
        dequant_splice_reference(k, v, src, **quant, **{**plan, "length": [8, 11, 3]})


# ---------------------------------------------------------------- cubes
@pytest.fixture(scope="module", autouse=True)
def _fewer_probes():
    """Two probes of 8 tokens, 3 greedy tokens: the measurement's code paths at a fraction of the forwards."""
    from kvmem.cubes import quant_error

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quant_error, "PROBES", 2)
        mp.setattr(quant_error, "PROBE_TOKENS", 8)
        mp.setattr(quant_error, "GREEDY_TOKENS", 3)
        yield


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def cube(model):
    return MemCube.from_ids(model, random_ids(70), anchor_ids=random_ids(3, seed=1), name="q", text="Alice")


@pytest.fixture(scope="module")
def quantized(cube, tmp_path_factory):
    folder = tmp_path_factory.mktemp("quantized")
    return {s: cube.save(folder / f"{s}.safetensors", quantize=s) for s in SCHEMES}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_file_round_trip(cube, quantized, scheme):
    path = quantized[scheme]
    q = MemCube.load(path)
    header, _ = split_file(open(path, "rb").read())
    assert header["__metadata__"]["format_version"] == "2"  # a kvmem that reads only version 1 refuses it
    assert q.packed is not None and q.dtype == cube.dtype and q.kv_shapes == cube.kv_shapes
    info = q.quantization
    assert info["scheme"] == scheme and info["bits"] == SCHEMES[scheme] and info["bytes"] == q.nbytes
    assert info["full_bytes"] == cube.nbytes
    # bytes: one byte (int8) or half a byte (int4) a number, plus float16 scale and min per key group and channel
    # and per value token
    t, rows = cube.all_ids.shape[1], cube.all_ids.shape[1] if scheme == "int8" else (cube.all_ids.shape[1] + 1) // 2
    want = sum(h * rows * d + 4 * h * key_groups(t, cube.anchor_len, KEY_GROUP) * d + h * rows * dv + 4 * h * t
               for (h, _, d), (_, _, dv) in cube.kv_shapes)
    assert q.nbytes == want and q.nbytes < cube.nbytes * (0.31 if scheme == "int8" else 0.19)
    err = info["error"]
    assert 0 <= err["kl_mean"] <= err["kl_max"] and 0 <= err["greedy_same"] <= 1 and err["probes"] >= 1
    # the same cube again: saving a loaded quantized cube keeps it quantized and unchanged
    again = MemCube.load(q.save(path.replace(".safetensors", "-again.safetensors")))
    assert same_cube(again, q)
    # its KV is the dequantized packed bytes, close to the full-width cube
    for (k, v), (k0, v0) in zip(q.kv, cube.kv):
        assert k.dtype == k0.dtype and k.shape == k0.shape
        scale = k0.abs().max()
        assert (k - k0).abs().max() <= scale * (0.02 if scheme == "int8" else 0.2)


def test_full_width_cubes_stay_version_1(cube, tmp_path):
    header, _ = split_file(open(cube.save(tmp_path / "full.safetensors"), "rb").read())
    assert header["__metadata__"]["format_version"] == "1"
    assert "quantization" not in json.loads(header["__metadata__"]["meta"])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_prefill_dequantizes_inside_the_splice(model, cube, quantized, scheme):
    """prefill of a quantized cube equals prefill of its dequantized KV as a full-width cube, alone, composed, and
    mixed with full-width cubes; Prefix.quantized reports each quantized cube's error."""
    q = MemCube.load(quantized[scheme])
    plain = MemCube(q.kv, q.all_ids[0], {k: v for k, v in q.meta.items() if k != "quantization"})
    other = MemCube.from_ids(model, random_ids(40, seed=5), anchor_ids=random_ids(3, seed=1), name="other")
    for cubes in ([q], [q, other, q], [other, q]):
        got = kvmem.prefill(model, cubes, recompute="none")
        want = kvmem.prefill(model, [plain if c is q else c for c in cubes], recompute="none")
        assert torch.equal(got.input_ids, want.input_ids)
        for a, b in zip(got.cache.layers, want.cache.layers):
            torch.testing.assert_close(a.keys, b.keys, rtol=1e-6, atol=1e-6)
            assert torch.equal(a.values, b.values)
        assert [r["name"] for r in got.quantized] == ["q"] * sum(c is q for c in cubes)
        assert got.quantized[0]["scheme"] == scheme and got.quantized[0]["kl_mean"] == q.quantization["error"]["kl_mean"]
        assert want.quantized == []


def test_measured_error_is_real(model, cube):
    """The measurement is zero for the exact KV itself, positive for a perturbed one, larger for int4 than int8."""
    windows = probe_windows(cube.num_tokens, probes=4, probe_tokens=16)
    assert len(windows) == 4 and all(b - a == 16 for a, b in windows) and windows[-1][1] == cube.num_tokens
    assert probe_windows(5, probes=4, probe_tokens=16) == [(0, 5)]
    same = measure_error(model, cube.kv, cube.kv, cube.all_ids[0], anchor_len=cube.anchor_len)
    assert same["kl_mean"] == 0 and same["kl_max"] == 0 and same["greedy_same"] == 1
    noisy = [(k + torch.randn_like(k), v + torch.randn_like(v)) for k, v in cube.kv]
    worse = measure_error(model, cube.kv, noisy, cube.all_ids[0], anchor_len=cube.anchor_len)
    assert worse["kl_mean"] > 0
    int8, int4 = (cube.quantize(s).quantization["error"]["kl_mean"] for s in ("int8", "int4"))
    assert 0 < int8 < int4


def test_quantize_refusals(model, cube, quantized, tmp_path):
    loaded = MemCube.load(quantized["int8"])
    with pytest.raises(CubeError, match="quantize must be one of 'int8', 'int4'"):
        cube.save(tmp_path / "x.safetensors", quantize="int2")
    with pytest.raises(CubeError, match="already quantized .int8.; quantizing it to int4"):
        loaded.quantize("int4")
    assert loaded.quantize("int8") is loaded
    full = MemCube.load(cube.save(tmp_path / "full.safetensors"))  # loaded: no model known in this process
    with pytest.raises(CubeError, match="pass model="):
        full.save(tmp_path / "q.safetensors", quantize="int8")
    with pytest.raises(FingerprintMismatch):
        full.quantize("int8", model=tiny_model("llama", seed=1))
    assert MemCube.load(full.save(tmp_path / "q.safetensors", quantize="int8", model=model)).packed is not None
    assert not (tmp_path / "x.safetensors").exists()


def test_with_meta_and_to_keep_the_packed_bytes(quantized):
    q = MemCube.load(quantized["int4"])
    stamped = q.with_meta({"memory": {"id": "x"}})
    assert stamped.packed is q.packed and stamped.meta["memory"] == {"id": "x"}
    moved = q.to("cpu", dtype=torch.bfloat16)
    assert moved.nbytes == q.nbytes and moved.dtype == torch.bfloat16 and moved.kv[0][0].dtype == torch.bfloat16


# ---------------------------------------------------------------- damaged and forged quantized files
def _forge(path, meta, tensors, *, version="2"):
    meta_json = json.dumps(meta, sort_keys=True, ensure_ascii=False)
    tensors = {k: t.contiguous() for k, t in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "kvmem.memcube", "format_version": version, "meta": meta_json,
                                            "checksum": checksum("kvmem.memcube", version, meta_json, tensors)})
    return path


def _set(name, fn):
    def edit(meta, t):
        t[name] = fn(t[name].clone())
    return edit


def _meta(path, value):
    def edit(meta, t):
        *keys, last = path
        for key in keys:
            meta = meta[key]
        meta[last] = value
    return edit


FORGED = {
    "scale missing": (lambda m, t: t.pop("k_scale.1"), r"missing \['k_scale\.1'\]"),
    "old names": (lambda m, t: t.update({"k.0": t.pop("k_q.0")}), r"missing \['k_q\.0'\].*unexpected \['k\.0'\]"),
    "levels as int8": (_set("k_q.0", lambda x: x.to(torch.int8)), r"k_q\.0 is torch\.int8"),
    "levels one token short": (_set("v_q.1", lambda x: x[:, 1:]), r"v_q\.1 is torch\.uint8"),
    "scale as float32": (_set("v_scale.0", lambda x: x.float()), r"v_scale\.0 is torch\.float32"),
    "nan scale": (_set("k_scale.0", lambda x: x.index_fill_(1, torch.tensor([0]), float("nan"))),
                  r"k_scale\.0 holds a value that is not finite or < 0"),
    "inf min": (_set("v_min.1", lambda x: x.index_fill_(1, torch.tensor([2]), float("inf"))),
                r"v_min\.1 holds a value that is not finite"),
    "negative scale": (_set("v_scale.0", lambda x: -x - 1), r"v_scale\.0 holds a value that is not finite or < 0"),
    "bits disagree": (_meta(("quantization", "bits"), 4), r"quantization metadata lacks or garbles"),
    "scheme unknown": (_meta(("quantization", "scheme"), "int2"), r"quantization metadata lacks or garbles"),
    "key group changed": (_meta(("quantization", "key_group"), 16), r"quantization metadata lacks or garbles"),
    "error missing": (_meta(("quantization", "error"), None), r"quantization metadata lacks or garbles"),
    "scheme says int4": (_meta(("quantization", "scheme"), "int4"), r"quantization metadata|k_q\.0 is"),
}


@pytest.mark.parametrize("edit", FORGED)
def test_forged_quantized_file_is_refused(quantized, tmp_path, edit):
    """Checksum recomputed after an inconsistent edit: only validation stands in the way, and it must say why."""
    change, message = FORGED[edit]
    meta, tensors = read_parts(__import__("pathlib").Path(quantized["int8"]))
    change(meta, tensors)
    path = _forge(tmp_path / "forged.safetensors", meta, tensors)
    with pytest.raises(CubeError, match=message):
        MemCube.load(path)


def test_version_must_match_quantization(quantized, cube, tmp_path):
    from pathlib import Path

    meta, tensors = read_parts(Path(quantized["int8"]))
    with pytest.raises(CubeError, match="format version 1 but the metadata declares a quantization"):
        MemCube.load(_forge(tmp_path / "v1.safetensors", meta, tensors, version="1"))
    plain = cube.save(tmp_path / "plain.safetensors")
    meta, tensors = read_parts(Path(plain))
    with pytest.raises(CubeError, match="format version 2 but the metadata declares no quantization"):
        MemCube.load(_forge(tmp_path / "v2.safetensors", meta, tensors, version="2"))
    assert MemCube.load(_forge(tmp_path / "ok.safetensors", *read_parts(Path(quantized["int4"])))).packed is not None


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fuzzed_quantized_files_raise_cube_error(quantized, tmp_path, scheme):
    """Seeded random damage to a quantized file: CubeError, or (damage that changed nothing) the same cube."""
    from test_fuzz_cube_files import MUTATORS

    data = open(quantized[scheme], "rb").read()
    original = MemCube.load(quantized[scheme])
    rng = random.Random(23)
    path = tmp_path / "fuzz.safetensors"
    escaped = []
    for i in range(120):
        mutated, desc = rng.choice(MUTATORS)(rng, data)
        path.write_bytes(mutated)
        try:
            loaded = MemCube.load(path)
        except CubeError:
            continue
        except Exception as exc:  # the bug this test exists for
            escaped.append(f"#{i} {desc}: {type(exc).__name__}: {exc}"[:160])
            continue
        if not (mutated == data or same_cube(loaded, original)):
            escaped.append(f"#{i} {desc}: loaded a cube that differs from the original")
    assert not escaped, "\n".join(escaped[:10])


# ---------------------------------------------------------------- CLI, store, scheduler
def test_cli_build_quantize_then_inspect(checkpoint, tmp_path):
    from typer.testing import CliRunner

    from kvmem.cli import app

    runner = CliRunner(env={"COLUMNS": "400", "NO_COLOR": "1"})
    notes = tmp_path / "notes.txt"
    notes.write_text("Alice lives in Oslo. Bob lives in Lisbon. Carol works as a baker in Porto.\n", encoding="utf-8")
    out = tmp_path / "notes.safetensors"
    result = runner.invoke(app, ["build", str(notes), "-o", str(out), "--model", str(checkpoint), "--quantize", "int4"])
    assert result.exit_code == 0, result.output
    cube = MemCube.load(out)
    assert cube.quantization["scheme"] == "int4" and "next-token KL" in result.output
    shown = runner.invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0 and "int4:" in shown.output and "greedy continuation unchanged" in shown.output
    bad = runner.invoke(app, ["build", str(notes), "-o", str(out), "--model", str(checkpoint), "--quantize", "int3"])
    assert bad.exit_code != 0 and "int8 or int4" in bad.output
    store = ["--store", str(tmp_path / "store")]
    added = runner.invoke(app, ["add", "--file", str(notes), "--id", "n1", "--cube", "--quantize", "int8",
                                "--model", str(checkpoint), *store])
    assert added.exit_code == 0 and "int8 cube" in added.output, added.output
    stored = kvmem.CubeStore(tmp_path / "store").view("default").load_cube("n1")
    assert stored.quantization["scheme"] == "int8" and stored.packed is not None
    alone = runner.invoke(app, ["add", "x y z", "--quantize", "int8", *store])
    assert alone.exit_code != 0 and "add --cube" in alone.output


def test_store_keeps_packed_bytes_and_scheduler_counts_them(model, cube, tmp_path):
    from kvmem.memory.scheduler import MemScheduler
    from kvmem.store import CubeStore

    view = CubeStore(tmp_path / "store").view("ns")
    full = view.put_cube("full", cube)
    small = view.put_cube("small", cube, quantize="int8")
    assert small.bytes < 0.45 * full.bytes  # the file holds packed bytes
    loaded = view.load_cube("small")
    assert loaded.quantization["scheme"] == "int8" and loaded.packed is not None
    scheduler = MemScheduler(view, device_capacity_bytes=10**9)
    scheduler.fetch("small")
    scheduler.fetch("full")
    stats = scheduler.stats()
    assert stats["bytes_disk_read"] == loaded.nbytes + cube.nbytes and stats["device_bytes"] == loaded.nbytes + cube.nbytes
    assert loaded.nbytes < 0.45 * cube.nbytes


# ---------------------------------------------------------------- cubes="auto", mm.last, serving
BEAGLE = ("Toast the beagle sleeps in a wicker basket by the kitchen door, under a blue blanket that Grandma knitted, "
          "and she will not sleep anywhere else, not even on the sofa in winter. Everyone in the house knows this, "
          "and the neighbours have heard the story at least twice, usually over dinner on a Sunday.")


@pytest.mark.parametrize("allow", [False, True])
def test_auto_uses_quantized_cubes_only_when_allowed(tmp_path, tokenizer, allow):
    mm = kvmem.wrap(tiny_model("llama"), tokenizer)
    view = kvmem.CubeStore(tmp_path / "s").view("me")
    view.put_cube("beagle", mm.build_cube(BEAGLE, name="beagle"), quantize="int8")
    mm.attach(view, index=kvmem.MemoryIndex(dense=False), allow_quantized=allow, promote_after=0)
    mm.generate("Where does Toast the beagle sleep?", cubes="auto", evidence=False, max_new_tokens=1)
    (memory,) = mm.last.memories
    if allow:
        assert memory["source"] == "disk" and mm.last.injected
        assert [q["name"] for q in mm.last.quantized] == ["beagle"] and mm.last.quantized[0]["scheme"] == "int8"
    else:
        assert memory["source"] == "text" and "quantized (int8" in memory["note"] and not mm.last.quantized


def test_mm_last_reports_explicit_quantized_cubes(tokenizer):
    mm = kvmem.wrap(tiny_model("llama"), tokenizer)
    full = mm.build_cube(BEAGLE, name="beagle")
    mm.generate("Where?", cubes=[full], max_new_tokens=1)
    assert mm.last.quantized == []
    mm.generate("Where?", cubes=[full.quantize("int4")], max_new_tokens=1)
    (report,) = mm.last.quantized
    assert report["name"] == "beagle" and report["scheme"] == "int4" and 0 <= report["kl_mean"] <= report["kl_max"]


def test_serving_salts_quantized_cubes_and_never_auto_matches_them(model, cube, tmp_path):
    from kvmem.cubes.fingerprint import fingerprint_fields
    from kvmem.integrations.serving import CubePlanner, CubeSource
    from kvmem.model.rope import rope_facts

    cube.save(tmp_path / "default" / "q.safetensors", quantize="int8")
    planner = CubePlanner(CubeSource(folder=str(tmp_path)), fields=fingerprint_fields(model), dtype=torch.float32,
                          block_size=16, rope=rope_facts(model))
    prompt = cube.all_ids[0].tolist() + [1, 2, 3]
    plan = planner.plan(prompt, {"kvmem": {"cubes": ["q"]}})
    assert not plan.exact and plan.salt and any("quantized int8" in n for n in plan.notes)
    loaded = MemCube.load(tmp_path / "default" / "q.safetensors")
    for (k, v), (dk, dv) in zip(plan.kv, loaded.kv):
        assert torch.equal(k, dk[:, :plan.num_tokens]) and torch.equal(v, dv[:, :plan.num_tokens])
    assert planner.plan(prompt) is None  # a plain request never gets an approximate cube by automatic match


def test_redis_stores_packed_bytes(cube, tmp_path):
    """A quantized cube put through a Redis store: Redis holds the packed file, another machine's copy loads it."""
    pytest.importorskip("redis")
    from test_store_redis import REDIS_SERVER, redis_server, store_url

    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis") as url:
        writer = kvmem.CubeStore(store_url(url, tmp_path, tag="q", machine="m1")).view("ns")
        rec = writer.put_cube("q", cube, quantize="int4")
        full = writer.put_cube("full", cube)
        assert rec.bytes < 0.3 * full.bytes  # head_dim 16: the scales weigh more than on a real model
        reader = kvmem.CubeStore(store_url(url, tmp_path, tag="q", machine="m2")).view("ns")
        loaded = reader.load_cube("q")
        assert loaded.quantization["scheme"] == "int4" and same_cube(loaded, writer.load_cube("q"))
