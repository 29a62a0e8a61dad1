"""Bundle install speed: `install_bundle` of a signed 1,000-memory bundle (every byte verified, every unit validated,
then one store batch: one catalog commit) vs what a user would otherwise do, writing the same memories one at a time
through `StoreView.add` / `put_cube` (one catalog transaction each, as installs did before store batches).

The bundle: 1,000 plaintext memories, 20 of them with a MemCube of a tiny llama (float32), packed and signed by
`kvmem.travel.pack_namespace`. Every call writes into a fresh store folder on the given disk (default: the system's
temporary folder; SQLite fsyncs each transaction there). One process, medians after one warm-up with p10..p90; the
methods run interleaved, round robin.

    .venv/bin/python bench/bundle_install.py            # a few minutes (the one-by-one baseline is slow)
    .venv/bin/python bench/bundle_install.py --quick    # smoke run, 100 memories; writes nothing unless --out
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _common  # noqa: E402

STYLE = {"kvmem_install": ("kvmem install (verify + one batch commit)", "#1f77b4"),
         "one_by_one": ("the same writes, one memory at a time", "#7f7f7f")}


def build(folder: Path, *, memories: int, cubes: int):
    """(bundle path, the memories as [(id, text, meta, cube or None)], the trust list)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import kvmem
    from kvmem.store.batch import Batch
    from kvmem.travel import TrustList, generate_key, pack_namespace

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=49152,
                                  max_position_embeddings=4096)
    model = AutoModelForCausalLM.from_config(config).eval()
    store = kvmem.CubeStore(folder / "src")
    batch, every = Batch(store), memories // cubes
    items = []
    for i in range(memories):
        text = f"memory {i}: " + "lorem ipsum " * (i % 7)
        meta = {"turn": i}
        cube = None
        if i % every == 0:
            ids = torch.randint(100, 49152, (64,), generator=torch.Generator().manual_seed(i))
            cube = kvmem.MemCube.from_ids(model, ids, text=text)
            batch.put_cube("notes", f"m{i:04d}", cube, text=text, meta=meta)
        else:
            batch.add("notes", f"m{i:04d}", text, meta)
        items.append((f"m{i:04d}", text, meta, cube))
    batch.commit()
    key = generate_key(folder / "bench.key", name="bench")
    path = pack_namespace(store, "notes", folder / "notes.kvmem", key=key, sequence=1).path
    return path, items, TrustList([key.public])


def run(args) -> dict:
    import kvmem
    from kvmem.travel import install_bundle

    folder = Path(tempfile.mkdtemp(prefix="kvmem-bench-", dir=args.dir))
    path, items, trust = build(folder, memories=args.memories, cubes=args.cubes)

    def fresh() -> Path:
        return folder / f"dst-{uuid.uuid4().hex[:8]}"

    def kvmem_install():
        install_bundle(path, fresh(), "notes", trust=trust)

    def one_by_one():
        view = kvmem.CubeStore(fresh()).view("notes")
        for memory_id, text, meta, cube in items:
            if cube is not None:
                view.put_cube(memory_id, cube, text=text, meta=meta)
            else:
                view.add(memory_id, text, meta)

    def clean(name):  # untimed: drop the stores earlier calls wrote
        for old in folder.glob("dst-*"):
            shutil.rmtree(old, ignore_errors=True)

    fns = {"kvmem_install": kvmem_install, "one_by_one": one_by_one}
    facts = _common.machine_facts(packages=("torch", "kvmem", "cryptography"), memories=args.memories,
                                  cubes=args.cubes, bundle_bytes=path.stat().st_size, store_folder=str(folder),
                                  filesystem=_filesystem(folder))
    series = _common.round_robin(fns, {"kvmem_install": args.reps, "one_by_one": args.base_reps}, warmup=1,
                                 before=clean)
    rows = []
    for name, s in series.items():
        row = {"method": name, "memories": args.memories, **_common.spread(s.seconds)}
        rows.append(row)
        print(f"{name:<14} median {row['median_s']:8.3f} s  p10..p90 {row['p10_s']:.3f}..{row['p90_s']:.3f} s",
              flush=True)
    rows[0]["speedup_vs_one_by_one"] = rows[1]["median_s"] / rows[0]["median_s"]
    facts["loadavg_end"] = _common.loadavg()
    shutil.rmtree(folder, ignore_errors=True)
    return {"machine": facts, "rows": rows}


def _filesystem(folder: Path) -> str | None:
    """The file system type of ``folder`` (tmpfs makes fsync free; a VM disk does not)."""
    best, kind = "", None
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fs, *_ = line.split()
            if str(folder.resolve()).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fs
    except OSError:
        return None
    return kind


def plot(doc: dict, png: str) -> None:
    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    rows = doc["rows"]
    for i, row in enumerate(rows):
        color = STYLE[row["method"]][1]
        ax.barh(i, row["median_s"], xerr=[[row["median_s"] - row["p10_s"]], [row["p90_s"] - row["median_s"]]],
                color=color)
        ax.text(row["median_s"], i, f"  {row['median_s']:.2f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [STYLE[r["method"]][0] for r in rows], fontsize=8)
    ax.set_xlabel("seconds (median, p10..p90)")
    m = doc["machine"]
    ax.set_title(f"Installing {m['memories']:,} memories ({m['cubes']} with cubes) into a new store on "
                 f"{m.get('filesystem')} ({m['cpu']}, load {m['loadavg_start'][0] if m['loadavg_start'] else '?'})",
                 fontsize=8)
    _common.save_figure(fig, png, m)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 memories, 2 repeats; writes nothing unless --out")
    parser.add_argument("--out", help="JSON to write (default bench/results/bundle_install_cpu.json)")
    parser.add_argument("--dir", default=os.environ.get("TMPDIR"), help="folder for the stores (default: $TMPDIR "
                                                                         "or the system's temporary folder)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--base-reps", type=int, default=3, help="repeats of the (slow) one-by-one baseline")
    args = parser.parse_args(argv)
    args.memories, args.cubes = (100, 5) if args.quick else (1000, 20)
    if args.quick:
        args.reps = args.base_reps = 2
    doc = run(args)
    out = args.out or (None if args.quick else _common.result_path("bundle_install"))
    if out:
        _common.write_results(doc, out, plot)


if __name__ == "__main__":
    main()
