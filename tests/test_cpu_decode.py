"""kvmem's CPU decode kernel (kvmem/kernels/cpu_decode.py): exact against torch's sdpa (the oracle) for grouped
heads, head dims, key counts, runs and cache views; taken by kvmem_sdpa only where it applies and only when asked;
a fast-path decode on it equals a full prefill; a machine that cannot build it gets a clear error."""

from __future__ import annotations

import os

import pytest
import torch

import kvmem
import kvmem.model.attention as attention
from kvmem.errors import CubeError
from kvmem.kernels import cpu_decode
from kvmem.model.attention import use_gqa_attention
from conftest import random_ids, tiny_model


@pytest.fixture(scope="module")
def kernel():
    try:
        return cpu_decode.build()
    except CubeError as exc:  # no compiler or no AVX-512 here: the fallback is tested below without it
        if os.environ.get("KVMEM_REQUIRE_CPU_KERNEL"):  # a machine that must build it: fail, do not skip
            raise
        pytest.skip(str(exc))


def _inputs(heads, kv_heads, kv_len, dim, *, room=7, seed=0, scale=1.0):
    """A decode step's query [1, heads, 1, dim] and keys/values as views of a larger cache (room after them)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, 1, dim, generator=g) * scale
    k = torch.randn(1, kv_heads, kv_len + room, dim, generator=g)[:, :, :kv_len]
    v = torch.randn(1, kv_heads, kv_len + room, dim, generator=g)[:, :, :kv_len]
    return q, k, v


def _oracle(q, k, v, scale=None):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)


def _as_exact_as_torch(got, q, k, v, scale=None):
    """``got`` is as close to the float64 result as torch's own float32 sdpa is (within 4x its worst error, or
    2e-6): two kernels summing the same products in another order."""
    exact = _oracle(q.double(), k.double(), v.double(), scale=scale)
    torch_err = (_oracle(q, k, v, scale=scale).double() - exact).abs().max().item()
    err = (got.double() - exact).abs().max().item()
    assert err <= max(4 * torch_err, 2e-6), (err, torch_err)


@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 2), (8, 1), (2, 2)])
@pytest.mark.parametrize("kv_len", [1, 15, 16, 17, 129, 700, 3001])
def test_equals_sdpa(kernel, dim, heads, kv_heads, kv_len):
    """Every key count around the 16-wide vectors and the 128-key blocks, views into a cache with room after."""
    q, k, v = _inputs(heads, kv_heads, kv_len, dim, seed=kv_len)
    assert (kv_heads == 1 or not k.is_contiguous()) and cpu_decode.applies(q, k, v)
    _as_exact_as_torch(cpu_decode.decode_attention(q, k, v), q, k, v)


@pytest.mark.parametrize("parts", [1, 2, 3, 5, 64])
def test_runs_of_keys_merge_exactly(kernel, parts):
    """A head's keys split into runs (threads' tasks) and merged by their maxima and sums == one pass."""
    q, k, v = _inputs(9, 3, 1000, 64, scale=4.0)  # peaked softmax: the runs' maxima differ widely
    got = kernel.decode_attention(q.reshape(3, 3, 64), k[0], v[0], 64 ** -0.5, parts).reshape(1, 9, 1, 64)
    _as_exact_as_torch(got, q, k, v)


def test_scale_and_extreme_scores(kernel):
    """A given scale is used; scores hundreds apart (exps that underflow to 0) stay exact."""
    q, k, v = _inputs(4, 2, 300, 128, scale=30.0)
    _as_exact_as_torch(cpu_decode.decode_attention(q, k, v, scale=0.3), q, k, v, scale=0.3)


def test_nan_and_inf_propagate_as_in_sdpa(kernel):
    """A NaN in one key (a corrupted cache) or an infinite key gives NaN where sdpa does, never a quiet number."""
    for bad in (float("nan"), float("inf")):
        q, k, v = _inputs(9, 3, 300, 64)
        k[0, 1, 17, 5] = bad
        got, want = cpu_decode.decode_attention(q, k, v), _oracle(q, k, v)
        assert want.isnan().any()
        assert torch.equal(got.isnan(), want.isnan())


def test_runs_balance_the_threads():
    assert cpu_decode.runs(3, 6231, threads=2) == 2  # SmolLM2 on 2 threads: 6 tasks, 3 each
    assert cpu_decode.runs(4, 6231, threads=2) == 1  # already even
    assert cpu_decode.runs(3, 600, threads=2) == 1  # runs would be under MIN_RUN keys
    assert cpu_decode.runs(3, 2000, threads=4) == 1  # more runs would not lighten the busiest thread
    assert cpu_decode.runs(3, 9000, threads=1) == 1


def test_not_taken_when_a_gradient_is_wanted(kernel, monkeypatch):
    """The kernel has no backward: a decode step under autograd takes torch's kernel, so gradients reach every
    layer's attention weights as without the flag."""
    calls = []
    real = cpu_decode.decode_attention
    monkeypatch.setattr(cpu_decode, "decode_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model = tiny_model("llama", hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    ids = random_ids(20, seed=1)[None]
    with torch.no_grad():
        cache = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
    use_gqa_attention(model, decode_kernel=True)
    try:
        model(input_ids=ids[:, -1:], cache=cache).logits.sum().backward()
    finally:
        use_gqa_attention(model, enabled=False)
    assert calls == []
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_applies_only_where_exact(kernel):
    q, k, v = _inputs(9, 3, 40, 64)
    assert cpu_decode.applies(q, k, v)
    assert not cpu_decode.applies(q.bfloat16(), k.bfloat16(), v.bfloat16())  # float32 only
    assert not cpu_decode.applies(torch.cat([q, q], 2), k, v)  # two queries a head: not a decode step
    assert not cpu_decode.applies(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1))
    q32, k32, v32 = _inputs(9, 3, 40, 32)
    assert not cpu_decode.applies(q32, k32, v32)  # a head dim it has no registers for
    kt = torch.randn(1, 3, 64, 40).transpose(2, 3)  # last axis strided
    assert not cpu_decode.applies(q, kt, v)


