"""Bundle verification speed: `kvmem verify` (every byte of a signed bundle checked) vs what a user would otherwise
run on a downloaded file (sha256 of the whole file, `sha256sum`), and the floor (reading the file).

A real bundle: a store namespace of 100 memories whose MemCubes (a tiny llama, float32, 2,000 tokens each) add up to
~100 MB, packed and signed by `kvmem.travel.pack_namespace`. One process, medians after warm-up with p10..p90; the
methods run interleaved, round robin. Page cache warm (the file was just read) and cold (evicted with
posix_fadvise(DONTNEED) before every call; a VM's disk cache below may still help).

    .venv/bin/python bench/bundle_verify.py            # ~1 min
    .venv/bin/python bench/bundle_verify.py --quick    # smoke run, 5 MB; writes nothing unless --out
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _common  # noqa: E402

STYLE = {"kvmem_verify": ("kvmem verify (every byte + signature)", "#1f77b4"),
         "sha256_file": ("sha256 of the whole file (sha256sum)", "#7f7f7f"),
         "read_file": ("read the file (floor)", "#2ca02c")}


def build(folder: Path, *, memories: int, tokens: int) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import kvmem
    from kvmem.travel import generate_key, pack_namespace

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=49152,
                                  max_position_embeddings=4096)
    model = AutoModelForCausalLM.from_config(config).eval()
    store = kvmem.CubeStore(folder / "store")
    view = store.view("notes")
    for i in range(memories):
        ids = torch.randint(100, 49152, (tokens,), generator=torch.Generator().manual_seed(i))
        view.put_cube(f"m{i:03d}", kvmem.MemCube.from_ids(model, ids), text=f"memory {i}")
    key = generate_key(folder / "bench.key", name="bench")
    return pack_namespace(store, "notes", folder / "notes.kvmem", key=key, sequence=1).path


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run(args) -> dict:
    from kvmem.travel import verify_bundle

    folder = Path(tempfile.mkdtemp(prefix="kvmem-bench-"))
    path = build(folder, memories=args.memories, tokens=args.tokens)
    size = path.stat().st_size

    def sha256_file():
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    def read_file():
        with open(path, "rb") as f:
            while f.read(4 << 20):
                pass

    fns = {"kvmem_verify": lambda: verify_bundle(path), "sha256_file": sha256_file, "read_file": read_file}
    facts = _common.machine_facts(packages=("torch", "kvmem", "cryptography"), bundle_bytes=size,
                                  units=2 * args.memories)
    rows = []
    for cache in ("warm", "cold"):
        before = (lambda name: _evict(path)) if cache == "cold" else None
        series = _common.round_robin(fns, args.reps, warmup=1, before=before)
        for name, s in series.items():
            row = {"method": name, "cache": cache, "bytes": size, **_common.spread(s.seconds)}
            row["mb_per_s"] = size / 1e6 / row["median_s"]
            rows.append(row)
            print(f"{cache:>5} {name:<14} median {row['median_s'] * 1e3:7.1f} ms  p10..p90 "
                  f"{row['p10_s'] * 1e3:.1f}..{row['p90_s'] * 1e3:.1f} ms  {row['mb_per_s']:.0f} MB/s", flush=True)
    facts["loadavg_end"] = _common.loadavg()
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    return {"machine": facts, "rows": rows, "target": {"kvmem_verify_100MB_s": 1.0}}


def plot(doc: dict, png: str) -> None:
    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    rows = doc["rows"]
    caches = ["warm", "cold"]
    width = 0.25
    for j, (name, (label, color)) in enumerate(STYLE.items()):
        med = [next(r["median_s"] for r in rows if r["method"] == name and r["cache"] == c) for c in caches]
        lo = [m - next(r["p10_s"] for r in rows if r["method"] == name and r["cache"] == c) for m, c in zip(med, caches)]
        hi = [next(r["p90_s"] for r in rows if r["method"] == name and r["cache"] == c) - m for m, c in zip(med, caches)]
        ax.bar([i + (j - 1) * width for i in range(len(caches))], med, width, yerr=[lo, hi], label=label, color=color)
    ax.axhline(doc["target"]["kvmem_verify_100MB_s"], color="#d62728", ls="--", lw=1, label="target: 1 s")
    ax.set_xticks(range(len(caches)), [f"page cache {c}" for c in caches])
    ax.set_ylabel("seconds (median, p10..p90)")
    ax.set_title(f"Verifying a {rows[0]['bytes'] / 1e6:.0f} MB signed bundle ({doc['machine']['cpu']})", fontsize=9)
    ax.legend(fontsize=7)
    _common.save_figure(fig, png, doc["machine"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 MB, 3 repeats; writes nothing unless --out")
    parser.add_argument("--out", help="JSON to write (default bench/results/bundle_verify_cpu.json)")
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args(argv)
    args.memories, args.tokens = (5, 2000) if args.quick else (100, 2000)
    if args.quick:
        args.reps = 3
    doc = run(args)
    out = args.out or (None if args.quick else _common.result_path("bundle_verify"))
    if out:
        _common.write_results(doc, out, plot)


if __name__ == "__main__":
    main()
