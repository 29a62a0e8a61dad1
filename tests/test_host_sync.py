"""No host sync on the GPU path: a repeat request (`kvmem.prefill`, the fast recipe's `static_prefix`, the query
forward and decode steps) calls nothing that brings a tensor's value to the host (``.item()``, ``.tolist()``,
``bool``/``int`` of a tensor, ``nonzero``, ``.cpu()``...). On a GPU each such call waits for the queued work and
forbids CUDA-graph capture; on the CPU they are free, so this test records the calls themselves
(`torch.overrides.TorchFunctionMode`) rather than timing anything. The visibility the attention needs comes from
what the host knows (`kvmem.model.visibility`); these tests also check that knowledge never goes stale."""

from __future__ import annotations

import copy
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

import kvmem
from kvmem.model.attention import use_gqa_attention
from kvmem.model.cache import cache_kwarg
from kvmem.model.static_cache import PrefixStaticCache, static_prefix
from helpers import random_ids, tiny_model

# Tensor functions whose result is a host value read from the tensor's data (on CUDA: a device->host copy and a
# wait for every kernel queued before it), or whose output shape depends on the data (the same wait).
_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__", "nonzero", "argwhere",
          "masked_select", "unique", "unique_consecutive", "equal", "allclose", "cpu", "numpy", "__array__"}


class HostReads(TorchFunctionMode):
    """Records every call in ``_READS`` (and ``.to`` from a device to the CPU, and indexing by a bool tensor)
    made while it is active, with the three innermost frames that made it."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, list[str]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        read = name in _READS
        if name == "to" and args[0].device.type != "cpu":  # a device->host copy (seen where a GPU runs this)
            target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
            read = target is not None and torch.device(target).type == "cpu"
        if name == "__getitem__" and len(args) > 1:  # boolean-mask indexing: its output shape is data-dependent
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            read = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        if read:
            frames = traceback.extract_stack()[:-1]
            self.calls.append((name, [f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in frames][-3:]))
        return func(*args, **kwargs)


def _request(model, cube, query, *, fast: bool, steps: int = 3) -> torch.Tensor:
    """One request as a serving loop runs it: prefill, (fast: static prefix), the query forward, ``steps`` decode
    forwards fed with the previous argmax (kept on the device). Returns the ``steps + 1`` greedy tokens [1, n]."""
    kw = cache_kwarg(model)
    prefix = kvmem.prefill(model, cube)
    if fast:
        prefix = static_prefix(model, prefix, max_new_tokens=steps + 1, query_len=query.shape[-1])
    out = model(input_ids=query, logits_to_keep=1, **{kw: prefix.cache})
    tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(steps):
        out = model(input_ids=tokens[-1], logits_to_keep=1, **{kw: prefix.cache})
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, -1)


def _truth(model, cube, query, n: int) -> torch.Tensor:
    ids = torch.cat([cube.all_ids.reshape(1, -1), query], -1)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[-1]:]


# The fast recipe (kvmem_sdpa + static prefix) and the plain loop under either attention. Not stock sdpa with a
# static cache: transformers' own mask builder reads the StaticCache's device counter there (docs/gpu-path.md).
@pytest.mark.parametrize("attn, fast", [("kvmem_sdpa", True), ("kvmem_sdpa", False), ("sdpa", False)])
def test_repeat_request_reads_nothing_back(attn, fast):
    model = tiny_model("llama")
    use_gqa_attention(model, enabled=attn == "kvmem_sdpa")
    cube = kvmem.MemCube.from_ids(model, random_ids(40))
    query = random_ids(6, seed=1)[None]
    with torch.inference_mode():
        _request(model, cube, query, fast=fast)  # the first request checks the cube once (shapes, digests)
        with HostReads() as reads:
            got = _request(model, cube, query, fast=fast)
    assert reads.calls == [], "host reads on the hot path:\n" + "\n".join(f"{n} at {w}" for n, w in reads.calls)
    assert torch.equal(got, _truth(model, cube, query, got.shape[-1]))  # and every token is a full prefill's


def test_recorder_sees_a_mask_read():
    """The recorder is not blind: a 2D attention mask (whose values may pad) makes kvmem_sdpa read the mask."""
    model = tiny_model("llama")
    use_gqa_attention(model)
    cube = kvmem.MemCube.from_ids(model, random_ids(40))
    query = random_ids(6, seed=1)[None]
    with torch.inference_mode():
        prefix = kvmem.prefill(model, cube)
        ids = prefix.extend(query)
        with HostReads() as reads:
            model(input_ids=query, attention_mask=torch.ones_like(ids), **{cache_kwarg(model): prefix.cache})
    assert any(name == "nonzero" and "attention.py" in where[-1] for name, where in reads.calls)


def test_host_length_follows_updates_and_is_dropped_on_other_changes():
    model = tiny_model("llama")
    use_gqa_attention(model)
    cube = kvmem.MemCube.from_ids(model, random_ids(40))
    kw = cache_kwarg(model)
    with torch.inference_mode():
        prefix = static_prefix(model, kvmem.prefill(model, cube), max_new_tokens=4, query_len=6)
        cache = prefix.cache
        assert isinstance(cache, PrefixStaticCache)
        counter = lambda: cache.layers[0].cumulative_length  # noqa: E731
        n = prefix.num_tokens
        assert cache.host_length(0, counter()) == n == int(counter())
        model(input_ids=random_ids(6, seed=1)[None], **{kw: cache})
        assert cache.host_length(0, counter()) == n + 6 == int(counter())
        assert cache.host_length(1, cache.layers[1].cumulative_length) is None  # transformers sizes masks by layer 0
        copied = copy.deepcopy(cache)  # a copy's counter is not this cache's: never answered from this cache
        assert cache.host_length(0, copied.layers[0].cumulative_length) is None
        counter().add_(1)  # a change the cache did not make (as crop or reset would)
        assert cache.host_length(0, counter()) is None


def test_compiled_call_leaves_no_stale_length():
    """A compiled decode step moves the device counter where the host cannot follow: the next eager step must read
    the mask, and still decode exactly (fails if the host copy survived the compiled call: it would be 1 short)."""
    torch._dynamo.reset()
    model = tiny_model("llama")
    use_gqa_attention(model)
    cube = kvmem.MemCube.from_ids(model, random_ids(40))
    query = random_ids(6, seed=1)[None]
    kw = cache_kwarg(model)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    step = torch.compile(lambda ids, cache: model(input_ids=ids, logits_to_keep=1, **{kw: cache}).logits,
                         backend=backend, fullgraph=False, dynamic=False)
    with torch.inference_mode():
        prefix = static_prefix(model, kvmem.prefill(model, cube), max_new_tokens=4, query_len=6)
        out = model(input_ids=query, logits_to_keep=1, **{kw: prefix.cache}).logits
        tokens = [out[:, -1].argmax(-1, keepdim=True)]
        tokens.append(step(tokens[-1], prefix.cache)[:, -1].argmax(-1, keepdim=True))  # compiled
        assert graphs and not prefix.cache.host_known  # inductor/CUDA graphs may not bump its version
        out = model(input_ids=tokens[-1], logits_to_keep=1, **{kw: prefix.cache}).logits  # eager again
        tokens.append(out[:, -1].argmax(-1, keepdim=True))
    assert torch.equal(torch.cat(tokens, -1), _truth(model, cube, query, 3))


def test_batch_counts_prompt_tokens_on_the_host():
    """`BatchPrefix.prompt_tokens`: each row's real tokens, without reading the mask (what a report needs)."""
    from kvmem.inject.batch import prefill_batch

    model = tiny_model("llama")
    cubes = [kvmem.MemCube.from_ids(model, random_ids(n, seed=n)) for n in (11, 17)]
    batch = prefill_batch(model, [[c] for c in cubes], [random_ids(4, seed=1), random_ids(6, seed=2)],
                          max_new_tokens=2)
    assert batch.prompt_tokens == batch.attention_mask.sum(1).tolist() == [11 + 4, 17 + 6]


