"""How generations are scored on the synthetic data: exact match and the preferred style.

Both are pure functions of the generated text, so quickstart, eval and tests score the same way.

Exact match: the generation's first sentence (up to the first ".", "!" or "?" that ends a
sentence, a newline or a special token such as "<|im_end|>"), compared after normalising
(case folded, every character other than a letter or digit a space, spaces collapsed), must END
with the normalised key answer as whole words. "The capital of Veltoria is Marrowby." and
"Marrowby" match the answer "Marrowby"; "The capital of Veltoria is Dunmere. Or Marrowby."
does not, and neither does "12 minus 5 is 17." for the answer "7". Canonical answers are built
to end with their key, so a model that learnt the answer format is scored exactly.

Preferred style: one sentence, then the closing `CLOSING` ("That is all we know.") right after
it. A rambling answer (more than one sentence before the closing) or no closing does not count.

The closing is made of words the corpus uses (never in this order), so a tokenizer trained on
the corpus has a trained token for each: with "Hope that helps!" (words the corpus never uses,
spelt by a 1.7k tokenizer as ten pieces such as "he", "l", "p", "s") DPO had to teach spelling,
not style, and whether 100 steps got there swung between 0% and 95% of generations with the
pretraining length.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

CLOSING = "That is all we know."
"""The closing that preferred answers end with (never written anywhere else in the data)."""

_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n|<\|")
_NOT_WORD = re.compile(r"[^0-9a-z]+")


def normalize(text: str) -> str:
    """Case folded, anything but letters and digits turned into single spaces, trimmed."""
    return _NOT_WORD.sub(" ", text.casefold()).strip()


def first_sentence(text: str) -> str:
    """The text up to the end of its first sentence (without the full stop)."""
    text = text.lstrip()
    match = _SENTENCE_END.search(text)
    return text[: match.start()] if match else text


def exact_match(generated: str, example: Mapping[str, Any] | str) -> bool:
    """True when the first sentence of `generated` ends with the example's key answer.

    `example` is an `sft_eval.jsonl` record (its "answer" field is used) or the answer itself.
    """
    answer = example if isinstance(example, str) else example["answer"]
    key = normalize(answer)
    said = normalize(first_sentence(generated))
    return bool(key) and (said == key or said.endswith(" " + key))


def shows_preference(generated: str) -> bool:
    """True when `generated` is one short sentence followed directly by `CLOSING`."""
    text = generated.lstrip()
    at = text.find(CLOSING)
    if at <= 0:
        return False
    before = text[:at].rstrip()
    # Exactly one sentence before the closing: it ends with its only sentence end.
    ends = list(_SENTENCE_END.finditer(before + " "))
    return len(ends) == 1 and ends[0].end() == len(before) and len(normalize(before)) > 0
