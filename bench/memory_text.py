"""Demo and test support, not API: invented, seeded memory texts: team notes about people who do not exist
(used by the demo, the tests and the benchmarks).

Facts the model cannot know from pre-training, so a right answer shows the memory reached the model.
"""

from __future__ import annotations

import random

FIRST = ["Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kavya",
         "Lars", "Mina", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Sami", "Tove", "Umar", "Vera", "Wen", "Xavier",
         "Yara", "Zeno", "Amara", "Bodil", "Cyril", "Dagny", "Emil", "Fiona", "Gustav", "Hanna", "Ivo", "Jule"]
LAST = ["Moreau", "Lindqvist", "Okafor", "Tanaka", "Rossi", "Novak", "Haddad", "Berg", "Silva", "Kowalski",
        "Ivanova", "Fischer", "Nakamura", "Costa", "Dubois", "Horvath", "Jensen", "Kaur", "Larsen", "Mendes"]
CITIES = ["Oslo", "Lisbon", "Tallinn", "Porto", "Bergen", "Ghent", "Krakow", "Lyon", "Turin", "Graz", "Aarhus",
          "Bilbao", "Utrecht", "Brno", "Tampere", "Split", "Malmo", "Leipzig", "Cork", "Basel"]
JOBS = ["baker", "marine biologist", "pilot", "violin maker", "data engineer", "beekeeper", "architect",
        "glassblower", "nurse", "cartographer", "chef", "translator", "locksmith", "astronomer", "librarian"]
PETS = ["a grey cat named Pixel", "a beagle named Toast", "two goldfish", "a parrot named Captain",
        "a tortoise named Sprint", "no pets", "a rabbit named Clover", "a husky named Frost"]
HOBBIES = ["climbing", "chess", "sailing", "pottery", "birdwatching", "running marathons", "baking sourdough",
           "restoring old radios", "playing the cello", "growing tomatoes", "kayaking", "painting lighthouses"]
FOODS = ["mushroom risotto", "fish tacos", "lentil soup", "cardamom buns", "pad thai", "pierogi", "paella",
         "ramen", "goulash", "falafel"]


def person_notes(rng: random.Random, first: str, last: str) -> tuple[str, dict]:
    city, job, pet = rng.choice(CITIES), rng.choice(JOBS), rng.choice(PETS)
    hobby, food = rng.choice(HOBBIES), rng.choice(FOODS)
    badge, floor = rng.randint(1000, 9999), rng.randint(1, 12)
    year = rng.randint(2009, 2024)
    facts = {"name": f"{first} {last}", "first": first, "city": city, "job": job, "pet": pet, "hobby": hobby,
             "food": food, "badge": badge, "floor": floor, "year": year}
    text = (f"{first} {last} lives in {city} and works as a {job}. {first} joined the team in {year} and sits "
            f"on floor {floor}; the badge number of {first} is {badge}. At home {first} has {pet}. On weekends "
            f"{first} enjoys {hobby}, and the favourite dish of {first} is {food}.\n")
    return text, facts


def team_notes(n_people: int = 40, *, seed: int = 0) -> tuple[str, list[dict]]:
    """(text, facts): notes on ``n_people`` invented people, one paragraph each (~75 tokens a person)."""
    rng = random.Random(seed)
    names = [(f, l) for f in FIRST for l in LAST]
    rng.shuffle(names)
    seen, picked = set(), []
    for f, l in names:  # one person per first name, so questions by first name are unambiguous
        if f not in seen:
            seen.add(f)
            picked.append((f, l))
    if n_people > len(picked):
        raise ValueError(f"at most {len(picked)} people")
    parts, facts = ["Team notes. Each paragraph describes one colleague.\n"], []
    for f, l in picked[:n_people]:
        text, fact = person_notes(rng, f, l)
        parts.append(text)
        facts.append(fact)
    return "".join(parts), facts


def text_of_tokens(tokenizer, n_tokens: int, *, seed: int = 0) -> str:
    """Memory text of exactly ``n_tokens`` tokens (no special tokens), built from repeated team notes."""
    chunks, ids = [], []
    i = 0
    while len(ids) < n_tokens:
        text, _ = team_notes(len(FIRST), seed=seed + i)
        chunks.append(text)
        ids = tokenizer("".join(chunks), add_special_tokens=False).input_ids
        i += 1
    return tokenizer.decode(ids[:n_tokens])
