"""Adapter swap benchmark: kvmem's LoRA hot swap vs loading the adapter with PEFT vs reloading model + adapter.

One process, one model (SmolLM2-135M-Instruct, float32), medians after warm-up with p10/p90 and min/max.
Random LoRA adapters (non-zero B, as after training) are made here, saved as PEFT folders, packaged as
AdapterCubes and loaded back from their own files. Every method alternates between two adapters of the same
shape, so each timed call really changes the active adapter.

    .venv/bin/python bench/adapter_swap.py             # the full run (~5 min on 2 quiet CPU cores)
    .venv/bin/python bench/adapter_swap.py --quick     # smoke run, one shape; writes nothing unless --out

Methods (each timed region in brackets; "A/B" = alternating between two adapters):
    kvmem_resident        [mm.use_adapter(A/B)]  both adapters resident: an LRU hit, PEFT set_adapter underneath
    kvmem_cold            [mm.use_adapter(A/B)]  cube in memory, not resident: the byte budget holds one adapter,
                          so every swap evicts the other (delete_adapter) and installs this one (add_adapter +
                          set_peft_model_state_dict)
    kvmem_disk            [AdapterCube.load(path A/B); mm.use_adapter(cube)]  cold install from the cube file
                          (file in the OS page cache; the load validates checksum and weights digest)
    kvmem_hotswap         [mm.use_adapter(A/B)]  wrap(..., hotswap=True): one slot overwritten in place
    peft_set_adapter      [peft_model.set_adapter(A/B)]  plain PEFT, both adapters loaded (walks every module)
    peft_load_adapter     [peft_model.load_adapter(folder A/B); set_adapter; delete_adapter(previous)]
                          plain PEFT's own multi-adapter path, from the PEFT folder
    peft_from_pretrained  [PeftModel.from_pretrained(base, folder A/B)]  the usual recipe, base already loaded
    peft_unload           [peft_model.unload()]  undoing it: back to the bare base model
    reload_model_adapter  [AutoModelForCausalLM.from_pretrained(checkpoint); PeftModel.from_pretrained(...)]
                          reload base + adapter from disk (files in the OS page cache)
    reload_load_smollm2   [kvmem.real_model.load_smollm2(); PeftModel.from_pretrained(...)]  the same through
                          kvmem's loader, which also loads the tokenizer and re-hashes the GGUF file
    diag_flag_flip        [set _active_adapter on the cached LoRA layers]  a diagnostic, not an API: the floor of
                          a resident swap (table and JSON only)

Correctness, untimed: after the timed calls of each method, every adapter it swapped to is activated once more
and the logits of a fixed prompt are compared with a PeftModel freshly loaded from that adapter's folder onto a
fresh copy of the base (max |diff|); kvmem's use_adapter(None) and PEFT's unload() must give the base logits
bit for bit.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # bench/_common.py, also when imported from elsewhere

import kvmem  # noqa: E402
import _common  # noqa: E402
from kvmem.real_model import load_smollm2, smollm2_checkpoint  # noqa: E402

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
SPECS = {  # name -> (rank, target modules)
    "attn_r4": (4, ATTN),
    "attn_r16": (16, ATTN),
    "attn_r64": (64, ATTN),
    "attn_mlp_r16": (16, ATTN + MLP),
}
HEADLINE = "attn_r16"  # the spec the targets are judged on (rank 16, the issue's case)
KVMEM_METHODS = ("kvmem_resident", "kvmem_cold", "kvmem_disk", "kvmem_hotswap")
PEFT_METHODS = ("peft_set_adapter", "peft_load_adapter", "peft_from_pretrained", "peft_unload")
RELOAD_METHODS = ("reload_model_adapter", "reload_load_smollm2")
METHODS = KVMEM_METHODS + PEFT_METHODS + RELOAD_METHODS
PROMPT = "Alice lives in Oslo and works as a nurse. Bob lives in Lima. Question: where does Alice live? Answer:"
TARGET_MS = 10.0
TARGET_SPEEDUP = 50.0


# ---------------------------------------------------------------- adapters
def make_adapter(base, folder: Path, *, seed: int, rank: int, targets: list[str]) -> None:
    """Save a PEFT LoRA folder with random, non-zero A and B (as after training), made on a copy of ``base``."""
    import peft

    torch.manual_seed(seed)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False))
    pm.save_pretrained(folder)
    del pm


def reference_logits(base, folder: Path | None, ids: torch.Tensor) -> torch.Tensor:
    """Logits [1, n, vocab] of a PeftModel freshly loaded from ``folder`` onto a fresh copy of ``base`` (the oracle)."""
    import peft

    model = copy.deepcopy(base)
    if folder is not None:
        model = peft.PeftModel.from_pretrained(model, folder).eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits
    del model
    return out


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------- other load on the machine
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) so far; None without /proc."""
    try:
        f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        busy = sum(int(x) for i, x in enumerate(f[:8]) if i not in (3, 4))  # all but idle, iowait
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return busy / _TICK, (int(own[11]) + int(own[12])) / _TICK
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def foreign_load(out: dict):
    """Sets out["other_processes_cpu_cores"]: CPU cores other processes used on average inside the block."""
    c0, t0 = _cpu_seconds(), time.perf_counter()
    yield
    c1, dt = _cpu_seconds(), max(time.perf_counter() - t0, 1e-3)
    out["other_processes_cpu_cores"] = None if c0 is None or c1 is None else round(
        max(0.0, (c1[0] - c0[0]) - (c1[1] - c0[1])) / dt, 3)


