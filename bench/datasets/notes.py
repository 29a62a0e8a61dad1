"""Style "notes": one person's terse dated notes over ~120 days (~600 lines), one session per day.

Lines as people jot them: "dentist moved -> thu 3pm", "paid Kofi back 40", "bike: new chain, shop on Elm st".
Nouns, abbreviations, no pronouns, many near-duplicate errands. Questions are asked the way one asks an
assistant ("When is my dental appointment?"), in other words than the note. Dates only in the session (day).
"""

from __future__ import annotations

import datetime as dt
import random

from . import Dataset, Question, Turn, ask_about_span, overlaps, said_when, session_dates

# (note templates with {x} and {when}, values, single questions, the loose name of it for temporal questions)
ITEMS = {
    "dentist": (["dentist {when}, filling top left. next check {x}", "dental: cleaning done {when}, back {x}"],
                ["in 6 months", "mid march", "after summer"],
                ["When do I have to see the tooth doctor again?"], "have done at the clinic"),
    "car": (["car -> garage {when}, {x}", "mechanic {when}: {x}"],
            ["brake pads replaced 180", "new battery 95", "oil + filter 60"],
            ["What repair did the vehicle get and how much was it?"], "get fixed"),
    "loan": (["lent {x} {when}", "{x} {when}, pay back end of month"],
             ["Kofi 40 for concert tix", "Sara 25 for the taxi", "Ben 60 for groceries"],
             ["Who owes me money and for what?"], "lend out"),
    "plumber": (["plumber {when} - {x}", "leak under sink fixed {when}, {x}"],
                ["Dario 0761 554 210, good", "Ivo 0789 223 118, pricey", "Mila 0744 901 332, fast"],
                ["Who was the guy that repaired the pipes and what's his number?"], "get repaired"),
    "gift": (["bday present for mum: {x} (bought {when})", "gift sorted {when}: {x}"],
             ["silk scarf, blue", "pottery bowl from market", "rose bush for garden"],
             ["What did I get my mother for her birthday?"], "buy"),
    "recipe": (["tried {x} {when} - keep!", "{x} {when}: too salty, halve soy next time"],
               ["miso aubergine", "chickpea curry", "lemon orzo"],
               ["Which dish did I cook that I wanted to make again?"], "cook"),
    "flight": (["booked flights {when}: {x}", "flights {x}, booked {when}, seat 14A"],
               ["LIS 12-19 jun", "OSL 3-9 aug", "ATH 20-27 sep"],
               ["Where am I flying to on holiday and when?"], "book"),
    "wifi": (["router reset {when}, new pw {x}", "wifi pw changed {when} -> {x}"],
             ["blue-otter-77", "tangerine42!", "maple_sky_9"],
             ["What's the password for the internet at home now?"], "change at home"),
    "doctor": (["gp {when}: {x}", "doc appt {when}, {x}"],
               ["bloods normal, vit D low", "knee = mild sprain, rest 2 wks", "bp fine, recheck in year"],
               ["What did the physician say about my health?"], "hear from the GP"),
    "book_club": (["book club {when}: {x}", "bk club pick {when} - {x}"],
                  ["Station Eleven, ch 1-8", "Klara and the Sun", "The Overstory (long!)"],
                  ["What are we reading for the reading circle?"], "pick for reading"),
    "bike": (["bike: {x} {when}", "bicycle shop {when}: {x}"],
             ["new chain + tubes 45", "brakes adjusted free", "wheel trued 20"],
             ["What work was done on my cycle?"], "get done on the bike"),
    "rent": (["rent up from next month: {x} (letter {when})", "landlord call {when}: rent {x}"],
             ["1150 -> 1210", "stays 980", "1400 incl. parking"],
             ["How much will my housing cost going forward?"], "hear about the flat"),
    "gym": (["gym {when}: {x}", "workout {when} {x}"],
            ["squat 60kg x5 PB", "5k row 22:10", "first spin class, dead"],
            ["What was my personal best at the fitness centre?"], "do at the gym"),
    "passport": (["passport renewal sent {when}, ref {x}", "passport appt {when}, ref no {x}"],
                 ["PX-88213", "PR-40917", "PZ-11376"],
                 ["What's the reference number for my travel document renewal?"], "send off"),
}
ERRANDS = ["milk eggs oats", "call mum", "pick up parcel (post office)", "laundry", "bins out tue", "water plants",
           "email landlord re heating", "buy printer ink", "return library books", "cancel free trial",
           "pay electricity", "ironing", "book haircut", "fix squeaky door", "clean fridge", "batteries AA",
           "renew bus pass", "birthday card for Ana", "take vitamins", "defrost freezer", "reply to Jo",
           "order contact lenses", "back up laptop", "buy bin bags", "charge headphones"]
