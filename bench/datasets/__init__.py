"""Generated conversations for the retrieval benchmark, in several independent styles.

Each style is its own generator with its own vocabulary and structure; every one is deterministic from a seed
(independent of PYTHONHASHSEED) and returns a `Dataset`: dated sessions of turns and questions labelled with the
turns that answer them. The benchmark (bench/retrieval.py) measures; these modules only make data.

    casual     two named friends chatting: pronouns, drift, photo captions, events told with "yesterday"
    team       a work channel of four to six colleagues: threads, hand-offs, incidents, decisions
    notes      one person's terse dated notes and logs: appointments, errands, contacts, numbers
    assistant  a user and a verbose assistant (the project's first generator): personal facts among advice

Question kinds: ``single`` (a paraphrase of one turn), ``when`` (when did X happen: the turn, whose session date
answers it), ``temporal`` (names a date, not the topic: only the session dates find the turn), ``multi`` (needs
two turns), ``update`` (a fact that changed: the later turn).
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass, field

_DAY = dt.timedelta(days=1)
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


@dataclass
class Turn:
    id: str        # "s07-t03": session 7, turn 3
    session: int
    turn: int
    speaker: str
    date: str      # ISO date of the session: a session header, never in the text
    text: str

    def meta(self) -> dict:
        return {"session": self.session, "turn": self.turn, "speaker": self.speaker, "date": self.date}


@dataclass
class Question:
    text: str
    answers: list  # turn ids; recall counts the share of them retrieved
    kind: str      # single / when / temporal / multi / update


@dataclass
class Dataset:
    style: str
    seed: int
    turns: list = field(default_factory=list)
    questions: list = field(default_factory=list)


def session_dates(rng: random.Random, n: int, *, start: dt.date, gap=(3, 14)) -> list[dt.date]:
    """``n`` increasing session dates from around ``start``, ``gap`` days apart (inclusive range)."""
    day = start + rng.randint(0, 20) * _DAY
    out = []
    for _ in range(n):
        out.append(day)
        day += rng.randint(*gap) * _DAY
    return out


def said_when(rng: random.Random, on: dt.date) -> tuple[str, tuple[dt.date, dt.date]]:
    """A relative time phrase for a past event and the span it means, said on ``on``."""
    kind = rng.choice(["yesterday", "days", "weekday", "weekend", "last week", "today"])
    if kind == "yesterday":
        return "yesterday", (on - _DAY, on - _DAY)
    if kind == "today":
        return rng.choice(["this morning", "today"]), (on, on)
    if kind == "days":
        n = rng.randint(2, 4)
        return f"{['two', 'three', 'four'][n - 2]} days ago", (on - n * _DAY, on - n * _DAY)
    if kind == "weekday":
        back = rng.randint(2, 6)
        day = on - back * _DAY
        return f"{rng.choice(['last', 'on'])} {WEEKDAYS[day.weekday()]}", (day, day)
    if kind == "weekend":
        saturday = on - ((on.weekday() - 5) % 7 or 7) * _DAY
        if saturday + _DAY >= on:
            saturday -= 7 * _DAY
        return "last weekend", (saturday, saturday + _DAY)
    monday = on - on.weekday() * _DAY - 7 * _DAY
    return "last week", (monday, monday + 6 * _DAY)


def write_date(rng: random.Random, day: dt.date) -> str:
    """``day`` as people write it in a question: "14 May 2023" or "May 14, 2023"."""
    if rng.random() < 0.5:
        return f"{day.day} {MONTHS[day.month - 1]} {day.year}"
    return f"{MONTHS[day.month - 1]} {day.day}, {day.year}"


def ask_about_span(rng: random.Random, span: tuple[dt.date, dt.date]) -> str:
    """How a question names the time of an event without naming the event: "on 14 May 2023", "the weekend
    before May 15, 2023", "in the week of 8 May 2023"."""
    a, b = span
    if a == b:
        return rng.choice([f"on {write_date(rng, a)}", f"the day before {write_date(rng, a + _DAY)}"])
    if (b - a).days == 1:
        return rng.choice([f"the weekend before {write_date(rng, b + 2 * _DAY)}", f"the weekend of "
                                                                                   f"{write_date(rng, a)}"])
    return rng.choice([f"in the week of {write_date(rng, a)}", f"the week before {write_date(rng, b + 2 * _DAY)}"])


def overlaps(x: tuple, y: tuple) -> bool:
    return x[0] <= y[1] and y[0] <= x[1]


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]