QUIET = {"block_wait_s": 30.0, "sample_wait_s": 2.0, "waited_s": 0.0}  # set from the command line in main


def wait_quiet(max_wait_s: float, *, threshold: float = 0.15, window_s: float = 0.2) -> None:
    """Wait (up to ``max_wait_s``) until other processes use under ``threshold`` cores for ``window_s``.

    Other jobs on a shared small machine would otherwise land inside the timed region.
    """
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s:
        out = {}
        with foreign_load(out):
            time.sleep(window_s)
        if out["other_processes_cpu_cores"] is None or out["other_processes_cpu_cores"] < threshold:
            break
    QUIET["waited_s"] += time.perf_counter() - t0


# ---------------------------------------------------------------- timing
class Samples(list):
    """Wall-clock seconds per call, with ``cpu``: this process's CPU seconds per call (all its threads).

    On a shared machine the wall clock includes time other processes held the cores; this process's CPU time
    does not. The swap paths are mostly single-threaded Python, so their CPU time is close to what the wall
    clock reads on a quiet machine (for multi-threaded torch work it is larger than the wall clock).
    """

    def __init__(self):
        super().__init__()
        self.cpu: list[float] = []

    def add(self, wall: float, cpu: float) -> None:
        self.append(wall)
        self.cpu.append(cpu)


def time_calls(fn, n: int, warmup: int, *, after=None, slow: bool = False) -> Samples:
    """Seconds of ``fn(i)`` for i in warm-up then ``n`` timed calls; ``after(i)``, untimed, runs after each call.

    Waits for the machine to go quiet before the block and, when ``slow`` (calls of ~100 ms and more), before
    every call.
    """
    samples = Samples()
    gc.collect()
    wait_quiet(QUIET["block_wait_s"], window_s=0.5)
    for i in range(warmup + n):
        if slow:
            wait_quiet(QUIET["sample_wait_s"])
        c0, t0 = time.process_time(), time.perf_counter()
        fn(i)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if after is not None:
            after(i)
        if i >= warmup:
            samples.add(dt, dc)
    return samples


def _quantiles(samples: list[float]) -> tuple[float, float, float, float, float]:
    """(median, p10, p90, min, max) with linear interpolation."""
    s = sorted(samples)

    def q(p):
        x = p * (len(s) - 1)
        lo = int(x)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (x - lo)

    return statistics.median(s), q(0.1), q(0.9), s[0], s[-1]


def summary(samples: Samples) -> dict:
    ms = 1e3
    med, p10, p90, lo, hi = (ms * x for x in _quantiles(samples))
    out = {"median_ms": med, "p10_ms": p10, "p90_ms": p90, "min_ms": lo, "max_ms": hi, "samples": len(samples)}
    if getattr(samples, "cpu", None):
        med, p10, p90, lo, hi = (ms * x for x in _quantiles(samples.cpu))
        out.update({"cpu_median_ms": med, "cpu_p10_ms": p10, "cpu_p90_ms": p90, "cpu_min_ms": lo, "cpu_max_ms": hi})
    out["samples_ms"] = [round(ms * x, 4) for x in samples]
    if getattr(samples, "cpu", None):
        out["cpu_samples_ms"] = [round(ms * x, 4) for x in samples.cpu]
    return out


