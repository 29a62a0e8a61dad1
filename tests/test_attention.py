"""kvmem_sdpa: grouped KV heads never expanded, exact against transformers' stock sdpa (the oracle), selected
through transformers' attention registry."""

from __future__ import annotations

import pytest
import torch
import transformers.integrations.sdpa_attention as hf_sdpa

import kvmem
from kvmem.model.attention import (NAME, Visible, attend_grouped, attend_split, gqa_sdpa_forward, register_gqa_attention,
                             use_gqa_attention)
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


# ---------------------------------------------------------------- what the mask lets kvmem_sdpa skip
def _masks():
    """Boolean masks [b, 1, q, n] of the kinds transformers builds, with their (end, full)."""
    causal = torch.ones(5, 30, dtype=torch.bool).tril(25)[None, None]  # a request of 5 after a 25-token memory
    room = torch.cat([causal, torch.zeros(1, 1, 5, 8, dtype=torch.bool)], -1)  # a static cache's unused room
    window = causal & ~torch.ones(5, 30, dtype=torch.bool).tril(25 - 8)[None, None]  # sliding window of 8
    padded = causal.repeat(2, 1, 1, 1)
    padded[1, ..., :4] = False  # row 1 left-padded
    decode = torch.ones(1, 1, 1, 30, dtype=torch.bool)
    nothing = torch.zeros(1, 1, 3, 10, dtype=torch.bool)
    return {"causal": (causal, 30, 26), "room": (room, 30, 26), "window": (window, 30, 0),
            "padded": (padded, 30, 0), "decode": (decode, 30, 30), "nothing": (nothing, 0, 0)}


@pytest.mark.parametrize("kind", list(_masks()))
def test_visible_reads_the_mask(kind):
    mask, end, full = _masks()[kind]
    seen = Visible.of(mask)
    assert (seen.end, seen.full) == (end, full)
    # the definition, column by column
    cols = mask.flatten(0, -2)
    assert not cols[:, seen.end:].any() and (seen.end == 0 or cols[:, seen.end - 1].any())
    assert cols[:, :seen.full].all() and (seen.full == seen.end or not cols[:, seen.full].all())


def test_visible_reads_an_edited_mask_again():
    mask = torch.ones(1, 1, 2, 6, dtype=torch.bool)
    assert Visible.of(mask).full == 6
    mask[..., 3] = False
    assert (Visible.of(mask).end, Visible.of(mask).full) == (6, 3)


@pytest.mark.parametrize("kind", ["causal", "room", "window", "padded", "decode"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_skipping_what_the_mask_hides_is_exact(kind, dtype):
    """gqa_sdpa_forward over each mask (sliced room, mask dropped, memory split off) == stock sdpa."""
    mask = _masks()[kind][0]
    g = torch.Generator().manual_seed(2)
    b, q_len, n = mask.shape[0], mask.shape[2], mask.shape[3]
    q = torch.randn(b, 6, q_len, 16, generator=g).to(dtype)
    k, v = (torch.randn(b, 2, n, 16, generator=g).to(dtype) for _ in range(2))
    module = torch.nn.Module()
    module.num_key_value_groups = 3
    got, _ = gqa_sdpa_forward(module, q, k, v, mask, scaling=0.25)
    want, _ = hf_sdpa.sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=_tol(dtype) * 4)


def test_split_merges_queries_that_see_none_of_the_tail():
    """Row 0's queries see only the memory: the kernel reports a log-sum-exp of 0 (not -inf) for them over the
    tail, which must not enter the merge."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 4, 8, generator=g)
    k, v = (torch.randn(1, 2, 12, 8, generator=g) for _ in range(2))
    mask = torch.ones(4, 12, dtype=torch.bool).tril(8)[None, None]
    mask[..., 0, 8:] = False
    mask[..., 1, 9:] = False
    torch.testing.assert_close(attend_split(q, k, v, mask, 8, scale=None), _reference(q, k, v, mask), rtol=0,
                               atol=_tol(torch.float32))


def test_a_request_after_a_prefix_takes_the_split_and_decoding_takes_no_mask(llama, monkeypatch):
    """On the CPU in float32: the request's forward over a spliced memory runs the split (memory unmasked), and
    each decode step from a static prefix runs without a mask and without the cache's unused room."""
    import kvmem.model.attention as attention
    from kvmem.model.static_cache import static_prefix

    splits, plain = [], []
    real_split, real_sdpa = attention.attend_split, torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(attention, "attend_split", lambda *a, **kw: splits.append(a[4]) or real_split(*a, **kw))
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: plain.append((k.shape[2], kw.get("attn_mask") is None))
                        or real_sdpa(q, k, v, **kw))
    use_gqa_attention(llama)
    cube = kvmem.MemCube.from_ids(llama, random_ids(40))
    query = random_ids(7, seed=4)
    prefix = static_prefix(llama, kvmem.prefill(llama, cube), max_new_tokens=5, query_len=7)
    ids = prefix.extend(query)
    out = llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                         pad_token_id=0, cache=prefix.cache)
    use_gqa_attention(llama, enabled=False)
    want = llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out, want)
    n = prefix.input_ids.shape[1]
    assert splits and set(splits) == {n + 1}  # the memory (anchor + cube) split off, every layer; the request's
    # first token is seen by all of the request too
    decode_calls = [c for c in plain if c[0] > n + 7]
    assert decode_calls and all(no_mask for _, no_mask in decode_calls)
    assert max(length for length, _ in decode_calls) == n + 7 + 4  # never the room past the last written token


