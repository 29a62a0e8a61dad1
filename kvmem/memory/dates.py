"""What the memory index reads in texts besides words: dates.

A chat turn rarely carries a date: "I went to the support group yesterday" was said in a session whose date only
the session header knows. `event_spans` resolves such expressions against the session date (``meta["date"]``);
`query_spans` finds the dates a question asks about ("the weekend before 15 May 2023", "in June 2023"). A span
is an inclusive pair of `datetime.date`. `date_match` says how well a memory's spans meet a query's.
"""

from __future__ import annotations

import datetime as dt
import re

from ..errors import CubeError

Span = tuple[dt.date, dt.date]
_DAY = dt.timedelta(days=1)

MONTHS = {m: i + 1 for i, m in enumerate(["january", "february", "march", "april", "may", "june", "july", "august",
                                           "september", "october", "november", "december"])}
MONTHS.update({m[:3]: i for m, i in list(MONTHS.items())} | {"sept": 9})
WEEKDAYS = {d: i for i, d in enumerate(["monday", "tuesday", "wednesday", "thursday", "friday", "saturday",
                                         "sunday"])}
NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
           "a couple of": 2, "a few": 3, "couple of": 2, "few": 3}

_MON = r"(jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|" \
       r"oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?"
_ORD = r"(\d{1,2})(?:st|nd|rd|th)?"
_YEAR = r"((?:19|20)\d\d)"
_NUM = r"(\d+|a couple of|a few|an?|one|two|three|four|five|six|seven)"
_WD = r"(monday|tuesday|wednesday|thursday|friday|saturday|sunday)"

# absolute dates, most specific first; each match is consumed so "13 May 2023" is not also "May 2023"
_ABSOLUTE = [
    ("iso", re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")),
    ("dmy", re.compile(rf"\b{_ORD}(?:\s+of)?\s+{_MON}(?:,?\s+{_YEAR})?\b", re.I)),
    ("mdy", re.compile(rf"\b{_MON}\s+{_ORD}\b(?:,?\s+{_YEAR})?", re.I)),
    ("my", re.compile(rf"\b{_MON}(?:\s+of)?\s+{_YEAR}\b", re.I)),
]
# what a question says around a date: "the week before 15 May 2023" (applied to the date that follows)
_MODIFIER = re.compile(r"\b(?:the\s+)?(day|night|weekend|week|month)\s+(before|after|of|prior to|following)\s*$"
                       r"|\b(before|after|around|by|since|until)\s*$", re.I)

# relative expressions in a turn, resolved against the date it was said on
_RELATIVE = [
    (re.compile(r"\b(today|tonight|this morning|this afternoon|this evening|earlier today)\b", re.I),
     lambda d, m: (d, d)),
    (re.compile(r"\bthe day before yesterday\b", re.I), lambda d, m: (d - 2 * _DAY, d - 2 * _DAY)),
    (re.compile(r"\b(yesterday|last night)\b", re.I), lambda d, m: (d - _DAY, d - _DAY)),
    (re.compile(r"\btomorrow\b", re.I), lambda d, m: (d + _DAY, d + _DAY)),
    (re.compile(rf"\b{_NUM}\s+days?\s+ago\b", re.I), lambda d, m: _back(d, _count(m[1]), 0)),
    (re.compile(rf"\b{_NUM}\s+weeks?\s+ago\b", re.I), lambda d, m: _back(d, 7 * _count(m[1]), 3)),
    (re.compile(rf"\b{_NUM}\s+months?\s+ago\b", re.I), lambda d, m: _back(d, 30 * _count(m[1]), 15)),
    (re.compile(r"\b(last|this past)\s+weekend\b", re.I), lambda d, m: _weekend_before(d)),
    (re.compile(r"\b(this|next)\s+weekend\b", re.I), lambda d, m: _weekend_after(d)),
    (re.compile(r"\blast\s+week\b", re.I), lambda d, m: _week_of(d - 7 * _DAY)),
    (re.compile(r"\bthis\s+week\b", re.I), lambda d, m: (_week_of(d)[0], d)),
    (re.compile(r"\bnext\s+week\b", re.I), lambda d, m: _week_of(d + 7 * _DAY)),
    (re.compile(r"\blast\s+month\b", re.I), lambda d, m: _month_of((d.replace(day=1) - _DAY))),
    (re.compile(r"\bnext\s+month\b", re.I), lambda d, m: _month_of(d.replace(day=28) + 4 * _DAY)),
    (re.compile(rf"\bnext\s+{_WD}\b", re.I), lambda d, m: _weekday_after(d, WEEKDAYS[m[1].lower()])),
    (re.compile(rf"\b(?:last|on|this past)\s+{_WD}\b", re.I), lambda d, m: _weekday_before(d, WEEKDAYS[m[1].lower()])),
]


def parse_date(value) -> dt.date:
    """A memory's ``meta["date"]`` as a date: an ISO string ("2023-05-08", a time after it is ignored), a
    `datetime.date` or `datetime.datetime`."""
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value.strip()[:10])
        except ValueError:
            pass
    raise CubeError(f"meta['date'] must be an ISO date like '2023-05-08' (or a datetime.date), got {value!r}; "
                    "pass the date of the session the memory was said in")


