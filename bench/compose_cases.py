"""Cube sets with questions for bench/compose_fidelity.py (`kvmem.calibrate(cases=...)`): real kinds of text split
where a user splits them, and questions whose evidence is in a later cube or spans two cubes.

    notes   invented team notes over many paragraphs, one document per cube (kvmem.inject.calibrate's own):
            "where does X live", "what does X work as", every third "do X (first cube) and Y live in the same city"
    chat    the verbose user/assistant log (bench/datasets/assistant.py), one session per cube: the dataset's own
            questions about the user's facts (answered in one session of the set), and every third two of them
            asked at once, from two different sessions
    code    Python standard-library modules read from this interpreter's disk (nothing downloaded), one file per
            cube, cut at a line near the token size: "what arguments does f take", "which file defines f", and
            every third "which file defines f, and which defines g" for functions of two different files

Every builder returns ``[(documents, questions)]``, one case per set, and is deterministic for its seed.
"""

from __future__ import annotations

import random
import re
import sysconfig
from pathlib import Path

from kvmem.inject.calibrate import invented_documents, invented_questions

# modules of plain Python with many top-level functions and methods, a few thousand tokens each
CODE_FILES = ["textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "sched.py", "queue.py", "calendar.py", "cmd.py",
              "getopt.py", "netrc.py", "colorsys.py", "heapq.py", "string.py", "copy.py", "graphlib.py", "bisect.py",
              "tabnanny.py", "mailbox.py", "ftplib.py", "imaplib.py", "smtplib.py", "difflib.py", "pprint.py",
              "configparser.py"]
_DEF = re.compile(r"^\s*def ([A-Za-z_]\w*)\((.*?)\)", re.MULTILINE)


def _cut(tokenizer, text: str, max_tokens: int) -> str:
    """``text`` up to the last line that keeps it within ``max_tokens`` tokens."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) <= max_tokens:
        return text
    head = tokenizer.decode(ids[:max_tokens])
    return head[:head.rfind("\n") + 1] if "\n" in head else head


def notes_cases(tokenizer, counts, tokens: int, *, sets: int, questions: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    cases = []
    for n in counts:
        for s in range(sets):
            docs = invented_documents(tokenizer, n, tokens, seed=seed * 1000 + n * 10 + s)
            cases.append(([t for t, _ in docs], invented_questions([f for _, f in docs], rng, questions)))
    return cases


def _sessions(tokenizer, tokens: int, *, seed: int, n_sessions: int = 24):
    from datasets import assistant

    data = assistant.generate(seed, n_sessions=n_sessions, verbose=True)
    lines: dict[int, list[str]] = {}
    for turn in data.turns:
        lines.setdefault(turn.session, []).append(f"{turn.speaker}: {turn.text}\n")
    texts = {s: _cut(tokenizer, f"Chat session {s + 1}.\n" + "".join(ls), tokens) for s, ls in lines.items()}
    # a question counts for a session only if its answer turns are all inside the (possibly cut) session text
    by_session: dict[int, list[str]] = {}
    turns = {t.id: t for t in data.turns}
    for q in data.questions:
        sessions = {turns[a].session for a in q.answers}
        if len(sessions) == 1 and all(turns[a].text in texts[turns[a].session] for a in q.answers):
            by_session.setdefault(sessions.pop(), []).append(q.text)
    return texts, by_session


def chat_cases(tokenizer, counts, tokens: int, *, sets: int, questions: int, seed: int = 0) -> list:
    texts, by_session = _sessions(tokenizer, tokens, seed=seed)
    rng = random.Random(seed)
    cases = []
    for n in counts:
        for _ in range(sets):
            chosen = sorted(rng.sample([s for s in by_session], n))  # in the log's order, as a store lists them
            qs = []
            for i in range(questions):
                later = chosen[rng.randrange(1, n)]
                q = rng.choice(by_session[later])
                if i % 3 == 2:  # evidence in two cubes: two of the user's questions at once
                    other = rng.choice(by_session[rng.choice([s for s in chosen if s != later])])
                    q = f"{other.rstrip('?')}, and {q[0].lower()}{q[1:]}"
                qs.append(q)
            cases.append(([texts[s] for s in chosen], qs))
    return cases


def code_cases(tokenizer, counts, tokens: int, *, sets: int, questions: int, seed: int = 0) -> list:
    folder = Path(sysconfig.get_paths()["stdlib"])
    files = {}
    for name in CODE_FILES:
        if (folder / name).is_file():
            text = _cut(tokenizer, f"# file: {name}\n" + (folder / name).read_text(encoding="utf-8"), tokens)
            defs = [(f, a) for f, a in _DEF.findall(text) if not f.startswith("_")]
            # whole files as long as a cube (or cut to it): short ones would make this a test of small cubes
            if defs and len(tokenizer(text, add_special_tokens=False).input_ids) >= 0.8 * tokens:
                files[name] = (text, defs)
    if len(files) < max(counts):
        raise SystemExit(f"compose_cases: only {len(files)} standard-library files have a public function within "
                         f"{tokens} tokens, {max(counts)} needed: use more tokens per cube (--tokens)")
    rng = random.Random(seed)
    cases = []
    for n in counts:
        for _ in range(sets):
            chosen = rng.sample(sorted(files), n)
            qs = []
            for i in range(questions):
                later = chosen[rng.randrange(1, n)]
                f, _ = rng.choice(files[later][1])
                if i % 3 == 2:
                    g, _ = rng.choice(files[rng.choice([c for c in chosen if c != later])][1])
                    qs.append(f"Which file defines the function {g}, and which defines {f}?")
                elif i % 2:
                    qs.append(f"Which file defines the function {f}?")
                else:
                    qs.append(f"What arguments does the function {f} take?")
            cases.append(([files[c][0] for c in chosen], qs))
    return cases


BUILDERS = {"notes": notes_cases, "chat": chat_cases, "code": code_cases}