def test_visible_remembers_one_mask_per_layer_type():
    """Sliding and full layers alternate two masks within one forward: each is read once, not once per layer."""
    full, window = _masks()["causal"][0].clone(), _masks()["window"][0].clone()
    first = (Visible.of(full), Visible.of(window))
    assert (Visible.of(full), Visible.of(window)) == first  # the same objects: remembered, not read again
    assert Visible.of(full.clone()) is not first[0]  # another mask object is read anew


def test_decoding_from_a_static_prefix_reads_the_cache_in_place(llama, monkeypatch):
    """Issue 20: a decode step from a static prefix hands the attention kernel the cache's own storage (views, no
    copy or concatenation of the memory per step) and no mask; its tokens equal stock sdpa's full prefill."""
    from kvmem.model.static_cache import static_prefix

    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append((q.shape[2], k, v, kw.get("attn_mask"))) or
                        real_sdpa(q, k, v, **kw))
    use_gqa_attention(llama)
    cube = kvmem.MemCube.from_ids(llama, random_ids(40))
    query = random_ids(5, seed=6)
    prefix = static_prefix(llama, kvmem.prefill(llama, cube), max_new_tokens=4, query_len=5)
    ids = prefix.extend(query)
    out = llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                         pad_token_id=0, cache=prefix.cache)
    use_gqa_attention(llama, enabled=False)
    monkeypatch.undo()
    want = llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out, want)
    storage = {t.untyped_storage().data_ptr() for layer in prefix.cache.layers for t in (layer.keys, layer.values)}
    steps = [(k, v, mask) for q_len, k, v, mask in seen if k.shape[2] > ids.shape[1]]  # decode steps (packed q)
    assert len(steps) == 3 * len(prefix.cache.layers)  # 4 new tokens: 3 decode forwards, every layer
    for k, v, mask in steps:
        assert mask is None
        assert k.untyped_storage().data_ptr() in storage and v.untyped_storage().data_ptr() in storage


