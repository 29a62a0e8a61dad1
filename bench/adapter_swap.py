"""Adapter swap benchmark: kvmem's LoRA hot swap vs loading the adapter with PEFT vs reloading model + adapter.

One process, one model (SmolLM2-135M-Instruct, float32), medians after warm-up with p10/p90 and min/max.
Random LoRA adapters (non-zero B, as after training) are made here, saved as PEFT folders, packaged as
AdapterCubes and loaded back from their own files. Every method alternates between two adapters of the same
shape, so each timed call really changes the active adapter.

    .venv/bin/python bench/adapter_swap.py             # the full run (~5 min on 2 quiet CPU cores)
    .venv/bin/python bench/adapter_swap.py --quick     # smoke run, one shape; writes nothing unless --out

Methods (each timed region in brackets; "A/B" = alternating between two adapters):
    kvmem_resident        [mm.use_adapter(A/B)]  both adapters resident: an LRU hit, only LoRA layer flags flip
    kvmem_cold            [mm.use_adapter(A/B)]  cube in memory, not resident: the byte capacity holds one adapter,
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
    reload_load_smollm2   [kvmem.demo.models.load_smollm2(); PeftModel.from_pretrained(...)]  the same through
                          kvmem's loader, which also loads the tokenizer and re-hashes the GGUF file
    diag_flag_flip        [set _active_adapter on PEFT's LoRA layers]  a diagnostic, not an API: the floor of a
                          resident swap (table and JSON only)

Correctness, untimed: after the timed calls of each method, every adapter it swapped to is activated once more
and the logits of a fixed prompt are compared with a PeftModel freshly loaded from that adapter's folder onto a
fresh copy of the base (max |diff|); kvmem's use_adapter(None) and PEFT's unload() must give the base logits
bit for bit.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # bench/_common.py, also when imported from elsewhere

import kvmem  # noqa: E402
import _common  # noqa: E402
import adapter_swap_report as report  # noqa: E402
from kvmem.demo.models import load_smollm2, smollm2_checkpoint  # noqa: E402
from workloads import ADAPTER_SPECS, make_adapter  # noqa: E402

PROMPT = "Alice lives in Oslo and works as a nurse. Bob lives in Lima. Question: where does Alice live? Answer:"


# ---------------------------------------------------------------- adapters and the oracle
class Adapter(NamedTuple):
    folder: Path                # the PEFT folder
    cube: kvmem.AdapterCube     # loaded back from its own file
    path: Path                  # the cube file
    ref_logits: torch.Tensor    # [1, n, vocab] of a PeftModel freshly loaded from ``folder``


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def reference_logits(base, folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits [1, n, vocab] of a PeftModel freshly loaded from ``folder`` onto a fresh copy of ``base`` (the oracle)."""
    import peft

    return logits_of(peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval(), ids)


def make_pair(model, spec: str, n: int, work: Path, ids) -> tuple[Adapter, Adapter]:
    rank, targets = ADAPTER_SPECS[spec]
    pair = []
    for k in (0, 1):
        folder = work / f"{spec}_{k}"
        make_adapter(model, folder, seed=1000 + 10 * n + k, rank=rank, targets=targets)
        cube = kvmem.AdapterCube.from_peft(folder, name=f"{spec}_{k}", base_model=model)
        path = Path(cube.save(work / f"{spec}_{k}.safetensors"))
        pair.append(Adapter(folder, kvmem.AdapterCube.load(path), path, reference_logits(model, folder, ids)))
    return pair[0], pair[1]


# ---------------------------------------------------------------- timing
@dataclass
class Clock:
    """Times blocks of calls on a shared machine: waits up to ``block_wait_s`` for other processes to go quiet
    before a block, and with ``slow`` (calls of ~100 ms and more) up to ``quiet.wait_s`` before every call."""

    quiet: _common.Quiet
    block_wait_s: float

    def calls(self, fn, n: int, warmup: int, *, after=None, slow: bool = False) -> _common.Series:
        gc.collect()
        self.quiet.wait(self.block_wait_s, window_s=0.5)
        return _common.repeat(fn, n, warmup=warmup, quiet=self.quiet if slow else None, after=after)


def summary(series: _common.Series) -> dict:
    """Wall-clock and this process's CPU-time spread in ms. On a shared machine the wall clock includes time
    other processes held the cores; the CPU time does not (for multi-threaded torch work it can exceed the wall)."""
    return {**_common.spread(series.seconds, unit="ms"), **_common.spread(series.cpu_seconds, unit="ms", prefix="cpu_"),
            "samples": len(series.seconds)}


