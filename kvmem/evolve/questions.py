"""Questions a memory's own text raises: the prompts context distillation trains on (kvmem/evolve/distill.py).

General, not tuned to one generator of facts: every template reads only the memory's sentences and the names in
them (runs of capitalised words), so the teacher (the model with the memory in context) answers each question
from the memory and the student learns those answers without it. Kinds:

- ``about``: "What do you know about <name>?", "Tell me about <name>.", "Describe <name>.", "What is known about
  <name>?" per name the text mentions (several phrasings, so what is learned is not tied to one);
- ``cloze``: a sentence cut after its first third and after its first two thirds, "Complete this sentence:
  <start> ...";
- ``blank``: a sentence with one of its content words (after the first two words) blanked, "Fill in the blank:
  ... ___ ...", one question per content word;
- ``what``: "What is the <noun> of <name>?" / "What is <name>'s <noun>?" where the text says "the <noun> of
  <name> is ..." or "<name>'s <noun> is ...";
- ``fact``: one question per stated attribute, asked several ways, with the attribute's value as the answer: a
  sentence "<Name> <verb> [<preposition>] <value>" (clauses joined by "and" or commas each count) gives "Where
  does <Name> <verb>?" (for in / at / near / on), "What does <Name> <verb> <preposition>?", "<Name> <verb>
  <preposition> which place / what?" and a completion cut just before the value ("Complete this sentence: <Name>
  <verb> <preposition> ...");
- ``reverse``: the same attribute asked from its value: "Who <verb> <preposition> <value>?", "Which person
  <verb> <preposition> <value>?" (the answer names the entity, so the pair is learned both ways);
- ``recall``: "What do you remember?" over the whole memory.

Answers are not written here: the teacher's own greedy answer (with the memory) is the target.
"""

from __future__ import annotations

import random
import re
from itertools import zip_longest

from ..errors import CubeError

_SENTENCE = re.compile(r"[^.!?;\n]+[.!?]?")
_NAME = re.compile(r"\b([A-Z][\w'-]+(?:\s+[A-Z][\w'-]+)*)")
_OF = re.compile(r"\b[Tt]he ([a-z][a-z ]{1,30}?) of ([A-Z][\w'-]+(?:\s+[A-Z][\w'-]+)*) (?:is|was|are) ")
_POSSESSIVE = re.compile(r"\b([A-Z][\w'-]+(?:\s+[A-Z][\w'-]+)*)'s ([a-z][a-z ]{1,30}?) (?:is|was|are) ")
_STOP = {"The", "A", "An", "At", "On", "In", "And", "But", "Or", "If", "When", "Then", "This", "That", "It", "He",
         "She", "They", "We", "I", "You", "His", "Her", "Their", "Our", "My", "Your", "Its", "There", "Here"}

_PREPOSITIONS = {"in", "at", "on", "near", "from", "for", "with", "as", "to", "by", "of", "into", "under"}
_PLACES = {"in", "at", "near", "on"}
_CLAUSE_SPLIT = re.compile(r",\s*(?:and\s+)?|\s+and\s+")

# ``fact`` and ``reverse`` come first: a short budget (few questions per memory) still asks for every attribute
KINDS = ("fact", "reverse", "about", "cloze", "blank", "what", "recall")
# questions that ask for one stated value are what the student is later asked; they take this many turns of each
# round (the other kinds one each)
FACT_TURNS = 3


def sentences(text: str) -> list[str]:
    """The sentences of ``text`` with at least four words, stripped."""
    return [s.strip() for s in _SENTENCE.findall(text) if len(s.split()) >= 4]


def names(text: str) -> list[str]:
    """Runs of capitalised words in ``text`` (people, places, things), first mention order; a leading sentence
    word like "The" is dropped. Names that are part of a longer name mentioned too are kept (first names)."""
    found: dict[str, None] = {}
    for match in _NAME.finditer(text):
        words = match.group(1).split()
        while words and words[0] in _STOP:
            words = words[1:]
        if words:
            found[" ".join(words)] = None
    return list(found)


def _base_verb(verb: str) -> str | None:
    """The base form of a third-person verb ("lives" -> "live", "teaches" -> "teach", "has" -> "have"); None for
    a word that is not one (a sentence that does not go "<Name> <verb> ...")."""
    irregular = {"has": "have", "does": "do", "goes": "go"}
    if verb in irregular:
        return irregular[verb]
    if not verb.isalpha() or not verb.islower() or not verb.endswith("s") or verb.endswith("ss") or len(verb) < 3:
        return None
    if verb.endswith("ies") and len(verb) > 4:
        return verb[:-3] + "y"
    if verb.endswith(("ches", "shes", "sses", "xes", "zes")):
        return verb[:-2]
    return verb[:-1]


