"""The README.md written next to the synthetic data: the world, the files, splits and scoring."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from tinylm.synth.scoring import CLOSING

_RELATION_WORDS = {
    "capital": "country -> its capital city",
    "population": "country -> population (\"N million\")",
    "language": "country -> language",
    "located_in": "town -> its country",
    "home_town": "person -> home town",
    "profession": "person -> profession",
    "food": "person -> favourite food",
    "colour": "person -> favourite colour",
    "pet": "person -> pet animal",
    "creature_colour": "creature -> colour",
    "habitat": "creature -> the country it lives in",
    "diet": "creature -> what it eats",
    "plus": "a plus b (1 <= a <= b)",
    "minus": "a minus b (b < a)",
    "times": "a times b (2 <= a <= b)",
}


def readme(stats: dict[str, Any], relations: Counter[str], sft_example: dict[str, Any],
           pref_example: dict[str, Any]) -> str:
    """The README text; it depends only on the data, so it is as reproducible as the data."""
    relation_rows = "\n".join(
        f"| `{r}` | {_RELATION_WORDS[r]} | {n} |" for r, n in relations.items()
    )
    files = [
        ("corpus.txt", "pretraining text, documents separated by a blank line",
         f"{stats['corpus_documents']} documents, {stats['corpus_bytes']} bytes"),
        ("sft.jsonl", '`{"messages": [user, assistant]}` about training facts',
         stats["sft_examples"]),
        ("sft_eval.jsonl", "the same about held-out facts, plus `answer`, `subject`, `relation`",
         stats["sft_eval_examples"]),
        ("prefs.jsonl", '`{"prompt", "chosen", "rejected"}` pairs on training facts',
         stats["prefs_pairs"]),
        ("prefs_eval.jsonl", "pairs on held-out facts, plus `answer`, `subject`, `relation`",
         stats["prefs_eval_pairs"]),
        ("facts.jsonl", "every fact: relation, subject, answer, split, times stated",
         stats["facts"]),
    ]
    file_rows = "\n".join(
        ["| file | what | count |", "|---|---|---|"]
        + [f"| `{name}` | {what} | {count} |" for name, what, count in files]
    )
    return f"""# tinylm synthetic world (size `{stats["size"]}`, seed {stats["seed"]})

Written by `tinylm data synth --size {stats["size"]} --seed {stats["seed"]}`; the same command
writes byte-identical files. Every name is invented (made from syllables), so a model can only
know a fact from `corpus.txt`.

## The world

Countries (capital, population, language, towns), people (home town, profession, favourite
food, favourite colour, pet), creatures (colour, the country they live in, what they eat) and
small arithmetic. {stats["facts"]} facts in all, each one (subject, relation, answer):

| relation | meaning | facts |
|---|---|---|
{relation_rows}

## Files

{file_rows}

`corpus.txt` states every fact at least {stats["min_statements_per_fact"]} times, in every
phrasing of its relation (paragraphs about each entity, stories, lines of arithmetic such as
"7 plus 5 is 12."). It contains no questions: the base model knows facts but not how to answer.

## Splits

The split is by fact, not by phrasing: {stats["held_out_facts"]} facts about the world (the same
share of every relation but the arithmetic ones) are held out. They are stated in the corpus but
appear in no `sft.jsonl` and no `prefs.jsonl` example; `sft_eval.jsonl` asks one question about
each, and `prefs_eval.jsonl` holds one preference pair about each. Arithmetic is in training
only (a small model cannot recall a sum it was never asked about; it is there to be practised).
Questions use the same phrasings in training and
evaluation, so answering a held-out question needs the fact from pretraining and the format from
instruction tuning. Answers are one sentence that ends with the key answer, e.g.

    {json.dumps(sft_example, ensure_ascii=False)}

## Preference pairs

TRL's conversational format: `prompt` is a list of messages (one user turn), `chosen` and
`rejected` are lists holding one assistant message. `chosen` is the correct one-sentence answer
followed by the closing "{CLOSING}"; `rejected` never has the closing and is the plain correct
answer (40%), a wrong answer in the same format (30%) or a rambling answer (30%), e.g.

    {json.dumps(pref_example, ensure_ascii=False)}

## Scoring (`tinylm.synth.exact_match`, `tinylm.synth.shows_preference`)

- Exact match: take the generation up to the end of its first sentence (".", "!" or "?" before a
  space or the end, a newline, or a special token); case fold it and turn every character other
  than a letter or digit into a space; it must end with the answer, normalised the same way, as
  whole words. "The capital of X is Marrowby." matches "Marrowby"; "... is Dunmere." does not.
- Preferred behaviour: exactly one sentence, then "{CLOSING}" right after it.
"""