def time_pieces(mm, cubes, n: int, *, hotswap: bool, clock: Clock) -> dict:
    """Mean ms per swap spent in each PEFT callable the bridge calls, over ``n`` swaps alternating ``cubes``; the
    rest is kvmem itself. Patches PEFT's public functions and the PeftModel's methods for the block."""
    import peft
    import peft.utils.hotswap as hs

    mm.use_adapter(cubes[0])  # before patching: only the n timed swaps count
    clock.quiet.wait(clock.block_wait_s, window_s=0.5)
    pm = mm.adapters.peft
    if hotswap:
        pieces = [(hs, "check_hotswap_configs_compatible", "peft check_hotswap_configs_compatible"),
                  (hs, "hotswap_adapter_from_state_dict", "peft hotswap_adapter_from_state_dict (copy in place)")]
    else:
        pieces = [(pm, "add_adapter", "peft add_adapter (inject LoRA layers, random init)"),
                  (peft, "set_peft_model_state_dict", "peft set_peft_model_state_dict (copy weights in)"),
                  (pm, "delete_adapter", "peft delete_adapter (evict)"),
                  (pm, "eval", "peft_model.eval()")]
    pieces += [(pm, "set_adapter", "peft set_adapter"),
               (pm.base_model, "enable_adapter_layers", "peft enable_adapter_layers")]
    with _common.time_inside(pieces) as inside:
        t0 = time.perf_counter()
        for i in range(n):
            mm.use_adapter(cubes[(i + 1) % 2])
        total = time.perf_counter() - t0
    out = {k: 1e3 * v / n for k, v in inside.spent.items()}
    out["rest (kvmem: checks, bookkeeping, LoRA layer flags)"] = 1e3 * (total - inside.outer) / n
    return {"swaps": n, "mean_ms_per_swap": 1e3 * total / n, "pieces_mean_ms": out}


