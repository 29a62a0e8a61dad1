"""An AdapterCube that learned memories (``meta["derived_from"]``, as `kvmem.distill` writes) is not used by
`MemoryModel.generate` for a request it would contradict: a learned memory deleted, or edited and retrieved in its
new version (issue 26: "adapters that learned it are marked stale and not used"). The base model answers instead,
and ``mm.last.adapter_refused`` says why."""

from __future__ import annotations

import peft
import pytest
import torch

import kvmem
from helpers import tiny_model
from kvmem.memory.index import MemoryIndex
from kvmem.store.lineage import source_entry

FACT = "Pavel keeps the blue ledger in Brno."


def _adapter(base, learned):
    torch.manual_seed(3)
    lora = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                     init_lora_weights=False))
    cube = kvmem.AdapterCube.from_peft(lora, "learned", base_model=base)
    return kvmem.AdapterCube(cube.state_dict, {**cube.meta, "derived_from": [source_entry(r) for r in learned]})


@pytest.fixture
def setup(tmp_path, tokenizer):
    base = tiny_model("llama")
    mm = kvmem.wrap(base, tokenizer).attach(kvmem.CubeStore(tmp_path / "s").view("me"), index=MemoryIndex(dense=False))
    mm.remember(FACT, "ledger")
    mm.remember("Ada waters the ferns on Sundays.", "ferns")
    return mm, _adapter(base, [mm.store.get("ledger")])


def _answer(mm, prompt, **kw):
    return mm.generate(prompt, cubes="auto", max_new_tokens=4, do_sample=False, **kw)[0].tolist()


def test_a_current_adapter_is_used(setup):
    mm, acube = setup
    with_adapter = _answer(mm, "Where is the blue ledger?", adapter=acube)
    assert mm.last.adapter_refused == []
    assert with_adapter != _answer(mm, "Where is the blue ledger?", adapter=None)  # it changes the answer


@pytest.mark.parametrize("how", ["rm", "edit"])
def test_an_adapter_that_learned_a_forgotten_memory_is_not_used(setup, how):
    mm, acube = setup
    if how == "rm":
        mm.store.forget("ledger")
        mm.recall.forget("me/ledger")
    else:
        mm.remember("Pavel keeps the blue ledger in Prague.", "ledger")
    prompt = "Where is the blue ledger?" if how == "edit" else "Who waters the ferns?"
    refused = _answer(mm, prompt, adapter=acube)
    assert [(r["memory"], r["reason"]) for r in mm.last.adapter_refused] == [
        ("me/ledger", "deleted" if how == "rm" else "edited")]
    assert refused == _answer(mm, prompt, adapter=None)  # the base model answered
    assert mm.adapter is None  # the request's adapter choice is restored as before


def test_an_edit_the_request_does_not_retrieve_keeps_the_adapter(setup):
    mm, acube = setup
    mm.remember("Pavel keeps the blue ledger in Prague.", "ledger")
    _answer(mm, "Who waters the ferns on Sundays?", adapter=acube)
    if any(m["id"] == "ledger" for m in mm.last.memories):
        pytest.skip("the lexical index retrieved the ledger for this prompt too")
    assert mm.last.adapter_refused == []