class PieceTimer:
    """Wall time spent inside chosen callables (instance or module attributes), patched for the block."""

    def __init__(self):
        self.total: dict[str, float] = {}  # label -> seconds; a call inside another timed call: "label (in outer)"
        self.outer = 0.0                    # seconds in outermost timed calls (nested time not counted twice)
        self._stack: list[str] = []
        self._undo = []

    def wrap(self, owner, attr: str, label: str) -> None:
        original = getattr(owner, attr)
        in_instance_dict = attr in getattr(owner, "__dict__", {})

        def timed(*args, **kwargs):
            key = f"{label} (inside {self._stack[-1]})" if self._stack else label
            self._stack.append(label)
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self._stack.pop()
                self.total[key] = self.total.get(key, 0.0) + dt
                if not self._stack:
                    self.outer += dt

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, original, in_instance_dict))

    def restore(self) -> None:
        for owner, attr, original, in_instance_dict in reversed(self._undo):
            if in_instance_dict:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)
        self._undo.clear()


def time_pieces(mm, cubes, n: int, hotswap: bool) -> dict:
    """Mean ms per swap spent in each PEFT callable the bridge calls, over ``n`` swaps alternating ``cubes``.

    Best effort: patches PEFT's functions and the PeftModel's methods for the block (they may move in a new PEFT).
    """
    import peft
    import peft.utils.hotswap as hs

    mm.use_adapter(cubes[0])  # before patching: only the n timed swaps count
    wait_quiet(QUIET["block_wait_s"], window_s=0.5)
    pt = PieceTimer()
    pm = mm.adapters.peft
    if hotswap:
        pt.wrap(hs, "check_hotswap_configs_compatible", "peft check_hotswap_configs_compatible")
        pt.wrap(hs, "hotswap_adapter_from_state_dict", "peft hotswap_adapter_from_state_dict (copy in place)")
    else:
        pt.wrap(pm, "add_adapter", "peft add_adapter (inject LoRA layers, random init)")
        pt.wrap(peft, "set_peft_model_state_dict", "peft set_peft_model_state_dict (copy weights in)")
        pt.wrap(pm, "delete_adapter", "peft delete_adapter (evict)")
        pt.wrap(pm, "eval", "peft_model.eval()")
    pt.wrap(pm, "set_adapter", "peft set_adapter")
    pt.wrap(pm.base_model, "enable_adapter_layers", "peft enable_adapter_layers")
    if hasattr(mm.adapters, "_flip"):  # newer bridges flip the LoRA layers' flags themselves
        pt.wrap(mm.adapters, "_flip", "kvmem _flip (activate: LoRA layer flags)")
    t0 = time.perf_counter()
    try:
        for i in range(n):
            mm.use_adapter(cubes[(i + 1) % 2])
    finally:
        total = time.perf_counter() - t0
        pt.restore()
    pieces = {k: 1e3 * v / n for k, v in pt.total.items()}
    pieces["rest (kvmem: checks, bookkeeping)"] = 1e3 * (total - pt.outer) / n
    return {"swaps": n, "mean_ms_per_swap": 1e3 * total / n, "pieces_mean_ms": pieces}


def time_flag_flip(mm, slots: tuple[str, str], n: int) -> tuple[list[float], list]:
    """Diagnostic: set ``_active_adapter`` on a cached list of PEFT's LoRA layers, nothing else.

    What a resident swap costs without PEFT's set_adapter walk over every module (requires_grad flags, etc.).
    Returns (seconds per flip, the layers).
    """
    from peft.tuners.lora import LoraLayer

    layers = [m for m in mm.model.modules() if isinstance(m, LoraLayer)]

    def flip(i):
        names = [slots[i % 2]]
        for layer in layers:
            layer._active_adapter = names

    return time_calls(flip, n, 10), layers


