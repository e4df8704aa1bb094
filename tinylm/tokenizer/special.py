"""Special tokens (<|endoftext|>, <|im_start|>, ...): checking a list of them, and finding
their spellings in text. Shared by training and encoding."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import regex

from tinylm.errors import TinyLMError


def special_splitter(spellings: Iterable[str]) -> regex.Pattern:
    """A regex that finds any of the special-token spellings (the longest where one begins
    another)."""
    alternatives = sorted(spellings, key=len, reverse=True)
    return regex.compile("|".join(regex.escape(s) for s in alternatives))


def check_special_tokens(special_tokens: Sequence[str]) -> list[str]:
    """Special tokens as a list; an error for an empty or repeated one."""
    specials = list(special_tokens)
    for s in specials:
        if not isinstance(s, str) or not s:
            raise TinyLMError(f"special token {s!r} must be a non-empty string")
    repeated = {s for s in specials if specials.count(s) > 1}
    if repeated:
        raise TinyLMError(f"special token {sorted(repeated)[0]!r} is given twice")
    return specials
