"""The invented world: pronounceable names from syllables, entities, and their facts.

Everything is drawn from one `random.Random`, in a fixed order, so a seed gives the same world.
A fact is one (subject, relation, answer) triple; every question and every statement about the
world is about exactly one fact, which is what lets the splits hold facts out of training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# Syllable parts chosen so that any combination reads aloud easily and splits into few tokens.
_ONSETS = "b d f g h k l m n p r s t v z b d k l m r s t br dr gr st th sh".split() + ["", ""]
_INNER_ONSETS = "b d f g k l m n p r s t v z".split()
_VOWELS = "a e i o u a e o".split()
_INNER_CODAS = ["", "", "", "n", "r", "l"]
_CODAS = "n r l s m t d k".split()

_COUNTRY_ENDS = ["ria", "nia", "land", "mark", "dor", "vell", "ora", "stan", "esia", "avia"]
_TOWN_ENDS = ["by", "mere", "ford", "wick", "ton", "holm", "gate", "dale", "haven", "moor"]
_LANGUAGE_ENDS = ["ish", "ese", "ic", "ian"]
_FAMILY_ENDS = ["", "", "", "son", "ard", "ey", "er"]
_CREATURE_ENDS = ["et", "ling", "ock", "ax", "ip", "oon", "el", "imp"]

COLOURS = "red blue green yellow purple orange white black grey brown pink silver".split()
FOODS = (
    "soup plums rice cheese honey pears bread beans noodles figs carrots pie porridge "
    "dumplings olives mushrooms apples lentils"
).split()
PROFESSIONS = (
    "baker fisher carpenter weaver potter farmer doctor teacher tailor miner painter "
    "sailor gardener builder singer merchant librarian blacksmith"
).split()
PETS = "cat dog owl goat rabbit parrot tortoise hamster ferret lizard pony duck".split()


@dataclass(frozen=True)
class SizeSpec:
    """How big a world to make and how much text to write about it."""

    countries: int
    towns_per_country: int
    people: int
    creatures: int
    plus_max: int  # facts a + b with 1 <= a <= b <= plus_max
    minus_facts: int  # facts a - b drawn from 2 <= a <= minus_max
    minus_max: int
    times_max: int  # facts a * b with 2 <= a <= b <= times_max
    held_out: int  # facts kept out of every training question (one sft_eval question each)
    paragraphs: int  # documents about each entity (each states all of its facts once)
    arithmetic_repeats: int  # statements of each arithmetic fact
    stories: int
    prefs: int


SIZES: dict[str, SizeSpec] = {
    "small": SizeSpec(
        countries=12, towns_per_country=3, people=90, creatures=24, plus_max=10,
        minus_facts=50, minus_max=15, times_max=7, held_out=200, paragraphs=10,
        arithmetic_repeats=14, stories=700, prefs=1500,
    ),
    "medium": SizeSpec(
        countries=30, towns_per_country=4, people=320, creatures=80, plus_max=20,
        minus_facts=200, minus_max=30, times_max=12, held_out=600, paragraphs=12,
        arithmetic_repeats=16, stories=3000, prefs=5000,
    ),
}


@dataclass(frozen=True)
class Fact:
    """One checkable fact. `operands` holds the two numbers of an arithmetic fact."""

    relation: str
    subject: str
    answer: str
    operands: tuple[int, int] = (0, 0)


@dataclass
class Country:
    name: str
    capital: str
    population: str
    language: str
    towns: list[str] = field(default_factory=list)  # besides the capital


@dataclass
class Person:
    name: str
    home_town: str
    profession: str
    food: str
    colour: str
    pet: str


@dataclass
class Creature:
    name: str
    colour: str
    habitat: str
    diet: str


@dataclass
class World:
    """The entities of a world and the list of all its facts (in a fixed order)."""

    countries: list[Country]
    people: list[Person]
    creatures: list[Creature]
    arithmetic: list[Fact]

    def facts(self) -> list[Fact]:
        """Every fact of the world: the entities' attributes, then the arithmetic."""
        out: list[Fact] = []
        for c in self.countries:
            out += [
                Fact("capital", c.name, c.capital),
                Fact("population", c.name, c.population),
                Fact("language", c.name, c.language),
            ]
            out += [Fact("located_in", town, c.name) for town in c.towns]
        for p in self.people:
            out += [
                Fact("home_town", p.name, p.home_town),
                Fact("profession", p.name, p.profession),
                Fact("food", p.name, p.food),
                Fact("colour", p.name, p.colour),
                Fact("pet", p.name, p.pet),
            ]
        for k in self.creatures:
            out += [
                Fact("creature_colour", k.name, k.colour),
                Fact("habitat", k.name, k.habitat),
                Fact("diet", k.name, k.diet),
            ]
        return out + self.arithmetic


