"""The benchmark scripts import and answer --help, and the one harness in bench/_common.py times what it says.

No timings are asserted (they belong in bench/); these check the harness's bookkeeping: call order, warm-ups,
retries of disturbed calls, spreads, and the Zipf trace end to end on fake cubes.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

SCRIPTS = ["ttft", "compose_quality", "splice_kernel", "zipf_trace", "adapter_swap", "retrieval", "retrieval_tune",
           "retrieval_cost", "ttft_fast", "auto_overhead", "recall_gate", "distill", "compose_fidelity",
           "quantized_cubes", "host_overhead", "bundle_install", "bundle_verify", "forget_cost", "decode_profile",
           "distill_validate", "distill_step", "vllm_server_ttft", "load_floor"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports_and_answers_help(name, capsys):
    script = importlib.import_module(name)
    with pytest.raises(SystemExit) as exit_:
        script.main(["--help"])
    assert exit_.value.code == 0
    assert "--quick" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["ttft", "compose_quality"])
def test_model_switch_is_offered(name, capsys):
    with pytest.raises(SystemExit):
        importlib.import_module(name).main(["--help"])
    assert "--model {smollm2,gemma3}" in capsys.readouterr().out


def test_a_missing_matplotlib_names_the_install(monkeypatch):
    import _common

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(SystemExit, match="the plot needs matplotlib.*pip install 'matplotlib"):
        _common.pyplot()


def test_spread_is_linear_interpolation_quantiles():
    import _common

    s = _common.spread([float(x) for x in (10, 1, 9, 2, 8, 3, 7, 4, 6, 5)], unit="ms")
    assert s["median_ms"] == pytest.approx(5500.0)
    assert s["p10_ms"] == pytest.approx(1900.0)   # 1 + 0.9 * (2 - 1), in ms
    assert s["p90_ms"] == pytest.approx(9100.0)
    assert (s["min_ms"], s["max_ms"]) == (1000.0, 10000.0)
    assert s["samples_ms"][:2] == [10000.0, 1000.0]  # kept in the order measured


def test_round_robin_interleaves_after_warmups_and_keeps_first_result():
    import _common

    calls = []

    def method(name):
        def call():
            calls.append(name)
            return f"{name}{calls.count(name)}"  # a1, a2, ...: which call of this method it was
        return call

    series = _common.round_robin({"a": method("a"), "b": method("b")}, {"a": 2, "b": 3}, warmup={"a": 1, "b": 0},
                                 before=lambda name: calls.append("before " + name))
    timed = [c for c in calls if not c.startswith("before")]
    assert timed == ["a", "a", "b", "a", "b", "b"]  # a's warm-up, then rounds of a, b; b alone in the last
    assert calls[:2] == ["before a", "a"]           # the hook runs before every call, warm-ups too
    assert [len(series["a"].seconds), len(series["b"].seconds)] == [2, 3]
    assert series["a"].first == "a1" and series["b"].first == "b1"  # a's warm-up; b's first timed call


def test_disturbed_calls_are_redone_and_kept_apart(monkeypatch):
    import _common

    monkeypatch.setattr(_common.OtherLoad, "stop", lambda self: (1.5, 0.0))  # another process holds 1.5 cores
    quiet = _common.Quiet(busy=0.25, retries=2)
    n = []
    series = _common.repeat(lambda i: n.append(i), 1, quiet=quiet)
    assert len(n) == 3                        # the call, redone twice
    assert len(series.discarded_s) == 2 and len(series.seconds) == 1
    assert series.busy(0.25) == 1             # the kept sample is still marked disturbed


def test_missing_model_loader_is_a_clear_exit(monkeypatch):
    import _common

    monkeypatch.setitem(_common.MODELS, "nomodel", ("load_nomodel", "no such model"))
    with pytest.raises(SystemExit, match="kvmem.demo.models has no load_nomodel"):
        _common.load_model("nomodel")
    assert _common.result_path("ttft", model="gemma3").name == "ttft_cpu_gemma3.json"
    assert _common.result_path("ttft").name == "ttft_cpu.json"


def test_zipf_trace_runs_end_to_end(tmp_path):
    zipf_trace = importlib.import_module("zipf_trace")
    out = tmp_path / "zipf.json"
    assert zipf_trace.main(["--memories", "40", "--requests", "400", "--warmup", "50", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert (tmp_path / "zipf.png").exists()
    for row in doc["rows"]:
        assert row["hit_rate_device"] + row["hit_rate_cpu"] + row["hit_rate_disk"] == pytest.approx(1.0)
    by = {(r["policy"], r["scenario"], r["zipf_s"], r["device_budget_frac"], r["cpu_budget_frac"]): r
          for r in doc["rows"]}
    # no CPU tier: nothing is ever served from it; no device tier: nothing from there
    assert by[("lru", "static", 1.1, 0.05, 0.0)]["hit_rate_cpu"] == 0
    assert by[("lfu", "static", 1.1, 0.0, 0.2)]["hit_rate_device"] == 0


def test_time_inside_counts_nested_calls_apart_and_restores():
    import types

    import _common

    ns = types.SimpleNamespace()
    ns.inner = lambda: "inner"
    ns.outer = lambda: ns.inner() + "+outer"
    original_inner = ns.inner
    with _common.time_inside([(ns, "inner", "in"), (ns, "outer", "out")]) as inside:
        assert ns.outer() == "inner+outer"   # the patched callables still return what the originals do
        ns.inner()
    assert set(inside.spent) == {"out", "in (inside out)", "in"}
    assert inside.outer == pytest.approx(inside.spent["out"] + inside.spent["in"])  # nested time counted once
    assert ns.inner is original_inner      # restored after the block


class _NoTemplateTokenizer:
    """Enough of a tokenizer for kvmem.wrap (no chat template, no BOS): adapter swaps never tokenize."""

    chat_template = bos_token = None

    def __call__(self, text, add_special_tokens=True):
        return type("Encoding", (), {"input_ids": [1, 2]})()


def test_adapter_swap_methods_are_exact_on_a_tiny_model(tmp_path):
    """Every method adapter_swap.py times swaps to the right adapter: its logits equal a freshly loaded PeftModel's,
    and back to the base bit for bit (the bench's own untimed checks, run on a tiny llama)."""
    import argparse

    import torch

    pytest.importorskip("peft")
    from helpers import tiny_model

    adapter_swap = importlib.import_module("adapter_swap")
    import _common

    model = tiny_model("llama", vocab_size=256)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    pair = adapter_swap.make_pair(model, "attn_r4", 0, tmp_path, ids)
    args = argparse.Namespace(reps=3, warmup=1, cold_reps=2, peft_reps=2, peft_warmup=1, breakdown=True,
                              breakdown_swaps=2)
    clock = adapter_swap.Clock(_common.Quiet(), 0.0)
    rows, breakdowns = adapter_swap.SpecBench("attn_r4", pair, model, _NoTemplateTokenizer(), ids,
                                              adapter_swap.logits_of(model, ids), args, clock).run()
    methods = [r["method"] for r in rows]
    assert methods == ["kvmem_resident", "diag_flag_flip", "kvmem_cold", "kvmem_disk", "kvmem_hotswap",
                       "peft_set_adapter", "peft_load_adapter", "peft_from_pretrained", "peft_unload"]
    for r in rows:
        assert r.get("max_abs_logit_diff_vs_fresh_peft") in (None, 0.0), r["method"]
        assert r.get("base_bit_identical_after_none") in (None, True), r["method"]
    assert set(breakdowns) == {"kvmem_resident", "kvmem_cold", "kvmem_hotswap"}
    cold = breakdowns["kvmem_cold"]["pieces_mean_ms"]
    assert any(k.startswith("peft add_adapter") for k in cold)  # a cold swap installs through PEFT