def _fast_decode(model, *, kernel, steps=6):
    from kvmem.model.static_cache import static_prefix

    cube = kvmem.MemCube.from_ids(model, random_ids(600, seed=3))
    query = random_ids(6, seed=8)
    prefix = static_prefix(model, kvmem.prefill(model, cube), max_new_tokens=steps, query_len=6)
    ids = prefix.extend(query)
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False, pad_token_id=0,
               output_logits=True, return_dict_in_generate=True)
    use_gqa_attention(model, decode_kernel=kernel)
    try:
        out = model.generate(ids, cache=prefix.cache, **gen)
    finally:
        use_gqa_attention(model, enabled=False)
    want = model.generate(ids, **gen)  # stock sdpa, a full prefill of memory + query
    return ids, out, want


def test_fast_path_decode_on_the_kernel_equals_a_full_prefill(kernel, monkeypatch):
    """SmolLM2's head layout (9 query heads over 3 KV heads, head dim 64): every decode step of every layer runs
    on the kernel, and the tokens and logits equal stock sdpa's full prefill."""
    calls = []
    real = cpu_decode.decode_attention
    monkeypatch.setattr(cpu_decode, "decode_attention", lambda q, k, v, **kw: calls.append(k.shape[2]) or
                        real(q, k, v, **kw))
    model = tiny_model("llama", hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    ids, out, want = _fast_decode(model, kernel=True)
    assert torch.equal(out.sequences, want.sequences)
    for a, b in zip(out.logits, want.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * max(1.0, b.abs().max().item()))
    n = ids.shape[1]
    assert sorted(set(calls)) == list(range(n + 1, n + 6))  # the 5 decode steps after the query
    assert len(calls) == 5 * model.config.num_hidden_layers


def test_the_kernel_runs_only_when_asked(kernel, monkeypatch):
    """use_gqa_attention without decode_kernel (the default), or after switching it off, keeps torch's kernel."""
    calls = []
    monkeypatch.setattr(cpu_decode, "decode_attention", lambda *a, **kw: calls.append(1))
    model = tiny_model("llama", hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    _fast_decode(model, kernel=False, steps=3)
    use_gqa_attention(model, decode_kernel=True)
    use_gqa_attention(model)  # decode_kernel=False: off again
    assert not any(layer in attention._KERNEL_LAYERS for layer in model.modules())
    assert calls == []


def test_a_machine_that_cannot_build_it_gets_a_clear_error(monkeypatch):
    """A build failure (no compiler) is a CubeError naming what is missing; the model keeps its attention, and
    later calls do not try to build again."""
    monkeypatch.setattr(cpu_decode, "_module", None)
    monkeypatch.setattr(cpu_decode, "_failure", None)
    tries = []

    def no_compiler(verbose):
        tries.append(1)
        raise RuntimeError("Ninja is required to load C++ extensions")
    monkeypatch.setattr(cpu_decode, "_load", no_compiler)
    model = tiny_model("llama")
    with pytest.raises(CubeError, match="needs g\\+\\+, ninja"):
        use_gqa_attention(model, decode_kernel=True)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(CubeError, match="could not be built"):
        kvmem.wrap(model, lambda *a, **k: None, decode_kernel=True)
    assert tries == [1]


def test_a_compile_error_names_the_compiler_s_error(monkeypatch):
    """The message carries the compiler's first error line, not ninja's closing one."""
    monkeypatch.setattr(cpu_decode, "_module", None)
    monkeypatch.setattr(cpu_decode, "_failure", None)

    def compile_error(verbose):
        raise RuntimeError("Error building extension\ncpu_decode.cpp:3:2: error: #error no such intrinsic\n"
                           "ninja: build stopped: subcommand failed.")
    monkeypatch.setattr(cpu_decode, "_load", compile_error)
    with pytest.raises(CubeError, match="cpu_decode.cpp:3:2: error: #error no such intrinsic"):
        cpu_decode.build()


def test_bad_arguments():
    model = tiny_model("llama")
    with pytest.raises(CubeError, match="decode_kernel must be True or False"):
        use_gqa_attention(model, decode_kernel="yes")
    with pytest.raises(CubeError, match="needs kvmem_sdpa"):
        use_gqa_attention(model, enabled=False, decode_kernel=True)
    plain = tiny_model("llama", num_key_value_heads=4)  # no grouped heads: kvmem_sdpa is not taken
    with pytest.raises(CubeError, match="group key/value heads"):
        kvmem.wrap(plain, lambda *a, **k: None, decode_kernel=True)
    assert plain.config._attn_implementation == "sdpa" and model.config._attn_implementation == "sdpa"
