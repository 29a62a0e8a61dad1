"""kvmem_sdpa: grouped KV heads never expanded, exact against transformers' stock sdpa (the oracle), selected
through transformers' attention registry."""

from __future__ import annotations

import pytest
import torch
import transformers.integrations.sdpa_attention as hf_sdpa

import kvmem
from kvmem.attention import NAME, attend_grouped, register_gqa_attention, use_gqa_attention
from conftest import FAMILIES, random_ids, tiny_model


def _tol(dtype):
    return 16 * torch.finfo(dtype).eps


def _reference(q, k, v, mask, is_causal=False):
    """What stock sdpa computes under a mask: KV heads expanded with transformers' own repeat_kv, fp32."""
    groups = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q.float(), hf_sdpa.repeat_kv(k, groups).float(), hf_sdpa.repeat_kv(v, groups).float(), attn_mask=mask,
        is_causal=is_causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pack", [False, True], ids=["enable_gqa", "packed"])
@pytest.mark.parametrize("batch,heads,kv_heads,q_len,kv_len", [(1, 9, 3, 7, 53), (3, 4, 2, 5, 21), (2, 6, 1, 1, 17)])
def test_attend_grouped_matches_expanded_heads(batch, heads, kv_heads, q_len, kv_len, pack, dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, q_len, 16, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, kv_len, 16, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, kv_len, 16, generator=g).to(dtype)
    # causal over a memory, plus a padded row: the shape of a batched prefix's mask
    mask = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len).repeat(batch, 1, 1, 1)
    mask[-1, ..., :3] = False
    got = attend_grouped(q, k, v, mask, pack=pack)
    assert got.shape == (batch, heads, q_len, 16) and got.dtype == dtype
    torch.testing.assert_close(got.float(), _reference(q, k, v, mask), rtol=0, atol=_tol(dtype) * 4)


@pytest.mark.parametrize("pack", [False, True], ids=["enable_gqa", "packed"])
def test_attend_grouped_causal_without_mask(pack):
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 6, 11, 8, generator=g), torch.randn(1, 2, 11, 8, generator=g), torch.randn(
        1, 2, 11, 8, generator=g)
    torch.testing.assert_close(attend_grouped(q, k, v, None, is_causal=True, pack=pack),
                               _reference(q, k, v, None, is_causal=True), rtol=0, atol=_tol(torch.float32))


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_model_with_prefix_matches_stock_sdpa(family, dtype):
    model = tiny_model(family, dtype=dtype)
    cube = kvmem.MemCube.from_ids(model, random_ids(33))
    query = random_ids(9, seed=2)[None]
    stock = _logits(model, query, cache=kvmem.prefill(model, cube).cache)
    ids = kvmem.prefill(model, cube).extend(query)
    stock_tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                  pad_token_id=0, cache=kvmem.prefill(model, cube).cache)
    assert use_gqa_attention(model) == NAME
    got = _logits(model, query, cache=kvmem.prefill(model, cube).cache)
    torch.testing.assert_close(got, stock, rtol=0, atol=_tol(dtype) * max(1.0, stock.abs().max().item()))
    assert torch.equal(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                      pad_token_id=0, cache=kvmem.prefill(model, cube).cache), stock_tokens)
    assert use_gqa_attention(model, enabled=False) == "sdpa"
    assert torch.equal(_logits(model, query, cache=kvmem.prefill(model, cube).cache), stock)


def test_kv_heads_are_not_expanded(llama, monkeypatch):
    """The point of kvmem_sdpa: stock sdpa calls repeat_kv under a mask, kvmem_sdpa never does."""
    calls = []
    real = hf_sdpa.repeat_kv
    monkeypatch.setattr(hf_sdpa, "repeat_kv", lambda x, n: calls.append(n) or real(x, n))
    cube = kvmem.MemCube.from_ids(llama, random_ids(20))
    query = random_ids(6, seed=3)[None]
    _logits(llama, query, cache=kvmem.prefill(llama, cube).cache)
    assert calls, "stock sdpa should expand KV heads here (else this test proves nothing)"
    calls.clear()
    use_gqa_attention(llama)
    _logits(llama, query, cache=kvmem.prefill(llama, cube).cache)
    assert calls == []


def test_load_by_name():
    """Registered once, the name works as attn_implementation= like any built-in one."""
    assert register_gqa_attention() == NAME
    model = tiny_model("qwen2", attn=NAME)
    assert model.config._attn_implementation == NAME
    ids = random_ids(12)[None]
    stock = tiny_model("qwen2")
    torch.testing.assert_close(_logits(model, ids), _logits(stock, ids), rtol=0, atol=1e-5)


def test_model_without_registry_support_is_refused():
    class NoRegistry(torch.nn.Module):
        config = None

        def set_attn_implementation(self, name):
            raise ValueError("this model does not support custom attention")

    with pytest.raises(kvmem.CubeError, match="cannot switch its attention"):
        use_gqa_attention(NoRegistry())