class _Namer:
    """Makes names from syllables and never gives the same word twice."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def stem(self, syllables: int, end: str) -> str:
        """Syllables (consonant, vowel, sometimes a consonant) that join `end` smoothly."""
        rng = self.rng
        word = rng.choice(_ONSETS) + rng.choice(_VOWELS)
        for _ in range(1, syllables):
            word += rng.choice(_INNER_CODAS) + rng.choice(_INNER_ONSETS) + rng.choice(_VOWELS)
        # A vowel must not meet a vowel at the joint, nor two consonants pile up.
        if end[:1] in tuple("aeiou") or (not end and rng.random() < 0.5):
            word += rng.choice(_CODAS)
        return word

    def make(self, syllables: tuple[int, int], ends: list[str], capital: bool = True) -> str:
        """A new name of `syllables` (min, max) syllables plus one of `ends`."""
        while True:
            end = self.rng.choice(ends)
            word = self.stem(self.rng.randint(*syllables), end) + end
            if not 4 <= len(word) <= 9 or word.lower() in self.used:
                continue
            self.used.add(word.lower())
            return word.capitalize() if capital else word


def build_world(rng: random.Random, spec: SizeSpec) -> World:
    """Draw a world of the given size from `rng`."""
    namer = _Namer(rng)
    countries: list[Country] = []
    # Countries take their endings in turn, so that no two look alike more than needed.
    country_ends = rng.sample(_COUNTRY_ENDS, len(_COUNTRY_ENDS))
    for i in range(spec.countries):
        name = namer.make((1, 2), [country_ends[i % len(country_ends)]])
        capital = namer.make((1, 2), _TOWN_ENDS)
        population = f"{rng.randint(2, 90)} million"
        language = namer.make((1, 2), _LANGUAGE_ENDS)
        towns = [namer.make((1, 2), _TOWN_ENDS) for _ in range(spec.towns_per_country)]
        countries.append(Country(name, capital, population, language, towns))
    all_towns = [t for c in countries for t in [c.capital, *c.towns]]
    people: list[Person] = []
    for _ in range(spec.people):
        first = namer.make((2, 2), [""])
        family = namer.make((2, 2), _FAMILY_ENDS)
        people.append(
            Person(
                f"{first} {family}", rng.choice(all_towns), rng.choice(PROFESSIONS),
                rng.choice(FOODS), rng.choice(COLOURS), rng.choice(PETS),
            )
        )
    creatures = [
        Creature(
            namer.make((1, 2), _CREATURE_ENDS, capital=False), rng.choice(COLOURS),
            rng.choice(countries).name, rng.choice(FOODS),
        )
        for _ in range(spec.creatures)
    ]
    return World(countries, people, creatures, _arithmetic(rng, spec))


def _arithmetic(rng: random.Random, spec: SizeSpec) -> list[Fact]:
    facts = [
        Fact("plus", f"{a} plus {b}", str(a + b), (a, b))
        for a in range(1, spec.plus_max + 1)
        for b in range(a, spec.plus_max + 1)
    ]
    minus = [(a, b) for a in range(2, spec.minus_max + 1) for b in range(1, a)]
    for a, b in sorted(rng.sample(minus, min(spec.minus_facts, len(minus)))):
        facts.append(Fact("minus", f"{a} minus {b}", str(a - b), (a, b)))
    facts += [
        Fact("times", f"{a} times {b}", str(a * b), (a, b))
        for a in range(2, spec.times_max + 1)
        for b in range(a, spec.times_max + 1)
    ]
    return facts