# ---------------------------------------------------------------- one adapter shape
def bench_spec(spec: str, model, tok, ids, adapters: dict, base_logits, refs: dict, args, rows: list[dict]) -> dict:
    """Time every method but the reloads on the two adapters of ``spec``; append rows; return the swap breakdowns."""
    import peft

    (fa, ca, pa), (fb, cb, pb) = adapters[spec]
    folders, cubes, paths = (fa, fb), (ca, cb), (pa, pb)
    rank, targets = SPECS[spec]
    reps, warm = args.reps, args.warmup
    breakdowns = {}  # method -> where its swap time goes

    def add(method, samples, check, extra=None):
        row = {"method": method, "spec": spec, "rank": rank, "targets": targets, "adapter_bytes": ca.nbytes,
               "warmup": warm if method not in ("peft_from_pretrained", "peft_unload", "peft_load_adapter")
               else args.peft_warmup, **summary(samples), **check, **(extra or {})}
        rows.append(row)
        print(f"  {spec:<13} {method:<21} median {row['median_ms']:9.3f} ms  p10..p90 {row['p10_ms']:.3f}.."
              f"{row['p90_ms']:.3f}  cpu {row['cpu_median_ms']:.3f} ms  n={row['samples']}  "
              f"max|dlogit|={row.get('max_abs_logit_diff_vs_fresh_peft')}  "
              f"other load {info.get('other_processes_cpu_cores')}", flush=True)

    def check_swaps(use, model_of) -> dict:
        """Activate A, B (each after the other), compare logits with fresh PeftModels; then the base, exactly."""
        diffs = []
        for k in (0, 1, 0):
            use(cubes[k])
            diffs.append(float((logits_of(model_of(), ids) - refs[(spec, k)]).abs().max()))
        use(None)
        same = torch.equal(logits_of(model_of(), ids), base_logits)
        return {"max_abs_logit_diff_vs_fresh_peft": max(diffs), "base_bit_identical_after_none": same}

    # (a) resident: both adapters loaded, LRU hit on every swap
    mm = kvmem.wrap(copy.deepcopy(model), tok)
    mm.use_adapter(ca)
    mm.use_adapter(cb)
    stats0 = dict(mm.adapters.stats)
    info = {}
    with foreign_load(info):
        s = time_calls(lambda i: mm.use_adapter(cubes[i % 2]), reps, warm)
    loads = mm.adapters.stats["loads"] - stats0["loads"]
    lora_grad = any(p.requires_grad for n, p in mm.model.named_parameters() if "lora_" in n)
    add("kvmem_resident", s, check_swaps(mm.use_adapter, lambda: mm.model),
        {**info, "loads_during_timing": loads, "lora_params_require_grad_after_swap": lora_grad})
    if args.breakdown:
        breakdowns["kvmem_resident"] = time_pieces(mm, cubes, max(2, args.reps // 4), hotswap=False)
        mm.use_adapter(ca)  # both resident again; flip their flags directly
        slots = tuple("kvmem_" + c.digest[:16] for c in cubes)
        with foreign_load(info):
            s, layers = time_flag_flip(mm, slots, reps)
        diffs = []
        for k in (0, 1, 0):
            for layer in layers:
                layer._active_adapter = [slots[k]]
            diffs.append(float((logits_of(mm.model, ids) - refs[(spec, k)]).abs().max()))
        add("diag_flag_flip", s, {"max_abs_logit_diff_vs_fresh_peft": max(diffs)},
            {**info, "diagnostic": "not a kvmem API: sets _active_adapter on the cached LoRA layers of the resident "
                                   "model, the floor of a resident swap without PEFT's set_adapter",
             "lora_layers": len(layers)})
    del mm

    # (b) cold: the budget holds one adapter, so each swap evicts the other and installs this one from memory
    mm = kvmem.wrap(copy.deepcopy(model), tok, adapter_budget_bytes=max(ca.nbytes, cb.nbytes))
    mm.use_adapter(ca)
    stats0 = dict(mm.adapters.stats)
    with foreign_load(info):
        s = time_calls(lambda i: mm.use_adapter(cubes[(i + 1) % 2]), args.cold_reps, warm, slow=True)
    n_calls = args.cold_reps + warm
    extra = {**info, "loads_per_swap": (mm.adapters.stats["loads"] - stats0["loads"]) / n_calls,
             "evictions_per_swap": (mm.adapters.stats["evictions"] - stats0["evictions"]) / n_calls}
    add("kvmem_cold", s, check_swaps(mm.use_adapter, lambda: mm.model), extra)

    # where the cold swap's time goes, and the same install without PEFT's random init of weights it overwrites
    if args.breakdown:
        breakdowns["kvmem_cold"] = time_pieces(mm, cubes, args.breakdown_swaps, hotswap=False)
        pm, slot, ts = mm.adapters.peft, "probe_meta", []
        for _ in range(args.breakdown_swaps):
            t0 = time.perf_counter()
            pm.add_adapter(slot, cb.config, low_cpu_mem_usage=True)
            peft.set_peft_model_state_dict(pm, cb.state_dict, adapter_name=slot, low_cpu_mem_usage=True)
            ts.append(time.perf_counter() - t0)
            pm.delete_adapter(slot)
        breakdowns["kvmem_cold"]["add_adapter+set_state_dict_low_cpu_mem_usage_median_ms"] = \
            1e3 * statistics.median(ts)
        mm.use_adapter(None)
    del mm

    # (c) from disk: AdapterCube.load + cold install
    mm = kvmem.wrap(copy.deepcopy(model), tok, adapter_budget_bytes=max(ca.nbytes, cb.nbytes))
    mm.use_adapter(ca)
    with foreign_load(info):
        s = time_calls(lambda i: mm.use_adapter(kvmem.AdapterCube.load(paths[(i + 1) % 2])), args.cold_reps, warm,
                       slow=True)
    load_only = time_calls(lambda i: kvmem.AdapterCube.load(paths[i % 2]), args.cold_reps, warm)
    add("kvmem_disk", s, check_swaps(lambda c: mm.use_adapter(
        None if c is None else kvmem.AdapterCube.load(paths[cubes.index(c)])), lambda: mm.model),
        {**info, "cube_file_bytes": Path(pa).stat().st_size,
         "AdapterCube.load_alone_median_ms": 1e3 * statistics.median(load_only)})
    del mm

    # (d) hotswap: one slot, weights overwritten in place
    mm = kvmem.wrap(copy.deepcopy(model), tok, hotswap=True)
    mm.use_adapter(ca)
    with foreign_load(info):
        s = time_calls(lambda i: mm.use_adapter(cubes[(i + 1) % 2]), reps, warm)
    add("kvmem_hotswap", s, check_swaps(mm.use_adapter, lambda: mm.model), info)
    if args.breakdown:
        breakdowns["kvmem_hotswap"] = time_pieces(mm, cubes, args.breakdown_swaps, hotswap=True)
    del mm

    # (e) plain PEFT
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), folders[0], adapter_name="a0").eval()
    pm.load_adapter(folders[1], adapter_name="a1")
    with foreign_load(info):
        s = time_calls(lambda i: pm.set_adapter(f"a{(i + 1) % 2}"), reps, warm)

    diffs = []
    for k in (0, 1, 0):
        pm.set_adapter(f"a{k}")
        diffs.append(float((logits_of(pm, ids) - refs[(spec, k)]).abs().max()))
    with pm.disable_adapter():
        same = torch.equal(logits_of(pm, ids), base_logits)
    add("peft_set_adapter", s, {"max_abs_logit_diff_vs_fresh_peft": max(diffs), "base_bit_identical_after_none": same},
        info)

    names = ["a1"]  # the loaded adapter, newest last

    def load_adapter(i):
        name = f"x{i}"
        pm.load_adapter(folders[i % 2], adapter_name=name)
        pm.set_adapter(name)
        pm.delete_adapter(names.pop())
        names.append(name)

    pm.delete_adapter("a0")
    pm.set_adapter("a1")
    with foreign_load(info):
        s = time_calls(load_adapter, args.peft_reps, args.peft_warmup, slow=True)
    last = (args.peft_reps + args.peft_warmup - 1) % 2
    diff = float((logits_of(pm, ids) - refs[(spec, last)]).abs().max())
    add("peft_load_adapter", s, {"max_abs_logit_diff_vs_fresh_peft": diff}, info)
    del pm

    holder = {"base": copy.deepcopy(model), "pm": None}
    unload_s, diffs, same = Samples(), [], True

    def from_pretrained(i):
        holder["pm"] = peft.PeftModel.from_pretrained(holder["base"], folders[i % 2])

    def unload(i):  # timed apart: the cost of undoing the adapter to load the next one
        if i < 3:
            diffs.append(float((logits_of(holder["pm"], ids) - refs[(spec, i % 2)]).abs().max()))
        wait_quiet(QUIET["sample_wait_s"])
        c0, t0 = time.process_time(), time.perf_counter()
        holder["base"] = holder["pm"].unload()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        holder["pm"] = None
        if i >= args.peft_warmup:
            unload_s.add(dt, dc)
        if i < 3:
            nonlocal same
            same = same and torch.equal(logits_of(holder["base"], ids), base_logits)

    with foreign_load(info):
        s = time_calls(from_pretrained, args.peft_reps, args.peft_warmup, after=unload, slow=True)
    add("peft_from_pretrained", s, {"max_abs_logit_diff_vs_fresh_peft": max(diffs)}, info)
    add("peft_unload", unload_s, {"base_bit_identical_after_none": same}, info)
    del holder
    gc.collect()
    return breakdowns


