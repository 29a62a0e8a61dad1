"""kvmem.distill: context distillation of memories into a LoRA AdapterCube (kvmem/evolve/distill.py).

Fast tests run a tiny random llama with SmolLM2's tokenizer; one slow test distils a fact into the real SmolLM2.
"""

from __future__ import annotations

import pytest
import torch

import kvmem
from helpers import tiny_model

peft = pytest.importorskip("peft")

MEMORIES = ["Alice Moreau lives in Tallinn and works as a glassblower.",
            "The badge number of Bruno Okafor is 4821. Bruno Okafor sits on floor 7."]
FAST = dict(rank=4, questions_per_memory=3, max_answer_tokens=5, keep_prompts=("Say hello.",), progress=False)


def _examples(model, tok):
    from kvmem.evolve.distill import make_examples
    from kvmem.prompt import ChatLayout

    return make_examples(model, tok, MEMORIES, layout=ChatLayout(tok), questions_per_memory=3, seed=0,
                         max_answer_tokens=5, keep_prompts=FAST["keep_prompts"])


@pytest.fixture(scope="module")
def run(tok):
    """(model, distilled AdapterCube, the model's logits on a probe before distilling): every example in every
    batch (batch_size = the number of examples), so successive losses measure the same thing."""
    model = tiny_model("llama")
    n = len(_examples(model, tok))
    probe = torch.arange(100, 113)[None]
    with torch.no_grad():
        before = model(input_ids=probe).logits
    cube = kvmem.distill(model, tok, MEMORIES, steps=8, batch_size=n, lr=3e-3, **FAST)
    return model, cube, before, probe


def test_runs_the_steps_and_the_loss_falls(run):
    _, cube, _, _ = run
    facts = cube.meta["distill"]
    assert facts["steps"] == 8 and len(facts["losses"]) == 8 and facts["stopped"] == "steps"
    assert facts["losses"][-1] < 0.5 * facts["losses"][0], facts["losses"]
    assert facts["memories"] == 2 and facts["examples"] >= 4
    # the one keep prompt: its greedy answer and sampled ones, as many as the repeats keep_share asks for
    from kvmem.evolve.distill import keep_copies

    assert facts["keep_examples"] == keep_copies(facts["examples"], 1, 0.2) > 1
    # three values each rounded to the millisecond: the parts may exceed the whole by 1.5 ms of rounding, no more
    assert facts["teacher_seconds"] + facts["train_seconds"] <= facts["seconds"] + 1.5e-3 + 1e-9
    # the record rounds seconds to the millisecond and the rate to 4 decimals: allow exactly that rounding
    seconds = facts["train_seconds"]
    assert 8 / (seconds + 5e-4) - 5e-5 <= facts["steps_per_s"] <= 8 / (seconds - 5e-4) + 5e-5


def test_the_model_comes_back_unchanged(run):
    model, _, before, probe = run
    assert not isinstance(model, peft.PeftModel)
    assert not any("lora" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(input_ids=probe).logits, before)


def test_teacher_sees_the_memory_through_a_cube(tok):
    """The teacher's recorded distributions are the model's with the memory's text in the prompt (a full
    prefill, transformers' own), at every answer token."""
    from kvmem.prompt import ChatLayout

    model = tiny_model("llama")
    layout = ChatLayout(tok)
    example = next(e for e in _examples(model, tok) if e.source == 0)
    request_and_answer = example.ids[len(layout.anchor_ids()):]
    full = torch.cat([layout.anchor_ids(), layout.text_ids(MEMORIES[0]), request_and_answer])[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=full).logits[0].float(), -1)
    a = example.teacher.shape[0]
    start = full.shape[1] - (example.ids.numel() - example.start)
    want = logp[start - 1:start - 1 + a]
    assert torch.equal(full[0, start:start + a], example.ids[example.start:example.start + a])
    assert (example.teacher.float() - want).abs().max() < 2e-2  # float16 storage of log-probs


def test_generate_uses_the_distilled_adapter(run, tok):
    """mm.generate(..., adapter=cube) runs the model with exactly this LoRA (checked against a PeftModel made
    from its weights on a fresh copy of the base), then restores the base."""
    model, cube, before, probe = run
    reference = peft.PeftModel(tiny_model("llama"), cube.config)
    peft.set_peft_model_state_dict(reference, cube.state_dict)
    reference.eval()
    mm = kvmem.wrap(model, tok)
    out = mm.generate("Where does Alice Moreau live?", adapter=cube, max_new_tokens=6, do_sample=False)
    ids = mm.prompt_ids("Where does Alice Moreau live?", [])
    want = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              pad_token_id=mm._pad_id({}))
    assert torch.equal(out, want)
    with torch.no_grad(), mm.adapters.using(cube):
        assert not torch.equal(mm.model(input_ids=probe).logits, before)  # the LoRA learned something
    assert mm.adapter is None
    with torch.no_grad():
        assert torch.equal(mm.model(input_ids=probe).logits, before)


