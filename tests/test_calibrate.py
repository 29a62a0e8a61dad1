"""The composition gate (kvmem.calibrate / recompute="auto"): exact with a full budget, its choice follows the
calibration's measurements, a model that misses the target is prefilled as text, and mm.last says why."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import kvmem
from helpers import random_ids, tiny_model
from kvmem.inject import gate as gate_module
from kvmem.inject.gate import Target, calibration_path, choose
from kvmem.model.cache import cache_kwarg


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMEM_CACHE", str(tmp_path))
    gate_module._NOTICED.clear()
    return tmp_path


def _cubes(model, lengths=(12, 17, 9)):
    anchor = random_ids(3, seed=1)
    return [kvmem.MemCube.from_ids(model, random_ids(n, seed=10 + i), anchor_ids=anchor, name=f"c{i}")
            for i, n in enumerate(lengths)]


def _next_logits(model, prefix, query):
    with torch.inference_mode():
        out = model(input_ids=query[None], use_cache=True, **{cache_kwarg(model): prefix.cache})
    return out.logits[0, -1]


def _full_logits(model, prefix, query):
    with torch.inference_mode():
        return model(input_ids=prefix.extend(query)).logits[0, -1]


def _row(n, mode, budget, kl, agreement, ttft):
    return {"cubes": n, "mode": mode, "budget": budget, "kl_mean": kl, "agreement": agreement, "ttft_s": ttft,
            "full_ttft_s": 1.0, "ttft_saving": 1 - ttft}


def _write(model, rows):
    path = calibration_path(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "rows": rows}))
    return path


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("mode,budget", [("leading", 17), ("blend", 34), ("deep", 34)])
def test_full_budget_is_exact(family, mode, budget):
    model = tiny_model(family)
    cubes = _cubes(model)
    query = random_ids(5, seed=99)
    prefix = kvmem.prefill(model, cubes, recompute=mode, budget=budget)
    assert prefix.recomputed == 17 + 9
    torch.testing.assert_close(_next_logits(model, prefix, query), _full_logits(model, prefix, query),
                               rtol=1e-4, atol=1e-4)
    partial = kvmem.prefill(model, cubes, recompute="none")  # the check can fail: composition alone is not exact
    assert not torch.allclose(_next_logits(model, partial, query), _full_logits(model, partial, query), atol=1e-4)


def test_blend_takes_leading_and_most_deviating_tokens_per_cube(llama):
    cubes = _cubes(llama, (10, 30, 30))
    prefix = kvmem.prefill(llama, cubes, recompute="blend", budget=8)
    assert prefix.recomputed == 16  # 8 per later cube


def test_gate_choice_follows_measurements(llama, cache_dir):
    cubes = _cubes(llama)
    _write(llama, [_row(4, "none", None, 0.30, 0.5, 0.05), _row(4, "leading", 4, 0.04, 0.95, 0.08),
                   _row(4, "leading", 8, 0.01, 1.0, 0.12), _row(8, "none", None, 0.9, 0.1, 0.1)])
    prefix = kvmem.prefill(llama, cubes)  # 3 cubes -> the 4-cube measurements
    assert prefix.composition.startswith("leading: calibrated: at 4 cubes leading@4")
    assert prefix.recomputed == 4 + 4
    path = _write(llama, [_row(4, "none", None, 0.02, 0.95, 0.05), _row(4, "leading", 4, 0.01, 1.0, 0.08)])
    prefix = kvmem.prefill(llama, cubes)
    assert prefix.composition.startswith("none: calibrated: at 4 cubes none"), path
    assert prefix.recomputed == 0
    assert choose(json.loads(path.read_text()), 3, target=Target(kl=0.015, agreement=1.0)).budget == 4


def test_failing_model_is_prefilled_as_text(llama, cache_dir):
    cubes = _cubes(llama, (40, 45, 50))  # longer than the default's 32 leading tokens: only text is exact
    _write(llama, [_row(4, "none", None, 0.5, 0.2, 0.05), _row(4, "leading", 8, 0.2, 0.6, 0.1)])
    query = random_ids(5, seed=7)
    prefix = kvmem.prefill(llama, cubes)
    assert prefix.composition.startswith("text: calibrated: no composition meets the target faster than a full prefill at 4 cubes")
    assert "best leading@8: KL 0.200" in prefix.composition
    assert prefix.recomputed == 45 + 50  # every later cube's tokens, as a text prefill computes them
    torch.testing.assert_close(_next_logits(llama, prefix, query), _full_logits(llama, prefix, query),
                               rtol=1e-4, atol=1e-4)
    # the check can fail: bypassing the gate (the default mode) composes, and composition is not exact here
    bypass = kvmem.prefill(llama, cubes, recompute="leading", budget=32)
    assert not torch.allclose(_next_logits(llama, bypass, query), _full_logits(llama, bypass, query), atol=1e-4)
    _write(llama, [_row(4, "none", None, 0.5, 0.2, 0.05), _row(4, "leading", 8, 0.01, 1.0, 1.2)])
    assert kvmem.prefill(llama, cubes).composition.startswith("text:")  # meets the target, but slower than text
    more = kvmem.prefill(llama, _cubes(llama, (5,) * 6))  # more cubes than ever measured: text too
    assert more.composition.startswith("text: calibrated up to 4 cubes, not 6")


def test_memory_model_reports_the_choice(llama, tok, cache_dir):
    mm = kvmem.wrap(llama, tok)
    cubes = [mm.build_cube(f"Note {i}: the code word is {w}.") for i, w in enumerate(("apple", "birch"))]
    _write(llama, [_row(2, "none", None, 0.5, 0.2, 0.05)])
    mm.generate("What is the code word?", cubes=cubes, max_new_tokens=2, do_sample=False)
    assert mm.last.composition.startswith("text: calibrated: no composition meets the target faster than a full prefill at 2 cubes")
    mm.generate("What is the code word?", cubes=cubes[:1], max_new_tokens=2, do_sample=False)
    assert mm.last.composition == ""  # one cube is exact: no gate


def test_uncalibrated_keeps_default_and_notices_once(llama, cache_dir):
    cubes = _cubes(llama)
    with pytest.warns(UserWarning, match="without a calibration"):
        prefix = kvmem.prefill(llama, cubes)
    assert prefix.composition.startswith("leading: uncalibrated: leading@32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kvmem.prefill(llama, cubes)


def test_bad_arguments_and_files(llama, cache_dir):
    cubes = _cubes(llama)
    assert kvmem.prefill(llama, cubes, budget=8).recomputed == 16  # a budget alone: the default mode's, no gate
    calibration_path(llama).parent.mkdir(parents=True, exist_ok=True)
    calibration_path(llama).write_text("{not json")
    with pytest.raises(kvmem.CubeError, match="unreadable.*kvmem calibrate"):
        kvmem.prefill(llama, cubes)
    with pytest.raises(kvmem.CubeError, match="cube counts >= 2"):
        kvmem.calibrate(llama, None, cubes=(1,))


def test_calibrate_measures_and_prefill_follows(llama, tok, cache_dir):
    doc = kvmem.calibrate(llama, tok, cubes=(2,), settings=(("none", None), ("leading", 10 ** 4)),
                          tokens_per_cube=40, sets=1, questions=2, answer_tokens=4, progress=False)
    rows = {r["label"]: r for r in doc["rows"]}
    assert rows["leading@10000"]["kl_mean"] < 1e-6 and rows["leading@10000"]["agreement"] == 1.0
    assert rows["none"]["kl_mean"] > 1e-6  # composition without recompute drifts, and the calibration sees it
    saved = json.loads(calibration_path(llama).read_text())
    assert saved["rows"] == doc["rows"]
    expected = choose(saved, 2)
    prefix = kvmem.prefill(llama, _cubes(llama, (8, 8)))
    assert prefix.composition.startswith(f"{expected.mode}: {expected.reason}")


def test_cli_calibrate(tmp_path, tok, cache_dir):
    from typer.testing import CliRunner

    from kvmem.cli import app

    folder = tmp_path / "tiny"
    model = tiny_model("llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    args = ["calibrate", "--model", str(folder), "--tokens-per-cube", "30", "--sets", "1", "--questions", "1",
            "--folder", str(tmp_path / "store")]
    result = CliRunner().invoke(app, args + ["--cubes", "2"])
    assert result.exit_code == 0, result.output
    assert "2 cubes -> " in result.output and "wrote " in result.output
    assert len(list((tmp_path / "store" / "calibration").glob("*.json"))) == 1
    bad = CliRunner().invoke(app, args + ["--cubes", "1"])
    assert bad.exit_code == 1 and bad.output.strip().splitlines()[-1].startswith("kvmem: cubes lists cube counts")


def test_calibrate_on_given_texts(llama, tok, cache_dir):
    texts = [f"Session {i}. The user said the meeting moved to room {100 + i}. " * 3 for i in range(3)]
    doc = kvmem.calibrate(llama, tok, texts=texts, cubes=(2, 3), settings=(("none", None),), sets=1, questions=1,
                          answer_tokens=3, save=False, progress=False)
    assert [(r["cubes"], r["label"], r["questions"]) for r in doc["rows"]] == [(2, "none", 1), (3, "none", 1)]
    assert not calibration_path(llama).exists()  # save=False writes nothing
    with pytest.raises(kvmem.CubeError, match="at least 4 texts"):
        kvmem.calibrate(llama, tok, texts=texts, cubes=(4,), progress=False)


def test_calibrate_on_given_cases(llama, tok, cache_dir):
    docs = [f"Session {i}. The user said the meeting moved to room {100 + i}. " * 3 for i in range(3)]
    cases = [(docs[:2], ["Which room is the meeting in?"]),
             (docs, ["Which rooms were named?", "Where did the meeting move in session 1 and in session 3?"])]
    doc = kvmem.calibrate(llama, tok, cases=cases, settings=(("none", None), ("leading", 10 ** 4)),
                          answer_tokens=3, save=False, progress=False)
    rows = {(r["cubes"], r["label"]): r for r in doc["rows"]}
    assert {k: r["questions"] for k, r in rows.items()} == {(2, "none"): 1, (2, "leading@10000"): 1,
                                                            (3, "none"): 2, (3, "leading@10000"): 2}
    assert rows[(3, "leading@10000")]["kl_mean"] < 1e-6 and rows[(3, "leading@10000")]["agreement"] == 1.0
    assert rows[(3, "none")]["kl_mean"] > 1e-6 and doc["texts"] == "given cases"
    with pytest.raises(kvmem.CubeError, match="texts or cases, not both"):
        kvmem.calibrate(llama, tok, texts=docs, cases=cases, progress=False)
    with pytest.raises(kvmem.CubeError, match="cases is a non-empty list of"):
        kvmem.calibrate(llama, tok, cases=[(docs[:2], [])], progress=False)
    with pytest.raises(kvmem.CubeError, match="cube counts >= 2"):
        kvmem.calibrate(llama, tok, cases=[(docs[:1], ["Which room?"])], progress=False)


def test_serving_connector_follows_the_calibration(llama, tmp_path, cache_dir):
    from kvmem.cubes.fingerprint import fingerprint_fields
    from kvmem.integrations.serving import CubePlanner, CubeSource, Refused
    from kvmem.model.rope import rope_facts

    anchor = random_ids(5, seed=1)
    a = kvmem.MemCube.from_ids(llama, random_ids(27, seed=2), name="a", anchor_ids=anchor)
    b = kvmem.MemCube.from_ids(llama, random_ids(16, seed=3), name="b", anchor_ids=anchor)
    for cube in (a, b):
        cube.save(tmp_path / "store" / "default" / f"{cube.name}.safetensors")
    planner = CubePlanner(CubeSource(folder=str(tmp_path / "store")), fields=fingerprint_fields(llama),
                          dtype=torch.float32, block_size=16, rope=rope_facts(llama))
    prompt = torch.cat([a.all_ids[0], b.input_ids[0], random_ids(7, seed=9)]).tolist()
    request = {"kvmem": {"cubes": ["a", "b"]}}
    assert planner.plan(prompt, request) is not None  # no calibration: the splice, as before
    _write(llama, [_row(2, "none", None, 0.4, 0.3, 0.05), _row(2, "leading", 8, 0.01, 1.0, 0.1)])
    with pytest.raises(Refused, match="calibration measured the pure splice of 2 cubes below the fidelity target"):
        planner.plan(prompt, request)  # leading passes, but an engine cannot recompute: refused
    _write(llama, [_row(2, "none", None, 0.01, 1.0, 0.05)])
    assert planner.plan(prompt, request) is not None


def test_calibrate_measures_query_and_ape_settings_and_the_gate_skips_ape(llama, tok, cache_dir):
    settings = (("query", 10 ** 4), ("none", None, (1.0, 1.0, True)), ("none", None, (0.5, 0.8, False)))
    doc = kvmem.calibrate(llama, tok, cubes=(2,), settings=settings, tokens_per_cube=40, sets=1, questions=2,
                          answer_tokens=4, progress=False)
    rows = {r["label"]: r for r in doc["rows"]}
    assert set(rows) == {"query@10000", "none+ape1/1", "none+ape0.5/0.8q"}
    assert rows["query@10000"]["kl_mean"] < 1e-6 and rows["query@10000"]["agreement"] == 1.0  # full budget: exact
    assert rows["none+ape1/1"]["kl_mean"] > 1e-6  # T = S = 1 is the pure splice, which drifts
    assert rows["none+ape0.5/0.8q"]["kl_mean"] != rows["none+ape1/1"]["kl_mean"]  # the adjustment was applied
    _write(llama, [_row(2, "none", None, 0.001, 1.0, 0.01) | {"ape": [0.9, 0.9, True]},
                   _row(2, "leading", 4, 0.01, 1.0, 0.1)])
    assert kvmem.prefill(llama, _cubes(llama, (8, 8))).composition.startswith("leading: calibrated")


def test_agreement_read_off_forced_logits_is_greedy_generation(llama, tok, cache_dir):
    """The calibration reads agreement off the teacher-forced logits instead of decoding each composed answer:
    it must equal comparing the two greedy generations token for token, per setting."""
    from kvmem.inject.calibrate import query_ids

    docs = [f"Note {i}: the courier for depot {i} is called {n}. " * 4 for i, n in enumerate(("Ada", "Bo", "Cy"))]
    questions = ["Who is the courier?", "Which depot?", "Name the courier of depot 2.", "What is the last note?"]
    settings = (("none", None), ("leading", 2), ("leading", 10 ** 4))
    doc = kvmem.calibrate(llama, tok, cases=[(docs, questions)], settings=settings, answer_tokens=5, save=False,
                          progress=False, stop_early=False)
    cubes = [kvmem.MemCube.from_text(llama, tok, d, progress=False) for d in docs]
    full_ids = torch.cat([cubes[0].anchor_ids[0]] + [c.input_ids[0] for c in cubes])

    def greedy(ids, cache=None):
        extra = {cache_kwarg(llama): cache} if cache is not None else {}
        out = llama.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=5,
                             do_sample=False, pad_token_id=0, **extra)
        return out[0, ids.numel():]

    for (mode, budget), row in zip(settings, doc["rows"]):
        same = []
        for q in questions:
            query = query_ids(tok, q)
            prefix = kvmem.prefill(llama, cubes, recompute=mode, budget=budget)
            same.append(torch.equal(greedy(prefix.extend(query)[0], prefix.cache),
                                    greedy(torch.cat([full_ids, query]))))
        assert row["agreement"] == pytest.approx(sum(same) / len(same)), (mode, budget)
    assert doc["rows"][-1]["agreement"] == 1.0  # the full budget is exact


def test_stop_early_keeps_the_choice_and_says_so(llama, tok, cache_dir):
    docs = [f"Session {i}. The user said the meeting moved to room {100 + i}. " * 3 for i in range(3)]
    cases = [(docs, ["Which room?", "Which rooms were named?", "Where did the meeting move?", "Who said it?"])]
    settings = (("none", None), ("leading", 10 ** 4))
    target = Target(kl=1e-6, agreement=0.5)
    full = kvmem.calibrate(llama, tok, cases=cases, settings=settings, answer_tokens=3, save=False, progress=False,
                           target=target, stop_early=False)
    fast = kvmem.calibrate(llama, tok, cases=cases, settings=settings, answer_tokens=3, save=False, progress=False,
                           target=target)
    slow_rows, fast_rows = ({r["label"]: r for r in d["rows"]} for d in (full, fast))
    assert slow_rows["none"]["kl_mean"] > 1e-5 and not slow_rows["none"]["stopped_early"]
    assert fast_rows["none"]["stopped_early"] and fast_rows["none"]["questions"] < 4  # could not meet KL <= 1e-6
    assert not fast_rows["leading@10000"]["stopped_early"] and fast_rows["leading@10000"]["questions"] == 4
    assert fast_rows["leading@10000"]["kl_mean"] == pytest.approx(slow_rows["leading@10000"]["kl_mean"], abs=1e-9)
    # the same settings meet the target either way (the choice among them then follows TTFT, not tested here)
    assert {k for k, r in fast_rows.items() if target.met_by(r) and not r["stopped_early"]} == \
        {k for k, r in slow_rows.items() if target.met_by(r)} == {"leading@10000"}
    # once every setting has stopped, the count's remaining sets are not run at all (not even the full prefill)
    calls = []
    hook = llama.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        runs = {}
        for name, sets in (("one", [(docs, ["Which room?"])]),
                           ("two", [(docs, ["Which room?"]), (docs, ["Which rooms were named?", "Who said it?"])])):
            calls.clear()
            runs[name] = kvmem.calibrate(llama, tok, cases=sets, settings=(("none", None), ("leading", 1)),
                                         answer_tokens=3, save=False, progress=False,
                                         target=Target(kl=1e-9, agreement=1.0))
            runs[name]["forwards"] = len(calls)
    finally:
        hook.remove()
    assert [(r["questions"], r["stopped_early"]) for r in runs["two"]["rows"]] == [(1, True), (1, True)]
    assert runs["two"]["forwards"] == runs["one"]["forwards"] > 0
    # a stopped row is never picked, even if its partial numbers read as passing
    stopped = _row(3, "none", None, 0.0, 1.0, 0.01) | {"stopped_early": True}
    assert choose({"rows": [stopped, _row(3, "leading", 4, 0.01, 1.0, 0.1)]}, 3).mode == "leading"


def test_cli_calibrate_cases_file(tmp_path, tok, cache_dir):
    from typer.testing import CliRunner

    from kvmem.cli import app

    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tok.save_pretrained(folder)
    docs = [f"Session {i}. The user said the meeting moved to room {100 + i}. " * 2 for i in range(3)]
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([{"documents": docs[:2], "questions": ["Which room?"]},
                                 {"documents": docs, "questions": ["Which rooms?", "Where did it move?"]}]))
    args = ["calibrate", "--model", str(folder), "--folder", str(tmp_path / "store")]
    result = CliRunner().invoke(app, args + ["--cases", str(cases)])
    assert result.exit_code == 0, result.output
    assert "2 cubes -> " in result.output and "3 cubes -> " in result.output and "8 cubes" not in result.output
    saved = json.loads(next((tmp_path / "store" / "calibration").glob("*.json")).read_text())
    assert saved["texts"] == "given cases"
    assert {(r["cubes"], r["questions"]) for r in saved["rows"] if not r["stopped_early"]} <= {(2, 1), (3, 2)}

    def error(content, *extra):
        cases.write_text(content)
        bad = CliRunner().invoke(app, args + ["--cases", str(cases), *extra])
        assert bad.exit_code == 1, bad.output
        line = bad.output.strip().splitlines()[-1]
        assert line.startswith("kvmem: "), bad.output
        return line

    assert "is not JSON" in error("[{")
    assert "non-empty JSON list" in error("{}")
    assert "set 0: must be an object with exactly the keys" in error(json.dumps([{"documents": docs}]))
    assert 'set 1: "documents" must be a list of at least 2' in error(json.dumps(
        [{"documents": docs[:2], "questions": ["q"]}, {"documents": docs[:1], "questions": ["q"]}]))
    assert 'set 0: "questions" must be a list of at least 1' in error(json.dumps([{"documents": docs, "questions": [""]}]))
    assert "not both" in error(json.dumps([{"documents": docs, "questions": ["q"]}]), "--text", str(cases))
    cases.unlink()
    missing = CliRunner().invoke(app, args + ["--cases", str(cases)])
    assert missing.exit_code == 1 and "does not exist" in missing.output.strip().splitlines()[-1]