@pytest.mark.gpu
@pytest.mark.parametrize("attn, fast", [("kvmem_sdpa", True), ("kvmem_sdpa", False), ("sdpa", False)])
def test_repeat_request_never_synchronises_on_cuda(attn, fast):
    """On a GPU: torch's sync debug mode raises at any synchronising call (``.item()``, ``nonzero``, a blocking
    host->device copy...) during a repeat request; its tokens equal the same request run without the mode."""
    model = tiny_model("llama").cuda()
    use_gqa_attention(model, enabled=attn == "kvmem_sdpa")
    cube = kvmem.MemCube.from_ids(model, random_ids(40)).to("cuda")
    query = random_ids(6, seed=1)[None]  # on the host, as a tokenizer gives it: moved without blocking
    with torch.inference_mode():
        want = _request(model, cube, query.cuda(), fast=fast)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            prefix = kvmem.prefill(model, cube)
            ids = prefix.extend(query)  # a host query through Prefix.extend (what generate would take)
            del prefix  # a live prefix would keep the model's prefix pool from the request below
            got = _request(model, cube, ids[:, -6:], fast=fast)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got, want)


def test_noted_visibility_is_the_masks_own():
    """What the mask builder notes equals what reading the mask gives, for the growing and the static cache, query
    forward and decode; and a mask edited in place afterwards is read again, not answered from the note."""
    from kvmem.model.attention import Visible
    from kvmem.model.visibility import noted, visible_mask

    for q_len, q_offset, kv_len in [(6, 40, 46), (1, 46, 47), (6, 40, 60), (1, 50, 60), (3, 0, 3)]:
        mask = visible_mask(batch_size=1, q_length=q_len, kv_length=kv_len, q_offset=q_offset)
        if mask is None:  # sdpa's causal flag stands for it
            continue
        cols = mask.flatten(0, -2)
        end = int(cols.any(0).nonzero()[-1]) + 1
        full = int((~cols.all(0)).int().argmax()) if not bool(cols.all(0).all()) else kv_len
        assert noted(mask) == (end, min(full, end))
        assert (Visible.of(mask).end, Visible.of(mask).full) == (end, min(full, end))
        mask[..., 0] = False  # not an inference tensor here: its version moves
        assert noted(mask) is None


def test_wrap_reads_nothing_back_itself(tok):
    """`wrap(...).generate` over a batch: transformers' generate loop reads (its stopping checks), kvmem's own
    code does not (the report's prompt-token count is the batch's host count, not a sum over the mask)."""
    mm = kvmem.wrap(tiny_model("llama", seed=3), tok)
    cubes = [mm.build_cube(t, name=f"n{i}") for i, t in enumerate(["Ada keeps bees.", "Bo sails on Sundays."])]
    prompts = ["Who keeps bees?", "When does Bo sail?"]
    with torch.inference_mode():
        mm.generate(prompts, [[cubes[0]], [cubes[1]]], max_new_tokens=3, do_sample=False)  # first request
        with HostReads() as reads:
            mm.generate(prompts, [[cubes[0]], [cubes[1]]], max_new_tokens=3, do_sample=False)
    ours = [(n, w) for n, w in reads.calls if any(f.startswith("memory_model.py") for f in w)]
    assert ours == [], "host reads in wrap's own code:\n" + "\n".join(f"{n} at {w}" for n, w in ours)
    assert reads.calls, "the recorder saw none of transformers' generate-loop reads: it is not recording"