def test_merged_serving_equals_the_adapter(run, tok):
    """wrap(..., merge_adapters=True) serves the adapter from a merged copy of the weights: the logits of a PeftModel
    of the same LoRA (up to float rounding), its greedy answer, a plain model (no LoRA layers) that runs, the base
    model untouched, the copy reused, and the fingerprint check kept."""
    model, cube, before, probe = run
    reference = peft.PeftModel(tiny_model("llama"), cube.config)
    peft.set_peft_model_state_dict(reference, cube.state_dict)
    reference.eval()
    base = tiny_model("llama")
    mm = kvmem.wrap(base, tok, merge_adapters=True)
    with torch.no_grad(), mm.adapters.using(cube):
        assert mm.model is not base and not any("lora" in n for n, _ in mm.model.named_parameters())
        merged = mm.model(input_ids=probe).logits
        want = reference(input_ids=probe).logits
    assert (merged - want).abs().max() < 1e-4 and (want - before).abs().max() > 1e-3
    question = "Where does Alice Moreau live?"
    ids = mm.prompt_ids(question, [])
    out = mm.generate(question, adapter=cube, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                               do_sample=False, pad_token_id=mm._pad_id({})))
    assert mm.adapter is None and mm.model is base and mm.adapters.stats["loads"] == 1  # made once, reused
    with torch.no_grad():
        assert torch.equal(base(input_ids=probe).logits, before)
    with pytest.raises(kvmem.FingerprintMismatch):
        kvmem.wrap(tiny_model("llama", seed=1), tok, merge_adapters=True).use_adapter(cube)
    with pytest.raises(kvmem.CubeError, match="pick one of hotswap"):
        kvmem.wrap(tiny_model("llama"), tok, merge_adapters=True, hotswap=True)


def test_fingerprinted_to_its_base(run, tmp_path):
    _, cube, _, _ = run
    loaded = kvmem.AdapterCube.load(cube.save(tmp_path / "d.safetensors"))
    assert loaded.digest == cube.digest and loaded.meta["distill"]["losses"] == cube.meta["distill"]["losses"]
    loaded.check_base(tiny_model("llama"))  # the same weights: accepted
    with pytest.raises(kvmem.FingerprintMismatch):
        loaded.check_base(tiny_model("llama", seed=1))  # other weights: refused


def test_resume_equals_the_uninterrupted_run(tok, tmp_path):
    model = tiny_model("llama")
    # constant lr: the "interrupted" run below is a 3-step run, whose cosine schedule would differ from 6 steps'
    options = dict(FAST, batch_size=2, lr=1e-2, seed=3, checkpoint_every=2, lr_schedule="constant")
    whole = kvmem.distill(model, tok, MEMORIES, steps=6, checkpoint_dir=tmp_path / "a", **options)
    kvmem.distill(model, tok, MEMORIES, steps=3, checkpoint_dir=tmp_path / "b", **options)  # "interrupted" at 3
    resumed = kvmem.distill(model, tok, MEMORIES, steps=6, checkpoint_dir=tmp_path / "b", resume=True, **options)
    assert resumed.meta["distill"]["losses"] == whole.meta["distill"]["losses"]
    assert resumed.state_dict.keys() == whole.state_dict.keys()
    for key, value in whole.state_dict.items():
        assert torch.equal(resumed.state_dict[key], value), key
    # interrupted for real (an exception in step 5) under the cosine schedule: the checkpoint of step 4
    # resumes with the schedule of the same 6 steps
    import kvmem.evolve.distill as distill_module

    cosine = dict(options, lr_schedule="cosine")
    whole_cosine = kvmem.distill(model, tok, MEMORIES, steps=6, checkpoint_dir=tmp_path / "d", **cosine)
    calls, real_loss = [], distill_module.kl_loss

    def failing_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    distill_module.kl_loss = failing_loss
    try:
        with pytest.raises(KeyboardInterrupt):
            kvmem.distill(model, tok, MEMORIES, steps=6, checkpoint_dir=tmp_path / "e", **cosine)
    finally:
        distill_module.kl_loss = real_loss
    resumed_cosine = kvmem.distill(model, tok, MEMORIES, steps=6, checkpoint_dir=tmp_path / "e", resume=True,
                                   **cosine)
    assert resumed_cosine.digest == whole_cosine.digest
    assert resumed_cosine.meta["distill"]["losses"] == whole_cosine.meta["distill"]["losses"]
    fresh = kvmem.distill(model, tok, MEMORIES, steps=6, checkpoint_dir=tmp_path / "c", resume=True, **options)
    assert fresh.digest == whole.digest  # resume with no checkpoint yet starts from step 0
    with pytest.raises(kvmem.CubeError, match="another distillation"):
        kvmem.distill(model, tok, MEMORIES, steps=6, checkpoint_dir=tmp_path / "b", resume=True,
                      **{**options, "seed": 4})


def test_weight_average_is_the_moving_average_and_resumes(tok, tmp_path):
    """weight_average=d: the adapter is the bias-corrected EMA of the trained weights over the steps: after one step
    the step's weights themselves (never the initial ones); after two, (d * w1 + w2) / (1 + d); a checkpointed run
    resumes to the same average."""
    model = tiny_model("llama")
    options = dict(FAST, batch_size=2, lr=1e-2, seed=3)
    one = kvmem.distill(model, tok, MEMORIES, steps=1, weight_average=0.0, **options)
    two = kvmem.distill(model, tok, MEMORIES, steps=2, weight_average=0.0, **options)
    avg1 = kvmem.distill(model, tok, MEMORIES, steps=1, weight_average=0.5, **options)
    avg2 = kvmem.distill(model, tok, MEMORIES, steps=2, weight_average=0.5, **options)
    assert avg2.meta["distill"]["weight_average"] == 0.5 and one.meta["distill"]["weight_average"] == 0.0
    assert any(not torch.equal(one.state_dict[k], two.state_dict[k]) for k in one.state_dict)
    for k in one.state_dict:
        torch.testing.assert_close(avg1.state_dict[k], one.state_dict[k])
        torch.testing.assert_close(avg2.state_dict[k], (0.5 * one.state_dict[k] + two.state_dict[k]) / 1.5)
    averaged = dict(options, weight_average=0.7, checkpoint_every=2)
    whole = kvmem.distill(model, tok, MEMORIES, steps=6, checkpoint_dir=tmp_path / "a", **averaged)
    kvmem.distill(model, tok, MEMORIES, steps=3, checkpoint_dir=tmp_path / "b", **averaged)  # "interrupted" at 3
    resumed = kvmem.distill(model, tok, MEMORIES, steps=6, checkpoint_dir=tmp_path / "b", resume=True, **averaged)
    assert resumed.digest == whole.digest


