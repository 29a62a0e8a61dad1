"""wrap(...).generate([...]): one generate call for several prompts, each with its own cubes; every row equals
the same request run alone."""

from __future__ import annotations

import pytest
import torch

import kvmem
from helpers import tiny_model

NOTES = ["Alice lives in Oslo and keeps bees on the roof of her building, three hives in all.",
         "Bruno is a pilot who flies cargo planes between Lisbon and Porto every Tuesday and Friday night.",
         "Chiara restores old radios; her workshop in Turin smells of solder and dust, and she loves it."]
PROMPTS = ["Where does Alice live?", "What does Bruno do on Tuesdays?", "What does Chiara restore in her workshop?"]


@pytest.fixture(scope="module")
def mm(tokenizer):
    return kvmem.wrap(tiny_model("llama", seed=3), tokenizer)


def _alone(mm, prompt, cubes, new=6, **kw):
    out = mm.generate(prompt, cubes, max_new_tokens=new, do_sample=False, **kw)
    return out[0, mm.last.prompt_tokens:]


def test_each_row_equals_its_request_alone(mm):
    cubes = [mm.build_cube(t, name=f"n{i}") for i, t in enumerate(NOTES)]
    rows = [[cubes[0]], [cubes[1], cubes[2]], cubes[2]]  # different cube counts and lengths per row
    out = mm.generate(PROMPTS, rows, max_new_tokens=6, do_sample=False)
    batch = mm.last
    assert batch.injected and len(batch.rows) == 3 and out.shape[0] == 3
    for b, (prompt, row) in enumerate(zip(PROMPTS, rows)):
        want = _alone(mm, prompt, row)
        assert torch.equal(out[b, batch.prompt_tokens:], want), f"row {b}"
        assert batch.rows[b].cube_names == [c.name for c in ([row] if isinstance(row, kvmem.MemCube) else row)]
    texts = mm.answer(PROMPTS, rows, max_new_tokens=6)
    assert isinstance(texts, list) and len(texts) == 3


def test_a_row_without_cubes_prefills_the_batch_in_full(mm):
    cube = mm.build_cube(NOTES[0], name="n0")
    out = mm.generate(PROMPTS[:2], [[cube], None], max_new_tokens=5, do_sample=False)
    assert not mm.last.injected
    width = mm.last.prompt_tokens
    assert torch.equal(out[0, width:], _alone(mm, PROMPTS[0], [cube], new=5, inject=False))
    assert torch.equal(out[1, width:], _alone(mm, PROMPTS[1], None, new=5))


def test_auto_batch_recalls_per_row(tmp_path, tokenizer):
    mm = kvmem.wrap(tiny_model("llama", seed=3), tokenizer).attach(
        kvmem.CubeStore(tmp_path / "s").view("me"), index=kvmem.MemoryIndex(dense=False), promote_after=0)
    for i, text in enumerate(NOTES):
        mm.remember(text, f"n{i}")
    out = mm.generate(PROMPTS, "auto", k=1, max_new_tokens=4, do_sample=False)
    assert [r.memories[0]["id"] for r in mm.last.rows] == ["n0", "n1", "n2"]
    width = mm.last.prompt_tokens
    for b, prompt in enumerate(PROMPTS):
        assert torch.equal(out[b, width:], _alone(mm, prompt, "auto", new=4, k=1))


def test_bad_batches_are_refused(mm):
    with pytest.raises(kvmem.CubeError, match="list of 2 entries"):
        mm.generate(PROMPTS[:2], [None], max_new_tokens=1)
    with pytest.raises(kvmem.CubeError, match="non-empty list"):
        mm.generate([], None, max_new_tokens=1)


def test_beams_and_max_length_in_a_batch(mm):
    """Beam search repeats each row's cache (DynamicCache path); max_length sizes the static cache's room."""
    cubes = [mm.build_cube(t, name=f"n{i}") for i, t in enumerate(NOTES[:2])]
    out = mm.generate(PROMPTS[:2], [[cubes[0]], [cubes[1]]], max_new_tokens=4, num_beams=2, do_sample=False)
    width = mm.last.prompt_tokens
    for b in range(2):
        assert torch.equal(out[b, width:], _alone(mm, PROMPTS[b], [cubes[b]], new=4, num_beams=2, inject=False))
    out = mm.generate(PROMPTS[:2], [[cubes[0]], [cubes[1]]], max_length=mm.last.prompt_tokens + 5, do_sample=False)
    width = mm.last.prompt_tokens
    assert out.shape[1] == width + 5
    for b in range(2):
        assert torch.equal(out[b, width:], _alone(mm, PROMPTS[b], [cubes[b]], new=5))