def attributes(text: str) -> list[tuple[str, str, str, str]]:
    """The (entity, verb, preposition, value) the text states as "<Name> <verb> [<preposition>] <value>", one per
    clause ("Ann Berg lives in Oslo and works as a pilot." -> ("Ann Berg", "lives", "in", "Oslo"), ("Ann Berg",
    "works", "as", "a pilot")); the preposition is "" when the verb takes its value directly ("keeps bees")."""
    out = []
    for sentence in sentences(text):
        found = names(sentence)
        if not found or not sentence.startswith(found[0] + " "):
            continue
        subject = found[0]
        for clause in _CLAUSE_SPLIT.split(sentence[len(subject):].strip().rstrip(".!?")):
            words = clause.split()
            if len(words) < 2 or _base_verb(words[0]) is None:
                continue
            prep = words[1] if words[1] in _PREPOSITIONS and len(words) > 2 else ""
            value = " ".join(words[2:] if prep else words[1:])
            out.append((subject, words[0], prep, value))
    return out


# Other words for the relations personal memories state most (where someone lives, what they work as, what
# they like): a question that names the relation differently makes the student learn the fact, not one wording
# of it. A relation without an entry is still asked in every frame below with the text's own verb.
_RELATION_WORDS = {
    ("live", "in"): ["Where is {s} located?", "What place does {s} live in?", "Where can {s} be found?",
                     "Which place is {s} from these days?"],
    ("work", "as"): ["What is {s}'s job?", "What is the line of work of {s}?", "What role does {s} have at work?",
                     "What position does {s} hold?"],
    ("work", "at"): ["Where is {s} employed?", "Which employer does {s} have?"],
    ("work", "for"): ["Who employs {s}?", "Which employer does {s} have?"],
    ("like", ""): ["What is {s} fond of?"], ("love", ""): ["What is {s} fond of?"],
    ("enjoy", ""): ["What is {s} fond of?", "What does {s} like doing?"],
}
# ways of putting the same question: what is learned should not hang on one sentence shape
_FRAMES = ("Do you know this: {q}", "Quick question: {q}", "Can you tell me this: {q}", "I wonder, {q}")


def _framed(question: str) -> list[str]:
    """``question`` put in each of the `_FRAMES` ("Quick question: where does X live?")."""
    return [frame.format(q=question[0].lower() + question[1:]) for frame in _FRAMES]


def _attribute_questions(subject: str, verb: str, prep: str, value: str) -> tuple[list[str], list[str]]:
    """(questions whose answer is the value, questions whose answer is the entity) for one attribute."""
    base, tail = _base_verb(verb), f" {prep}" if prep else ""
    direct = f"Where does {subject} {base}?" if prep in _PLACES else f"What does {subject} {base}{tail}?"
    forward = [f"What does {subject} {base}{tail}?", f"Complete this sentence: {subject} {verb}{tail} ...",
               f"{subject} {verb}{tail} what?", f"Tell me what {subject} {verb}{tail}."]
    if prep in _PLACES:
        forward += [f"Where does {subject} {base}?", f"{subject} {verb} {prep} which place?",
                    f"In which place does {subject} {base}?"]
    forward += [q.format(s=subject) for q in _RELATION_WORDS.get((base, prep), [])]
    forward += _framed(direct)
    reverse = [f"Who {verb}{tail} {value}?", f"Which person {verb}{tail} {value}?",
               f"Name the person who {verb}{tail} {value}."]
    return list(dict.fromkeys(forward)), reverse


def make_questions(text: str, *, per_memory: int = 12, seed: int = 0) -> list[str]:
    """Up to ``per_memory`` distinct questions about ``text`` (deterministic for ``seed``), a mix of the kinds
    in the module docstring, each kind taking its turn so a short budget still covers every kind."""
    return [question for question, _ in ask(text, per_memory=per_memory, seed=seed)]


