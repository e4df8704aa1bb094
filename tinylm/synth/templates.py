"""How each kind of fact is stated, asked and answered.

Per relation: several statements (the corpus cycles through them, so no fact is learnt as one
fixed sentence), several questions (training and held-out questions use the same set, so the
format learnt on training facts transfers), and one canonical answer. The canonical answer is
also the first statement, so a held-out answer is a sentence the model has read in pretraining,
and it always ends with the key answer, which is what `exact_match` checks.

Placeholders: {s} subject, {a} answer, {an_a} / {an_s} with "a" or "an", {x} {y} operands.
"""

from __future__ import annotations

from dataclasses import dataclass

from tinylm.synth.world import Fact


@dataclass(frozen=True)
class Relation:
    statements: tuple[str, ...]
    questions: tuple[str, ...]

    @property
    def answer(self) -> str:
        return self.statements[0]


RELATIONS: dict[str, Relation] = {
    "capital": Relation(
        ("The capital of {s} is {a}.", "{a} is the capital of {s}.",
         "The capital city of {s} is {a}.", "{s} is governed from its capital, {a}.",
         "{a} has long been the capital of {s}."),
        ("What is the capital of {s}?", "Which city is the capital of {s}?",
         "Name the capital of {s}.", "What is the capital city of {s}?"),
    ),
    "population": Relation(
        ("The population of {s} is {a}.", "{s} has a population of {a}.",
         "About {a} people live in {s}.", "{s} is home to {a} people."),
        ("What is the population of {s}?", "How many people live in {s}?",
         "How large is the population of {s}?"),
    ),
    "language": Relation(
        ("The language spoken in {s} is {a}.", "The people of {s} speak {a}.",
         "In {s}, the language is {a}.", "{a} is the language of {s}."),
        ("What language do people speak in {s}?", "Which language is spoken in {s}?",
         "What is the language of {s}?"),
    ),
    "located_in": Relation(
        ("{s} is in {a}.", "{s} is a town in {a}.", "The town of {s} lies in {a}.",
         "You can find the town of {s} in {a}."),
        ("In which country is {s}?", "Where is {s}?", "Which country is {s} in?"),
    ),
    "home_town": Relation(
        ("{s} lives in {a}.", "{s} comes from {a}.", "The home town of {s} is {a}.",
         "{s} has always lived in the town of {a}."),
        ("Where does {s} live?", "What is the home town of {s}?",
         "Which town does {s} come from?"),
    ),
    "profession": Relation(
        ("{s} works as {an_a}.", "{s} is {an_a}.", "By trade, {s} is {an_a}.",
         "{s} earns a living as {an_a}."),
        ("What does {s} do for a living?", "What is the job of {s}?",
         "What is the profession of {s}?"),
    ),
    "food": Relation(
        ("The favourite food of {s} is {a}.", "{s} loves to eat {a}.",
         "{s} likes {a} more than any other food.", "Of all foods, {s} likes {a} best."),
        ("What is the favourite food of {s}?", "What food does {s} like best?",
         "What does {s} love to eat?"),
    ),
    "colour": Relation(
        ("The favourite colour of {s} is {a}.", "{s} likes the colour {a} best.",
         "{s} loves anything that is {a}.", "Of all colours, {s} prefers {a}."),
        ("What is the favourite colour of {s}?", "Which colour does {s} like best?",
         "What colour does {s} prefer?"),
    ),
    "pet": Relation(
        ("{s} has a pet {a}.", "{s} keeps {an_a} as a pet.", "The pet of {s} is {an_a}.",
         "{s} shares a home with a pet {a}."),
        ("What pet does {s} have?", "What animal does {s} keep as a pet?",
         "What kind of pet does {s} have?"),
    ),
    "creature_colour": Relation(
        ("The {s} is {a}.", "Every {s} is {a} in colour.", "The colour of the {s} is {a}.",
         "You can tell {an_s} by its {a} colour."),
        ("What colour is the {s}?", "What is the colour of the {s}?",
         "Which colour is {an_s}?"),
    ),
    "habitat": Relation(
        ("The {s} lives in {a}.", "The {s} is found only in {a}.",
         "{an_s} can be seen in the wild in {a}.", "The home of the {s} is {a}."),
        ("Where does the {s} live?", "In which country is the {s} found?",
         "Where can you find the {s}?"),
    ),
    "diet": Relation(
        ("The {s} eats {a}.", "The {s} feeds on {a}.", "The favourite meal of the {s} is {a}.",
         "{an_s} will eat {a} whenever it can."),
        ("What does the {s} eat?", "What is the food of the {s}?", "What does the {s} feed on?"),
    ),
    "plus": Relation(
        ("{x} plus {y} is {a}.", "{x} plus {y} equals {a}.", "The sum of {x} and {y} is {a}.",
         "Adding {x} and {y} gives {a}.", "If you add {y} to {x}, you get {a}."),
        ("What is {x} plus {y}?", "How much is {x} plus {y}?", "Compute {x} plus {y}.",
         "What do you get when you add {x} and {y}?"),
    ),
    "minus": Relation(
        ("{x} minus {y} is {a}.", "{x} minus {y} equals {a}.",
         "Take {y} away from {x} and {a} is left.", "Subtracting {y} from {x} gives {a}.",
         "The difference between {x} and {y} is {a}."),
        ("What is {x} minus {y}?", "How much is {x} minus {y}?", "Compute {x} minus {y}.",
         "What do you get when you take {y} away from {x}?"),
    ),
    "times": Relation(
        ("{x} times {y} is {a}.", "{x} times {y} equals {a}.",
         "The product of {x} and {y} is {a}.", "Multiplying {x} by {y} gives {a}.",
         "{x} groups of {y} make {a}."),
        ("What is {x} times {y}?", "How much is {x} times {y}?", "Compute {x} times {y}.",
         "What do you get when you multiply {x} by {y}?"),
    ),
}

ARITHMETIC = ("plus", "minus", "times")


def with_article(word: str) -> str:
    """`word` after "a" or "an", chosen by its first letter."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def render(template: str, fact: Fact, answer: str | None = None) -> str:
    """A template filled in with a fact (or with another `answer`, to make a wrong one)."""
    a = fact.answer if answer is None else answer
    x, y = fact.operands
    text = template.format(
        s=fact.subject, a=a, an_a=with_article(a), an_s=with_article(fact.subject), x=x, y=y
    )
    return text[0].upper() + text[1:]


def statement(fact: Fact, index: int) -> str:
    """The fact in phrasing number `index` (cycling through the relation's statements)."""
    templates = RELATIONS[fact.relation].statements
    return render(templates[index % len(templates)], fact)


def question(fact: Fact, index: int) -> str:
    """The question about a fact in phrasing number `index`."""
    templates = RELATIONS[fact.relation].questions
    return render(templates[index % len(templates)], fact)


def answer(fact: Fact, value: str | None = None) -> str:
    """The canonical one-sentence answer, ending with the key answer (or with `value`)."""
    return render(RELATIONS[fact.relation].answer, fact, value)
