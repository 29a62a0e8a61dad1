"""A child process for the install kill and lock tests: installs a bundle, and SIGKILLs itself or pauses at a point.

    python travel_kill.py BUNDLE LOCATION PUBKEY NAMESPACE POINTS [LOG]

POINTS, comma-separated:
    none             just install
    put:K            die right after the K-th cube blob is put (staging)
    commit:before    die just before the one catalog commit of the install
    commit:after     die just after it returns (before the replaced cubes are deleted)
    delete:K         die right after the K-th replaced cube is deleted (finishing)
    pause:S          sleep S seconds just before the commit (inside the namespace lock), logging
                     ``enter <pid> <time>`` / ``exit <pid> <time>`` lines to LOG (and ``start`` when it starts)
    ttl:S            a Redis lock expires S seconds after its last renewal (default 30)
    rowwise          commit the rows one at a time (the store before batches): the reader test's control
The hooks wrap the methods of this process's own store object; the process really dies by SIGKILL.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    bundle, location, pub, namespace, points = sys.argv[1:6]
    log = sys.argv[6] if len(sys.argv) > 6 else None
    if log:
        with open(log, "a") as f:
            f.write(f"start {os.getpid()} {time.time()}\n")
    import kvmem
    from kvmem.travel import TrustList, install_bundle, read_public_key

    points = dict(p.partition(":")[::2] for p in points.split(","))
    if "ttl" in points:
        import kvmem.store.redis_lock as redis_lock

        redis_lock.LOCK_TTL_S = float(points["ttl"])
    store = kvmem.CubeStore(location)
    catalog, blobs = store.catalog, store.blobs
    counts = {"put": 0, "delete": 0}

    def counted(obj, name):
        real = getattr(obj, name)

        def wrapped(*args, **kwargs):
            out = real(*args, **kwargs)
            counts[name] += 1
            if points.get(name) == str(counts[name]):
                die()
            return out

        setattr(obj, name, wrapped)

    counted(blobs, "put")
    counted(blobs, "delete")
    real_commit = catalog.upsert_many

    def commit(records):
        records = list(records)
        if points.get("commit") == "before":
            die()
        if "pause" in points:
            with open(log, "a") as f:
                f.write(f"enter {os.getpid()} {time.time()}\n")
            time.sleep(float(points["pause"]))
        if "rowwise" in points:
            out = []
            for rec in records:  # a pause per row, as a row's own fsync gives on a disk: a quiet machine and a
                out.append(catalog.upsert(rec))  # fast Redis otherwise commit 1,000 rows between two reads
                time.sleep(0.002)
            out = [b for b in out if b]
        else:
            out = real_commit(records)
        if "pause" in points:
            with open(log, "a") as f:
                f.write(f"exit {os.getpid()} {time.time()}\n")
        if points.get("commit") == "after":
            die()
        return out

    catalog.upsert_many = commit
    install_bundle(bundle, store, namespace, trust=TrustList([read_public_key(pub)]))


if __name__ == "__main__":
    main()