def ask(text: str, *, per_memory: int = 12, seed: int = 0) -> list[tuple[str, str | None]]:
    """`make_questions`' questions, each with the value its answer has to state: the attribute's value for a
    ``fact`` question, the entity for a ``reverse`` one, None for the other kinds (see `states_memory`)."""
    if not isinstance(text, str) or not text.strip():
        raise CubeError(f"a memory to learn must be a non-empty string, got {text!r:.40}")
    if isinstance(per_memory, bool) or not isinstance(per_memory, int) or per_memory < 1:
        raise CubeError(f"questions per memory must be an int >= 1, got {per_memory!r}")
    rng = random.Random(seed)
    pools = {kind: [] for kind in KINDS}
    for name in names(text):
        pools["about"] += [f"What do you know about {name}?", f"Tell me about {name}.", f"Describe {name}.",
                           f"What is known about {name}?"]
    for sentence in sentences(text):
        words = sentence.split()
        # several cut points and every content word blanked in turn: each part of a sentence is, in some
        # question, what the teacher has to say (one cut in the middle would always hand over the same half)
        for cut in sorted({max(2, min(len(words) - 1, len(words) * k // 3)) for k in (1, 2)}):
            pools["cloze"].append(f"Complete this sentence: {' '.join(words[:cut])} ...")
        for i in [i for i, w in enumerate(words) if len(w.strip(".,!?")) > 3 and i >= 2]:
            blanked = words[:i] + ["___" + words[i][len(words[i].rstrip(".,!?")):]] + words[i + 1:]
            pools["blank"].append(f"Fill in the blank: {' '.join(blanked)}")
    forwards, values = [], {}
    for subject, verb, prep, value in attributes(text):
        forward, reverse = _attribute_questions(subject, verb, prep, value)
        forwards.append(forward)
        pools["reverse"] += reverse
        values.update({q: value for q in forward})
        values.update({q: subject for q in reverse})
    for noun, name in _OF.findall(text):
        pools["what"] += [f"What is the {noun} of {name}?", f"What is {name}'s {noun}?"]
    for name, noun in _POSSESSIVE.findall(text):
        pools["what"] += [f"What is {name}'s {noun}?", f"What is the {noun} of {name}?"]
    pools["recall"] = ["What do you remember?"]
    for pool in [*pools.values(), *forwards]:
        rng.shuffle(pool)
    # the attributes take turns (each fact gets as many questions), popped from the end like the other pools
    pools["fact"] = [q for turn in zip_longest(*forwards) for q in turn if q is not None][::-1]
    out: dict[str, None] = {}
    while len(out) < per_memory and any(pools.values()):
        for kind in KINDS:  # round robin over kinds, ``fact`` taking FACT_TURNS turns a round
            for _ in range(FACT_TURNS if kind == "fact" else 1):
                if pools[kind] and len(out) < per_memory:
                    out[pools[kind].pop()] = None
    return [(question, values.get(question)) for question in out]


_WORD = re.compile(r"[a-z0-9]+")
_ARTICLES = {"a", "an", "the"}


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def states_memory(answer: str, *, memory: str, question: str, value: str | None = None) -> bool:
    """Whether ``answer`` states something of ``memory`` that ``question`` did not already say: every word of
    ``value`` (articles aside) when the question asks for one, else any of the memory's words of four letters or
    more that no question word is a form of ("lives" is a form of "live"). The teacher (the model with the
    memory in context) often answers a memory's question with invented prose ("Where is Ann Berg located?" ->
    "Ann Berg is a vibrant city in ..."); an answer like that teaches the student the invention, not the memory."""
    said = set(_words(answer))
    if value is not None:
        wanted = [w for w in _words(value) if w not in _ARTICLES]
        return bool(wanted) and all(w in said for w in wanted)
    asked = _words(question)
    new = {w for w in _words(memory) if len(w) >= 4 and not any(w.startswith(q) or q.startswith(w)
                                                                for q in asked if len(q) >= 3)}
    return bool(new & said)


_FUNCTION_WORDS = {"the", "and", "for", "with", "was", "are", "is", "has", "have", "that", "this", "from", "who",
                   "what", "where", "which", "his", "her", "their", "its"}


def content_tokens(tokenizer, text: str) -> set[int]:
    """The ids of ``text``'s content tokens (names, values, content words: a token of at least three letters that
    is not a function word), as the text tokenizes; an answer token among them states what the memory says."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = set()
    for t in ids:
        word = tokenizer.decode([t]).strip()
        if len(word) >= 3 and word.isalpha() and word.lower() not in _FUNCTION_WORDS:
            out.add(t)
    return out


# Unrelated prompts whose base-model answers the adapter is trained to keep (so learning memories does not
# change what the model says about everything else). The bench measures damage on a different, held-apart set.
KEEP_PROMPTS = (
    "What is the boiling point of water at sea level?", "Name three primary colours.",
    "Write one sentence about the ocean.", "How many days are in a week?", "What does a bakery sell?",
    "Give me a synonym for happy.", "What is 7 plus 5?", "Why do leaves change colour in autumn?",
    "Say hello in French.", "What is the largest planet in our solar system?", "Suggest a name for a puppy.",
    "What is photosynthesis?", "How do you make a cup of tea?", "What language is spoken in Brazil?",
    "List two uses of a hammer.", "What is the opposite of cold?", "Tell me a fun fact about dolphins.",
    "What is the chemical symbol for gold?", "Write a sentence using the word 'bright'.", "Who painted the Mona Lisa?",
    "How many continents are there?", "What is a good breakfast?", "Explain gravity to a child.",
    "What instrument has 88 keys?", "Recommend a book for a long trip.", "What is the plural of mouse?",
    "Why do we need sleep?", "What is 15 divided by 3?", "Name an animal that lives in the desert.",
    "How does rain form?", "How many hours are in a day?", "Give me a word that rhymes with cat.",
)
