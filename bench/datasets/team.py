"""Style "team": a work channel of five colleagues over ~40 dated days (~600 messages).

Threads start with an announcement and go on with questions and answers from others ("which region?" / "eu-west,
it's back now"), so the detail is in a reply that leans on the thread; stand-up chatter, reactions and bot-like
status lines fill the rest. Dates only in the session (the day's log) header.
"""

from __future__ import annotations

import datetime as dt
import random

from . import Dataset, Question, Turn, ask_about_span, overlaps, said_when, session_dates

PEOPLE = ["Priya", "Jonas", "Aisha", "Mateo", "Yuki", "Daniel", "Chloe", "Marek"]

# kind: (announcement templates with {when}, follow-up question, detail reply with {x}, values, questions, did)
THREADS = {
    "outage": (["Heads up: the checkout service went down {when} for about an hour",
                "Postmortem for the payments incident from {when} is up"],
               ["What was the root cause?", "Do we know why it happened?"],
               ["Root cause was {x}, fix is merged.", "Turned out to be {x}, we rolled it back."],
               ["an expired TLS certificate", "a full disk on the db replica", "a bad feature flag"],
               ["Why did the payment system fail, according to {who}?"], "deal with"),
    "release": (["Shipped v{v} of the mobile app {when} \U0001f680", "Release {v} went out {when}"],
                ["Nice! What's in it?", "What's the headline feature?"],
                ["Main thing is {x}, plus bug fixes.", "Mostly {x}, release notes in the wiki."],
                ["offline mode for maps", "dark theme", "faster login with passkeys"],
                ["What was the big new capability in the phone version {who} put out?"], "ship"),
    "customer": (["Had the call with Northwind {when}", "Talked to the Acme folks {when}"],
                 ["How did it go?", "Are they renewing?"],
                 ["They'll renew if we {x} by next quarter.", "Main ask: {x}, otherwise they're happy."],
                 ["add SSO support", "cut the invoice price by 10%", "build a CSV export"],
                 ["What condition did the client set for signing again, per {who}?"], "discuss with a client"),
    "hire": (["Welcome our new teammate, joined {when}!", "We closed the backend hire {when}"],
             ["Welcome!! What will they work on?", "Great, which team?"],
             ["They'll own {x}.", "Starting on {x} first."],
             ["the search indexer", "the billing migration", "on-call tooling"],
             ["What area is the recruit {who} announced responsible for?"], "get done for hiring"),
    "offsite": (["Booked the team offsite venue {when}", "Offsite planning: venue confirmed {when}"],
                ["Where is it?", "Ooh where are we going?"],
                ["It's at {x}, two nights.", "{x}, agenda to follow."],
                ["a lodge near the lake", "an old mill outside town", "a farmhouse in the hills"],
                ["Where is the group retreat {who} arranged taking place?"], "book"),
    "migration": (["Finished migrating the analytics jobs {when}", "Cut over the reporting pipeline {when}"],
                  ["Any surprises?", "How long did it take?"],
                  ["Only {x}, otherwise smooth.", "Took longer because of {x}."],
                  ["timezone bugs in old dashboards", "a missing index on events", "a quota limit"],
                  ["What went wrong while {who} was moving the data workloads?"], "finish"),
    "security": (["Rotated all the API keys {when}", "Security review done {when}"],
                 ["Anything we need to change?", "Action items for us?"],
                 ["Yes: {x}, by Friday please.", "One thing: {x}."],
                 ["enable 2FA on the admin panel", "stop sharing tokens in chat", "update the base images"],
                 ["What did {who}'s audit ask everyone to do?"], "do for security"),
    "demo": (["Demoed the new onboarding flow to leadership {when}", "Did the quarterly demo {when}"],
             ["What did they think?", "How was the reaction?"],
             ["They loved it but want {x}.", "Good overall, feedback was {x}."],
             ["fewer steps on signup", "a tour video", "support for teams"],
             ["What change did the executives request after {who} showed the product?"], "present"),
    "bug": (["Found a nasty bug in the exporter {when}", "Chased a heisenbug all day {when}"],
            ["What was it?", "Did you find it?"],
            ["Classic {x}.", "It was {x}, patch is in review."],
            ["off-by-one in pagination", "a race between two workers", "unicode in file names"],
            ["What defect did {who} find in the export tool?"], "find"),
}
WHEN = {"outage": "When did {who} report the payments downtime?", "release": "When did {who} publish the new app "
        "version?", "customer": "When did {who} speak with the client?", "hire": "When did {who} announce the new "
        "colleague?", "offsite": "When did {who} reserve the place for the retreat?", "migration": "When did {who} "
        "complete moving the data jobs?", "security": "When did {who} finish the security work?", "demo": "When "
        "did {who} show the product to the bosses?", "bug": "When did {who} discover the defect?"}
# "when" questions in the announcement's words (same order as its templates)
ECHO = {"outage": ["When did the checkout service go down?", "When was the payments incident?"],
        "release": ["When did {who} ship the new mobile app version?", "When did release {v} go out?"],
        "customer": ["When was the call with Northwind?", "When did {who} talk to the Acme folks?"],
        "hire": ["When did the new teammate join?", "When was the backend hire closed?"],
        "offsite": ["When was the offsite venue booked?", "When was the offsite venue confirmed?"],
        "migration": ["When did {who} finish migrating the analytics jobs?",
                      "When was the reporting pipeline cut over?"],
        "security": ["When were the API keys rotated?", "When was the security review done?"],
        "demo": ["When did {who} demo the onboarding flow?", "When was the quarterly demo?"],
        "bug": ["When did {who} find the bug in the exporter?", "When did {who} chase the heisenbug?"]}
