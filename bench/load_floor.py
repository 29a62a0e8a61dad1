"""What a cold cube's bytes cost the CPU, standalone: the floor under `KvmemConnector`'s cold loads.

A vLLM replica serving a cube it has never seen reads the cube's KV from its file into the paged cache's blocks
(vLLM CPU: 4 KB pieces, one per head and block of 16 tokens, scattered over the cache) and checks it against its
xxh3 checksum, on a loader thread beside the forward pass (`kvmem.cubes.cubefile.PartFile.read_part_into`). On a
machine whose every core runs the forward pass, that CPU time is taken from the forward pass, whatever the
overlap: this bench measures it alone, for a file of a 4k-token SmolLM2 cube's size (189 MiB), with each way of
moving the bytes, in one process, round robin after a warm-up (medians; wall time and the process's CPU time):

    preadv, 4 KB pieces            the connector's read: ``preadv`` of 128 KiB of pieces at a time from the page
                                   cache, no checksum
    preadv + xxh3, 4 KB pieces     the connector's read as it runs: each 128 KiB hashed right after it is read
    preadv + xxh3, 2 threads       the same split over two threads, half the file each
    preadv, 2 threads              the read alone on two threads (no checksum): what two cores give the copy
    O_DIRECT preadv, 4 KB pieces   the disk's DMA instead of the kernel's copy (file offsets and pieces 4 KB
                                   aligned here; the cube format does not align them)
    O_DIRECT, 4 MiB contiguous     the same into one contiguous buffer, 4 MiB a read: what the disk alone costs
    mmap + copy, 4 KB pieces       the file mapped and copied piece by piece: no read() at all, but a file
                                   truncated while mapped kills the process (SIGBUS), so the connector does not
    xxh3 alone, 4 KB pieces        the checksum over bytes already in memory
    xxh3 alone, 2 threads          the same split over two threads (each 4 KB update takes Python's GIL)

The file is written once and read first so that the page cache holds it, as a cube just built or fetched is
(O_DIRECT bypasses that cache: it reads what the disk, here a virtual one, returns). Run:
``.venv/bin/python bench/load_floor.py`` (``--mib``, ``--reps``, ``--dir``; ``--quick``: 16 MiB, 2 reps).
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, loadavg, machine_facts, pyplot, save_figure, spread, write_results  # noqa: E402

PIECE = 4096  # one head's 16 tokens x 64 dims x float32: a vLLM CPU value block's piece
CHUNK = 128 << 10  # the connector's read size (kvmem.cubes.cubefile._CHUNK)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Target:
    """A page-aligned buffer standing in for a paged cache, and the file's 4 KB pieces scattered over it (piece i
    of the file goes to slot 3 i mod n: neighbours in the file are not neighbours in memory, as blocks are not)."""

    def __init__(self, size: int):
        self.size = size
        self.buf = mmap.mmap(-1, size)  # anonymous: page-aligned, as a large torch allocation is
        whole = memoryview(self.buf)
        n = size // PIECE
        step = 3 if n % 3 else 1
        self.pieces = [whole[(i * step % n) * PIECE:(i * step % n) * PIECE + PIECE] for i in range(n)]
        for i in range(0, size, PIECE):  # touched once: no first-touch page faults in the timed reads
            self.buf[i] = 0


def read_pieces(fd: int, pieces, offset: int = 0, *, hash_it: bool) -> None:
    import xxhash

    h = xxhash.xxh3_128()
    batch, size = [], 0
    for v in pieces:
        batch.append(v)
        size += PIECE
        if size >= CHUNK or len(batch) == 1024:
            if os.preadv(fd, batch, offset) != size:
                raise OSError(f"short read at {offset}")
            if hash_it:
                for b in batch:
                    h.update(b)
            offset, batch, size = offset + size, [], 0
    if batch:
        if os.preadv(fd, batch, offset) != size:
            raise OSError(f"short read at {offset}")
        if hash_it:
            for b in batch:
                h.update(b)


def methods(path: Path, target: Target) -> dict:
    import xxhash

    def opened(flags: int = 0):
        return os.open(path, os.O_RDONLY | flags)

    def buffered(hash_it: bool):
        def run():
            fd = opened()
            try:
                read_pieces(fd, target.pieces, hash_it=hash_it)
            finally:
                os.close(fd)
        return run

    def halves(fn):
        """``fn(pieces, offset)`` on two threads, each over half of the pieces (and of the file)."""
        half = len(target.pieces) // 2
        threads = [threading.Thread(target=fn, args=(part, at))
                   for part, at in ((target.pieces[:half], 0), (target.pieces[half:], half * PIECE))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def two_threads(hash_it: bool):
        def run():
            fd = opened()
            try:
                halves(lambda part, at: read_pieces(fd, part, at, hash_it=hash_it))
            finally:
                os.close(fd)
        return run

    def direct_pieces():
        fd = opened(os.O_DIRECT)
        try:
            read_pieces(fd, target.pieces, hash_it=False)
        finally:
            os.close(fd)

    def direct_contiguous():
        fd = opened(os.O_DIRECT)
        whole = memoryview(target.buf)
        try:
            for at in range(0, target.size, 4 << 20):
                os.preadv(fd, [whole[at:at + (4 << 20)]], at)
        finally:
            os.close(fd)

    def mapped():
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            with memoryview(m) as src:
                for i, v in enumerate(target.pieces):
                    v[:] = src[i * PIECE:(i + 1) * PIECE]

    def hash_alone(pieces=None, at=0):
        h = xxhash.xxh3_128()
        for v in target.pieces if pieces is None else pieces:
            h.update(v)

    out = {"preadv, 4 KB pieces": buffered(False), "preadv + xxh3, 4 KB pieces": buffered(True),
           "preadv + xxh3, 2 threads": two_threads(True), "preadv, 2 threads": two_threads(False),
           "mmap + copy, 4 KB pieces": mapped, "xxh3 alone, 4 KB pieces": hash_alone,
           "xxh3 alone, 2 threads": lambda: halves(hash_alone)}
    try:
        os.close(opened(os.O_DIRECT))
        direct_pieces()  # a file system without O_DIRECT (tmpfs) refuses here
        out["O_DIRECT preadv, 4 KB pieces"] = direct_pieces
        out["O_DIRECT, 4 MiB contiguous"] = direct_contiguous
    except OSError as exc:
        print(f"O_DIRECT rows left out: {path.parent} does not take O_DIRECT reads ({exc})", file=sys.stderr)
    return out


def plot(doc: dict, png: str) -> None:
    plt = pyplot()
    rows = doc["rows"]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [r["median_ms"] for r in rows], height=0.4, label="wall")
    ax.barh([i - 0.2 for i in y], [r["cpu_median_ms"] for r in rows], height=0.4, label="CPU (the process's)")
    for i, r in enumerate(rows):
        ax.text(r["median_ms"], i + 0.2, f" {r['median_ms']:.0f}", va="center", fontsize=7)
        ax.text(r["cpu_median_ms"], i - 0.2, f" {r['cpu_median_ms']:.0f}", va="center", fontsize=7)
    ax.set_yticks(list(y), [r["method"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms (median)")
    ax.set_title(f"{doc['mib']} MiB of cube bytes into 4 KB pieces: wall and CPU time, standalone", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, png, doc["machine"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=189, help="file size in MiB (default: a 4k SmolLM2 cube's KV)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dir", default=None, help="where the file is written (default: the system's temp folder)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 MiB, 2 reps; writes nothing unless --out")
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/load_floor_cpu.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.mib, args.reps, args.warmup = 16, 2, 1
    size = args.mib << 20
    work = Path(tempfile.mkdtemp(prefix="kvmem-load-floor-", dir=args.dir))
    try:
        path = work / "cube.bin"
        with open(path, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        os.sync()
        target = Target(size)
        with open(path, "rb") as f:  # into the page cache
            while f.read(8 << 20):
                pass
        fns = methods(path, target)
        wall = {k: [] for k in fns}
        cpu = {k: [] for k in fns}
        for rep in range(args.warmup + args.reps):
            for name, fn in fns.items():
                t0, c0 = time.perf_counter(), cpu_seconds()
                fn()
                if rep >= args.warmup:
                    wall[name].append(time.perf_counter() - t0)
                    cpu[name].append(cpu_seconds() - c0)
        rows = [{"method": k, "bytes": size, **spread(wall[k], unit="ms"), **spread(cpu[k], unit="ms", prefix="cpu_")}
                for k in fns]
        for r in rows:
            print(f"{r['method']:32s} wall {r['median_ms']:7.1f} ms   CPU {r['cpu_median_ms']:7.1f} ms")
        import xxhash

        facts = machine_facts(packages=("numpy", "kvmem"))
        facts["xxhash"] = xxhash.VERSION
        facts["loadavg_end"] = loadavg()
        facts["file_system"] = _file_system(work)
        doc = {"bench": "load_floor", "machine": facts, "mib": args.mib, "rows": rows, "how": __doc__.split("\n\n")[1]}
        if args.quick and args.out is None:
            return
        write_results(doc, args.out or RESULTS / "load_floor_cpu.json", plot)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _file_system(folder: Path) -> str | None:
    """The file system type of ``folder`` (from /proc/mounts: the longest mount point above it)."""
    try:
        mounts = [line.split()[:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    best = max((m for m in mounts if str(folder.resolve()).startswith(m[1])), key=lambda m: len(m[1]), default=None)
    return None if best is None else f"{best[2]} ({best[0]} on {best[1]})"


if __name__ == "__main__":
    main()
