"""The splice kernel against a float64 oracle: reference on CPU, Triton under TRITON_INTERPRET=1 (conftest sets
it when there is no CUDA) and on a real GPU when there is one."""

from __future__ import annotations

import pytest
import torch

from kvmem.kernels.splice import _rotate, rotation_tables, splice, splice_reference, splice_triton


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    """Triton on CPU runs only under TRITON_INTERPRET=1, read when the kernel module is first imported (lazily, in
    the first Triton test). conftest sets it, but another conftest may clear it at collection (tests/vllm does,
    for vLLM's kernels), so set it for these tests alone."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _case(*, dtype, dst_dtype, heads=3, dim=24, layers=2, lens=(7, 13, 5), rot=24, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    src_k = [[torch.randn(heads, n, dim, generator=g).to(device, dtype) for _ in range(layers)] for n in lens]
    src_v = [[torch.randn(heads, n, dim, generator=g).to(device, dtype) for _ in range(layers)] for n in lens]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    src_start = [0] + [2] * (len(lens) - 1)         # later cubes skip a 2-token anchor
    length = [lens[0]] + [n - 2 for n in lens[1:]]
    dst_start, off = [], 0
    for n in length:
        dst_start.append(off)
        off += n
    delta = [0] + [dst_start[c] - src_start[c] for c in range(1, len(lens))]
    dst = lambda: torch.full((layers, heads, off + 3, dim), float("nan"), dtype=dst_dtype, device=device)  # noqa: E731
    args = dict(src_start=src_start, dst_start=dst_start, length=length, delta=delta, inv_freq=inv_freq)
    return src_k, src_v, dst, args


def _oracle(src_k, src_v, dst, args, interleaved):
    k64, v64 = dst(), dst()
    k64, v64 = k64.double().cpu(), v64.double().cpu()
    cpu64 = lambda cubes: [[t.double().cpu() for t in cube] for cube in cubes]  # noqa: E731
    splice_reference(k64, v64, cpu64(src_k), cpu64(src_v), interleaved=interleaved, **args)
    return k64, v64


def _tol(*dtypes):
    return max(4 * torch.finfo(d).eps for d in dtypes)


IMPLS = {"reference": splice_reference, "triton": splice_triton}


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype,dst_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=["f32", "bf16", "f16->f32", "f32->bf16"])
@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_splice_matches_float64_oracle(impl, dtype, dst_dtype, interleaved):
    src_k, src_v, dst, args = _case(dtype=dtype, dst_dtype=dst_dtype)
    k, v = dst(), dst()
    IMPLS[impl](k, v, src_k, src_v, interleaved=interleaved, **args)
    k64, v64 = _oracle(src_k, src_v, dst, args, interleaved)
    written = slice(0, sum(args["length"]))
    tol = _tol(dtype, dst_dtype) * 8
    torch.testing.assert_close(k[:, :, written].double(), k64[:, :, written], rtol=tol, atol=tol)
    torch.testing.assert_close(v[:, :, written].double(), v64[:, :, written], rtol=tol, atol=tol)
    assert torch.isnan(k[:, :, sum(args["length"]):]).all()  # nothing written past the spliced tokens


@pytest.mark.parametrize("block_t", [4, 32])
@pytest.mark.parametrize("dtype,dst_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)],
                         ids=["f32", "bf16"])
def test_triton_neox_full_rotary_fast_path(dtype, dst_dtype, block_t):
    """NeoX halves over a power-of-two head (Llama, Qwen, Mistral, Gemma): the kernel's half-tile path. Cubes of
    uneven lengths over several token blocks (block_t=4) and within one (32)."""
    src_k, src_v, dst, args = _case(dtype=dtype, dst_dtype=dst_dtype, dim=16, rot=16, lens=(9, 21, 6))
    per_layer = torch.stack([args["inv_freq"], torch.zeros(8)])  # layer 1 NoPE: the zero row leaves it as it is
    for inv_freq in (args["inv_freq"], per_layer):
        a = {**args, "inv_freq": inv_freq}
        k, v = dst(), dst()
        splice_triton(k, v, src_k, src_v, block_t=block_t, **a)
        k64, v64 = _oracle(src_k, src_v, dst, a, False)
        n = sum(a["length"])
        tol = _tol(dtype, dst_dtype) * 8
        torch.testing.assert_close(k[:, :, :n].double(), k64[:, :, :n], rtol=tol, atol=tol)
        torch.testing.assert_close(v[:, :, :n].double(), v64[:, :, :n], rtol=tol, atol=tol)
        assert torch.isnan(k[:, :, n:]).all() and torch.isnan(v[:, :, n:]).all()


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_no_rotary_dims_is_an_exact_copy(impl):
    """A model with no rotary dims at all (inv_freq empty): keys are copied bit for bit, inf and NaN included (the
    kernel must not touch a partner element it would multiply by a zero sine)."""
    src_k, src_v, dst, args = _case(dtype=torch.float32, dst_dtype=torch.float32, rot=0)
    for cube in src_k:
        cube[0][0, 0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 3.0])
    k, v = dst(), dst()
    IMPLS[impl](k, v, src_k, src_v, **args)
    for c, (s, d, n) in enumerate(zip(args["src_start"], args["dst_start"], args["length"])):
        for layer in range(len(src_k[c])):
            torch.testing.assert_close(k[layer, :, d:d + n], src_k[c][layer][:, s:s + n], rtol=0, atol=0,
                                       equal_nan=True)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_partial_rotary_and_odd_head_dim(impl):
    """head_dim 40 (BLOCK_D pads to 64), only 16 dims rotated: the other 24 are copied untouched."""
    src_k, src_v, dst, args = _case(dtype=torch.float32, dst_dtype=torch.float32, dim=40, rot=16, heads=5)
    k, v = dst(), dst()
    IMPLS[impl](k, v, src_k, src_v, **args)
    k64, _ = _oracle(src_k, src_v, dst, args, False)
    n = sum(args["length"])
    torch.testing.assert_close(k[:, :, :n].double(), k64[:, :, :n], rtol=1e-6, atol=1e-6)
    last = len(src_k) - 1
    s, d, ln = args["src_start"][last], args["dst_start"][last], args["length"][last]
    assert torch.equal(k[0, :, d:d + ln, 16:], src_k[last][0][:, s:s + ln, 16:])


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_per_layer_frequencies_and_nope_layers(impl, interleaved):
    """A [layers, half] table: each layer rotated by its own frequencies (Gemma 3's local and global RoPE), and a
    row of zeros leaves a NoPE layer's keys bit for bit as they were. 3 layers, head_dim 24 (not a power of 2)."""
    src_k, src_v, dst, args = _case(dtype=torch.float32, dst_dtype=torch.float32, layers=3)
    base = args["inv_freq"]
    table = torch.stack([base, 1.0 / (1e6 ** (torch.arange(0, 24, 2, dtype=torch.float32) / 24)), torch.zeros(12)])
    args = {**args, "inv_freq": table}
    k, v = dst(), dst()
    IMPLS[impl](k, v, src_k, src_v, interleaved=interleaved, **args)
    n = sum(args["length"])
    for layer in range(2):  # each rotated layer against the oracle run with that layer's own vector
        one = {**args, "inv_freq": table[layer]}
        k64, _ = _oracle(src_k, src_v, dst, one, interleaved)
        torch.testing.assert_close(k[layer, :, :n].double(), k64[layer, :, :n], rtol=1e-6, atol=1e-6)
    for c in range(len(src_k)):  # the NoPE layer: an exact copy
        s, d, ln = args["src_start"][c], args["dst_start"][c], args["length"][c]
        assert torch.equal(k[2, :, d:d + ln], src_k[c][2][:, s:s + ln])
    assert not torch.equal(k[0, :, :n], k[1, :, :n])


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_values_of_their_own_width(impl):
    """MLA caches keys and values of different widths: values [heads, T, 40] beside keys [heads, T, 24]."""
    src_k, _, dst, args = _case(dtype=torch.float32, dst_dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    src_v = [[torch.randn(t.shape[0], t.shape[1], 40, generator=g) for t in cube] for cube in src_k]
    k = dst()
    v = torch.full((*k.shape[:3], 40), float("nan"))
    IMPLS[impl](k, v, src_k, src_v, **args)
    k64, _ = _oracle(src_k, [[t[..., :24] for t in cube] for cube in src_v], dst, args, False)
    n = sum(args["length"])
    torch.testing.assert_close(k[:, :, :n].double(), k64[:, :, :n], rtol=1e-6, atol=1e-6)
    for c in range(len(src_k)):
        s, d, ln = args["src_start"][c], args["dst_start"][c], args["length"][c]
        assert torch.equal(v[1, :, d:d + ln], src_v[c][1][:, s:s + ln])
    assert torch.isnan(v[:, :, n:]).all()


def test_rotation_composes():
    """Rotating by a then by b equals rotating by a + b: what makes moving a cached key exact."""
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    inv = 1.0 / (10000 ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32))
    ca, sa = rotation_tables([5], inv)
    cb, sb = rotation_tables([-12], inv)
    cab, sab = rotation_tables([-7], inv)
    two = _rotate(_rotate(x, ca[0].double(), sa[0].double(), False), cb[0].double(), sb[0].double(), False)
    torch.testing.assert_close(two, _rotate(x, cab[0].double(), sab[0].double(), False), rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_refused():
    src_k, src_v, dst, args = _case(dtype=torch.float32, dst_dtype=torch.float32)
    with pytest.raises(ValueError, match="out of range"):
        splice_reference(dst(), dst(), src_k, src_v, **{**args, "length": [100] + args["length"][1:]})
    with pytest.raises(ValueError, match="one entry per cube"):
        splice_reference(dst(), dst(), src_k, src_v, **{**args, "delta": [0]})
    with pytest.raises(ValueError, match=r"inv_freq must be \[half\] or \[layers=2, half\]"):
        splice_reference(dst(), dst(), src_k, src_v, **{**args, "inv_freq": torch.zeros(3, 12)})


@pytest.mark.gpu
@pytest.mark.parametrize("per_layer", [False, True], ids=["shared", "per-layer+nope"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_triton_on_gpu(dtype, per_layer):
    src_k, src_v, dst, args = _case(dtype=dtype, dst_dtype=dtype, heads=8, dim=128, rot=128, layers=4,
                                    lens=(300, 129, 77), device="cuda")
    if per_layer:  # layers 0/2 local theta, 1 global, 3 NoPE
        glob = 1.0 / (1e6 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
        args["inv_freq"] = torch.stack([args["inv_freq"], glob, args["inv_freq"], torch.zeros(64)])
    k, v = dst(), dst()
    splice(k, v, src_k, src_v, **args)  # dispatches to Triton on CUDA
    k64, v64 = _oracle(src_k, src_v, dst, args, False)
    n = sum(args["length"])
    tol = _tol(dtype) * 8
    torch.testing.assert_close(k[:, :, :n].double().cpu(), k64[:, :, :n], rtol=tol, atol=tol)
    torch.testing.assert_close(v[:, :, :n].double().cpu(), v64[:, :, :n], rtol=tol, atol=tol)
