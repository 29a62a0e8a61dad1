"""Which CPUs the connector's own threads (cube loads and saves) run on in a vLLM CPU worker: `connector_cpus`.

vLLM's CPU backend binds each OpenMP thread of the forward pass to one core (``VLLM_CPU_OMP_THREADS_BIND``,
``auto`` by default: it starts the worker process with ``OMP_NUM_THREADS`` and ``GOMP_CPU_AFFINITY``,
``OMP_PLACES`` or ``KMP_AFFINITY`` naming those cores), and the worker's main thread is the first of them. A
thread the connector starts inherits the mask of the thread that starts it: that one core, shared with the
forward pass's first thread, even where vLLM left cores out of the binding for work like this (its ``auto``
binding reserves a core per rank for the scheduler and one more when a KV connector is configured, where the
machine has cores to spare). Measured in vLLM's OpenAI server: the loader thread ran on core 0 beside the forward
pass's first thread, whatever cores were free.

``loader_cpus`` (``kv_connector_extra_config``) says where they run instead:

- ``"auto"`` (the default): the CPUs this worker may use that vLLM did not bind a forward thread to. Where there
  are none (every core runs the forward pass, as on a 2-core machine) nothing is changed: letting the loader float
  over all of them measured worse than leaving it beside the forward pass's first thread (1.46x and 1.56x a warm
  hit against 1.42x and 1.44x: bench/results/vllm_server_ttft_cpu_e143d85.json and _b501ae4.json). Where vLLM
  bound no thread (``VLLM_CPU_OMP_THREADS_BIND=nobind``, or an engine run in the caller's process) nothing is
  changed either.
- ``"inherit"``: nothing is changed (the threads keep the mask of the thread that starts them).
- a CPU list such as ``"3"``, ``"2,3"`` or ``"4-7"``: those CPUs.

"The CPUs this worker may use" is the mask of the process that started the worker (vLLM's engine core, which no
binding narrowed: it carries the machine's cgroup and any ``taskset`` the server was started under) together with
the worker's own.
"""

from __future__ import annotations

import logging
import os
import re

import torch

from ..errors import CubeError

logger = logging.getLogger("vllm.kvmem")

_OMP_ENV = ("GOMP_CPU_AFFINITY", "OMP_PLACES", "KMP_AFFINITY")  # how vLLM binds a worker's OpenMP threads


def parse_cpu_list(text: str) -> set[int]:
    """``"0,2-4"`` (commas, ranges; spaces also separate, as in ``GOMP_CPU_AFFINITY``) as {0, 2, 3, 4}."""
    cpus: set[int] = set()
    for item in re.split(r"[,\s]+", text.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if m is None:
            raise ValueError(f"{item!r} is not a CPU number or range")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if hi < lo:
            raise ValueError(f"{item!r} is an empty range")
        cpus.update(range(lo, hi + 1))
    return cpus


def omp_cpus(environ=None) -> set[int] | None:
    """The cores vLLM bound this worker's OpenMP threads to, read from the variables it sets for the worker
    (``GOMP_CPU_AFFINITY="0 1"``, ``OMP_PLACES="{0,1}"``, ``KMP_AFFINITY="...,proclist=[0,1]"``); None where none
    is set or none can be read (no binding known)."""
    environ = os.environ if environ is None else environ
    for name in _OMP_ENV:
        value = environ.get(name)
        if not value:
            continue
        if name == "KMP_AFFINITY":
            m = re.search(r"proclist=\[([^\]]*)\]", value)
            value = m[1] if m else ""
        elif name == "OMP_PLACES":
            value = value.replace("{", " ").replace("}", " ")
        try:
            cpus = parse_cpu_list(value)
        except ValueError:
            continue  # an abstract name ("cores", "threads") or a form vLLM does not write: no binding known
        if cpus:
            return cpus
    return None


def worker_cpus() -> set[int]:
    """The CPUs this worker process may use: its parent's mask (vLLM's engine core, not narrowed by the
    OpenMP binding) with its own (see the module docstring)."""
    cpus = set(os.sched_getaffinity(0))
    try:
        cpus |= set(os.sched_getaffinity(os.getppid()))
    except OSError:  # the parent is gone or not ours to read: the worker's own mask
        pass
    return cpus


def connector_cpus(option="auto", *, environ=None, allowed: set[int] | None = None) -> set[int] | None:
    """The CPUs the connector's threads should run on for ``loader_cpus`` = ``option``; None: leave them as they
    are. ``allowed`` (default `worker_cpus`) and ``environ`` (default ``os.environ``) are for tests.

    Raises:
        CubeError: ``option`` is not "auto", "inherit" or a CPU list, or names no CPU this worker may use."""
    if not hasattr(os, "sched_setaffinity"):  # not Linux: nothing to choose
        return None
    if option == "inherit":
        return None
    if option == "auto":
        bound = omp_cpus(environ)
        if bound is None:
            return None
        allowed = worker_cpus() if allowed is None else allowed
        return (allowed - bound) or None
    if not isinstance(option, str):
        raise CubeError(f"loader_cpus must be \"auto\", \"inherit\" or a CPU list such as \"2,3\" or \"4-7\", "
                        f"got {option!r:.40}")
    try:
        cpus = parse_cpu_list(option)
    except ValueError as exc:
        raise CubeError(f"loader_cpus {option!r:.40}: {exc}; give \"auto\", \"inherit\" or a CPU list such as "
                        "\"2,3\" or \"4-7\"") from None
    allowed = worker_cpus() if allowed is None else allowed
    if not cpus & allowed:
        raise CubeError(f"loader_cpus {option!r:.40} names no CPU this worker may use ({_text(allowed)}); "
                        "give CPUs from that list, or \"auto\"")
    return cpus & allowed


def pin_thread(cpus: set[int] | None) -> None:
    """Run the calling thread on ``cpus`` (None: leave it): a `ThreadPoolExecutor` ``initializer``. A mask the
    kernel refuses (CPUs taken away since) is logged and the thread keeps the mask it has.

    GNU OpenMP binds a thread to the binding's first core the first time that thread starts a parallel region
    (a torch op on enough elements), and only then: so the thread starts one here, before its mask is set, or
    its first torch op would move it back beside the forward pass's first thread (measured in vLLM's worker)."""
    if cpus is None:
        return
    torch.ones(1 << 17).add_(1)  # above torch's grain size (32,768 elements): a parallel region
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        logger.warning("kvmem: could not run a connector thread on CPUs %s (%s); it keeps CPUs %s",
                       _text(cpus), exc, _text(set(os.sched_getaffinity(0))))


def describe(cpus: set[int] | None, environ=None) -> str:
    """One line for the connector's start-up log."""
    bound = omp_cpus(environ)
    if cpus is None:
        if bound is None:
            return "cube loads and saves run where the thread starting them runs (vLLM bound no OpenMP thread)"
        return (f"cube loads and saves run beside the forward pass's first thread: its OpenMP threads take CPUs "
                f"{_text(bound)}, no other is spare (or loader_cpus is \"inherit\")")
    where = f"cube loads and saves run on CPUs {_text(cpus)}"
    return where + ("" if bound is None else f" (the forward pass's OpenMP threads: CPUs {_text(bound)})")


def _text(cpus: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))