STANDUP = ["Morning all", "Working on tickets today", "In meetings until 2", "Reviewing PRs, ping me",
           "Lunch anyone?", "Coffee machine is broken again", "I'm out tomorrow afternoon", "Build is green",
           "Can someone look at my PR?", "Thanks for the review!", "Deploy queue is long today", "+1",
           "Back from lunch", "Who's on call this week?", "Standup moved to 10:15", "Friendly reminder: timesheets",
           "Anyone seen the new design doc?", "Merged, thanks", "Taking a short break", "Wifi is terrible here"]
REPLIES = ["Nice work!", "Thanks for the update", "\U0001f44d", "Great, thanks", "Good to know", "Ouch, thanks for "
           "fixing", "Awesome", "Noted"]
CONFUSERS = ["Unrelated but the release calendar moved", "Is the checkout page slow for anyone else?",
             "We should do an offsite sometime", "Anyone know a good security podcast?",
             "The migration guide for the laptop setup is outdated", "Customer support asked about exports",
             "Demo day snacks are in the kitchen", "Hiring panel training on Thursday"]
# (introduction, later message about the same thing in other words, question needing both)
CHAINS = [("FYI {p} is our contact at the bank for the Ledger project", "{p} says the bank wants the API spec "
           "by Monday", "What does our banking partner need, and who asked?"),
          ("New on-call rotation: {p} covers nights this month", "{p} got paged 3 times last night for the queue",
           "How often was the overnight responder woken up?"),
          ("The Falcon project is led by {p}", "{p} pushed the launch to next sprint",
           "When will the project with the bird name launch?")]


def generate(seed: int, n_days: int = 40) -> Dataset:
    """Five colleagues, ``n_days`` days of messages; questions single / when / temporal / multi."""
    rng = random.Random(seed)
    people = rng.sample(PEOPLE, 5)
    dates = session_dates(rng, n_days, start=dt.date(2024, 2, 5), gap=(1, 4))
    plan = {s: [] for s in range(n_days)}
    for kind in THREADS:
        for _ in range(2):
            plan[rng.randrange(n_days)].append(("thread", kind, rng.choice(people)))
    for chain in CHAINS:
        first = rng.randrange(n_days - 8)
        plan[first].append(("intro", chain, rng.choice(people)))
        plan[rng.randrange(first + 3, n_days)].append(("later", chain))
    ds = Dataset("team", seed)
    events, questions, intros = [], [], {}
    for s in range(n_days):
        turns: list[Turn] = []

        def post(who: str, text: str) -> str:
            t = Turn(f"s{s:02d}-t{len(turns):02d}", s, len(turns), who, dates[s].isoformat(), text)
            turns.append(t)
            return t.id

        items = plan[s] + [("chatter",)] * rng.randint(6, 11) + [("confuser",)] * (rng.random() < 0.4)
        rng.shuffle(items)
        for item in items:
            if item[0] == "thread":
                _, kind, who = item
                announce, asks, details, values, qs, did = THREADS[kind]
                other = rng.choice([p for p in people if p != who])
                phrase, span = said_when(rng, dates[s])
                x = rng.choice(values)
                which, v = rng.randrange(len(announce)), f"{rng.randint(2, 9)}.{rng.randint(0, 9)}"
                tid = post(who, announce[which].format(when=phrase, v=v))
                post(other, rng.choice(asks))
                if rng.random() < 0.4:
                    post(rng.choice(people), rng.choice(STANDUP))  # a message in between, as in real channels
                did_id = post(who, rng.choice(details).format(x=x))
                post(rng.choice(people), rng.choice(REPLIES))
                questions.append(Question(qs[0].format(who=who), [did_id], "single"))
                when_q = ECHO[kind][which] if rng.random() < 0.5 else WHEN[kind]
                questions.append(Question(when_q.format(who=who, v=v), [tid], "when"))
                questions.append(("temporal", who, span, tid, did))
                events.append((who, span, tid))
            elif item[0] == "intro":
                (intro, later, ask), who = item[1], item[2]
                p = rng.choice([x for x in people if x != who])
                intros[intro] = (p, post(who, intro.format(p=p)))
            elif item[0] == "later":
                intro, later, ask = item[1]
                if intro in intros:
                    p, intro_id = intros[intro]
                    questions.append(Question(ask, [intro_id, post(rng.choice(people), later.format(p=p))], "multi"))
            elif item[0] == "chatter":
                post(rng.choice(people), rng.choice(STANDUP))
            else:
                post(rng.choice(people), rng.choice(CONFUSERS))
        ds.turns += turns
    for i, q in enumerate(questions):
        if isinstance(q, tuple):
            _, who, span, tid, did = q
            clash = any(w == who and overlaps(sp, span) and t != tid for w, sp, t in events)
            questions[i] = None if clash else Question(f"What did {who} {did} {ask_about_span(rng, span)}?", [tid],
                                                       "temporal")
    ds.questions = [q for q in questions if q is not None]
    return ds
