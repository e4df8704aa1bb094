"""Pre-tokenization: the split regexes, and cutting text into the chunks that BPE works within.

Two built-in patterns, written so that the `regex` package, tiktoken (fancy-regex) and Hugging
Face tokenizers (Oniguruma) all read them the same way:

- "gpt4": the cl100k_base pattern of GPT-4 (the default). tiktoken writes its number rule as
  `\\p{N}{1,3}+`; Oniguruma reads `{1,3}+` as "one or more runs of 1-3 digits", so we write
  `\\p{N}{1,3}`, which means the same as tiktoken's possessive form here.
- "gpt2": the r50k_base pattern of GPT-2.

A custom regex is used as given (with the `regex` package); text between its matches becomes
chunks too, as in Hugging Face's `Split(behavior="isolated")`, so no byte is ever dropped.

The optional C accelerator (`_fastbpe`) implements the two built-in patterns by hand; it gets
its character classes (`\\p{L}`, `\\p{N}`, `\\s`) from the `regex` package, so both paths agree.
"""

from __future__ import annotations

import functools
import os
import sys
from array import array
from types import ModuleType

import regex

from tinylm.errors import TinyLMError

GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)

PATTERNS = {"gpt4": GPT4_PATTERN, "gpt2": GPT2_PATTERN}

# Pattern ids of the C scanner; other spellings of the same regexes map to them too.
_BUILTIN_IDS = {
    GPT4_PATTERN: 1,
    GPT2_PATTERN: 2,
    # Hugging Face's ByteLevel(use_regex=True) regex: the same splits as GPT-2's.
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""": 2,
}
HF_BYTELEVEL_PATTERN = next(p for p, i in _BUILTIN_IDS.items() if i == 2 and p != GPT2_PATTERN)


# tiktoken's own spelling of cl100k (its `{1,3}+` would mean something else to Oniguruma).
_TIKTOKEN_CL100K = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)


def resolve_pattern(pattern: str) -> str:
    """The regex for a pattern name ("gpt4", "gpt2") or a custom regex, checked to compile."""
    if pattern in PATTERNS:
        return PATTERNS[pattern]
    if pattern == _TIKTOKEN_CL100K:
        return GPT4_PATTERN
    if not pattern:
        raise TinyLMError("empty split pattern", "use --pattern gpt4, gpt2 or a regex")
    try:
        regex.compile(pattern)
    except (regex.error, ValueError, OverflowError) as exc:
        raise TinyLMError(
            f"invalid split regex {pattern!r}: {exc}", "use gpt4, gpt2 or a valid regex"
        ) from None
    return pattern


def builtin_id(pattern: str) -> int:
    """1 for the gpt4 pattern, 2 for gpt2 (or an equivalent spelling), 0 for a custom regex."""
    return _BUILTIN_IDS.get(pattern, 0)


def pattern_name(pattern: str) -> str:
    """ "gpt4", "gpt2" or "custom", for summaries."""
    return {1: "gpt4", 2: "gpt2"}.get(builtin_id(pattern), "custom")


@functools.lru_cache(maxsize=16)
def compiled(pattern: str) -> regex.Pattern:
    """The compiled regex (cached; a process compiles each pattern once)."""
    return regex.compile(pattern)


def split_text(text: str, pattern: str) -> list[str]:
    """The chunks of a text: the regex's matches and the (non-empty) text between them."""
    rx = compiled(pattern)
    if builtin_id(pattern):
        return rx.findall(text)  # the built-in patterns match every character
    chunks: list[str] = []
    pos = 0
    for match in rx.finditer(text):
        start, end = match.span()
        if start > pos:
            chunks.append(text[pos:start])
        if end > start:
            chunks.append(text[start:end])
        pos = max(pos, end)
    if pos < len(text):
        chunks.append(text[pos:])
    return chunks


def clean_surrogates(text: str) -> str:
    """Lone surrogates cannot be UTF-8 encoded; like tiktoken, replace them with U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _char_class_table() -> bytes:
    """One byte per code point: 1 letter (\\p{L}), 2 number (\\p{N}), 4 space (\\s), 0 other."""
    # Every code point in order; surrogates cannot occur in UTF-8 text, NUL stands in for them.
    codes = array("I", range(0x110000))
    codes[0xD800:0xE000] = array("I", bytes(4 * 0x800))
    chars = codes.tobytes().decode("utf-32-le" if sys.byteorder == "little" else "utf-32-be")
    table = bytearray(len(chars))
    for class_regex, value in ((r"\p{L}+", 1), (r"\p{N}+", 2), (r"\s+", 4)):
        for match in regex.finditer(class_regex, chars):
            start, end = match.span()
            table[start:end] = bytes([value]) * (end - start)
    return bytes(table)


def _load_native() -> ModuleType | None:
    """The accelerator module; None when it is not built or TINYLM_PURE_PYTHON is set. With
    TINYLM_REQUIRE_NATIVE set (CI, packagers) a missing accelerator is an error, not a silent
    fall-back to the slower path."""
    if os.environ.get("TINYLM_PURE_PYTHON"):
        return None
    try:
        from tinylm.tokenizer import _fastbpe
    except ImportError as exc:
        if os.environ.get("TINYLM_REQUIRE_NATIVE"):
            raise ImportError(f"TINYLM_REQUIRE_NATIVE is set but the tokenizer's C accelerator "
                              f"is not importable ({exc}); rebuild with pip install -e .") from exc
        return None
    return _fastbpe


_native: ModuleType | None = _load_native()
_classes_ready = False


def native() -> ModuleType | None:
    """The C accelerator, ready to use, or None (not built, or TINYLM_PURE_PYTHON is set)."""
    global _classes_ready
    if _native is not None and not _classes_ready:
        _native.set_char_classes(_char_class_table())
        _classes_ready = True
    return _native