def bench_reload(spec: str, adapters: dict, ids, refs: dict, args, rows: list[dict]) -> None:
    """Reload base + adapter from disk, a few reps only (each call builds a whole new model)."""
    import peft
    from transformers import AutoModelForCausalLM

    (fa, ca, _), _ = adapters[spec]
    rank, targets = SPECS[spec]
    ckpt = smollm2_checkpoint(verbose=False)
    kept = {}

    def reload_plain(i):
        base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        kept["m"] = peft.PeftModel.from_pretrained(base, fa)

    def reload_kvmem(i):
        base, _tok = load_smollm2(verbose=False)
        kept["m"] = peft.PeftModel.from_pretrained(base, fa)

    def drop(i):
        kept.pop("m", None)
        gc.collect()

    for method, fn in (("reload_model_adapter", reload_plain), ("reload_load_smollm2", reload_kvmem)):
        info = {}
        with foreign_load(info):
            s = time_calls(fn, args.reload_reps, 1, slow=True, after=lambda i: (
                kept.__setitem__("diff", float((logits_of(kept["m"], ids) - refs[(spec, 0)]).abs().max())), drop(i)))
        row = {"method": method, "spec": spec, "rank": rank, "targets": targets, "adapter_bytes": ca.nbytes,
               "warmup": 1, **summary(s), "max_abs_logit_diff_vs_fresh_peft": kept.pop("diff"), **info}
        rows.append(row)
        print(f"  {spec:<13} {method:<21} median {row['median_ms']:9.1f} ms  min..max {row['min_ms']:.1f}.."
              f"{row['max_ms']:.1f}  cpu {row['cpu_median_ms']:.1f} ms  n={row['samples']}  "
              f"other load {info.get('other_processes_cpu_cores')}", flush=True)