# ---------------------------------------------------------------- one adapter shape
class SpecBench:
    """Every method but the reloads, on the two adapters of one shape; each appends its row to ``rows``."""

    def __init__(self, spec: str, pair: tuple[Adapter, Adapter], model, tok, ids, base_logits, args, clock: Clock):
        self.spec, self.pair, self.model, self.tok, self.ids = spec, pair, model, tok, ids
        self.base_logits, self.args, self.clock = base_logits, args, clock
        self.cubes = tuple(a.cube for a in pair)
        self.rows: list[dict] = []
        self.breakdowns: dict[str, dict] = {}  # method -> where its swap time goes

    def run(self) -> tuple[list[dict], dict]:
        self.kvmem_resident()
        self.kvmem_cold()
        self.kvmem_disk()
        self.kvmem_hotswap()
        self.peft_set_adapter()
        self.peft_load_adapter()
        self.peft_from_pretrained()
        return self.rows, self.breakdowns

    # -------------------------------- helpers
    def add(self, method: str, series, load: _common.OtherLoad, warmup: int, **fields) -> None:
        rank, targets = ADAPTER_SPECS[self.spec]
        other = None if load.cores is None else round(load.cores[0], 3)
        row = {"method": method, "spec": self.spec, "rank": rank, "targets": targets,
               "adapter_bytes": self.cubes[0].nbytes, "warmup": warmup, **summary(series), **fields,
               "other_processes_cpu_cores": other}
        self.rows.append(row)
        print(f"  {self.spec:<13} {method:<21} median {row['median_ms']:9.3f} ms  p10..p90 {row['p10_ms']:.3f}.."
              f"{row['p90_ms']:.3f}  cpu {row['cpu_median_ms']:.3f} ms  n={row['samples']}  "
              f"max|dlogit|={row.get('max_abs_logit_diff_vs_fresh_peft')}  other load {other}", flush=True)

    def diff(self, model, k: int) -> float:
        """max |logits of ``model`` - logits of a fresh PeftModel of adapter ``k``|."""
        return float((logits_of(model, self.ids) - self.pair[k].ref_logits).abs().max())

    def check_swaps(self, use, model_of) -> dict:
        """Activate A, B, A (each after the other), compare with fresh PeftModels; then the base, exactly."""
        diffs = []
        for k in (0, 1, 0):
            use(k)
            diffs.append(self.diff(model_of(), k))
        use(None)
        same = torch.equal(logits_of(model_of(), self.ids), self.base_logits)
        return {"max_abs_logit_diff_vs_fresh_peft": max(diffs), "base_bit_identical_after_none": same}

    def wrapped(self, **kwargs):
        """A MemoryModel on a fresh copy of the base."""
        return kvmem.wrap(copy.deepcopy(self.model), self.tok, **kwargs)

    def use_in(self, mm):
        return lambda k: mm.use_adapter(None if k is None else self.cubes[k])

    # -------------------------------- kvmem
    def kvmem_resident(self) -> None:
        """Both adapters resident, an LRU hit on every swap; then the breakdown and the flag-flip floor."""
        args, cubes = self.args, self.cubes
        mm = self.wrapped()
        mm.use_adapter(cubes[0])
        mm.use_adapter(cubes[1])
        loads0 = mm.adapters.stats["loads"]
        with _common.OtherLoad() as load:
            s = self.clock.calls(lambda i: mm.use_adapter(cubes[i % 2]), args.reps, args.warmup)
        lora_grad = any(p.requires_grad for n, p in mm.model.named_parameters() if "lora_" in n)
        self.add("kvmem_resident", s, load, args.warmup, **self.check_swaps(self.use_in(mm), lambda: mm.model),
                 loads_during_timing=mm.adapters.stats["loads"] - loads0, lora_params_require_grad_after_swap=lora_grad)
        if args.breakdown:
            self.breakdowns["kvmem_resident"] = time_pieces(mm, cubes, max(2, args.reps // 4), hotswap=False,
                                                            clock=self.clock)
            self.flag_flip(mm)

    def flag_flip(self, mm) -> None:
        """Diagnostic: set ``_active_adapter`` on PEFT's LoRA layers, nothing else (a PEFT internal, not an API):
        what a resident swap costs without any bookkeeping."""
        from peft.tuners.lora import LoraLayer

        layers = [m for m in mm.model.modules() if isinstance(m, LoraLayer)]
        slots = []
        for cube in self.cubes:  # both resident; a slot's name is what the LoRA layers report active under it
            mm.use_adapter(cube)
            slots.append(layers[0].active_adapters[0])

        def flip(k):
            for layer in layers:
                layer._active_adapter = [slots[k]]

        with _common.OtherLoad() as load:
            s = self.clock.calls(lambda i: flip(i % 2), self.args.reps, 10)
        diffs = []
        for k in (0, 1, 0):
            flip(k)
            diffs.append(self.diff(mm.model, k))
        self.add("diag_flag_flip", s, load, 10, max_abs_logit_diff_vs_fresh_peft=max(diffs),
                 diagnostic="not a kvmem API: sets _active_adapter on the LoRA layers of the resident model, the "
                            "floor of a resident swap", lora_layers=len(layers))

    def kvmem_cold(self) -> None:
        """The capacity holds one adapter, so each swap evicts the other and installs this one from memory."""
        import peft

        args, cubes = self.args, self.cubes
        mm = self.wrapped(adapter_capacity_bytes=max(c.nbytes for c in cubes))
        mm.use_adapter(cubes[0])
        stats0 = dict(mm.adapters.stats)
        with _common.OtherLoad() as load:
            s = self.clock.calls(lambda i: mm.use_adapter(cubes[(i + 1) % 2]), args.cold_reps, args.warmup, slow=True)
        n_calls = args.cold_reps + args.warmup
        self.add("kvmem_cold", s, load, args.warmup, **self.check_swaps(self.use_in(mm), lambda: mm.model),
                 loads_per_swap=(mm.adapters.stats["loads"] - stats0["loads"]) / n_calls,
                 evictions_per_swap=(mm.adapters.stats["evictions"] - stats0["evictions"]) / n_calls)
        if not args.breakdown:
            return
        # where the cold swap's time goes, and the same install without PEFT's random init of weights it overwrites
        b = self.breakdowns["kvmem_cold"] = time_pieces(mm, cubes, args.breakdown_swaps, hotswap=False,
                                                        clock=self.clock)
        pm, slot, ts = mm.adapters.peft, "probe_meta", []
        for _ in range(args.breakdown_swaps):
            t0 = time.perf_counter()
            pm.add_adapter(slot, cubes[1].config, low_cpu_mem_usage=True)
            peft.set_peft_model_state_dict(pm, cubes[1].state_dict, adapter_name=slot, low_cpu_mem_usage=True)
            ts.append(time.perf_counter() - t0)
            pm.delete_adapter(slot)
        b["add_adapter+set_state_dict_low_cpu_mem_usage_median_ms"] = 1e3 * statistics.median(ts)

    def kvmem_disk(self) -> None:
        """AdapterCube.load from the cube file + cold install."""
        args, paths = self.args, [a.path for a in self.pair]
        mm = self.wrapped(adapter_capacity_bytes=max(c.nbytes for c in self.cubes))
        mm.use_adapter(self.cubes[0])
        with _common.OtherLoad() as load:
            s = self.clock.calls(lambda i: mm.use_adapter(kvmem.AdapterCube.load(paths[(i + 1) % 2])),
                                 args.cold_reps, args.warmup, slow=True)
        load_only = self.clock.calls(lambda i: kvmem.AdapterCube.load(paths[i % 2]), args.cold_reps, args.warmup)
        check = self.check_swaps(lambda k: mm.use_adapter(None if k is None else kvmem.AdapterCube.load(paths[k])),
                                 lambda: mm.model)
        self.add("kvmem_disk", s, load, args.warmup, **check, cube_file_bytes=paths[0].stat().st_size,
                 **{"AdapterCube.load_alone_median_ms": 1e3 * statistics.median(load_only.seconds)})

    def kvmem_hotswap(self) -> None:
        """One slot, its weights overwritten in place (torch.compile-friendly)."""
        args, cubes = self.args, self.cubes
        mm = self.wrapped(hotswap=True)
        mm.use_adapter(cubes[0])
        with _common.OtherLoad() as load:
            s = self.clock.calls(lambda i: mm.use_adapter(cubes[(i + 1) % 2]), args.reps, args.warmup)
        self.add("kvmem_hotswap", s, load, args.warmup, **self.check_swaps(self.use_in(mm), lambda: mm.model))
        if args.breakdown:
            self.breakdowns["kvmem_hotswap"] = time_pieces(mm, cubes, args.breakdown_swaps, hotswap=True,
                                                           clock=self.clock)

    # -------------------------------- plain PEFT, the baselines
    def peft_set_adapter(self) -> None:
        """Both adapters loaded into one PeftModel as "a0" and "a1"; set_adapter alternates."""
        import peft

        args = self.args
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(self.model), self.pair[0].folder, adapter_name="a0").eval()
        pm.load_adapter(self.pair[1].folder, adapter_name="a1")
        with _common.OtherLoad() as load:
            s = self.clock.calls(lambda i: pm.set_adapter(f"a{(i + 1) % 2}"), args.reps, args.warmup)
        diffs = []
        for k in (0, 1, 0):
            pm.set_adapter(f"a{k}")
            diffs.append(self.diff(pm, k))
        with pm.disable_adapter():
            same = torch.equal(logits_of(pm, self.ids), self.base_logits)
        self.add("peft_set_adapter", s, load, args.warmup, max_abs_logit_diff_vs_fresh_peft=max(diffs),
                 base_bit_identical_after_none=same)

    def peft_load_adapter(self) -> None:
        """One adapter loaded at a time: load the next from its folder, activate it, delete the previous."""
        import peft

        args = self.args
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(self.model), self.pair[1].folder, adapter_name="a1").eval()
        loaded = ["a1"]

        def swap(i):
            name = f"x{i}"
            pm.load_adapter(self.pair[i % 2].folder, adapter_name=name)
            pm.set_adapter(name)
            pm.delete_adapter(loaded.pop())
            loaded.append(name)

        with _common.OtherLoad() as load:
            s = self.clock.calls(swap, args.peft_reps, args.peft_warmup, slow=True)
        last = (args.peft_reps + args.peft_warmup - 1) % 2
        self.add("peft_load_adapter", s, load, args.peft_warmup, max_abs_logit_diff_vs_fresh_peft=self.diff(pm, last))

    def peft_from_pretrained(self) -> None:
        """PeftModel.from_pretrained onto the loaded base; unload() after each call, timed apart (peft_unload)."""
        import peft

        args = self.args
        state = {"base": copy.deepcopy(self.model), "peft": None}
        unloads, diffs, base_exact = _common.Series(), [], []

        def load_adapter(i):
            state["peft"] = peft.PeftModel.from_pretrained(state["base"], self.pair[i % 2].folder)

        def unload(i):  # the cost of undoing the adapter to load the next one
            if i < 3:
                diffs.append(self.diff(state["peft"], i % 2))
            self.clock.quiet.wait()
            sample = _common.measure(state["peft"].unload)
            state["base"], state["peft"] = sample.result, None
            if i >= args.peft_warmup:
                unloads.add(sample)
            if i < 3:
                base_exact.append(torch.equal(logits_of(state["base"], self.ids), self.base_logits))

        with _common.OtherLoad() as load:
            s = self.clock.calls(load_adapter, args.peft_reps, args.peft_warmup, after=unload, slow=True)
        self.add("peft_from_pretrained", s, load, args.peft_warmup, max_abs_logit_diff_vs_fresh_peft=max(diffs))
        self.add("peft_unload", unloads, load, args.peft_warmup, base_bit_identical_after_none=all(base_exact))