def test_bfloat16_training_is_autocast_and_recorded(tok):
    """precision="bfloat16": the student's matmuls run in bfloat16 (its first loss, before any update, differs from
    float32's by bfloat16 rounding only), the LoRA weights stay float32, the run records what it used."""
    model = tiny_model("llama")
    options = dict(FAST, batch_size=2, lr=1e-2, seed=3, steps=3)
    full = kvmem.distill(model, tok, MEMORIES, precision="float32", **options)
    half = kvmem.distill(model, tok, MEMORIES, precision="bfloat16", **options)
    assert full.meta["distill"]["precision"] == "float32" and half.meta["distill"]["precision"] == "bfloat16"
    first_full, first_half = full.meta["distill"]["losses"][0], half.meta["distill"]["losses"][0]
    assert first_half != first_full and first_half == pytest.approx(first_full, rel=0.05)
    assert all(t.dtype == torch.float32 for t in half.state_dict.values())
    assert any(not torch.equal(full.state_dict[k], half.state_dict[k]) for k in full.state_dict)


def test_auto_precision_follows_the_device(monkeypatch):
    """"auto" is bfloat16 only where the CPU multiplies it natively (AVX512-BF16 or AMX); an explicit choice is kept;
    a model that is not float32 trains in its own dtype, and says so; bfloat16 without autocast is refused."""
    from kvmem.evolve.distill import train_precision

    model = tiny_model("llama")
    for avx, amx, want in ((True, False, "bfloat16"), (False, True, "bfloat16"), (False, False, "float32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda avx=avx: avx)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        assert train_precision(model, "auto") == want
        assert train_precision(model, "float32") == "float32" and train_precision(model, "bfloat16") == "bfloat16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    for dtype, name in ((torch.float16, "float16"), (torch.bfloat16, "bfloat16")):
        assert {train_precision(tiny_model("llama", dtype=dtype), p) for p in ("auto", "float32", "bfloat16")} == {name}
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda kind: False)
    assert train_precision(model, "auto") == "float32"
    with pytest.raises(kvmem.CubeError, match="needs torch.autocast"):
        train_precision(model, "bfloat16")


def test_bfloat16_student_keeps_its_head_in_float32(tok):
    """Under the autocast of bfloat16 training the student's logits come out float32 (its LM head runs outside the
    autocast) and equal the float32 head applied to the same hidden states."""
    from kvmem.evolve.distill import _targets, bare_copy, make_student

    model = tiny_model("llama")
    ids = torch.arange(5, 25)[None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = make_student(bare_copy(model), rank=2, targets=_targets(model, None), precision="float32")
        assert plain(input_ids=ids).logits.dtype == torch.bfloat16
        student = make_student(bare_copy(model), rank=2, targets=_targets(model, None), precision="bfloat16")
        out = student(input_ids=ids, output_hidden_states=True)
    assert out.logits.dtype == torch.float32
    head = model.get_output_embeddings()
    torch.testing.assert_close(out.logits, head(out.hidden_states[-1].float()))


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "auto"])
def test_a_bfloat16_model_trains_in_its_own_dtype(tok, precision):
    """A bfloat16 model distils whatever ``precision`` says (no autocast, its LM head left as it is) and records
    "bfloat16"."""
    cube = kvmem.distill(tiny_model("llama", dtype=torch.bfloat16), tok, MEMORIES, steps=1, precision=precision,
                         **FAST)
    assert cube.meta["distill"]["precision"] == "bfloat16" and len(cube.meta["distill"]["losses"]) == 1


def test_resume_keys_the_precision(tok, tmp_path, monkeypatch):
    """A checkpoint of a bfloat16 run is not resumed in float32 (another run), and "auto" resumes the run of the
    precision it resolves to (bfloat16 on a CPU that says it has AVX512-BF16)."""
    model = tiny_model("llama")
    options = dict(FAST, batch_size=2, checkpoint_dir=tmp_path / "c", checkpoint_every=1)
    whole = kvmem.distill(model, tok, MEMORIES, steps=2, precision="bfloat16", **{**options, "checkpoint_dir": None})
    kvmem.distill(model, tok, MEMORIES, steps=1, precision="bfloat16", **options)
    with pytest.raises(kvmem.CubeError, match="another distillation"):
        kvmem.distill(model, tok, MEMORIES, steps=2, precision="float32", resume=True, **options)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    auto = kvmem.distill(model, tok, MEMORIES, steps=2, precision="auto", resume=True, **options)
    assert auto.meta["distill"]["precision"] == "bfloat16" and auto.digest == whole.digest


