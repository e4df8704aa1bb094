"""tokenizer.json in the Hugging Face `tokenizers` format, both ways, and export to tiktoken.

We write a byte-level BPE: model BPE (vocab + merges), pre-tokenizer Sequence[Split(our regex,
isolated), ByteLevel(use_regex=false)], decoder ByteLevel, special tokens as added tokens
(special=true) at the end of the vocabulary. Token strings use GPT-2's byte-to-character map.

We read files of that shape, and GPT-2 style ones (ByteLevel(use_regex=true) pre-tokenizer, no
prefix space). Anything that would make Hugging Face encode differently from us (a normalizer,
another model type, a prefix space) is refused with a clear error.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tinylm.errors import TinyLMError
from tinylm.tokenizer.pretokenize import GPT2_PATTERN, HF_BYTELEVEL_PATTERN

if TYPE_CHECKING:
    import tiktoken


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (printable Latin-1 stays itself)."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@functools.lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def token_string(data: bytes) -> str:
    """A token's bytes as its vocabulary string."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in data)


def token_from_string(text: str, source: str) -> bytes:
    """A vocabulary string back to bytes; an error if it is not a byte-level token."""
    table = _unicode_to_bytes()
    try:
        return bytes(table[c] for c in text)
    except KeyError:
        raise TinyLMError(
            f"{source}: token {text!r} is not a byte-level token",
            "tinylm reads byte-level BPE tokenizers only",
        ) from None


@dataclass
class BPEState:
    """What defines a byte-level BPE tokenizer, independent of the file format."""

    tokens: list[bytes]  # id -> bytes (a special token's bytes are its UTF-8 text)
    byte_ids: list[int]  # byte -> id
    merges: list[tuple[int, int, int]]  # (left, right, new id), in rank order
    pattern: str
    special_tokens: dict[str, int]


def to_hf_json(state: BPEState) -> dict[str, Any]:
    """The tokenizer.json document for a tokenizer."""
    special_ids = set(state.special_tokens.values())
    vocab: dict[str, int] = {}
    for i, data in enumerate(state.tokens):
        key = data.decode("utf-8") if i in special_ids else token_string(data)
        if key in vocab:
            raise TinyLMError(
                f"token {i} ({key!r}) has the same string as token {vocab[key]}",
                "choose special tokens that cannot be learned as ordinary tokens",
            )
        vocab[key] = i
    merges = [
        f"{token_string(state.tokens[a])} {token_string(state.tokens[b])}"
        for a, b, _ in state.merges
    ]
    added = [
        {
            "id": i,
            "content": text,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for text, i in sorted(state.special_tokens.items(), key=lambda kv: kv[1])
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": state.pattern},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {
                    "type": "ByteLevel",
                    "add_prefix_space": False,
                    "trim_offsets": True,
                    "use_regex": False,
                },
            ],
        },
        "post_processor": None,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def _pattern_from(pre: Any, source: str) -> str:
    """The split regex of a pre-tokenizer: Sequence[Split, ByteLevel] or GPT-2's ByteLevel."""
    steps = (
        pre.get("pretokenizers", [])
        if isinstance(pre, dict) and pre.get("type") == "Sequence"
        else [pre]
    )
    pattern = None
    byte_level = None
    for step in steps:
        kind = step.get("type") if isinstance(step, dict) else None
        if kind == "Split" and pattern is None:
            regex_text = step.get("pattern", {}).get("Regex")
            if regex_text is None or step.get("behavior") != "Isolated" or step.get("invert"):
                raise TinyLMError(f"{source}: only Split(Regex, behavior=Isolated) is supported")
            pattern = regex_text
        elif kind == "ByteLevel" and byte_level is None:
            byte_level = step
        else:
            raise TinyLMError(f"{source}: unsupported pre-tokenizer {kind!r}")
    if byte_level is None:
        raise TinyLMError(f"{source}: not a byte-level tokenizer (no ByteLevel pre-tokenizer)")
    if byte_level.get("add_prefix_space"):
        raise TinyLMError(f"{source}: ByteLevel with add_prefix_space is not supported")
    if byte_level.get("use_regex", True):
        if pattern is not None:
            raise TinyLMError(
                f"{source}: a Split followed by ByteLevel(use_regex=true) is not supported"
            )
        return GPT2_PATTERN  # the same splits as HF_BYTELEVEL_PATTERN
    if pattern is None:
        raise TinyLMError(f"{source}: ByteLevel(use_regex=false) without a Split pre-tokenizer")
    return GPT2_PATTERN if pattern == HF_BYTELEVEL_PATTERN else pattern


def from_hf_json(doc: Any, source: str) -> BPEState:
    """A byte-level BPE tokenizer from a tokenizer.json document; errors name what is wrong."""
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "vocab" not in model:
        raise TinyLMError(f"{source}: not a BPE tokenizer.json", "expected a byte-level BPE model")
    if doc.get("normalizer") is not None:
        raise TinyLMError(f"{source}: tokenizers with a normalizer are not supported")
    if (
        model.get("continuing_subword_prefix")
        or model.get("end_of_word_suffix")
        or model.get("dropout")
    ):
        raise TinyLMError(
            f"{source}: BPE with a subword prefix, suffix or dropout is not supported"
        )
    pattern = _pattern_from(doc.get("pre_tokenizer"), source)
    ids: dict[int, bytes] = {}
    vocab = model["vocab"]
    special_tokens = {t["content"]: int(t["id"]) for t in doc.get("added_tokens", [])}
    special_ids = set(special_tokens.values())
    for text, i in vocab.items():
        if i not in special_ids:
            ids[int(i)] = token_from_string(text, source)
    for text, i in special_tokens.items():
        ids[i] = text.encode("utf-8")
    if sorted(ids) != list(range(len(ids))):
        raise TinyLMError(f"{source}: token ids are not 0..{len(ids) - 1} without gaps")
    tokens = [ids[i] for i in range(len(ids))]
    table = bytes_to_unicode()
    try:
        byte_ids = [vocab[table[b]] for b in range(256)]
    except KeyError:
        raise TinyLMError(f"{source}: the vocabulary lacks some of the 256 byte tokens") from None
    merges = []
    for k, raw in enumerate(model.get("merges", [])):
        left, right = raw.split(" ") if isinstance(raw, str) else raw
        try:
            merges.append((vocab[left], vocab[right], vocab[left + right]))
        except KeyError:
            raise TinyLMError(
                f"{source}: merge {k} ({left!r}, {right!r}) uses unknown tokens"
            ) from None
    return BPEState(tokens, byte_ids, merges, pattern, special_tokens)


def to_tiktoken(state: BPEState, name: str) -> tiktoken.Encoding:
    """A `tiktoken.Encoding`: token bytes ranked by id, the same pattern and special tokens.

    tiktoken merges by the rank of the merged bytes, which equals merging by merge rank when
    each merge's new id is larger than its parts' and ids grow with the merges, as in every
    tokenizer tinylm trains.
    """
    import tiktoken

    special_ids = set(state.special_tokens.values())
    ranks = {t: i for i, t in enumerate(state.tokens) if i not in special_ids}
    if len(ranks) != len(state.tokens) - len(special_ids):
        raise TinyLMError("two tokens have the same bytes; tiktoken cannot represent this")
    made = [c for _, _, c in state.merges]
    if made != sorted(made) or any(c <= max(a, b) for a, b, c in state.merges):
        raise TinyLMError("token ids do not follow merge order; tiktoken cannot represent this")
    return tiktoken.Encoding(
        name=name,
        pat_str=state.pattern,
        mergeable_ranks=ranks,
        special_tokens=dict(state.special_tokens),
    )
