"""torch.compile: a prefix filled into a static cache decodes through transformers' compiled forward, exactly,
and requests with other cubes of the same padded length reuse the graph (compiles counted by the backend)."""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig

import kvmem
from kvmem.model.attention import use_gqa_attention
from kvmem.inject.batch import prefill_batch
from kvmem.model.static_cache import static_prefix
from conftest import random_ids, tiny_model


def _counting_config(graphs: list) -> CompileConfig:
    """A compile config whose backend records each graph dynamo hands it and runs it eagerly (no inductor: fast).
    transformers deep-copies the config; a plain function survives that as itself."""
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    config = CompileConfig(backend=backend, fullgraph=True, dynamic=False, mode=None)
    config._compile_all_devices = True  # transformers compiles decoding on CUDA only unless asked
    return config


def _greedy(model, ids, n, **kw):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          pad_token_id=0, **kw)


@pytest.mark.parametrize("attn", ["kvmem_sdpa", "sdpa"])
def test_compiled_decoding_reuses_one_graph(attn):
    torch._dynamo.reset()
    model = tiny_model("llama")
    use_gqa_attention(model, enabled=attn == "kvmem_sdpa")
    graphs: list = []
    config = _counting_config(graphs)
    for seed in range(3):  # three requests, three different cubes, one padded length
        cube = kvmem.MemCube.from_ids(model, random_ids(20, seed=seed))
        query = random_ids(5, seed=10 + seed)
        prefix = static_prefix(model, kvmem.prefill(model, cube), max_new_tokens=4, query_len=5)
        ids = prefix.extend(query)
        out = _greedy(model, ids, 4, cache=prefix.cache, compile_config=config)
        assert torch.equal(out, _greedy(model, ids, 4))  # uncompiled full prefill: the truth
        assert len(graphs) == 1, f"request {seed} compiled again ({len(graphs)} graphs)"


def test_compiled_batch_decoding():
    torch._dynamo.reset()
    model = tiny_model("qwen2")
    use_gqa_attention(model)
    graphs: list = []
    cubes = [kvmem.MemCube.from_ids(model, random_ids(n, seed=n)) for n in (11, 17)]
    queries = [random_ids(4, seed=1), random_ids(6, seed=2)]
    batch = prefill_batch(model, [[c] for c in cubes], queries, max_new_tokens=4)
    out = model.generate(**batch.generate_kwargs(model), max_new_tokens=4, do_sample=False, pad_token_id=0,
                         compile_config=_counting_config(graphs))
    assert len(graphs) == 1
    for c, q, got in zip(cubes, queries, batch.new_tokens(out)):
        ids = kvmem.prefill(model, c).extend(q)
        assert torch.equal(got, _greedy(model, ids, 4)[0, ids.shape[1]:])
