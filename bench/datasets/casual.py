"""Style "casual": two named friends catching up over ~24 dated sessions (~600 turns).

Events are told across turns the way friends tell them: "I finally went to that pottery thing yesterday!" /
"Ooh, how was it?" / "So fun. Made a wobbly little bowl, she said it's not bad for a first go." The answer is
often in the turn with the pronouns; the topic in the turn before. Photos are captions in brackets. Between
events the chat drifts (weather, shows, food) and now and then mentions an event's words in another sense.
Dates are only in the session header (each turn's meta).
"""

from __future__ import annotations

import random

from . import Dataset, Question, Turn, ask_about_span, cap, overlaps, said_when, session_dates

NAMES = [("Maya", "she"), ("Leo", "he"), ("Ines", "she"), ("Omar", "he"), ("Tess", "she"), ("Ravi", "he"),
         ("Nora", "she"), ("Felix", "he"), ("Zoe", "she"), ("Caleb", "he")]

# kind: (tell templates with {when}, detail templates with {x}, values of x, photo captions, questions)
# questions: "what" asks for x (answered by the detail turn), "when" asks when (the tell turn), "did" names the
# event loosely for a date-anchored question ("What did {name} do {time}?" answered by the tell turn)
EVENTS = {
    "pottery": (["I finally went to that pottery class {when}!", "Tried the wheel at the clay studio {when}, so messy"],
                ["It was so fun. I made {x}, the teacher said it's not bad for a first go.",
                 "Honestly harder than it looks, but I came home with {x}."],
                ["a wobbly little bowl", "a lopsided mug", "a tiny vase"],
                ["[shares a photo of {x} drying on a shelf]"],
                {"what": ["What did {name} make at the ceramics workshop?", "What did {name} bring home from "
                          "throwing clay?"], "when": ["When did {name} try ceramics?"]}),
    "hike": (["We did the ridge trail {when}, my legs are dead", "Went hiking up {x2} {when}"],
             ["The view at the top was unreal, we saw {x} from up there.", "Worth it though, we spotted {x}."],
             ["a herd of wild goats", "two eagles circling", "the whole lake glittering"],
             ["[shares a photo of a rocky summit with clouds below]"],
             {"what": ["What animals or sights did {name} see on the mountain walk?"],
              "when": ["When did {name} go up the mountain?"]}),
    "concert": (["Saw {x2} live {when}!!", "Went to a gig {when}, finally saw {x2}"],
                ["They opened with {x} and I actually cried a bit.", "Best part was {x}, the crowd went wild."],
                ["their oldest song", "an acoustic cover", "a ten-minute drum solo"],
                ["[shares a blurry photo of a stage with purple lights]"],
                {"what": ["What was the highlight of the show {name} attended?", "How did the band {name} watched "
                          "start their set?"], "when": ["When did {name} go see the band?"]}),
    "adoption": (["We brought home a rescue {when}!", "So we adopted someone {when}... a shelter pup"],
                 ["{Pron} is the sweetest, we named {obj} {x}.", "Took ages to pick a name but we went with {x}."],
                 ["Biscuit", "Pepper", "Moose", "Olive"],
                 ["[shares a photo of a puppy asleep on a blue blanket]"],
                 {"what": ["What is the name of {name}'s new dog?", "What did {name} call the animal from the "
                           "shelter?"], "when": ["When did {name} get the dog?"]}),
    "support": (["I went to the support group again {when}", "Finally made it to that peer group meeting {when}"],
                ["Everyone was so kind. Someone suggested {x} and it's really helping.",
                 "Talked for the first time. The facilitator told me to try {x}."],
                ["journaling every night", "breathing exercises", "a weekly walk with a friend"],
                [],
                {"what": ["What coping idea did {name} get from the group sessions?"],
                 "when": ["When did {name} attend the support meeting?"]}),
    "race": (["Ran my first 10k {when}!", "Did the charity run {when}, still sore"],
             ["Finished in {x}, way better than I hoped.", "My time was {x}, I'll take it."],
             ["58 minutes", "just under an hour", "52 minutes"],
             ["[shares a photo of a finisher medal on a striped ribbon]"],
             {"what": ["How long did it take {name} to finish the race?"],
              "when": ["When did {name} do the running event?"]}),
    "cooking": (["Hosted dinner for the family {when}", "Cooked for eight people {when}, never again lol"],
                ["I made {x} and there were zero leftovers.", "Went all out with {x}, it actually worked."],
                ["a huge paella", "homemade ramen", "a lemon risotto"],
                ["[shares a photo of a big pan on a crowded table]"],
                {"what": ["What dish did {name} serve the relatives?"],
                 "when": ["When did {name} cook the big family meal?"]}),
    "museum": (["Spent the afternoon at the science museum {when}", "Dragged the kids to the museum {when}"],
               ["Their favourite bit was {x}.", "We spent an hour at {x}, they wouldn't leave."],
               ["the planetarium show", "the dinosaur skeletons", "the giant wave tank"],
               ["[shares a photo of kids staring up at a huge skeleton]"],
               {"what": ["Which exhibit did {name}'s children love on their day out?"],
                "when": ["When did {name} take the kids to the exhibition?"]}),
    "painting": (["Signed up for an art class, first one was {when}", "Started painting again {when}"],
                 ["We did {x}, mine looks like a toddler did it haha.", "I painted {x}, pretty proud of it."],
                 ["sunflowers in watercolour", "a sunset over the harbour", "a portrait of my cat"],
                 ["[shares a photo of a small canvas with bright colours]"],
                 {"what": ["What was the subject of {name}'s artwork?", "What did {name} put on canvas?"],
                  "when": ["When did {name} start the art lessons?"]}),
    "camping": (["Back from camping, we went {when}", "Took the tent out {when}, first trip of the year"],
                ["It rained the whole night but we saw {x}.", "Freezing, but the kids loved {x}."],
                ["a sky full of stars", "deer by the river", "the sunrise over the lake"],
                ["[shares a photo of a small orange tent by a lake]"],
                {"what": ["What was the best moment of {name}'s night outdoors?"],
                 "when": ["When did {name} sleep out in the woods?"]}),
    "job": (["Had the interview {when}, I'm so nervous", "Big news, got the call {when}"],
            ["They offered me the job! I'll be {x}.", "It went well, the role is {x}."],
            ["a junior designer at a studio", "a nurse on the children's ward", "a teacher at the primary school"],
            [],
            {"what": ["What position was {name} offered?", "What will {name} be working as?"],
             "when": ["When did {name} hear back from the employer?"]}),
    "volunteer": (["Volunteered at the shelter {when}", "Did a shift at the food bank {when}"],
                  ["Spent the whole time {x}, exhausting but good.", "They had me {x} all afternoon."],
                  ["sorting donated coats", "walking the older dogs", "packing food boxes"],
                  [],
                  {"what": ["What task did {name} do while helping out for charity?"],
                   "when": ["When did {name} do the charity shift?"]}),
    "book": (["Finished a book {when} and I can't stop thinking about it", "Stayed up reading until 2am {when}"],
             ["It was {x}, you have to read it.", "The one I mentioned, {x}. The ending wrecked me."],
             ["Piranesi", "The Remains of the Day", "Circe"],
             ["[shares a photo of a worn paperback on a bedside table]"],
             {"what": ["Which novel did {name} recommend?"], "when": ["When did {name} finish the novel?"]}),
    "beach": (["Took a day trip to the coast {when}", "We drove down to the sea {when}"],
              ["The kids built {x}, it took them hours.", "We ended up {x} until sunset."],
              ["a massive sandcastle", "collecting shells", "flying a kite"],
              ["[shares a photo of two kids with buckets on the sand]"],
              {"what": ["What did {name}'s family do at the seaside?"],
               "when": ["When did {name} go to the coast?"]}),
}
DID = {"pottery": "try", "hike": "do outdoors", "concert": "see live", "adoption": "bring home",
       "support": "attend", "race": "take part in", "cooking": "cook", "museum": "visit with the kids",
       "painting": "start", "camping": "do outdoors", "job": "hear about", "volunteer": "do to help out",
       "book": "finish", "beach": "do with the family"}
