"""Style "assistant": a user and an assistant over 60 dated sessions (~700 turns); the project's first generator.

Personal facts (dog, city, sister's wedding, job, ...) are stated once by the user, often in passing, among
requests, chit-chat and look-alike remarks about other people; four change later ("update" questions ask for
the new value). ``verbose=True``: the assistant goes on with 3-8 sentences of generic advice and the user adds
asides (~50 words a turn), as verbose assistant logs do. Session dates are in the meta only.
"""

from __future__ import annotations

import datetime as dt
import random
import re

from . import Dataset, Question, Turn, session_dates
from .assistant_data import ADVICE, CHITCHAT, CONFUSERS, FACTS, PEOPLE, REPLIES, REQUESTS, USER_ASIDES

def _fill(template: str, values: dict) -> str:
    text = template.format(**values)
    return text[0].upper() + text[1:]


def generate(seed: int, n_sessions: int = 60, verbose: bool = True) -> Dataset:
    """A deterministic conversation and its questions for ``seed``.

    verbose: the same conversation (same facts, turns, questions), but every assistant reply goes on with 3-8
    sentences of generic advice and most user turns carry 1-4 more remarks, as in real chat logs: ~6x the words.
    """
    rng = random.Random(seed)
    dates = session_dates(random.Random(seed + 2000), n_sessions, start=dt.date(2024, 1, 8), gap=(2, 9))
    # 1. pick values and plan which user turns carry facts, updates and same-topic negatives, by session
    plan: dict[int, list] = {s: [] for s in range(n_sessions)}
    pending = []  # (fact, values, statement session)
    for fact in FACTS:
        values = {k: rng.choice(v) for k, v in fact.slots.items()}
        s = rng.randrange(0, n_sessions - 15 if fact.update else n_sessions - 2)
        plan[s].append(("say", fact, values))
        if fact.update:
            for k, pool in fact.update["slots"].items():
                values[k] = rng.choice([v for v in pool if v not in values.values()])
            plan[rng.randrange(s + 8, n_sessions)].append(("update", fact, values))
        for text in rng.sample(fact.later, min(len(fact.later), rng.randint(1, 2))):
            plan[rng.randrange(s + 1, n_sessions)].append(("later", fact, text))
        pending.append((fact, values))
    pools = {k: list(v) for f in FACTS for k, v in f.slots.items()}
    pools.update(city=pools["new"] + pools["old"] + pools["wcity"], person=PEOPLE)
    used = {v for _, vals in pending for v in vals.values()}
    requests, chitchat = REQUESTS[:], CHITCHAT[:]
    rng.shuffle(requests)
    rng.shuffle(chitchat)

    def filler() -> tuple[str, str]:
        """A user remark that holds no fact about the user, and the assistant's reply."""
        r = rng.random()
        if r < 0.35:
            return requests.pop() if requests else rng.choice(REQUESTS)
        if r < 0.65:
            template = rng.choice(CONFUSERS)
            names = dict.fromkeys(re.findall(r"{(\w+)}", template))  # ordered: same draws in every process
            text = _fill(template, {k: rng.choice([v for v in pools[k] if v not in used]) for k in names})
            return text, rng.choice(REPLIES)
        return (chitchat.pop() if chitchat else rng.choice(CHITCHAT)), rng.choice(REPLIES)

    # 2. write the sessions: planned turns and filler, each user turn followed by an assistant reply
    turns: list[Turn] = []
    where: dict[tuple, str] = {}  # (fact key, "say"/"update") -> turn id
    for s in range(n_sessions):
        items = plan[s] + [("filler",)] * rng.randint(3, 6)
        rng.shuffle(items)
        for item in items:
            tid = f"s{s:02d}-t{len([t for t in turns if t.session == s]):02d}"
            if item[0] in ("say", "update"):
                kind, fact, values = item
                spec = fact.update if kind == "update" else {"say": fact.say, "reply": fact.reply}
                user, reply = _fill(rng.choice(spec["say"]), values), rng.choice(spec["reply"])
                where[(fact.key, kind)] = tid
                if rng.random() < 0.5:  # as in real chats, the fact is often a side remark in a longer message
                    other, answer = filler()
                    user, reply = (f"{user} {other}", f"{reply} {answer}") if rng.random() < 0.5 else \
                        (f"{other} {user}", f"{answer} {reply}")
            elif item[0] == "later":
                user, reply = item[2], rng.choice(REPLIES)
            else:
                user, reply = filler()
                if rng.random() < 0.3:
                    other, answer = filler()
                    user, reply = f"{user} {other}", f"{reply} {answer}"
            n = len([t for t in turns if t.session == s])
            turns.append(Turn(tid, s, n, "user", dates[s].isoformat(), user))
            turns.append(Turn(f"s{s:02d}-t{n + 1:02d}", s, n + 1, "assistant", dates[s].isoformat(), reply))

    # 3. questions: per question type two different paraphrases (one if it has one), asked at different times;
    #    plus "now" and "before" questions for updated facts
    questions = []
    ask = lambda paraphrases: [_fill(p, values) for p in rng.sample(paraphrases, min(2, len(paraphrases)))]  # noqa
    for fact, values in pending:
        for qtype, paraphrases in fact.ask.items():
            questions += [Question(q, [where[(fact.key, "say")]], "single") for q in ask(paraphrases)]
        if fact.update:
            questions += [Question(q, [where[(fact.key, "update")]], "update")
                          for q in ask(fact.update["ask_now"])]
            before = [where[(fact.key, "say")]]
            update_turn = next(t for t in turns if t.id == where[(fact.key, "update")])
            if values[fact.update["before_slot"]] in update_turn.text:  # "we cancelled Japan" answers it too
                before.append(update_turn.id)
            questions += [Question(q, before, "single") for q in ask(fact.update["ask_before"])]
    rng.shuffle(questions)
    if verbose:
        pad = random.Random(seed + 1000)  # its own stream: the short set's draws stay as they are
        for t in turns:
            if t.speaker == "assistant":
                t.text = " ".join([t.text] + pad.sample(ADVICE, pad.randint(3, 8)))
            elif pad.random() < 0.7:
                extra = pad.sample(CHITCHAT + USER_ASIDES, pad.randint(1, 4))
                cut = pad.randint(0, len(extra))
                t.text = " ".join(extra[:cut] + [t.text] + extra[cut:])
    return Dataset("assistant" if verbose else "assistant_short", seed, turns, questions)
