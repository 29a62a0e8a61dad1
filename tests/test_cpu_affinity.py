"""Where the vLLM connector's loading and saving threads run (kvmem.integrations.cpu_affinity): on the worker's
CPUs that no forward-pass thread is bound to, and as the thread starting them where none is spare or vLLM bound
nothing; a CPU list the worker cannot use is an error naming the ones it can."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvmem.errors import CubeError
from kvmem.integrations.cpu_affinity import connector_cpus, describe, omp_cpus, parse_cpu_list, pin_thread
from kvmem.integrations.vllm_pages import LayerWriter

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")


def test_cpu_lists_parse_as_vllm_and_taskset_write_them():
    assert parse_cpu_list("0,2-4") == {0, 2, 3, 4}
    assert parse_cpu_list(" 0 1 ") == {0, 1}
    assert parse_cpu_list("7") == {7}
    for bad in ("a", "3-1", "1-", "0;1"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)


@pytest.mark.parametrize("environ, cpus", [
    ({"GOMP_CPU_AFFINITY": "0 1", "OMP_NUM_THREADS": "2"}, {0, 1}),  # vLLM with GNU OpenMP
    ({"OMP_PLACES": "{2,3,4}", "OMP_PROC_BIND": "true"}, {2, 3, 4}),  # with another OpenMP runtime
    ({"KMP_AFFINITY": "granularity=fine,explicit,proclist=[4,5]"}, {4, 5}),  # with Intel OpenMP
    ({"OMP_PLACES": "cores"}, None),  # an abstract place name: no cores known
    ({"KMP_AFFINITY": "compact"}, None),
    ({"OMP_NUM_THREADS": "2"}, None),  # no binding
    ({}, None),
])
def test_the_forward_pass_cores_are_read_from_what_vllm_sets_for_its_worker(environ, cpus):
    assert omp_cpus(environ) == cpus


def test_auto_takes_the_cpus_no_forward_thread_is_bound_to():
    bound = {"GOMP_CPU_AFFINITY": "0 1"}
    assert connector_cpus("auto", environ=bound, allowed={0, 1, 2, 3}) == {2, 3}
    # none spare (every core runs the forward pass): left beside the forward pass's first thread (measured best)
    assert connector_cpus("auto", environ=bound, allowed={0, 1}) is None
    # vLLM bound nothing (nobind, or an engine in the caller's process): the threads are left as they start
    assert connector_cpus("auto", environ={}, allowed={0, 1, 2}) is None
    assert connector_cpus("inherit", environ=bound, allowed={0, 1, 2}) is None
    assert describe({2, 3}, bound).endswith("on CPUs 2,3 (the forward pass's OpenMP threads: CPUs 0,1)")
    assert "take CPUs 0,1, no other is spare" in describe(None, bound)
    assert "bound no OpenMP thread" in describe(None, {})


def test_a_cpu_list_is_checked_against_the_cpus_the_worker_may_use():
    assert connector_cpus("1", allowed={0, 1}) == {1}
    assert connector_cpus("1-3", allowed={0, 1, 2}) == {1, 2}  # the part the worker has
    with pytest.raises(CubeError, match=r"names no CPU this worker may use \(0,1\)"):
        connector_cpus("7", allowed={0, 1})
    for bad in ("x", "2-1", 3, ["1"]):
        with pytest.raises(CubeError, match="loader_cpus"):
            connector_cpus(bad, allowed={0, 1})


def test_the_threads_run_where_they_are_told_and_the_caller_keeps_its_mask():
    mine = set(os.sched_getaffinity(0))
    one = {min(mine)}
    with ThreadPoolExecutor(max_workers=1, initializer=pin_thread, initargs=(one,)) as pool:
        assert pool.submit(os.sched_getaffinity, 0).result() == one
    with ThreadPoolExecutor(max_workers=1, initializer=pin_thread, initargs=(None,)) as pool:
        assert pool.submit(os.sched_getaffinity, 0).result() == mine
    assert set(os.sched_getaffinity(0)) == mine


def test_a_thread_keeps_its_cpus_after_its_first_torch_op_under_gnu_openmp_binding():
    """libgomp binds a thread to the binding's first core at its first parallel region: pin_thread starts one
    first, so the thread's later torch ops leave it where it was put (run in a child with vLLM's variables)."""
    import subprocess
    import sys

    mine = sorted(os.sched_getaffinity(0))
    if len(mine) < 2:
        pytest.skip("needs two CPUs")
    code = ("import os, threading, torch\n"
            "from kvmem.integrations.cpu_affinity import pin_thread\n"
            "got = []\n"
            "def run():\n"
            f"    pin_thread({{{mine[1]}}})\n"
            "    torch.ones(10**6).add_(1); torch.ones(10**6).sum()\n"
            "    got.append(sorted(os.sched_getaffinity(0)))\n"
            "t = threading.Thread(target=run); t.start(); t.join(); print(got[0])\n")
    env = dict(os.environ, GOMP_CPU_AFFINITY=f"{mine[0]} {mine[1]}", OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == f"[{mine[1]}]"


def test_pinning_to_cpus_taken_away_keeps_the_thread_running(caplog):
    got = []
    t = threading.Thread(target=lambda: (pin_thread({10_000}), got.append(set(os.sched_getaffinity(0)))))
    t.start()
    t.join()
    assert got == [set(os.sched_getaffinity(0))]
    assert "could not run a connector thread on CPUs 10000" in caplog.text


@pytest.mark.parametrize("readers", [1, 2])
def test_the_layer_writer_loads_on_its_cpus(readers):
    one = {max(os.sched_getaffinity(0))}
    writer = LayerWriter(block_size=16, readers=readers, cpus=one)
    try:
        writer.start([], [])  # starts the loader and the readers
        writer.finish()
        assert writer._pool.submit(os.sched_getaffinity, 0).result() == one
        assert all(writer._reader.submit(os.sched_getaffinity, 0).result() == one for _ in range(4))
    finally:
        writer.close()