def test_lineage_of_store_records(tok, tmp_path):
    from kvmem.store.lineage import source_entry, stale_sources

    view = kvmem.CubeStore(tmp_path / "s").view("alice")
    records = [view.add(f"m{i}", text) for i, text in enumerate(MEMORIES)]
    cube = kvmem.distill(tiny_model("llama"), tok, view.ls(), steps=1, **FAST)
    derived = kvmem.AdapterCube.load(cube.save(tmp_path / "a.safetensors")).meta["derived_from"]
    assert derived == [source_entry(r) for r in records]
    assert stale_sources(view.store.catalog, derived) == []
    view.add("m0", "Alice Moreau moved to Porto.")
    assert [(s["memory"], s["reason"]) for s in stale_sources(view.store.catalog, derived)] == [("alice/m0", "edited")]
    assert kvmem.distill(tiny_model("llama"), tok, MEMORIES[:1], steps=1, **FAST).meta["derived_from"] == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "steps= .* or time_budget="),
    (dict(steps=0), "steps must be an int >= 1"),
    (dict(steps=1, rank=0), "rank must be"),
    (dict(steps=1, lr=5.0), "lr must be"),
    (dict(steps=1, batch_size=True), "batch_size must be"),
    (dict(steps=1, time_budget=-1), "time_budget must be"),
    (dict(steps=1, resume=True), "resume=True needs checkpoint_dir"),
    (dict(steps=1, content_weight=0), "content_weight must be a number > 0"),
    (dict(steps=1, keep_share=1.0), "keep_share must be a number in"),
    (dict(steps=1, target_modules=["nope_proj"]), "not linear layers"),
    (dict(steps=1, lr_schedule="linear"), "lr_schedule must be .constant., .cosine. or .wsd."),
    (dict(steps=1, warmup=1.0), "warmup must be a share"),
    (dict(steps=1, sampled_share=1.5), "sampled_share must be a share"),
    (dict(steps=1, content_temperature=0), "content_temperature must be a number > 0"),
    (dict(steps=1, content_temperature=float("nan")), "content_temperature must be a number > 0"),
    (dict(steps=1, grounded="yes"), "grounded must be true or false"),
    (dict(steps=1, keep_answers="drawn"), "keep_answers must be 'greedy' or 'sampled'"),
    (dict(steps=1, keep_answers=None), "keep_answers must be 'greedy' or 'sampled'"),
    (dict(steps=1, weight_average=1.0), "weight_average must be an EMA decay"),
    (dict(steps=1, weight_average=True), "weight_average must be an EMA decay"),
    (dict(time_budget=1e-9), "time budget .* ran out"),
    (dict(steps=1, precision="fp8"), "precision must be one of 'auto', 'float32', 'bfloat16'"),
    (dict(steps=1, precision=None), "precision must be one of"),
])
def test_bad_arguments(tok, kwargs, match):
    with pytest.raises(kvmem.CubeError, match=match):
        kvmem.distill(tiny_model("llama"), tok, MEMORIES, **{**FAST, **kwargs})


@pytest.mark.parametrize("memories, match", [
    ([], "at least one memory"), ("Alice lives in Oslo.", "must be a list"), ([""], "non-empty text"),
    ([3], "non-empty text"),
])
def test_bad_memories(tok, memories, match):
    with pytest.raises(kvmem.CubeError, match=match):
        kvmem.distill(tiny_model("llama"), tok, memories, steps=1, **FAST)


def test_refuses_a_peft_model(tok):
    wrapped = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(kvmem.CubeError, match="base model, not a PeftModel"):
        kvmem.distill(wrapped, tok, MEMORIES, steps=1, **FAST)


def test_questions_come_from_the_text():
    from kvmem.evolve.questions import make_questions, names

    text = "Quinn Jensen keeps bees in Graz. The favourite colour of Quinn Jensen is teal."
    assert names(text)[:2] == ["Quinn Jensen", "Graz"]
    qs = make_questions(text, per_memory=16, seed=0)
    assert qs == make_questions(text, per_memory=16, seed=0) and len(set(qs)) == len(qs)
    assert "What is the favourite colour of Quinn Jensen?" in qs
    cloze = [q[len("Complete this sentence: "):-len(" ...")] for q in qs if q.startswith("Complete this sentence: ")]
    assert cloze and all(text.startswith(c) or f". {c}" in text for c in cloze)
    assert any(q.startswith("Fill in the blank:") and "___" in q for q in qs)
    about = {f"{t} Quinn Jensen{end}" for t, end in (("What do you know about", "?"), ("Tell me about", "."),
                                                        ("Describe", "."), ("What is known about", "?"))}
    assert about & set(qs)
    assert len(make_questions(text, per_memory=3, seed=0)) == 3
    with pytest.raises(kvmem.CubeError):
        make_questions("  ", per_memory=3)


def test_every_attribute_is_asked_both_ways():
    """Each (entity, relation, value) the text states is asked with the value as the answer and, reversed, with
    the entity as the answer; a short budget still asks about both attributes."""
    from kvmem.evolve.questions import attributes, make_questions

    text = "Ann Berg lives in Oslo and works as a pilot. Ann Berg teaches chess."
    assert attributes(text) == [("Ann Berg", "lives", "in", "Oslo"), ("Ann Berg", "works", "as", "a pilot"),
                                ("Ann Berg", "teaches", "", "chess")]
    assert attributes("The colour of Ann Berg is teal.") == []  # no "<Name> <verb> ..." clause
    every = set(make_questions(text, per_memory=200, seed=0))
    assert {"Where does Ann Berg live?", "Who lives in Oslo?", "What does Ann Berg work as?",
            "Who works as a pilot?", "What does Ann Berg teach?", "Who teaches chess?",
            "Complete this sentence: Ann Berg works as ..."} <= every
    short = make_questions(text, per_memory=4, seed=0)
    assert any(q.startswith(("Who ", "Which person ", "Name the person ")) for q in short)


def test_facts_are_asked_in_other_words_and_frames():
    """A stated relation is also asked with other words for it (where someone lives, what they work as) and in
    several sentence frames; fact questions take most of a short budget, each attribute as many."""
    from kvmem.evolve.questions import FACT_TURNS, make_questions

    text = "Ann Berg lives in Oslo and works as a pilot."
    every = set(make_questions(text, per_memory=200, seed=0))
    assert {"Where is Ann Berg located?", "What is Ann Berg's job?", "Quick question: where does Ann Berg live?",
            "Do you know this: what does Ann Berg work as?"} <= every
    short = make_questions(text, per_memory=12, seed=3)
    lives = [q for q in short if "Ann Berg" in q and ("live" in q or "located" in q or "place" in q)]
    works = [q for q in short if "Ann Berg" in q and ("work" in q or "job" in q or "role" in q or "position" in q)]
    assert FACT_TURNS > 1 and abs(len(lives) - len(works)) <= 1 and len(lives) + len(works) >= 2 * FACT_TURNS - 1