def event_spans(text: str, on: dt.date | None) -> list[Span]:
    """The dates ``text`` speaks of: relative ones ("yesterday", "last weekend") resolved against ``on`` (the
    date it was said; skipped without one) and absolute ones (a year-less date takes ``on``'s year)."""
    spans = []
    if on is not None:
        for pattern, resolve in _RELATIVE:
            spans += [resolve(on, m) for m in pattern.finditer(text)]
    spans += [s for s, _, _ in _absolute(text, years=[on.year] if on else [])]
    return spans


def query_spans(query: str, *, years=()) -> list[Span]:
    """The dates a question asks about, with what it says around them ("the week before 15 May 2023" -> 8-14
    May). A date without a year is tried in each of ``years`` (the years the index's memories are from)."""
    out = []
    for span, start, _ in _absolute(query, years=sorted(years)):
        out.append(_modified(span, query[:start]))
    return out


def strip_dates(text: str) -> str:
    """``text`` without the absolute dates in it (and the words around them that `query_spans` reads)."""
    for _, pattern in _ABSOLUTE:
        text = pattern.sub(" ", text)
    return re.sub(r"\s+", " ", text).strip()


def date_match(memory: list[Span], said_on: dt.date | None, query: list[Span]) -> float:
    """1 when an event the memory speaks of falls in a span the query asks about, 0.5 when the memory was said
    in one (its session date), else 0."""
    if not query:
        return 0.0
    if any(a <= qb and qa <= b for a, b in memory for qa, qb in query):
        return 1.0
    if said_on is not None and any(qa <= said_on <= qb for qa, qb in query):
        return 0.5
    return 0.0


# ---------------------------------------------------------------- helpers
def _count(word: str) -> int:
    word = word.lower()
    return int(word) if word.isdigit() else NUMBERS[word]


def _back(d: dt.date, days: int, slack: int) -> Span:
    return d - (days + slack) * _DAY, d - max(days - slack, 0) * _DAY


def _week_of(d: dt.date) -> Span:
    monday = d - d.weekday() * _DAY
    return monday, monday + 6 * _DAY


def _month_of(d: dt.date) -> Span:
    first = d.replace(day=1)
    nxt = (first + 32 * _DAY).replace(day=1)
    return first, nxt - _DAY


def _weekend_before(d: dt.date) -> Span:
    saturday = d - ((d.weekday() - 5) % 7 or 7) * _DAY
    if saturday + _DAY >= d:  # said on a Sunday: "last weekend" is the one before
        saturday -= 7 * _DAY
    return saturday, saturday + _DAY


def _weekend_after(d: dt.date) -> Span:
    saturday = d + ((5 - d.weekday()) % 7) * _DAY
    return saturday, saturday + _DAY


def _weekday_before(d: dt.date, weekday: int) -> Span:
    day = d - ((d.weekday() - weekday) % 7 or 7) * _DAY
    return day, day


def _weekday_after(d: dt.date, weekday: int) -> Span:
    day = d + ((weekday - d.weekday()) % 7 or 7) * _DAY
    return day, day


def _absolute(text: str, *, years) -> list[tuple[Span, int, int]]:
    """(span, start, end) of each absolute date in ``text``; year-less ones once per year in ``years``."""
    found, taken = [], []
    for kind, pattern in _ABSOLUTE:
        for m in pattern.finditer(text):
            if any(a < m.end() and m.start() < b for a, b in taken):
                continue
            taken.append((m.start(), m.end()))
            for span in _resolve(kind, m, years):
                found.append((span, m.start(), m.end()))
    return found


def _resolve(kind: str, m: re.Match, years) -> list[Span]:
    try:
        if kind == "iso":
            day = dt.date(int(m[1]), int(m[2]), int(m[3]))
            return [(day, day)]
        if kind == "my":
            return [_month_of(dt.date(int(m[2]), MONTHS[m[1].lower().rstrip(".")], 1))]
        day_s, month_s, year_s = (m[1], m[2], m[3]) if kind == "dmy" else (m[2], m[1], m[3])
        month = MONTHS[month_s.lower().rstrip(".")]
        out = []
        for year in ([int(year_s)] if year_s else years):
            day = dt.date(year, month, int(day_s))
            out.append((day, day))
        return out
    except (ValueError, KeyError):  # "31 February", "May 45": not a date
        return []


def _modified(span: Span, before: str) -> Span:
    m = _MODIFIER.search(before)
    if m is None:
        return span
    unit, direction = (m[1] or "").lower(), (m[2] or m[3]).lower()
    a, b = span
    if direction in ("of", "around") and unit in ("", "day", "night"):
        return (a - 3 * _DAY, b + 3 * _DAY) if direction == "around" else span
    if direction == "of":
        return {"week": _week_of(a), "weekend": _weekend_after(a - 6 * _DAY) if a.weekday() >= 5 else
                _weekend_after(a), "month": _month_of(a)}.get(unit, span)
    if direction in ("before", "prior to", "by", "until"):
        if unit in ("day", "night"):
            return a - _DAY, a - _DAY
        if unit == "weekend":
            return _weekend_before(a)
        days = {"week": 7, "month": 30}.get(unit, 14 if direction == "before" else 30)
        return a - days * _DAY, a - _DAY
    # after, following, since
    if unit in ("day", "night"):
        return b + _DAY, b + _DAY
    if unit == "weekend":
        return _weekend_after(b + _DAY)
    days = {"week": 7, "month": 30}.get(unit, 14 if direction == "after" else 30)
    return b + _DAY, b + days * _DAY