# ---------------------------------------------------------------- machine facts, report
def machine_facts(model) -> dict:
    return _common.machine_facts(packages=("torch", "transformers", "peft", "kvmem"), model=model)


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_X = median(X, same adapter shape; reloads: the headline shape) / median(this row), wall clock;
    cpu_speedup_vs_X the same with CPU-time medians."""
    for key, prefix in (("median_ms", "speedup_vs_"), ("cpu_median_ms", "cpu_speedup_vs_")):
        med = {(r["method"], r["spec"]): r[key] for r in rows}
        for r in rows:
            for base in ("peft_from_pretrained", "peft_load_adapter") + RELOAD_METHODS:
                b = med.get((base, r["spec"])) or (med.get((base, HEADLINE)) if base in RELOAD_METHODS else None)
                r[prefix + base] = b / r[key] if b else None


def check_targets(rows: list[dict]) -> dict:
    by = {r["method"]: r for r in rows if r["spec"] == HEADLINE}
    t = {"spec": HEADLINE, "target_median_ms": TARGET_MS, "target_speedup_vs_reload": TARGET_SPEEDUP,
         "reload_compared_to": "reload_model_adapter: AutoModelForCausalLM.from_pretrained of the converted "
                               "checkpoint (safetensors, in the OS page cache) + PeftModel.from_pretrained"}
    for m in KVMEM_METHODS:
        if m in by:
            for clock, key, prefix in (("wall", "median_ms", "speedup_vs_"),
                                       ("cpu", "cpu_median_ms", "cpu_speedup_vs_")):
                t[f"{m}_{clock}_median_ms"] = by[m][key]
                t[f"{m}_{clock}_le_{TARGET_MS:g}ms"] = by[m][key] <= TARGET_MS
                sp = by[m].get(prefix + "reload_model_adapter")
                t[f"{m}_{clock}_speedup_vs_reload"] = sp
                t[f"{m}_{clock}_ge_{TARGET_SPEEDUP:g}x_vs_reload"] = None if sp is None else sp >= TARGET_SPEEDUP
                t[f"{m}_{clock}_speedup_vs_peft_from_pretrained"] = by[m].get(prefix + "peft_from_pretrained")
    return t


def print_table(rows: list[dict]) -> None:
    head = (f"{'adapter':<13} {'method':<21} {'median ms':>10} {'p10..p90 ms':>21} {'cpu ms':>9} {'n':>4} "
            f"{'x from_pre':>10} {'x reload':>9} {'max|dlogit|':>11} {'base ==':>7} {'load':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        sp1, sp2 = r.get("speedup_vs_peft_from_pretrained"), r.get("speedup_vs_reload_model_adapter")
        d = r.get("max_abs_logit_diff_vs_fresh_peft")
        eq = r.get("base_bit_identical_after_none")
        load = r.get("other_processes_cpu_cores")
        print(f"{r['spec']:<13} {r['method']:<21} {r['median_ms']:>10.3f} "
              f"{r['p10_ms']:>10.3f}..{r['p90_ms']:<9.3f} {r['cpu_median_ms']:>9.3f} {r['samples']:>4} "
              f"{'-' if sp1 is None else f'{sp1:.1f}':>10} {'-' if sp2 is None else f'{sp2:.0f}':>9} "
              f"{'-' if d is None else f'{d:.1e}':>11} {'-' if eq is None else str(eq):>7} "
              f"{'-' if load is None else f'{load:.2f}':>5}")


def markdown_table(doc: dict) -> str:
    """The rows of a results JSON as a markdown table (for bench/ADAPTERS.md)."""
    lines = ["| adapter | method | median ms | p10..p90 ms | CPU ms | n | x from_pretrained | x reload "
             "| max abs logit diff | base exact | other load |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|:-:|--:|"]

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    for r in doc["rows"]:
        d, eq, load = (r.get("max_abs_logit_diff_vs_fresh_peft"), r.get("base_bit_identical_after_none"),
                       r.get("other_processes_cpu_cores"))
        prec = ".3f" if r["median_ms"] < 100 else ".1f"
        lines.append(
            f"| {r['spec']} | {r['method']} | {r['median_ms']:{prec}} | {r['p10_ms']:{prec}}..{r['p90_ms']:{prec}} "
            f"| {r['cpu_median_ms']:{prec}} | {r['samples']} | {f(r.get('speedup_vs_peft_from_pretrained'), '.1f')} "
            f"| {f(r.get('speedup_vs_reload_model_adapter'), '.1f')} | {'-' if d is None else f'{d:.1e}'} "
            f"| {'-' if eq is None else ('yes' if eq else 'NO')} | {f(load, '.2f')} |")
    return "\n".join(lines)


def plot(doc: dict, png: Path) -> None:
    """Grouped bars (log y): median ms per method, one bar per adapter shape, p10..p90 whiskers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, facts = doc["rows"], doc["machine"]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    specs = [s for s in SPECS if any(r["spec"] == s for r in rows)]
    colors = {"attn_r4": "#9ecae1", "attn_r16": "#1f77b4", "attn_r64": "#08306b", "attn_mlp_r16": "#ff7f0e"}
    labels = {"attn_r4": "rank 4, attention", "attn_r16": "rank 16, attention", "attn_r64": "rank 64, attention",
              "attn_mlp_r16": "rank 16, attention + MLP"}
    fig, ax = plt.subplots(figsize=(11, 5.8), dpi=120)
    width = 0.8 / len(specs)
    for j, spec in enumerate(specs):
        xs, ys, lo, hi, cpu = [], [], [], [], []
        for i, m in enumerate(methods):
            r = next((r for r in rows if r["method"] == m and r["spec"] == spec), None)
            if r is None:
                continue
            xs.append(i + (j - (len(specs) - 1) / 2) * width)
            ys.append(r["median_ms"])
            lo.append(r["median_ms"] - r["p10_ms"])
            hi.append(r["p90_ms"] - r["median_ms"])
            cpu.append(r["cpu_median_ms"])
        ax.bar(xs, ys, width=width * 0.95, color=colors.get(spec), label=labels.get(spec, spec),
               yerr=[lo, hi], capsize=2, error_kw={"elinewidth": 0.8})
        ax.scatter(xs, cpu, marker="D", s=14, facecolor="white", edgecolor="black", linewidths=0.8, zorder=3,
                   label="this process's CPU time (median)" if j == 0 else None)
    ax.axhline(TARGET_MS, color="#d62728", linestyle="--", linewidth=1)
    ax.text(len(methods) - 0.5, TARGET_MS * 1.12, f"target {TARGET_MS:g} ms", color="#d62728", ha="right", fontsize=8)
    for i in range(len(methods) - 1):  # separate kvmem / PEFT / reload groups
        if methods[i].split("_")[0] != methods[i + 1].split("_")[0]:
            ax.axvline(i + 0.5, color="#bbbbbb", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([m.replace("_", "\n", 1) for m in methods], fontsize=8)
    ax.set_ylabel("ms per swap / load (wall-clock median, p10..p90)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.set_title(f"LoRA adapter swap, SmolLM2-135M-Instruct {facts['dtype'].replace('torch.', '')}, "
                 f"CPU ({facts['cpu']}, {facts['torch_threads']} threads)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--specs", nargs="+", default=list(SPECS), choices=list(SPECS))
    p.add_argument("--reps", type=int, default=60, help="timed swaps of the fast methods (resident, hotswap, "
                                                         "peft_set_adapter)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--cold-reps", type=int, default=15, help="timed swaps of kvmem_cold and kvmem_disk")
    p.add_argument("--peft-reps", type=int, default=8, help="timed calls of peft_from_pretrained/load_adapter")
    p.add_argument("--peft-warmup", type=int, default=3)
    p.add_argument("--reload-reps", type=int, default=3, help="timed reloads of base + adapter")
    p.add_argument("--no-reload", dest="reload", action="store_false")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                   help="skip the per-piece timing of kvmem swaps and the flag-flip diagnostic")
    p.add_argument("--breakdown-swaps", type=int, default=5)
    p.add_argument("--quiet-wait", type=float, default=5.0,
                   help="before each timed block, wait up to this many seconds for other processes to go quiet")
    p.add_argument("--sample-quiet-wait", type=float, default=0.3,
                   help="the same before each call of the slow methods (cold, disk, PEFT loads, reloads)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/adapter_swap_cpu.json; "
                                               "--quick writes nothing unless given)")
    p.add_argument("--png", default=None, help="PNG path (default: the JSON path with .png)")
    p.add_argument("--report", metavar="JSON", default=None,
                   help="measure nothing: print the markdown table of a results file and redraw its PNG (--png)")
    args = p.parse_args(argv)
    if args.report:
        doc = json.loads(Path(args.report).read_text())
        print(markdown_table(doc))
        if args.png:
            plot(doc, Path(args.png))
        return 0
    if args.quick:
        args.reps, args.warmup, args.cold_reps, args.peft_reps, args.peft_warmup, args.reload_reps = 8, 2, 4, 2, 1, 1
        args.breakdown_swaps = 2
        if args.specs == list(SPECS):
            args.specs = [HEADLINE]
    QUIET["block_wait_s"], QUIET["sample_wait_s"] = args.quiet_wait, args.sample_quiet_wait
    out = Path(args.out) if args.out else (None if args.quick else ROOT / "bench/results/adapter_swap_cpu.json")

    t_start = time.perf_counter()
    model, tok = load_smollm2()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    base_logits = logits_of(model, ids)
    work = Path(tempfile.mkdtemp(prefix="kvmem-adapter-bench-"))
    adapters, refs = {}, {}
    print(f"making adapters in {work} ...", flush=True)
    for n, spec in enumerate(args.specs):
        rank, targets = SPECS[spec]
        pair = []
        for k in (0, 1):
            folder = work / f"{spec}_{k}"
            make_adapter(model, folder, seed=1000 + 10 * n + k, rank=rank, targets=targets)
            cube = kvmem.AdapterCube.from_peft(folder, name=f"{spec}_{k}", base_model=model)
            path = Path(cube.save(work / f"{spec}_{k}.safetensors"))
            pair.append((folder, kvmem.AdapterCube.load(path), path))
            refs[(spec, k)] = reference_logits(model, folder, ids)
        adapters[spec] = pair
        assert not torch.allclose(refs[(spec, 0)], refs[(spec, 1)]), "the two adapters should differ"
        assert not torch.allclose(refs[(spec, 0)], base_logits), "the adapter should change the logits"
    print(f"setup {time.perf_counter() - t_start:.0f} s", flush=True)

    rows, breakdowns = [], {}
    for spec in args.specs:
        breakdowns[spec] = bench_spec(spec, model, tok, ids, adapters, base_logits, refs, args, rows)
    if args.reload:
        bench_reload(HEADLINE if HEADLINE in args.specs else args.specs[0], adapters, ids, refs, args, rows)
    add_speedups(rows)
    targets = check_targets(rows)

    print()
    print_table(rows)
    print()
    for spec, bs in breakdowns.items():
        for method, b in bs.items():
            print(f"{method} breakdown, {spec} (mean of {b['swaps']} swaps, {b['mean_ms_per_swap']:.2f} ms each):")
            for k, v in b["pieces_mean_ms"].items():
                print(f"    {v:9.3f} ms  {k}")
            if "add_adapter+set_state_dict_low_cpu_mem_usage_median_ms" in b:
                print(f"    (add_adapter + set_peft_model_state_dict with low_cpu_mem_usage=True, no random init: "
                      f"{b['add_adapter+set_state_dict_low_cpu_mem_usage_median_ms']:.3f} ms median)")
    print()
    print(json.dumps(targets, indent=1))
    print(f"total {time.perf_counter() - t_start:.0f} s, of which {QUIET['waited_s']:.0f} s waiting for other "
          "processes to go quiet")
    if out is not None:
        doc = {"benchmark": "adapter_swap", "machine": machine_facts(model), "settings": vars(args),
               "prompt_tokens": ids.shape[1], "waited_for_quiet_s": round(QUIET["waited_s"], 1),
               "total_s": round(time.perf_counter() - t_start, 1), "targets": targets,
               "swap_breakdown": breakdowns, "rows": rows}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        png = Path(args.png) if args.png else out.with_suffix(".png")
        plot(doc, png)
        print(f"wrote {out} and {png}")
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