def test_lr_schedule():
    """Cosine: a linear warm-up to the peak, then a decay to a tenth; constant: the peak throughout; wsd: warm-up,
    the peak, a linear decay to a tenth at the end."""
    from kvmem.evolve.schedule import WSD_DECAY, lr_factor

    factors = [lr_factor(i / 100, schedule="cosine", warmup=0.1) for i in range(101)]
    assert factors[0] < 0.05 and factors[10] == pytest.approx(1.0) and factors[100] == pytest.approx(0.1)
    assert factors[:10] == sorted(factors[:10]) and factors[10:] == sorted(factors[10:], reverse=True)
    assert {lr_factor(p, schedule="constant", warmup=0.1) for p in (0, 0.5, 1)} == {1.0}
    # wsd: the same warm-up, the peak until the last WSD_DECAY of the run, then a straight line down to a tenth
    wsd = [lr_factor(i / 100, schedule="wsd", warmup=0.1) for i in range(101)]
    flat_until = round(100 * (1 - WSD_DECAY))
    assert wsd[:10] == factors[:10] and set(wsd[10:flat_until + 1]) == {1.0} and wsd[100] == pytest.approx(0.1)
    steps = [a - b for a, b in zip(wsd[flat_until:], wsd[flat_until + 1:])]
    assert all(s == pytest.approx(0.9 / (100 - flat_until)) for s in steps)
    # a warm-up longer than the stable part: the decay starts where it ends, with no jump
    late = [lr_factor(i / 100, schedule="wsd", warmup=0.9) for i in range(101)]
    assert late[:90] == sorted(late[:90]) and late[90:] == sorted(late[90:], reverse=True)
    assert late[90] == pytest.approx(1.0) and late[100] == pytest.approx(0.1)
    assert max(abs(a - b) for a, b in zip(late, late[1:])) < 0.12


def test_keep_share_and_content_weights(tok):
    """Keep prompts are repeated up to their share of the examples; answer tokens that state the memory weigh
    ``content_weight``, the rest 1, and the loss is the weighted mean of the per-token KL."""
    from kvmem.evolve.distill import Example, content_tokens, kl_loss, make_examples, with_keep_share
    from kvmem.prompt import ChatLayout

    model = tiny_model("llama")
    examples = make_examples(model, tok, MEMORIES, layout=ChatLayout(tok), questions_per_memory=3, seed=0,
                             max_answer_tokens=5, keep_prompts=FAST["keep_prompts"], content_weight=4.0)
    learn = [e for e in examples if e.source >= 0]
    mixed = with_keep_share(examples, 0.25)
    assert sum(e.source < 0 for e in mixed) / len(mixed) >= 0.25 and [e for e in mixed if e.source >= 0] == learn
    assert with_keep_share(examples, 0.0) is examples
    content = content_tokens(tok, MEMORIES[0])
    assert tok.encode(" Tallinn", add_special_tokens=False)[0] in content
    assert tok.encode(" and", add_special_tokens=False)[0] not in content
    for e in learn:
        answer = e.ids[e.start:e.start + e.teacher.shape[0]].tolist()
        want = [4.0 if t in content_tokens(tok, MEMORIES[e.source]) else 1.0 for t in answer]
        assert e.weights.tolist() == want
    # the weighted loss is the weighted mean of the same per-token KLs: equal weights give the plain mean
    e = learn[0]
    plain = Example(e.ids, e.start, e.teacher, e.source)
    heavy = Example(e.ids, e.start, e.teacher, e.source, torch.full((e.teacher.shape[0],), 7.0))
    with torch.no_grad():
        assert torch.allclose(kl_loss(model, [plain], pad=0), kl_loss(model, [heavy], pad=0))


def test_kl_loss_is_the_weighted_mean_of_each_examples_own_kl(tok):
    """`kl_loss` of a padded batch equals, to float rounding, the weighted mean over answer tokens of
    torch's own KL (``F.kl_div``) between each example's teacher rows and the model run on that example alone (no
    padding, every logit); its gradient is that reference's gradient."""
    import torch.nn.functional as F

    from kvmem.evolve.distill import Example, kl_loss, make_examples
    from kvmem.prompt import ChatLayout

    model = tiny_model("llama")
    examples = make_examples(model, tok, MEMORIES, layout=ChatLayout(tok), questions_per_memory=3, seed=0,
                             max_answer_tokens=5, keep_prompts=FAST["keep_prompts"], content_weight=2.5)
    batch = [e if e.weights is not None else Example(e.ids, e.start, e.teacher, e.source, None) for e in examples]
    assert len({e.ids.numel() for e in batch}) > 1 and any(e.weights is not None for e in batch)
    weight = next(p for p in model.parameters() if p.requires_grad)
    total, count = 0.0, 0.0
    for e in batch:
        a = e.teacher.shape[0]
        logits = model(input_ids=e.ids[None]).logits[0, e.start - 1:e.start - 1 + a]
        per_token = F.kl_div(torch.log_softmax(logits.float(), -1), e.teacher.float(), log_target=True,
                             reduction="none").sum(-1)
        w = e.weights if e.weights is not None else torch.ones(a)
        total, count = total + (w * per_token).sum(), count + float(w.sum())
    want = total / count
    (want_grad,) = torch.autograd.grad(want, weight)
    got = kl_loss(model, batch, pad=0)
    (got_grad,) = torch.autograd.grad(got, weight)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), (float(got), float(want))
    assert torch.allclose(got_grad, want_grad, rtol=1e-4, atol=1e-8)