# "when" questions in the words of the tell turn (same order as its templates): people often ask that way too
ECHO = {"pottery": ["When did {name} go to the pottery class?", "When did {name} try the wheel at the clay studio?"],
        "hike": ["When did {name} do the ridge trail?", "When did {name} go hiking?"],
        "concert": ["When did {name} see the band live?", "When did {name} go to the gig?"],
        "adoption": ["When did {name} bring home the rescue?", "When did {name} adopt the shelter pup?"],
        "support": ["When did {name} go to the support group?", "When did {name} make it to the peer group meeting?"],
        "race": ["When did {name} run the 10k?", "When did {name} do the charity run?"],
        "cooking": ["When did {name} host dinner for the family?", "When did {name} cook for eight people?"],
        "museum": ["When did {name} spend the afternoon at the science museum?",
                   "When did {name} take the kids to the museum?"],
        "painting": ["When did {name} go to the first art class?", "When did {name} start painting again?"],
        "camping": ["When did {name} go camping?", "When did {name} take the tent out?"],
        "job": ["When did {name} have the interview?", "When did {name} get the call?"],
        "volunteer": ["When did {name} volunteer at the shelter?", "When did {name} do a shift at the food bank?"],
        "book": ["When did {name} finish the book?", "When did {name} stay up reading?"],
        "beach": ["When did {name} take a day trip to the coast?", "When did {name} drive down to the sea?"]}
