"""bench/gpu_check.py keeps working without a GPU: its smoke run (--smoke = --dry: CPU, tiny shapes) runs every
step but pytest, kvmem_captured included (capture_query on the eager backend), and writes JSON + PNG whose checks
pass."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check():
    """bench/gpu_check.py as a module (bench/ is not a package)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return gpu_check


def test_dry_run_writes_passing_checks(tmp_path):
    gpu_check = _gpu_check()
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--smoke", "--skip", "pytest", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["dry"] and doc["failed"] == 0 and out.with_suffix(".png").stat().st_size > 0
    steps = {(r["step"], r.get("what") or r.get("method")) for r in doc["rows"]}
    for want in [("splice", "copy"), ("splice", "splice_all_layers"), ("splice", "splice_per_layer"),
                 ("ttft", "full_prefill"), ("ttft", "kvmem"), ("ttft", "kvmem_fast"), ("ttft", "kvmem_captured"),
                 ("decode", "kvmem"), ("decode", "kvmem_fast")]:
        assert want in steps
    assert all(r["passed"] for r in doc["rows"] if r["step"] in ("ttft", "decode"))
    ttft = [r for r in doc["rows"] if r["step"] == "ttft"]
    assert {r["memory_tokens"] for r in ttft} == {32, 48}  # every memory length of the dry run
    for r in ttft:  # the host / total breakdown of each request's two phases
        assert 0 <= r["setup_host_ms"] <= r["setup_total_ms"] and 0 < r["forward_host_ms"] <= r["forward_total_ms"]
        assert r["device_busy_ms"] is None and "no CUDA" in r["device_busy_note"]  # the profiler's part: CUDA only
    digest = [r for r in doc["rows"] if r["step"] == "digest"]
    assert len(digest) == 1 and digest[0]["seconds"] > 0 and digest[0]["weights_GB"] > 0
    assert {"torch", "transformers", "kvmem"} <= doc["versions"].keys()


def test_budget_skips_what_it_cannot_start(tmp_path):
    """--budget-s 0: nothing is started, every model is recorded as skipped, and the JSON is still written."""
    gpu_check = _gpu_check()
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--smoke", "--skip", "pytest", "splice", "--budget-s", "0", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["step"] == "skipped" for r in rows)


def test_device_busy_counts_overlapping_kernels_once():
    gpu_check = _gpu_check()
    assert gpu_check.covered([(20, 25), (0, 10), (5, 12), (21, 22), (30, 30)]) == 17
    assert gpu_check.covered([]) == 0


def test_pytest_step_reports_its_summary(monkeypatch):
    """The pytest step runs `pytest -m gpu` and keeps its summary line (here: a stand-in that prints one)."""
    gpu_check = _gpu_check()

    class Done:
        returncode, stdout, stderr = 0, "....\n3 passed, 200 deselected in 1.0s\n", ""

    calls = []
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or Done())
    row = gpu_check.step_pytest(False, 10)
    assert row["passed"] and row["summary"] == "3 passed, 200 deselected in 1.0s"
    assert calls[0][-2:] == ["-m", "gpu"]
