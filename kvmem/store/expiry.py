"""When a memory expires: ``meta["expires"]`` (epoch seconds, UTC), set from a ``ttl`` or an ``expires`` at add time.

A memory may be given a lifetime when it is written (``view.add(..., ttl=3600)`` or ``expires="2027-01-01T00:00"``,
or the same keys in its meta). The store keeps one normalised form, ``meta["expires"]`` as epoch seconds, so every
reader compares numbers and a ``ttl`` means "from when it was written", not "from when it is read". An expired memory
is invisible to reads (get, ls, load_cube, search, recall) at once and removed, with what derives from it, by `gc`
(docs/forgetting.md). ISO datetimes without a time zone are read as UTC.
"""

from __future__ import annotations

import datetime
import math
import time

from ..errors import CubeError

EXPIRES_KEY = "expires"
TTL_KEY = "ttl"


def now() -> float:
    """The clock expiry is judged by (epoch seconds); one function so a test can stand still in time."""
    return time.time()


def _seconds(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CubeError(f"{what} must be a finite number of seconds, got {value!r:.40}")
    return float(value)


def parse_expires(value) -> float:
    """``value`` (epoch seconds, or an ISO datetime string such as ``"2027-01-01T12:00"``, UTC unless it names a
    zone) as epoch seconds; CubeError saying the accepted forms otherwise."""
    if isinstance(value, str):
        try:
            when = datetime.datetime.fromisoformat(value.strip())
        except ValueError:
            raise CubeError(f"meta[{EXPIRES_KEY!r}] must be epoch seconds or an ISO datetime like "
                            f"'2027-01-01T12:00' (UTC unless it names a zone), got {value!r:.40}") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        return when.timestamp()
    return _seconds(value, f"meta[{EXPIRES_KEY!r}]")


def check_expiry(meta: dict) -> None:
    """CubeError unless ``meta``'s ``ttl`` (seconds > 0) and ``expires`` (epoch or ISO datetime) are well formed
    and not both given (`check_meta` calls it)."""
    ttl, expires = meta.get(TTL_KEY), meta.get(EXPIRES_KEY)
    if ttl is not None:
        if _seconds(ttl, f"meta[{TTL_KEY!r}]") <= 0:
            raise CubeError(f"meta[{TTL_KEY!r}] must be > 0 seconds (the memory's lifetime from when it is written), "
                            f"got {ttl!r}")
        if expires is not None:
            raise CubeError(f"give a memory either {TTL_KEY!r} (seconds from now) or {EXPIRES_KEY!r} (when), not both")
    if expires is not None:
        parse_expires(expires)


def with_expiry(meta: dict, *, ttl=None, expires=None, when: float | None = None) -> dict:
    """``meta`` (already checked) with its lifetime in the stored form: ``expires`` as epoch seconds, ``ttl``
    (from ``meta`` or the keyword) turned into ``when + ttl``. The keywords win over the meta keys."""
    meta = dict(meta)
    if ttl is not None or expires is not None:
        meta.pop(TTL_KEY, None), meta.pop(EXPIRES_KEY, None)
        meta.update({k: v for k, v in ((TTL_KEY, ttl), (EXPIRES_KEY, expires)) if v is not None})
        check_expiry(meta)
    if TTL_KEY in meta:
        meta[EXPIRES_KEY] = (now() if when is None else when) + float(meta.pop(TTL_KEY))
    elif meta.get(EXPIRES_KEY) is not None:
        meta[EXPIRES_KEY] = parse_expires(meta[EXPIRES_KEY])
    return meta


def expires_at(meta: dict | None) -> float | None:
    """When a memory with ``meta`` expires (epoch seconds), or None. A value that cannot be read counts as expired
    (0.0): a damaged lifetime must not make a memory live for ever."""
    value = (meta or {}).get(EXPIRES_KEY)
    if value is None:
        return None
    try:
        return parse_expires(value)
    except CubeError:
        return 0.0


def is_expired(meta: dict | None, at: float | None = None) -> bool:
    """Whether a memory with ``meta`` has expired at ``at`` (default: now)."""
    when = expires_at(meta)
    return when is not None and when <= (now() if at is None else at)