BANDS = ["the Lumineers", "Arctic Monkeys", "a local jazz trio", "Florence + the Machine"]
PEAKS = ["Mount Tam", "the old fire lookout", "Eagle Peak"]

REACTIONS = ["No way! How was it?", "Ooh, how did it go?", "That's awesome, tell me everything!", "Wait really? And?",
             "Oh nice!! What was it like?", "Omg, how was that?", "Yay! Did you enjoy it?"]
REPLIES = ["Love that for you!", "That's so cool.", "Haha amazing.", "Aww, that's lovely.", "So proud of you!",
           "I'm jealous honestly.", "Sounds perfect.", "Ha, classic."]
OPENERS = [("Hey {b}! Long time no talk, how've you been?", "Hi {a}! Busy but good, you?"),
           ("Morning {b}! Got a minute?", "Always for you {a}, what's up?"),
           ("{b}!! How's your week going?", "Hey {a}! Honestly kind of chaotic but fine."),
           ("Hi {b}, sorry I went quiet, life got hectic.", "No worries {a}! Good to hear from you.")]
CLOSERS = [("Gotta run, talk soon!", "Bye! Take care."), ("Okay I need sleep, night!", "Night night!"),
           ("Let's catch up again soon.", "Definitely, see you!")]
DRIFT = [("Is it raining where you are too?", "Non-stop, I've forgotten what the sun looks like."),
         ("Have you watched anything good lately?", "Rewatching an old sitcom, it's my comfort show."),
         ("Work has been so draining this week.", "Ugh, same. Mondays feel endless."),
         ("I really need a haircut.", "Ha, me too, I look like a mop."),
         ("Did you ever fix your car?", "Still making that weird noise, I'm ignoring it."),
         ("I'm trying to drink less coffee.", "Good luck with that, I'm on my third cup."),
         ("My neighbour's cat keeps sitting on my car.", "Cats have no respect for property lol."),
         ("Any plans for the holidays?", "Not yet, probably staying home."),
         ("I burnt toast this morning and set off the alarm.", "Classic start to the day."),
         ("How's your mum doing?", "Much better, thanks for asking."),
         ("I started a new podcast about history.", "Ooh send me the name."),
         ("The traffic today was insane.", "Everyone was out, no idea why."),
         ("I keep forgetting to water my plants.", "RIP to the plants."),
         ("Did you see the news about the new stadium?", "Yeah, sounds like it'll take years."),
         ("My phone screen cracked again.", "You need a better case honestly."),
         ("I'm so tired lately.", "Go to bed early tonight, promise me.")]
# a topic's words in another sense: same vocabulary, no event
CONFUSERS = ["My cousin keeps posting pottery videos, it's hypnotic.", "There's a band playing downstairs, so loud.",
             "I walked past the museum but didn't go in.", "Someone at work is training for a marathon.",
             "My sister wants a dog but her flat is tiny.", "I should really read more books.",
             "The beach near us is closed for repairs.", "I saw a poster for an art class at the library.",
             "My friend's interview got cancelled, poor thing.", "We ate leftover risotto for lunch.",
             "Camping gear is so expensive now.", "A colleague volunteers at the food bank every week.",
             "I want to try hiking but I'm so unfit.", "My brother ran a race once and never again."]
# multi-hop: an introduction, then a later turn about the same person without the first turn's words
FRIENDS = [("my neighbour", "Rosa", "works as a vet", "opened her own clinic in {place}",
            "Where did {name}'s veterinarian neighbour open a practice?"),
           ("my old roommate", "Dev", "is a chef now", "is moving to {place} for a new restaurant",
            "Which city is {name}'s cook friend relocating to?"),
           ("my cousin", "Hanna", "just became a pilot", "is flying her first long route to {place}",
            "Where is the aviator in {name}'s family flying to?"),
           ("a guy from my gym", "Marco", "teaches salsa", "is running a dance weekend in {place}",
            "Where is the dance instructor {name} knows holding his event?")]
PLACES = ["Lisbon", "Denver", "Osaka", "Cork", "Tallinn", "Porto"]