def test_the_student_trains_with_eager_attention_on_a_cpu(tok):
    """On a CPU a model that uses sdpa (or kvmem_sdpa) trains its LoRA with eager attention
    (`training_attention`): the copy's attention is switched, the caller's model keeps sdpa, the run records it,
    and the student's loss and gradient on a padded batch equal those of the same student computing sdpa attention
    (transformers' own), to float rounding."""
    from kvmem.evolve.distill import _targets, bare_copy, kl_loss, make_student, training_attention
    from kvmem.model.attention import use_gqa_attention

    model = tiny_model("llama")
    assert model.config._attn_implementation == "sdpa" and training_attention(model) == "eager"
    served = bare_copy(model)  # a kvmem.wrap-ped model of grouped heads serves with kvmem_sdpa: trains eager too
    assert use_gqa_attention(served) == "kvmem_sdpa" and training_attention(served) == "eager"
    served.set_attn_implementation("flex_attention")  # any other implementation is the model's own choice: kept
    assert training_attention(served) == "flex_attention"
    examples = _examples(model, tok)
    assert len({e.ids.numel() for e in examples}) > 1  # padded: the mask of each implementation is exercised
    results = {}
    for attention in (None, "sdpa"):
        torch.manual_seed(0)
        student = make_student(bare_copy(model), rank=2, targets=_targets(model, None), precision="float32",
                               attention=attention)
        loss = kl_loss(student, examples, pad=0)
        lora = [p for p in student.parameters() if p.requires_grad]
        results[student.config._attn_implementation] = (loss, torch.autograd.grad(loss, lora))
    assert set(results) == {"eager", "sdpa"} and model.config._attn_implementation == "sdpa"
    (eager, eager_grad), (sdpa, sdpa_grad) = results["eager"], results["sdpa"]
    assert torch.allclose(eager, sdpa, rtol=1e-5, atol=1e-7), (float(eager), float(sdpa))
    for a, b in zip(eager_grad, sdpa_grad):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    cube = kvmem.distill(model, tok, MEMORIES, steps=1, **FAST)
    assert cube.meta["distill"]["attention"] == "eager" and model.config._attn_implementation == "sdpa"


def test_sampled_answers(tok):
    """A ``sampled_share`` of each memory's questions gets a sampled teacher answer instead of the greedy one: the
    same for the same seed, the other questions and the keep prompts answered as with no sampling, and the teacher
    log-probs still those of the model's own (unmodified) distribution at each answer token."""
    from kvmem.evolve.distill import make_examples
    from kvmem.prompt import ChatLayout

    model = tiny_model("llama")
    kw = dict(layout=ChatLayout(tok), questions_per_memory=4, seed=0, max_answer_tokens=6,
              keep_prompts=FAST["keep_prompts"])
    greedy = make_examples(model, tok, MEMORIES, **kw)
    drawn = make_examples(model, tok, MEMORIES, sampled_share=0.5, **kw)
    again = make_examples(model, tok, MEMORIES, sampled_share=0.5, **kw)
    assert [torch.equal(a.ids, b.ids) and torch.equal(a.teacher, b.teacher) for a, b in zip(drawn, again)] == \
        [True] * len(drawn)
    assert sorted(e.source for e in drawn) == sorted(e.source for e in greedy)
    same = [any(torch.equal(d.ids, g.ids) for g in greedy) for d in drawn]
    # half the memory questions (4 of 8) are sampled; a tiny random model's sampled answers differ from its greedy
    assert sum(same) == len(drawn) - 4, same
    for e in drawn:  # the teacher's rows are log-probs of the whole vocabulary at each answer token
        assert torch.allclose(e.teacher.float().exp().sum(-1), torch.ones(e.teacher.shape[0]), atol=2e-2)


def test_keep_samples_are_the_base_models_own_sampled_answers(tok):
    """``keep_samples`` n: the keep prompts' greedy answers, then n rounds of answers sampled from the base model
    (the same for the same seed, the rounds apart from each other and from the greedy ones), each row the base's
    own log-probs along its answer as a plain forward of that example gives them; the memories' examples are
    untouched."""
    from kvmem.evolve.distill import make_examples
    from kvmem.prompt import ChatLayout

    model = tiny_model("llama")
    prompts = ("Say hello.", "Name a colour.", "Count to three.")
    kw = dict(layout=ChatLayout(tok), questions_per_memory=2, seed=0, max_answer_tokens=6, keep_prompts=prompts)
    greedy = make_examples(model, tok, MEMORIES, **kw)
    drawn = make_examples(model, tok, MEMORIES, keep_samples=2, **kw)
    again = make_examples(model, tok, MEMORIES, keep_samples=2, **kw)
    assert [torch.equal(a.ids, b.ids) and torch.equal(a.teacher, b.teacher) for a, b in zip(drawn, again)] == \
        [True] * len(drawn)
    learn = lambda examples: [(e.ids.tolist(), e.source) for e in examples if e.source >= 0]  # noqa: E731
    assert learn(drawn) == learn(greedy)
    keep_g, keep_d = [e for e in greedy if e.source < 0], [e for e in drawn if e.source < 0]
    assert len(keep_g) == len(prompts) and len(keep_d) == 3 * len(prompts)
    assert [e.ids.tolist() for e in keep_d[:len(prompts)]] == [e.ids.tolist() for e in keep_g]
    answers = [tuple(e.ids.tolist()) for e in keep_d]
    first, rest = answers[:len(prompts)], answers[len(prompts):]
    # a tiny random model's sampled answers differ from its greedy ones and from each other
    assert len(set(rest)) == 2 * len(prompts) and not set(rest) & set(first)
    for e in keep_d:
        a = e.teacher.shape[0]
        with torch.no_grad():
            want = torch.log_softmax(model(input_ids=e.ids[None]).logits[0, e.start - 1:e.start - 1 + a].float(), -1)
        assert torch.allclose(e.teacher.float(), want, atol=2e-2), float((e.teacher.float() - want).abs().max())