def bench_reload(spec: str, adapter: Adapter, ids, args, clock: Clock) -> list[dict]:
    """Reload base + adapter from disk, a few reps only (each call builds a whole new model)."""
    import peft
    from transformers import AutoModelForCausalLM

    rank, targets = ADAPTER_SPECS[spec]
    ckpt = smollm2_checkpoint(verbose=False)
    kept, rows = {}, []

    def reload_plain(i):
        base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        kept["model"] = peft.PeftModel.from_pretrained(base, adapter.folder)

    def reload_kvmem(i):
        base, _tok = load_smollm2(verbose=False)
        kept["model"] = peft.PeftModel.from_pretrained(base, adapter.folder)

    def check_and_drop(i):
        kept["diff"] = float((logits_of(kept.pop("model"), ids) - adapter.ref_logits).abs().max())
        gc.collect()

    for method, fn in (("reload_model_adapter", reload_plain), ("reload_load_smollm2", reload_kvmem)):
        with _common.OtherLoad() as load:
            s = clock.calls(fn, args.reload_reps, 1, slow=True, after=check_and_drop)
        other = None if load.cores is None else round(load.cores[0], 3)
        row = {"method": method, "spec": spec, "rank": rank, "targets": targets, "adapter_bytes": adapter.cube.nbytes,
               "warmup": 1, **summary(s), "max_abs_logit_diff_vs_fresh_peft": kept.pop("diff"),
               "other_processes_cpu_cores": other}
        rows.append(row)
        print(f"  {spec:<13} {method:<21} median {row['median_ms']:9.1f} ms  min..max {row['min_ms']:.1f}.."
              f"{row['max_ms']:.1f}  cpu {row['cpu_median_ms']:.1f} ms  n={row['samples']}  other load {other}",
              flush=True)
    return rows


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--specs", nargs="+", default=list(ADAPTER_SPECS), choices=list(ADAPTER_SPECS))
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
        print(report.markdown_table(doc))
        if args.png:
            report.plot(doc, Path(args.png))
        return 0
    if args.quick:
        args.reps, args.warmup, args.cold_reps, args.peft_reps, args.peft_warmup, args.reload_reps = 8, 2, 4, 2, 1, 1
        args.breakdown_swaps = 2
        if args.specs == list(ADAPTER_SPECS):
            args.specs = [report.HEADLINE]
    clock = Clock(_common.Quiet(wait_s=args.sample_quiet_wait, threshold=0.15, window_s=0.2), args.quiet_wait)
    out = Path(args.out) if args.out else (None if args.quick else _common.result_path("adapter_swap"))

    t_start = time.perf_counter()
    model, tok = load_smollm2()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    base_logits = logits_of(model, ids)
    work = Path(tempfile.mkdtemp(prefix="kvmem-adapter-bench-"))
    try:
        print(f"making adapters in {work} ...", flush=True)
        pairs = {spec: make_pair(model, spec, n, work, ids) for n, spec in enumerate(args.specs)}
        for a, b in pairs.values():
            assert not torch.allclose(a.ref_logits, b.ref_logits), "the two adapters should differ"
            assert not torch.allclose(a.ref_logits, base_logits), "the adapter should change the logits"
        print(f"setup {time.perf_counter() - t_start:.0f} s", flush=True)

        rows, breakdowns = [], {}
        for spec, pair in pairs.items():
            spec_rows, breakdowns[spec] = SpecBench(spec, pair, model, tok, ids, base_logits, args, clock).run()
            rows += spec_rows
        if args.reload:
            spec = report.HEADLINE if report.HEADLINE in pairs else args.specs[0]
            rows += bench_reload(spec, pairs[spec][0], ids, args, clock)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.add_speedups(rows)
    targets = report.check_targets(rows)

    print()
    report.print_table(rows)
    print()
    report.print_breakdowns(breakdowns)
    print()
    print(json.dumps(targets, indent=1))
    print(f"total {time.perf_counter() - t_start:.0f} s, of which {clock.quiet.waited_s:.0f} s waiting for other "
          "processes to go quiet")
    if out is not None:
        doc = {"benchmark": "adapter_swap", "machine": _common.machine_facts(
                   packages=("torch", "transformers", "peft", "kvmem"), model=model),
               "settings": vars(args), "prompt_tokens": ids.shape[1], "waited_for_quiet_s": round(clock.quiet.waited_s, 1),
               "total_s": round(time.perf_counter() - t_start, 1), "targets": targets,
               "swap_breakdown": breakdowns, "rows": rows}
        _common.write_results(doc, out, report.plot, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