def generate(seed: int, n_sessions: int = 24) -> Dataset:
    """Two friends, ``n_sessions`` dated sessions; questions of kinds single / when / temporal / multi."""
    rng = random.Random(seed)
    (a, _), (b, _) = rng.sample(NAMES, 2)
    dates = session_dates(rng, n_sessions, start=__import__("datetime").date(2023, 1, 2), gap=(5, 16))
    kinds = list(EVENTS)
    rng.shuffle(kinds)
    plan = {s: [] for s in range(n_sessions)}
    for i, kind in enumerate(kinds * 2):  # every event kind about twice (once per friend, usually)
        plan[rng.randrange(n_sessions)].append(("event", kind, a if i < len(kinds) else b))
    for friend in rng.sample(FRIENDS, 3):
        first = rng.randrange(n_sessions - 6)
        plan[first].append(("intro", friend, rng.choice([a, b])))
        plan[rng.randrange(first + 3, n_sessions)].append(("later", friend, None))
    ds = Dataset("casual", seed)
    events, questions, intros = [], [], {}

    for s in range(n_sessions):
        turns: list[Turn] = []

        def say(who: str, text: str) -> str:
            t = Turn(f"s{s:02d}-t{len(turns):02d}", s, len(turns), who, dates[s].isoformat(), cap(text))
            turns.append(t)
            return t.id

        first, other = (a, b) if rng.random() < 0.5 else (b, a)
        opener = rng.choice(OPENERS)
        say(first, opener[0].format(a=first, b=other))
        say(other, opener[1].format(a=first, b=other))
        items = plan[s] + [("drift",)] * rng.randint(4, 7) + [("confuser",)] * rng.randint(0, 2)
        rng.shuffle(items)
        for item in items:
            if item[0] == "event":
                _, kind, teller = item
                listener = b if teller == a else a
                tell, detail, values, photos, asks = EVENTS[kind]
                phrase, span = said_when(rng, dates[s])
                x = rng.choice(values)
                obj = "her" if rng.random() < 0.5 else "him"
                which = rng.randrange(len(tell))
                tell_id = say(teller, tell[which].format(when=phrase, x2=rng.choice(BANDS + PEAKS)))
                say(listener, rng.choice(REACTIONS))
                detail_id = say(teller, rng.choice(detail).format(x=x, Pron=cap("she" if obj == "her" else "he"),
                                                                  obj=obj))
                if photos and rng.random() < 0.6:
                    say(teller, rng.choice(photos).format(x=x))
                say(listener, rng.choice(REPLIES))
                events.append((teller, span, tell_id))
                for q in rng.sample(asks["what"], 1):
                    questions.append(Question(q.format(name=teller), [detail_id], "single"))
                when_q = ECHO[kind][which] if rng.random() < 0.5 else rng.choice(asks["when"])
                questions.append(Question(when_q.format(name=teller), [tell_id], "when"))
                questions.append(("temporal", teller, span, tell_id, kind))
            elif item[0] == "intro":
                _, (rel, name, job, _, _), teller = item
                intros[name] = (teller, say(teller, f"Did I tell you {rel} {name} {job}? Small world."))
                say(b if teller == a else a, rng.choice(REPLIES))
            elif item[0] == "later":
                _, (rel, name, job, later, ask), _ = item
                if name not in intros:  # introduced in a later session than planned: skip
                    continue
                teller, intro_id = intros[name]
                place = rng.choice(PLACES)
                later_id = say(teller, f"Oh, {name} {later.format(place=place)}!")
                say(b if teller == a else a, rng.choice(REACTIONS))
                questions.append(Question(ask.format(name=teller), [intro_id, later_id], "multi"))
            elif item[0] == "drift":
                line, reply = rng.choice(DRIFT)
                who = rng.choice([a, b])
                say(who, line)
                say(b if who == a else a, reply)
            else:
                say(rng.choice([a, b]), rng.choice(CONFUSERS))
        closer = rng.choice(CLOSERS)
        say(first, closer[0])
        say(other, closer[1])
        ds.turns += turns

    # date-anchored questions only where the speaker did nothing else in an overlapping span
    for i, q in enumerate(questions):
        if isinstance(q, tuple):
            _, teller, span, tell_id, kind = q
            clash = any(t == teller and overlaps(sp, span) and tid != tell_id for t, sp, tid in events)
            questions[i] = None if clash else Question(
                f"What did {teller} {DID[kind]} {ask_about_span(rng, span)}?", [tell_id], "temporal")
    ds.questions = [q for q in questions if q is not None]
    return ds