def test_keys_with_a_strided_last_axis_never_reach_the_cpu_flash_op():
    """torch's CPU flash op, called directly as the split does, misreads keys/values whose last axis is not
    contiguous (a transposed storage): such keys take the public sdpa, which is exact for any strides."""
    g = torch.Generator().manual_seed(5)
    mask = torch.ones(4, 40, dtype=torch.bool).tril(36)[None, None]  # a request of 4 after a 36-token memory
    q = torch.randn(1, 6, 4, 16, generator=g)
    k, v = (torch.randn(1, 2, 16, 40, generator=g).transpose(-1, -2) for _ in range(2))  # [1, 2, 40, 16], stride 1
    assert k.stride(-1) != 1
    module = torch.nn.Module()
    module.num_key_value_groups = 3
    got, _ = gqa_sdpa_forward(module, q, k, v, mask, scaling=0.25)
    want, _ = hf_sdpa.sdpa_attention_forward(module, q, k.contiguous(), v.contiguous(), mask, scaling=0.25)
    torch.testing.assert_close(got, want, rtol=0, atol=_tol(torch.float32) * 4)


# ---------------------------------------------------------------- decode steps split over threads (issue 20)
@pytest.fixture
def two_threads():
    """torch on 2 intra-op threads for the test (the split is chosen by the thread count), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


def _decode_inputs(kv_len, *, batch=1, heads=9, kv_heads=3, dim=16, room=5, offset=2, dtype=torch.float32, seed=7):
    """A decode step's query and keys/values as a static cache holds them: views [batch, kv_heads, kv_len, dim]
    into a larger storage (unused room after them, other entries before: a storage offset)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, dim, generator=g).to(dtype)
    k, v = (torch.randn(batch, kv_heads, offset + kv_len + room, dim, generator=g).to(dtype)[:, :, offset:offset + kv_len]
            for _ in range(2))
    return q, k, v


def test_decode_parts_balance_the_threads():
    """The rule: parts only where the (batch x kv head) tasks do not divide among the threads, each part at least
    MIN_PART_KEYS keys, and only where the split is exact and safe (fp32, one query, batch 1, contiguous last axis)."""
    from kvmem.model.attention import MIN_PART_KEYS, decode_parts

    long = 4 * MIN_PART_KEYS
    q, k, v = _decode_inputs(long)
    assert decode_parts(q, k, v, threads=1) == 1
    assert decode_parts(q, k, v, threads=2) == 2  # SmolLM2: 3 kv heads on 2 threads -> 6 tasks, 3 + 3
    assert decode_parts(q, k, v, threads=4) == 4  # 12 tasks, 3 each
    q2, k2, v2 = _decode_inputs(long, heads=8, kv_heads=2)
    assert decode_parts(q2, k2, v2, threads=2) == 1  # 2 tasks on 2 threads: balanced already
    assert decode_parts(q2, k2, v2, threads=3) == 3
    short = _decode_inputs(2 * MIN_PART_KEYS - 1)
    assert decode_parts(*short, threads=2) == 1  # a part would hold fewer than MIN_PART_KEYS keys
    assert decode_parts(*_decode_inputs(long, dtype=torch.bfloat16), threads=2) == 1
    assert decode_parts(*_decode_inputs(long, batch=2), threads=2) == 1
    assert decode_parts(q.expand(1, 9, 2, 16), k, v, threads=2) == 1  # not a decode step
    strided = torch.randn(1, 3, 16, long).transpose(-1, -2)
    assert decode_parts(q, strided, v, threads=2) == 1 and decode_parts(q, k, strided, threads=2) == 1


@pytest.mark.parametrize("parts,kv_len", [(p, n) for p in (2, 3, 4) for n in (2, 3, 5, 8, 13, 64, 1031) if n >= p])
def test_attend_parts_equals_one_pass_over_all_keys(two_threads, parts, kv_len):
    """Runs of a cache-like strided view (offset and room around it) laid on the batch axis, the keys a run
    shares with the run before masked out of it, merged by log-sum-exp == stock sdpa over all keys (KV heads
    expanded). Odd lengths, a remainder of every size (overlaps of 1 to parts - 1 keys), runs of one key."""
    from kvmem.model.attention import attend_parts

    q, k, v = _decode_inputs(kv_len)
    packed = q.reshape(1, 3, 3, 16)
    got = attend_parts(packed, k, v, parts, scale=0.25).reshape(1, 9, 1, 16)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, hf_sdpa.repeat_kv(k, 3), hf_sdpa.repeat_kv(v, 3), scale=0.25)
    torch.testing.assert_close(got, want, rtol=0, atol=_tol(torch.float32))


