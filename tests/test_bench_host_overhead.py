"""bench/host_overhead.py keeps working: a quick run of both parts writes rows whose methods agree on the first
token and a PNG."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow  # loads SmolLM2
def test_quick_run_writes_rows(tmp_path):
    import host_overhead  # bench/ is on sys.path (conftest)

    out = tmp_path / "host.json"
    assert host_overhead.main(["--quick", "--reps", "2", "--warmup", "1", "--proxy-memory", "64",
                               "--memory", "64", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    methods = {(r["part"], r.get("method")) for r in doc["rows"]}
    assert {("proxy", "kvmem_ttft"), ("proxy", "deepcopy_ttft"), ("host", "prefill"),
            ("host", "full_check_after_a_change")} <= methods
    assert all(r["same_first_token"] for r in doc["rows"] if r["part"] == "proxy")
    assert all(r["loadavg"] is not None for r in doc["rows"])
    assert out.with_suffix(".png").stat().st_size > 0