# the same words as a real note, but not the fact
CONFUSERS = ["dentist for Ana next week? ask her", "car wash 8", "lend the drill to neighbour?",
             "gift ideas: socks? candle?", "flight prices to Rome crazy", "doc for work (report) due fri",
             "bike lock broken again", "gym card expired? check", "rent a van for the move?",
             "recipe ideas: something with beans", "passport photos of kids still in drawer",
             "book club snacks - my turn in may"]
# (introduction, later note naming the same thing differently, question needing both)
CHAINS = [("new physio: Lena Park, clinic on Bay rd", "Lena says 3 more sessions, then gym ok",
           "How many more treatments did the physiotherapist on Bay road recommend?"),
          ("storage unit #214 at Safebox, code 4471", "moved winter stuff into #214",
           "Where did I put the cold-weather things, and how do I get in?"),
          ("accountant = Tom Reyes (tax)", "Tom: send P60 + receipts by 31st",
           "What documents does the person handling my taxes need?"),
          ("Mira's kid = Theo, turns 5 in july", "present for Theo: dino book",
           "What am I giving my friend's son?")]


def generate(seed: int, n_days: int = 120) -> Dataset:
    """One person's notes on ``n_days`` days (one session each, 2-8 lines); questions single / when / temporal /
    multi / update (a fact noted twice: the second is asked for)."""
    rng = random.Random(seed)
    dates = session_dates(rng, n_days, start=dt.date(2022, 9, 1), gap=(1, 2))
    plan = {s: [] for s in range(n_days)}
    for kind in ITEMS:
        first = rng.randrange(n_days - 30)
        plan[first].append(("item", kind, False))
        if rng.random() < 0.5:
            plan[rng.randrange(first + 10, n_days)].append(("item", kind, True))  # noted again, changed
    for chain in rng.sample(CHAINS, 3):
        first = rng.randrange(n_days - 20)
        plan[first].append(("intro", chain))
        plan[rng.randrange(first + 5, n_days)].append(("later", chain))
    ds = Dataset("notes", seed)
    events, questions, said = [], [], {}
    for s in range(n_days):
        items = plan[s] + [("errand",)] * rng.randint(2, 5) + [("confuser",)] * (rng.random() < 0.3)
        rng.shuffle(items)
        turns: list[Turn] = []

        def note(text: str) -> str:
            t = Turn(f"s{s:03d}-t{len(turns):02d}", s, len(turns), "me", dates[s].isoformat(), text)
            turns.append(t)
            return t.id

        for item in items:
            if item[0] == "item":
                _, kind, again = item
                templates, values, asks, did = ITEMS[kind]
                phrase, span = said_when(rng, dates[s])
                x = rng.choice([v for v in values if v != said.get(kind, (None, None))[1]])
                tid = note(rng.choice(templates).format(x=x, when=phrase))
                if again:
                    ask = asks[0][0].lower() + asks[0][1:]
                    questions.append(Question(rng.choice(["These days, ", "Currently, "]) + ask, [tid], "update"))
                    first_q = next(q for q in questions if isinstance(q, Question) and q.answers == [said[kind][0]])
                    first_q.answers.append(tid)  # the first question is answered by both notes
                else:
                    questions.append(Question(asks[0], [tid], "single"))
                    if rng.random() < 0.5:  # asked again in the note's own words
                        topic = kind.replace("_", " ")
                        questions.append(Question(f"What did I note about the {topic}?", [tid], "single"))
                    questions.append(("temporal", span, tid, did))
                said[kind] = (tid, x)
                events.append((span, tid))
            elif item[0] == "intro":
                said[item[1][0]] = (note(item[1][0]), None)
            elif item[0] == "later":
                intro, later, ask = item[1]
                if intro in said:
                    questions.append(Question(ask, [said[intro][0], note(later)], "multi"))
            elif item[0] == "errand":
                note(rng.choice(ERRANDS))
            else:
                note(rng.choice(CONFUSERS))
        ds.turns += turns
    for i, q in enumerate(questions):
        if isinstance(q, tuple):
            _, span, tid, did = q
            clash = any(overlaps(sp, span) and t != tid for sp, t in events)
            questions[i] = None if clash else Question(f"What did I {did} {ask_about_span(rng, span)}?", [tid],
                                                       "temporal")
    ds.questions = [q for q in questions if q is not None]
    return ds
