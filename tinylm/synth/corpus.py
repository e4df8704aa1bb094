"""The pretraining corpus: paragraphs about each entity, simple stories, and worded arithmetic.

Each entity gets `paragraphs` documents that state all of its facts once, in a shuffled order,
with the phrasing of each fact moving on by one from document to document, so every fact is
read in every phrasing of its relation. Stories restate facts in their own words. Nothing in
the corpus is false in the world, and no document is a question and answer: the base model
learns the facts, and only instruction tuning teaches it to answer questions.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

from tinylm.synth.templates import statement, with_article
from tinylm.synth.world import Country, Creature, Fact, Person, SizeSpec, World

Sentence = tuple[str, list[Fact]]  # a sentence and the facts it states

_OPENERS = {
    "country": ["Here is a short account of {s}.", "{s} is a country.",
                "This note is about {s}.", ""],
    "person": ["Here is what we know about {s}.", "This note is about {s}.",
               "A few words about {s}.", "", ""],
    "creature": ["The {s} is a strange little animal.", "This note is about the {s}.", "", ""],
}
_ITEMS = [("coin", "coins"), ("stone", "stones"), ("shell", "shells"), ("book", "books"),
          ("cup", "cups"), ("candle", "candles"), ("basket", "baskets")]


def _paragraph(rng: random.Random, kind: str, subject: str, facts: list[Fact], k: int,
               offsets: dict[Fact, int], counts: Counter[Fact]) -> str:
    order = list(facts)
    rng.shuffle(order)
    sentences = [rng.choice(_OPENERS[kind]).format(s=subject)]
    for fact in order:
        sentences.append(statement(fact, offsets[fact] + k))
        counts[fact] += 1
    return " ".join(s for s in sentences if s)


def _count(n: int, item: tuple[str, str]) -> str:
    return f"{n} {item[0] if n == 1 else item[1]}"


def _journey(rng: random.Random, w: World) -> list[Sentence]:
    p1, p2 = rng.sample(w.people, 2)
    c = rng.choice(w.countries)
    return [
        (f"{p1.name} set out from {p1.home_town} one morning.", [_f("home_town", p1)]),
        (f"{p1.name}, who works as {with_article(p1.profession)}, wanted to see {c.name}.",
         [_f("profession", p1)]),
        (f"After a long walk, {p1.name} reached {c.capital}, the capital of {c.name}.",
         [_f("capital", c)]),
        (f"In {c.name} the people speak {c.language}, so {p1.name} learned a few words of "
         f"{c.language}.", [_f("language", c)]),
        (f"In the market of {c.capital}, {p1.name} met {p2.name}, who lives in {p2.home_town}.",
         [_f("home_town", p2)]),
        (f"{p2.name} shared some {p2.food}, because {p2.food} is the favourite food of "
         f"{p2.name}.", [_f("food", p2)]),
        (f"In the evening {p1.name} walked home to {p1.home_town}.", []),
    ]


def _encounter(rng: random.Random, w: World) -> list[Sentence]:
    k = rng.choice(w.creatures)
    p = rng.choice(w.people)
    c = next(c for c in w.countries if c.name == k.habitat)
    town = rng.choice([c.capital, *c.towns])
    if town == c.capital:
        where = (f"{p.name} was walking near {town}, the capital of {c.name}, when "
                 f"{with_article(k.name)} crossed the path.", [_f("capital", c)])
    else:
        where = (f"{p.name} was walking near {town}, a town in {c.name}, when "
                 f"{with_article(k.name)} crossed the path.", [Fact("located_in", town, c.name)])
    return [
        where,
        (f"The {k.name} was {k.colour}, as every {k.name} is.", [_f("creature_colour", k)]),
        (f"{p.name} knew that the {k.name} lives in {c.name} and eats {k.diet}.",
         [_f("habitat", k), _f("diet", k)]),
        (f"{p.name} put down some {k.diet}, and the {k.name} ate every bite.", []),
        (f"Later, back home in {p.home_town}, {p.name} told the pet {p.pet} all about it.",
         [_f("home_town", p), _f("pet", p)]),
    ]


def _market(rng: random.Random, w: World) -> list[Sentence]:
    c = rng.choice(w.countries)
    town = rng.choice(c.towns)
    p1, p2 = rng.sample(w.people, 2)
    return [
        (f"It was market day in {town}, a town in {c.name}.", [Fact("located_in", town, c.name)]),
        (f"{p1.name}, {with_article(p1.profession)}, came to buy {p1.food}, since {p1.food} is "
         f"what {p1.name} likes to eat most.", [_f("profession", p1), _f("food", p1)]),
        (f"{p2.name} was there too, dressed all in {p2.colour}, the favourite colour of "
         f"{p2.name}.", [_f("colour", p2)]),
        (f"{p2.name} works as {with_article(p2.profession)} and had brought a pet {p2.pet} "
         "along.", [_f("profession", p2), _f("pet", p2)]),
        (f"The two of them talked until the sun went down over {town}.", []),
    ]


def _visit(rng: random.Random, w: World) -> list[Sentence]:
    p1, p2 = rng.sample(w.people, 2)
    return [
        (f"{p1.name} went to {p2.home_town} to visit {p2.name}, who lives there.",
         [_f("home_town", p2)]),
        (f"{p2.name} has a pet {p2.pet}, and it ran to the door to say hello.", [_f("pet", p2)]),
        (f"Over tea, {p1.name}, who is {with_article(p1.profession)}, told stories about work.",
         [_f("profession", p1)]),
        (f"{p1.name} had brought a gift wrapped in {p1.colour} paper, because {p1.colour} is "
         f"the favourite colour of {p1.name}.", [_f("colour", p1)]),
    ]


def _sums(rng: random.Random, w: World) -> list[Sentence]:
    p = rng.choice(w.people)
    fact = rng.choice(w.arithmetic)
    (a, b), c = fact.operands, int(fact.answer)
    item = rng.choice(_ITEMS)
    intro = (f"{p.name} lives in {p.home_town}.", [_f("home_town", p)])
    if fact.relation == "plus":
        told = [(f"{p.name} had {_count(a, item)} and found {b} more.", []),
                (f"Now {p.name} has {_count(c, item)}, because {a} plus {b} is {c}.", [fact])]
    elif fact.relation == "minus":
        told = [(f"{p.name} had {_count(a, item)} and gave {b} away.", []),
                (f"{p.name} has {_count(c, item)} left, because {a} minus {b} is {c}.", [fact])]
    else:
        told = [(f"{p.name} made {a} piles of {b} {item[1]}.", []),
                (f"That is {_count(c, item)} in all, because {a} times {b} is {c}.", [fact])]
    return [intro, *told]


_STORIES: list[Callable[[random.Random, World], list[Sentence]]] = [
    _journey, _encounter, _market, _visit, _sums,
]

# The entity attribute behind each relation, where the names differ.
_ATTRIBUTE = {"creature_colour": "colour"}


def _f(relation: str, entity: Person | Creature | Country) -> Fact:
    return Fact(relation, entity.name, getattr(entity, _ATTRIBUTE.get(relation, relation)))


def _arithmetic_documents(rng: random.Random, w: World, spec: SizeSpec,
                          counts: Counter[Fact]) -> list[str]:
    lines: list[str] = []
    for fact in w.arithmetic:
        offset = rng.randrange(8)
        for k in range(spec.arithmetic_repeats):
            lines.append(statement(fact, offset + k))
            counts[fact] += 1
    rng.shuffle(lines)
    docs = []
    while lines:
        n = rng.randint(8, 16)
        docs.append("\n".join(lines[:n]))
        lines = lines[n:]
    return docs


def build_corpus(rng: random.Random, w: World, spec: SizeSpec) -> tuple[str, Counter[Fact]]:
    """The corpus text (documents separated by blank lines) and how often each fact is stated."""
    counts: Counter[Fact] = Counter()
    offsets = {fact: rng.randrange(12) for fact in w.facts()}
    by_subject: dict[str, list[Fact]] = {}
    for fact in w.facts():
        by_subject.setdefault(fact.subject, []).append(fact)
    entities: list[tuple[str, str, list[Fact]]] = []
    for c in w.countries:
        facts = by_subject[c.name] + [f for t in c.towns for f in by_subject[t]]
        entities.append(("country", c.name, facts))
    entities += [("person", p.name, by_subject[p.name]) for p in w.people]
    entities += [("creature", k.name, by_subject[k.name]) for k in w.creatures]
    docs = [
        _paragraph(rng, kind, subject, facts, k, offsets, counts)
        for kind, subject, facts in entities
        for k in range(spec.paragraphs)
    ]
    docs += _arithmetic_documents(rng, w, spec, counts)
    for i in range(spec.stories):
        sentences = _STORIES[i % len(_STORIES)](rng, w)
        for _, facts in sentences:
            counts.update(facts)
        docs.append(" ".join(text for text, _ in sentences))
    rng.shuffle(docs)
    return "\n\n".join(docs) + "\n", counts
