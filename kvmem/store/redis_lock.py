"""A lock several processes and machines share through a Redis store: ``P:lock:<name>`` holds a random token,
set only if absent (SET NX PX) with an expiry its holder renews every third of it from a thread, and deleted
only by the holder's own token (a Lua compare-and-delete). A holder that dies stops renewing, so its lock is gone
`LOCK_TTL_S` later: a dead installer never blocks the next one for long. A holder paused longer than that loses the
lock (the expiry is what makes a dead holder harmless); kvmem's batch commits stay atomic either way."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid

from ..errors import CubeError

LOCK_TTL_S = 30.0   # a dead holder's lock is gone this long after its last renewal


class RedisLock:
    """The lock `RedisCatalog.lock` returns (SET NX PX with a token; renewed by a thread; deleted by token)."""

    _RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
    _DROP = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"

    def __init__(self, db, name: str, *, wait: float):
        self.db, self.name, self.wait = db, name, wait
        self.key = db.key("lock", name)
        self.token = f"{uuid.uuid4().hex} pid {os.getpid()} on {socket.gethostname()}"
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        ttl = int(LOCK_TTL_S * 1000)
        deadline = time.monotonic() + self.wait
        with self.db.errors():
            while not self.db.client.set(self.key, self.token, nx=True, px=ttl):
                if time.monotonic() >= deadline:
                    holder = (self.db.client.get(self.key) or b"").decode(errors="replace").partition(" ")[2]
                    raise CubeError(f"{self.name!r} is locked by {holder or 'another process'} (an install into it "
                                    f"is running): waited {self.wait:.0f} s; retry when it is done (a dead "
                                    f"holder's lock expires within {LOCK_TTL_S:.0f} s)")
                time.sleep(0.05)
        self._thread = threading.Thread(target=self._renew, args=(ttl,), daemon=True)
        self._thread.start()
        return self

    def _renew(self, ttl: int) -> None:
        renew = self.db.client.register_script(self._RENEW)
        while not self._stop.wait(LOCK_TTL_S / 3):
            try:
                renew(keys=[self.key], args=[self.token, ttl])
            except Exception:  # noqa: BLE001  (Redis away for a moment: try again; the expiry is the safety net)
                pass

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        with self.db.errors():
            self.db.client.register_script(self._DROP)(keys=[self.key], args=[self.token])
