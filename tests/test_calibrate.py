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
