"""Quantized cubes (issue 23): bytes, quality and TTFT of float32 / bfloat16 / int8 / int4 cubes (SmolLM2-135M and
Gemma 3 270M, float32 models, CPU).

    .venv/bin/python bench/quantized_cubes.py                  # both models -> results/quantized_cubes_cpu.json/.png
    .venv/bin/python bench/quantized_cubes.py --quick          # smoke run; writes nothing unless --out is given
    .venv/bin/python bench/quantized_cubes.py --redo-plot results/quantized_cubes_cpu.json
    .venv/bin/python bench/quantized_cubes.py --model smollm2 --parts ttft --update results/quantized_cubes_cpu.json
                                    # re-measure some parts of one model into an existing results file (the
                                    # file's "runs" says which run measured which part, with its machine facts)

Sizes: bytes per token of a cube's KV in memory (what the scheduler's tiers hold and what moves to the device) and
of its file, per format; bfloat16 is the float32 cube cast (what a bfloat16 model's cube weighs).

Quality, against the float32 cube (the exact KV) with the same recompute mode:
    fact QA        kvmem's fact QA (workloads.cube_set: invented people, "Where does <first> live?" / "What does
                   <first> work as?", the answer's start as a cue): one cube of 6 people, and 4 composed cubes of 3
                   (kvmem.prefill's default recompute). Per question: KL(float32 || format) of the first answer
                   token, whether the 8 greedy answer tokens are the same, whether the answer is right.
    long text      a real-text memory (the bundled team notes, ~2.4k tokens): the error each quantized cube carries
                   in its metadata (probes of its own tokens: kvmem.cubes.quant_error), and the fact-QA cubes' own.
    bfloat16       the float32 cube cast to bfloat16 and back: what storing in bfloat16 would lose.

TTFT (float32 model): [MemCube.load(path); kvmem.prefill; forward(query); argmax] with the file evicted from the
page cache before every call (posix_fadvise DONTNEED, checked with fincore when available), and [kvmem.prefill;
forward(query); argmax] with the cube in memory, for 1 cube of --tokens tokens and 4 cubes of --tokens/4 composed
(recompute="none": the data path itself). Medians after warm-up, formats interleaved round robin, one process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import kvmem  # noqa: E402
import _common  # noqa: E402
from kvmem.model.cache import cache_kwarg  # noqa: E402
from memory_text import text_of_tokens  # noqa: E402
from ttft import drop_page_cache, resident_bytes  # noqa: E402
from workloads import cube_set, questions_of  # noqa: E402

FORMATS = ("float32", "bfloat16", "int8", "int4")
QUANTIZED = ("int8", "int4")
NOTES = ROOT / "kvmem" / "demo" / "data" / "team_notes.txt"


def variant(cube: kvmem.MemCube, fmt: str) -> kvmem.MemCube:
    """The cube as stored in ``fmt``, ready for the float32 model (bfloat16: cast there and back)."""
    if fmt == "float32":
        return cube
    if fmt == "bfloat16":
        return cube.to(dtype=torch.bfloat16).to(dtype=torch.float32)
    return cube.quantize(fmt)


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    lp, lq = torch.log_softmax(p.double(), -1), torch.log_softmax(q.double(), -1)
    return float((lp.exp() * (lp - lq)).sum())


def answer(model, tok, ids: torch.Tensor, prefix, max_new: int) -> tuple[list[int], torch.Tensor]:
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                         do_sample=False, return_dict_in_generate=True, output_logits=True,
                         pad_token_id=tok.eos_token_id, **{cache_kwarg(model): prefix.cache})
    return out.sequences[0, ids.shape[1]:].tolist(), out.logits[0][0]


def run_quality(model, tok, mm, args) -> tuple[list[dict], list[dict]]:
    """(one record per question and format, the measured errors cubes carry)."""
    records, carried = [], []
    for n_cubes, people in ((1, 6), (4, 3)):
        for s in range(args.sets):
            seed = 2300 + 10 * n_cubes + s
            texts, facts = cube_set(n_cubes, people, seed)
            full = [mm.build_cube(t, name=f"s{seed}-c{i}") for i, t in enumerate(texts)]
            cubes = {fmt: [variant(c, fmt) for c in full] for fmt in FORMATS}
            for fmt in QUANTIZED:
                for c in cubes[fmt]:
                    carried.append({"memory": "fact QA cube", "format": fmt, "tokens": c.num_tokens,
                                    **c.quantization["error"]})
            prefixes = {fmt: kvmem.prefill(model, cs) for fmt, cs in cubes.items()}
            qs = questions_of(facts, ["city", "job"], args.questions, seed)
            for q in qs:
                cue = tok(q["cue"], add_special_tokens=False).input_ids
                ids = torch.cat([mm.prompt_ids(q["question"], full), torch.tensor([cue])], dim=-1)
                ref_tokens, ref_logits = None, None
                for fmt in FORMATS:
                    prefix = kvmem.prefill(model, cubes[fmt])  # a fresh cache per question
                    assert torch.equal(prefix.input_ids, prefixes[fmt].input_ids)
                    tokens, logits = answer(model, tok, ids, prefix, args.max_new_tokens)
                    if fmt == "float32":
                        ref_tokens, ref_logits = tokens, logits
                    text = tok.decode(tokens, skip_special_tokens=True)
                    records.append({"n_cubes": n_cubes, "set_seed": seed, "format": fmt, "question": q["question"],
                                    "answer": q["answer"], "output": text, "correct": q["answer"].lower() in text.lower(),
                                    "same_as_float32": tokens == ref_tokens, "kl_vs_float32": kl(ref_logits, logits)})
            print(f"{n_cubes} cube(s), set {seed}: " + ", ".join(
                f"{fmt} KL {statistics.mean(r['kl_vs_float32'] for r in records if r['set_seed'] == seed and r['format'] == fmt):.4f}"
                for fmt in FORMATS[1:]), flush=True)
    text = NOTES.read_text(encoding="utf-8")
    long_cube = mm.build_cube(text, name="team-notes")
    for fmt in QUANTIZED:
        carried.append({"memory": "team notes (real text)", "format": fmt, "tokens": long_cube.num_tokens,
                        **long_cube.quantize(fmt).quantization["error"]})
    return records, carried


def summarize(records: list[dict]) -> list[dict]:
    rows = []
    for n_cubes in sorted({r["n_cubes"] for r in records}):
        for fmt in FORMATS:
            rs = [r for r in records if r["n_cubes"] == n_cubes and r["format"] == fmt]
            rows.append({"n_cubes": n_cubes, "format": fmt, "n_questions": len(rs),
                         "mean_kl": statistics.mean(r["kl_vs_float32"] for r in rs),
                         "max_kl": max(r["kl_vs_float32"] for r in rs),
                         "same_answer_as_float32": statistics.mean(r["same_as_float32"] for r in rs),
                         "accuracy": statistics.mean(r["correct"] for r in rs)})
    return rows


def run_sizes(mm, args, workdir: Path) -> list[dict]:
    cube = mm.build_cube(text_of_tokens(mm.tokenizer, args.tokens), name="size")
    rows, bf16 = [], cube.to(dtype=torch.bfloat16).nbytes
    for fmt in FORMATS:
        c = cube.to(dtype=torch.bfloat16) if fmt == "bfloat16" else cube if fmt == "float32" else cube.quantize(fmt)
        path = Path(c.save(workdir / f"size-{fmt}.safetensors"))
        n = c.all_ids.shape[1]
        rows.append({"format": fmt, "tokens": n, "bytes_per_token": c.nbytes / n,
                     "file_bytes_per_token": path.stat().st_size / n, "x_bfloat16": c.nbytes / bf16,
                     "x_float32": c.nbytes / cube.nbytes})
    return rows


def run_ttft(model, tok, mm, args, workdir: Path) -> list[dict]:
    q = tok("\n\nQuestion: Where does Alice live, and what is her badge number? Answer:",
            add_special_tokens=False).input_ids
    rows = []
    for n_cubes in (1, 4):
        per = args.tokens // n_cubes
        full = [mm.build_cube(text_of_tokens(tok, per, seed=7 + i), name=f"t{i}") for i in range(n_cubes)]
        stored = {fmt: [c if fmt == "float32" else c.quantize(fmt) for c in full] for fmt in ("float32", *QUANTIZED)}
        paths = {fmt: [Path(c.save(workdir / f"ttft-{n_cubes}-{fmt}-{i}.safetensors")) for i, c in enumerate(cs)]
                 for fmt, cs in stored.items()}
        ids = torch.cat([mm.prompt_ids("", full)[:, :full[0].anchor_len + sum(c.num_tokens for c in full)],
                         torch.tensor([q])], dim=-1)
        resident = {}

        def first_token(cubes):
            prefix = kvmem.prefill(model, cubes, recompute="none")
            with torch.inference_mode():
                out = model(input_ids=ids[:, prefix.num_tokens:], use_cache=True, **{cache_kwarg(model): prefix.cache})
            return int(out.logits[0, -1].argmax())

        def evict(name):
            if name.startswith("disk_cold"):
                fmt = name.split(":")[1]
                for p in paths[fmt]:
                    drop_page_cache(p)
                resident[fmt] = [resident_bytes(p) for p in paths[fmt]]

        fns = {}
        for fmt in stored:
            fns[f"disk_cold:{fmt}"] = lambda fmt=fmt: first_token([kvmem.MemCube.load(p) for p in paths[fmt]])
            fns[f"memory:{fmt}"] = lambda fmt=fmt: first_token(stored[fmt])
        series = _common.round_robin(fns, args.reps, warmup=1, before=evict)
        for name, s in series.items():
            where, fmt = name.split(":")
            rows.append({"n_cubes": n_cubes, "tokens": args.tokens, "format": fmt, "tier": where,
                         "bytes_read": sum(p.stat().st_size for p in paths[fmt]) if where == "disk_cold" else 0,
                         "bytes_in_memory": sum(c.nbytes for c in stored[fmt]),
                         "resident_after_evict": resident.get(fmt) if where == "disk_cold" else None,
                         "first_token": s.first, **_common.spread(s.seconds, unit="ms")})
            print(f"TTFT {n_cubes} cube(s) {name}: {rows[-1]['median_ms']:.1f} ms", flush=True)
    return rows


def plot(doc: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(doc["models"])
    fig, axes = plt.subplots(len(models), 3, figsize=(15, 4.2 * len(models)), squeeze=False)
    for row, name in zip(axes, models):
        m = {"sizes": [], "quality": [], "ttft": [], **doc["models"][name]}  # a part not measured stays empty
        sizes = {r["format"]: r["bytes_per_token"] / 1e3 for r in m["sizes"]}
        row[0].bar(list(sizes), list(sizes.values()), color=["#777", "#999", "#3a7", "#37a"])
        row[0].set_ylabel("KB per token (KV in memory)")
        row[0].set_title(f"{name}: cube size")
        for i, (fmt, v) in enumerate(sizes.items()):
            row[0].text(i, v, f"{v:.1f}", ha="center", va="bottom")
        width = 0.35
        for j, n_cubes in enumerate((1, 4)):
            rs = [r for r in m["quality"] if r["n_cubes"] == n_cubes and r["format"] != "float32"]
            xs = [i + (j - 0.5) * width for i in range(len(rs))]
            row[1].bar(xs, [max(r["mean_kl"], 1e-7) for r in rs], width, label=f"{n_cubes} cube(s)")
            for x, r in zip(xs, rs):
                row[1].text(x, max(r["mean_kl"], 1e-7), f"{r['same_answer_as_float32']:.0%}", ha="center",
                            va="bottom", fontsize=8)
        row[1].set_xticks(range(3), ["bfloat16", "int8", "int4"])
        if m["quality"]:  # log scale needs data
            row[1].set_yscale("log")
        row[1].set_ylabel("mean next-token KL vs float32 (nats)")
        row[1].set_title("fact QA (labels: same greedy answer)")
        row[1].legend()
        for j, tier in enumerate(("disk_cold", "memory")):
            for k, n_cubes in enumerate((1, 4)):
                rs = [r for r in m["ttft"] if r["tier"] == tier and r["n_cubes"] == n_cubes]
                xs = [i + (2 * j + k - 1.5) * 0.2 for i in range(len(rs))]
                row[2].bar(xs, [r["median_ms"] for r in rs], 0.2, label=f"{tier}, {n_cubes} cube(s)")
        row[2].set_xticks(range(3), ["float32", "int8", "int4"])
        row[2].set_ylabel("TTFT median (ms)")
        row[2].set_title(f"TTFT, {m['ttft'][0]['tokens'] if m['ttft'] else '-'} memory tokens")
        row[2].legend(fontsize=7)
    facts = doc["machine"]
    shas = sorted({str(r["machine"].get("git_sha"))[:8] for r in doc.get("runs", [])} or {str(facts.get("git_sha"))[:8]})
    fig.suptitle(f"kvmem quantized cubes, CPU ({facts.get('cpu')}, torch {facts.get('torch')}, "
                 f"git {', '.join(shas)})")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "gemma3", "both"], default="both")
    ap.add_argument("--sets", type=int, default=3, help="cube sets per cube count")
    ap.add_argument("--questions", type=int, default=12, help="questions per set")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=2048, help="memory tokens for sizes and TTFT")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--redo-plot", default=None, help="redraw the PNG of a results JSON")
    ap.add_argument("--parts", default="sizes,quality,ttft", help="comma-separated: sizes, quality, ttft")
    ap.add_argument("--update", default=None, help="write the measured parts into this existing results JSON "
                    "(re-read when writing, so two runs of different models can share it)")
    args = ap.parse_args(argv)
    if args.redo_plot:
        plot(json.loads(Path(args.redo_plot).read_text()), args.redo_plot.replace(".json", ".png"))
        return 0
    if args.quick:
        args.sets, args.questions, args.tokens, args.reps = 1, 2, 256, 2
    parts = set(args.parts.split(","))
    if not parts <= {"sizes", "quality", "ttft"}:
        ap.error(f"--parts: unknown {sorted(parts - {'sizes', 'quality', 'ttft'})}")
    out = args.update or args.out or (None if args.quick else str(ROOT / "bench" / "results" / "quantized_cubes_cpu.json"))
    from kvmem.demo.models import load_gemma3, load_smollm2

    doc = {"models": {}}
    for name in (["smollm2", "gemma3"] if args.model == "both" else [args.model]):
        model, tok = (load_smollm2 if name == "smollm2" else load_gemma3)()
        facts = _common.machine_facts(model=model)
        mm = kvmem.wrap(model, tok)
        got = {}
        with tempfile.TemporaryDirectory(dir=ROOT / "bench" / "results") as tmp:
            if "sizes" in parts:
                got["sizes"] = run_sizes(mm, args, Path(tmp))
                print(json.dumps(got["sizes"], indent=1), flush=True)
            if "quality" in parts:
                records, got["carried_error"] = run_quality(model, tok, mm, args)
                got["quality"], got["records"] = summarize(records), records
                print(json.dumps(got["quality"], indent=1), flush=True)
            if "ttft" in parts:
                got["ttft"] = run_ttft(model, tok, mm, args, Path(tmp))
        facts["loadavg_end"] = _common.loadavg()
        run = {"model": name, "parts": sorted(parts), "args": {k: v for k, v in vars(args).items()
                                                                if k in ("sets", "questions", "tokens", "reps")},
               "machine": facts}
        if args.update:  # re-read now: another run may have written its model meanwhile
            doc = json.loads(Path(args.update).read_text())
            if "runs" not in doc:  # a file from before runs were recorded: its one run measured all it holds
                doc["runs"] = [{"model": m, "parts": sorted(set(v) & {"sizes", "quality", "ttft"}),
                                "machine": doc["machine"]} for m, v in doc["models"].items()]
            doc["runs"].append(run)
            doc["models"].setdefault(name, {}).update(got)
        else:
            doc["machine"] = facts
            doc["runs"] = doc.get("runs", []) + [run]
            doc["models"][name] = got
        if out:  # after each model: a long run keeps what it measured
            Path(out).write_text(json.dumps(doc, indent=1))
            plot(doc, out.replace(".json", ".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
