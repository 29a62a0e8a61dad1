"""A lock several processes of one machine (or of a shared file system with working locks) share through a store
folder: an exclusive `flock` on ``<root>/locks/<name>.lock``."""

from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import CubeError


@contextmanager
def hold_file_lock(folder: Path, name: str, *, wait: float):
    """Hold an exclusive `flock` on ``folder/<name>.lock`` (every holder, even two threads of one process, waits
    for the other). The kernel drops it when the holder's process dies, so it is never stale. The file says who
    holds it, for the message a waiter gets after ``wait`` seconds."""
    try:
        folder.mkdir(exist_ok=True)
        fd = os.open(folder / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise CubeError(f"cannot create the lock {folder / name}.lock ({exc.strerror}): writes need write access to "
                        "the store folder") from None
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    raise CubeError(f"{name!r} is locked by {holder} (an install into it is running): waited "
                                    f"{wait:.0f} s; retry when it is done") from None
                time.sleep(0.02)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