def test_keep_answers_sampled_replaces_the_repeats(tok):
    """``keep_answers="sampled"`` (the default): as many keep rows as the repeats of ``keep_share`` would be, each
    its own sampled answer (``keep_examples`` counts distinct rows); "greedy" repeats the greedy ones."""
    from kvmem.evolve.distill import keep_copies

    assert keep_copies(40, 2, 0.2) == 5 and keep_copies(40, 2, 0.0) == 1 and keep_copies(4, 2, 0.2) == 1
    kw = {**FAST, "keep_prompts": ("Say hello.", "Name a colour.")}
    copies = keep_copies(len(MEMORIES) * FAST["questions_per_memory"], 2, 0.4)
    assert copies > 1
    greedy = kvmem.distill(tiny_model("llama"), tok, MEMORIES, steps=1, keep_share=0.4, keep_answers="greedy",
                           **kw).meta["distill"]
    drawn = kvmem.distill(tiny_model("llama"), tok, MEMORIES, steps=1, keep_share=0.4, **kw).meta["distill"]
    assert greedy["keep_examples"] == 2 and greedy["keep_answers"] == "greedy"
    assert drawn["keep_examples"] == 2 * copies and drawn["keep_answers"] == "sampled"


def test_content_temperature_sharpens_the_tokens_that_state_the_memory(tok, monkeypatch):
    """``content_temperature`` T: at a memory answer's content tokens (`content_tokens`) the rows are
    log_softmax(teacher log-probs / T), argmax unchanged and entropy lower for T < 1; the other rows of the same
    answers, and the keep prompts' rows, stay the teacher's and the base's own. The answers are the same."""
    from kvmem.evolve import distill as module
    from kvmem.prompt import ChatLayout

    model = tiny_model("llama")
    kw = dict(layout=ChatLayout(tok), questions_per_memory=4, seed=0, max_answer_tokens=8,
              keep_prompts=FAST["keep_prompts"])
    memories = MEMORIES
    plain = module.make_examples(model, tok, memories, **kw)
    # a random model never says the memory's words: call the first token of each of its answers "content"
    first = {int(e.ids[e.start]) for e in plain if e.source >= 0}
    monkeypatch.setattr(module, "content_tokens", lambda tokenizer, text: first)
    content_tokens = module.content_tokens
    sharp = module.make_examples(model, tok, memories, content_temperature=0.5, **kw)
    assert [(e.source, e.ids.tolist()) for e in sharp] == [(e.source, e.ids.tolist()) for e in plain]

    def entropy(logp):
        return -(logp.float().exp() * logp.float()).sum(-1)

    states = 0
    for p, s in zip(plain, sharp):
        if p.source < 0:
            assert torch.equal(p.teacher, s.teacher)
            continue
        content = content_tokens(tok, memories[p.source])
        for t, prow, srow in zip(p.ids[p.start:].tolist(), p.teacher, s.teacher):
            if t not in content:
                assert torch.equal(prow, srow)
                continue
            states += 1
            want = torch.log_softmax(prow.float() / 0.5, -1)
            assert (srow.float() - want).abs().max() < 0.1  # float16 storage of log-probs twice
            assert srow.float().argmax() == prow.float().argmax() and entropy(srow) < entropy(prow)
    assert states > 0, "no answer token stated the memory: the test checked nothing"


def test_questions_carry_the_value_their_answer_states():
    """A fact question carries its attribute's value, a reverse one the entity, the other kinds none; an answer
    states the memory when it says the whole value (articles aside), or for a question without one, a word of
    the memory that the question did not say (a form of a question word, "lives" for "live", does not count)."""
    from kvmem.evolve.questions import ask, make_questions, states_memory

    text = "Ann Berg lives in Oslo and works as a pilot."
    asked = dict(ask(text, per_memory=200, seed=0))
    assert list(asked) == make_questions(text, per_memory=200, seed=0)
    assert asked["Where does Ann Berg live?"] == "Oslo" and asked["What does Ann Berg work as?"] == "a pilot"
    assert asked["Who lives in Oslo?"] == "Ann Berg" and asked["What do you remember?"] is None
    assert states_memory("She lives in Oslo, Norway.", memory=text, question="Where does Ann Berg live?", value="Oslo")
    assert not states_memory("Ann Berg lives in a small town.", memory=text, question="Where does Ann Berg live?",
                             value="Oslo")
    assert states_memory("Ann Berg is a pilot.", memory=text, question="Q", value="a pilot")
    assert not states_memory("Ann is a pilot.", memory=text, question="Who works as a pilot?", value="Ann Berg")
    assert states_memory("A pilot from Oslo.", memory=text, question="Tell me about Ann Berg.")
    assert not states_memory("Oslo is a vibrant city.", memory=text, question="Describe Oslo.")
    assert not states_memory("Ann Berg lives in a village.", memory=text, question="Where does Ann Berg live?")
    assert not states_memory("The old man smiled.", memory=text, question="What do you remember?")