def test_attend_parts_weighs_parts_by_their_share():
    """Parts whose scores differ by orders of magnitude: a merge that averaged the parts' outputs, or weighed them
    without their log-sum-exps, is off by O(1) here."""
    from kvmem.model.attention import attend_parts

    q, k, v = _decode_inputs(40, heads=3, kv_heads=3)
    k = k.clone()
    k[:, :, :20] *= 4  # the first run's scores dominate
    v = v.clone()
    v[:, :, 20:] += 10  # and the second run's values are far from the first's
    got = attend_parts(q, k, v, 2, scale=0.25)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25)
    torch.testing.assert_close(got, want, rtol=0, atol=_tol(torch.float32) * 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("kv_len", [1, 9, 40, 41])
def test_decode_step_on_two_threads_is_exact(two_threads, monkeypatch, kv_len, batch, dtype):
    """gqa_sdpa_forward on a decode step (no mask after the trim) with 2 threads == stock sdpa; the split is
    taken exactly where decode_parts says (fp32, batch 1, at least 2 keys with MIN_PART_KEYS lowered to 1)."""
    import kvmem.model.attention as attention

    monkeypatch.setattr(attention, "MIN_PART_KEYS", 1)
    taken = []
    real = attention.attend_parts
    monkeypatch.setattr(attention, "attend_parts", lambda *a, **kw: taken.append(a[3]) or real(*a, **kw))
    q, k, v = _decode_inputs(kv_len, batch=batch, dtype=dtype)
    mask = torch.ones(batch, 1, 1, kv_len + 3, dtype=torch.bool)  # a static cache's mask: room after the keys
    mask[..., kv_len:] = False
    k_room, v_room = (t.as_strided((batch, 3, kv_len + 3, 16), t.stride()) for t in (k, v))  # the room, in storage
    module = torch.nn.Module()
    module.num_key_value_groups = 3
    got, _ = gqa_sdpa_forward(module, q, k_room, v_room, mask, scaling=0.25)
    want, _ = hf_sdpa.sdpa_attention_forward(module, q, k, v, None, scaling=0.25)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=_tol(dtype) * 4)
    split = dtype == torch.float32 and batch == 1 and kv_len >= 2
    assert taken == ([2] if split else [])


def test_decoding_on_two_threads_from_a_static_prefix_equals_a_full_prefill(two_threads, monkeypatch):
    """End to end on a model with SmolLM2's head layout (9 query heads over 3 KV heads): the fast path's decode
    steps take the split on 2 threads, and its tokens and logits equal stock sdpa's full prefill."""
    import kvmem.model.attention as attention
    from kvmem.model.static_cache import static_prefix

    monkeypatch.setattr(attention, "MIN_PART_KEYS", 8)
    taken = []
    real = attention.attend_parts
    monkeypatch.setattr(attention, "attend_parts", lambda *a, **kw: taken.append(a[1].shape[2]) or real(*a, **kw))
    model = tiny_model("llama", hidden_size=72, num_attention_heads=9, num_key_value_heads=3)
    cube = kvmem.MemCube.from_ids(model, random_ids(37))
    query = random_ids(6, seed=8)
    prefix = static_prefix(model, kvmem.prefill(model, cube), max_new_tokens=6, query_len=6)
    ids = prefix.extend(query)
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0,
               output_logits=True, return_dict_in_generate=True)
    use_gqa_attention(model)
    out = model.generate(ids, cache=prefix.cache, **gen)
    use_gqa_attention(model, enabled=False)
    want = model.generate(ids, **gen)  # stock sdpa, a full prefill of memory + query
    assert torch.equal(out.sequences, want.sequences)
    for a, b in zip(out.logits, want.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=64 * _tol(torch.float32) * max(1.0, b.abs().max().item()))
    n = ids.shape[1]
    assert sorted(set(taken)) == list(range(n + 1, n + 6))  # every decode step (5 after the query), every layer
    assert len(taken) == 5 * model.config.num_hidden_layers