def test_grounded_leaves_out_answers_that_state_nothing(tok, monkeypatch):
    """``grounded=True`` keeps exactly the memory answers `states_memory` accepts, each judged on its own
    question, value and decoded answer; keep prompts are never judged; none accepted is a clear CubeError."""
    from kvmem.evolve import distill as module
    from kvmem.evolve.questions import ask
    from kvmem.prompt import ChatLayout

    model = tiny_model("llama")
    kw = dict(layout=ChatLayout(tok), questions_per_memory=4, seed=0, max_answer_tokens=5,
              keep_prompts=FAST["keep_prompts"])
    every = module.make_examples(model, tok, MEMORIES, **kw)
    calls = []

    def every_other(answer, *, memory, question, value=None):
        calls.append((answer, memory, question, value))
        return len(calls) % 2 == 1

    monkeypatch.setattr(module, "states_memory", every_other)
    kept = module.make_examples(model, tok, MEMORIES, grounded=True, **kw)
    learn = [e for e in every if e.source >= 0]
    assert len(calls) == len(learn)
    for e, (answer, memory, question, value) in zip(learn, calls):
        assert memory == MEMORIES[e.source] and (question, value) in ask(memory, per_memory=4, seed=e.source)
        assert question in tok.decode(e.ids[:e.start])  # the question this example's prompt asks
        assert answer == tok.decode(e.ids[e.start:], skip_special_tokens=True)
    want = [e for n, e in enumerate(learn) if n % 2 == 0] + [e for e in every if e.source < 0]
    assert [(e.source, e.ids.tolist()) for e in kept] == [(e.source, e.ids.tolist()) for e in want]
    monkeypatch.setattr(module, "states_memory", lambda *a, **k: False)
    with pytest.raises(kvmem.CubeError, match="states something of them"):
        module.make_examples(model, tok, MEMORIES, grounded=True, **kw)


@pytest.mark.slow
def test_smollm2_learns_a_fact_the_base_does_not_know(smollm2):
    """Distilled into SmolLM2, an invented fact is answered with no memory in the prompt, to a question the
    distillation never asked (a paraphrase); the base model does not know it, the cube does."""
    from kvmem.evolve.questions import make_questions

    model, tokenizer = smollm2
    fact = "Sami Haddad lives in Split and works as a glassblower."
    question = "What does Sami Haddad do for a living?"
    mm = kvmem.wrap(model, tokenizer)
    assert "glassblower" not in mm.answer(question, max_new_tokens=16).lower()
    assert "glassblower" in mm.answer(question, cubes=[mm.build_cube(fact)], max_new_tokens=16).lower()
    cube = kvmem.distill(mm.adapters.base, tokenizer, [fact], steps=30, lr=2e-3, seed=0, progress=False)
    assert question not in make_questions(fact, per_memory=32, seed=0)  # the questions distil asked (seed 0)
    assert "glassblower" in mm.answer(question, adapter=cube, max_new_tokens=16).lower()
    assert mm.adapter is None


def test_cli_distils_a_namespace_into_the_store(checkpoint, tmp_path):
    from typer.testing import CliRunner

    from kvmem.cli import app

    runner = CliRunner(env={"COLUMNS": "400", "NO_COLOR": "1"})
    view = kvmem.CubeStore(tmp_path / "s").view("alice")
    view.add("m0", MEMORIES[0])
    view.add("m1", MEMORIES[1])
    base = ["distill", "-n", "alice", "--store", str(tmp_path / "s"), "--model", str(checkpoint)]
    result = runner.invoke(app, [*base, "--ids", "m1", "--steps", "2", "--rank", "2", "--content-weight", "2",
                                 "--keep-share", "0.1", "--lr", "0.003", "--lr-schedule", "constant",
                                 "--questions", "3", "--answer-tokens", "4", "--batch-size", "2",
                                 "--precision", "bfloat16", "--content-temperature", "0.7",
                                 "--keep-answers", "greedy"])
    assert result.exit_code == 0, result.output
    path = tmp_path / "s" / "adapters" / "alice.safetensors"
    assert f"wrote {path}: 1 memories learned in 2 steps" in result.output and "bfloat16 matmuls" in result.output
    cube = kvmem.AdapterCube.load(path)
    assert [e["memory"] for e in cube.meta["derived_from"]] == ["alice/m1"] and cube.rank == 2
    run = cube.meta["distill"]
    assert (run["content_weight"], run["keep_share"], run["lr"], run["lr_schedule"]) == (2.0, 0.1, 0.003, "constant")
    assert (run["questions_per_memory"], run["max_answer_tokens"], run["batch_size"]) == (3, 4, 2)
    assert run["grounded"] is False and run["precision"] == "bfloat16" and run["content_temperature"] == 0.7
    assert run["keep_answers"] == "greedy"
    # --grounded reaches distill: this random model's answers state nothing of the memory, so none is left
    grounded = runner.invoke(app, [*base, "--ids", "m1", "--steps", "1", "--questions", "3", "--grounded"])
    assert grounded.exit_code == 1 and "states something of them (grounded=True)" in grounded.output
    bad = runner.invoke(app, [*base, "--steps", "1", "--keep-share", "1.5"])
    assert bad.exit_code == 1 and bad.output.startswith("kvmem: keep_share must be")
    bad = runner.invoke(app, [*base, "--steps", "1", "--keep-answers", "drawn"])
    assert bad.exit_code == 1 and bad.output.startswith("kvmem: keep_answers must be")
    bad = runner.invoke(app, [*base, "--steps", "1", "--precision", "half"])
    assert bad.exit_code == 1 and bad.output.startswith("kvmem: precision must be one of")
    out = tmp_path / "own.safetensors"
    assert runner.invoke(app, [*base, "--steps", "1", "-o", str(out)]).exit_code == 0
    assert len(kvmem.AdapterCube.load(out).meta["derived_from"]) == 2
    missing = runner.invoke(app, [*base, "--ids", "nope", "--steps", "1"])
    assert missing.exit_code == 1 and missing.output.startswith("kvmem: no memory 'nope'")
    empty = runner.invoke(app, ["distill", "-n", "bob", "--store", str(tmp_path / "s"), "--steps", "1"])
    assert empty.exit_code == 1 and "has no memories to distil" in empty.output
