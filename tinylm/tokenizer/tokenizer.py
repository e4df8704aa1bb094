"""The `Tokenizer`: a byte-level BPE with a split regex and special tokens at the end of the vocab.

Every string round-trips: `decode(encode(s)) == s`. Special tokens in text are ordinary text
unless the caller allows them (`allowed_special`, as in tiktoken), so user data cannot forge
control tokens. Saved as a Hugging Face tokenizer.json; exportable as a `tiktoken.Encoding`.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import regex

from tinylm.chat import DEFAULT_SPECIAL_TOKENS, END_OF_TEXT
from tinylm.console import SILENT, Output
from tinylm.errors import TinyLMError
from tinylm.textio import atomic_write_json, read_json
from tinylm.tokenizer import bpe, parallel
from tinylm.tokenizer.hf_format import BPEState, from_hf_json, to_hf_json, to_tiktoken
from tinylm.tokenizer.pretokenize import (
    builtin_id,
    clean_surrogates,
    native,
    pattern_name,
    resolve_pattern,
    split_text,
)
from tinylm.tokenizer.special import check_special_tokens, special_splitter
from tinylm.tokenizer.training import train_from_files, train_from_texts

if TYPE_CHECKING:
    import tiktoken

AllowedSpecial = AbstractSet[str] | Literal["all"]

_PY_CACHE_LIMIT = 1 << 18  # chunks kept by the pure-Python encoder's cache
_PARALLEL_MIN_CHARS = 1 << 20  # smaller batches are encoded by the calling thread


class Tokenizer:
    """A byte-level BPE tokenizer. Build one with `train`, `train_files`, `bytes_only` or `load`."""

    def __init__(self, state: BPEState) -> None:
        self._state = state
        self.pattern = state.pattern
        self.special_tokens: dict[str, int] = dict(state.special_tokens)
        self._tokens = state.tokens
        self._kind = builtin_id(state.pattern)
        self._table: dict[bpe.Pair, tuple[int, int]] | None = None  # for the Python encoder
        self._encoder: Any = None
        self._py_cache: dict[str, list[int]] = {}
        self._special_regexes: dict[frozenset[str], regex.Pattern] = {}
        self._fingerprint: str | None = None

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_merges(
        cls,
        merges: Sequence[tuple[int, int]],
        pattern: str = "gpt4",
        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    ) -> Tokenizer:
        """The tokenizer of trained merges: bytes are ids 0-255, merge k makes id 256 + k."""
        specials = check_special_tokens(special_tokens)
        tokens = [bytes([b]) for b in range(256)]
        full = []
        for k, (a, b) in enumerate(merges):
            if not (0 <= a < len(tokens) and 0 <= b < len(tokens)):
                raise TinyLMError(f"merge {k} ({a}, {b}) uses a token that does not exist yet")
            tokens.append(tokens[a] + tokens[b])
            full.append((a, b, 256 + k))
        special_ids = {s: len(tokens) + i for i, s in enumerate(specials)}
        tokens.extend(s.encode("utf-8") for s in specials)
        state = BPEState(tokens, list(range(256)), full, resolve_pattern(pattern), special_ids)
        return cls(state)

    @classmethod
    def bytes_only(cls, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS) -> Tokenizer:
        """256 byte tokens and the special tokens, no merges (a baseline, and for tests)."""
        return cls.from_merges([], "gpt4", special_tokens)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        pattern: str = "gpt4",
        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
        out: Output = SILENT,
    ) -> Tokenizer:
        """Learn merges from texts until the vocabulary (specials included) has `vocab_size`."""
        return train_from_texts(texts, vocab_size, pattern, special_tokens, out,
                                build=cls.from_merges).tokenizer

    @classmethod
    def train_files(
        cls,
        paths: Iterable[str | Path],
        vocab_size: int,
        pattern: str = "gpt4",
        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
        out: Output = SILENT,
        max_bytes: int | None = None,
    ) -> Tokenizer:
        """`train` on files and directories (.txt/.md/.jsonl), at most `max_bytes` of them."""
        return train_from_files(
            paths, vocab_size, pattern, special_tokens, out, max_bytes=max_bytes, holdout=0.0,
            build=cls.from_merges,
        ).tokenizer

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """A tokenizer from a tokenizer.json, or a directory that holds one."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TinyLMError(
                f"{path}: no such tokenizer file", "give a tokenizer.json or its directory"
            )
        return cls(from_hf_json(read_json(path), str(path)))

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json (atomically) to a directory, or to a path ending in .json."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / "tokenizer.json"
        atomic_write_json(path, to_hf_json(self._state))
        return path

    # ---- properties -----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return len(self._tokens)

    @property
    def eot_id(self) -> int:
        """Id of the end-of-text token."""
        if END_OF_TEXT not in self.special_tokens:
            raise TinyLMError(f"this tokenizer has no {END_OF_TEXT} token")
        return self.special_tokens[END_OF_TEXT]

    @property
    def merges(self) -> list[tuple[int, int]]:
        """The merges (left id, right id) in rank order."""
        return [(a, b) for a, b, _ in self._state.merges]

    @property
    def fingerprint(self) -> str:
        """A stable hex hash of the tokens, merges, pattern and special tokens."""
        if self._fingerprint is None:
            doc = {
                "pattern": self.pattern,
                "tokens": [t.hex() for t in self._tokens],
                "merges": self._state.merges,
                "special_tokens": sorted(self.special_tokens.items()),
            }
            digest = hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def __repr__(self) -> str:
        name = pattern_name(self.pattern)
        return f"Tokenizer(vocab_size={self.vocab_size}, pattern={name}, {self.fingerprint})"

    # ---- encoding -----------------------------------------------------------------------

    def _allowed(self, allowed_special: AllowedSpecial) -> frozenset[str]:
        if allowed_special == "all":
            return frozenset(self.special_tokens)
        allowed = frozenset(allowed_special)
        unknown = allowed - self.special_tokens.keys()
        if unknown:
            raise TinyLMError(f"special token {sorted(unknown)[0]!r} is not in this tokenizer")
        return allowed

    def _native_encoder(self) -> Any:
        fast = native()
        if fast is None:
            return None
        if self._encoder is None:
            self._encoder = fast.Encoder(self._state.byte_ids, self._state.merges, self._kind or 1)
        return self._encoder

    def _encode_python(self, text: str) -> list[int]:
        if self._table is None:
            self._table = bpe.merge_table(self._state.merges)
        ids: list[int] = []
        cache = self._py_cache
        if len(cache) > _PY_CACHE_LIMIT:
            cache.clear()
        for chunk in split_text(text, self.pattern):
            found = cache.get(chunk)
            if found is None:
                found = bpe.encode_chunk(chunk.encode("utf-8"), self._state.byte_ids, self._table)
                cache[chunk] = found
            ids.extend(found)
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of text with every special-token string encoded as plain text."""
        encoder = self._native_encoder()
        for attempt in range(2):
            try:
                if encoder is None:
                    return self._encode_python(text)
                if self._kind:
                    return encoder.encode(text)
                return encoder.encode_chunks(split_text(text, self.pattern))
            except UnicodeEncodeError:
                if attempt:
                    raise
                text = clean_surrogates(text)
        raise AssertionError("unreachable")

    def encode_packed(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> bytes:
        """`encode` as native uint32 bytes (cheap to send between processes or to a memmap)."""
        encoder = self._native_encoder()
        if encoder is not None and self._kind and not self._allowed(allowed_special):
            try:
                return encoder.encode_u32(text)
            except UnicodeEncodeError:
                pass
        return array("I", self.encode(text, allowed_special)).tobytes()

    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        """Ids of text. Special-token strings are plain text unless listed in `allowed_special`
        (a set of them, or "all")."""
        allowed = self._allowed(allowed_special)
        present = frozenset(s for s in allowed if s in text)
        if not present:
            return self.encode_ordinary(text)
        splitter = self._special_regexes.get(present)
        if splitter is None:
            splitter = self._special_regexes[present] = special_splitter(present)
        ids: list[int] = []
        pos = 0
        for match in splitter.finditer(text):
            ids.extend(self.encode_ordinary(text[pos : match.start()]))
            ids.append(self.special_tokens[match.group()])
            pos = match.end()
        ids.extend(self.encode_ordinary(text[pos:]))
        return ids

    def encode_many(
        self, texts: Sequence[str], allowed_special: AllowedSpecial = frozenset()
    ) -> list[list[int]]:
        """`encode` of each text, in this thread (the C encoder releases the GIL meanwhile)."""
        encoder = self._native_encoder()
        if encoder is not None and self._kind and not self._allowed(allowed_special):
            try:
                return encoder.encode_many(texts)
            except UnicodeEncodeError:
                pass
        return [self.encode(t, allowed_special) for t in texts]

    def encode_batch(
        self,
        texts: Iterable[str],
        allowed_special: AllowedSpecial = frozenset(),
        num_workers: int | None = None,
    ) -> list[list[int]]:
        """`encode` of many texts, on all cores (or `num_workers`) for large batches."""
        texts = list(texts)
        self._allowed(allowed_special)
        workers = min(num_workers or parallel.available_cpus(), len(texts))
        total = sum(map(len, texts))
        if workers <= 1 or total < _PARALLEL_MIN_CHARS:
            return self.encode_many(texts, allowed_special)
        groups: list[list[str]] = [[]]
        size = 0
        target = max(total // (workers * 8), 1 << 16)  # several groups per worker balance the load
        for text in texts:
            if size >= target:
                groups.append([])
                size = 0
            groups[-1].append(text)
            size += len(text)
        return parallel.encode_groups(self, groups, allowed_special, workers)

    # ---- decoding -----------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (a special token's are its UTF-8 text)."""
        if not 0 <= token_id < len(self._tokens):
            raise TinyLMError(f"token id {token_id} is out of range (vocab size {self.vocab_size})")
        return self._tokens[token_id]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of a sequence of ids."""
        ids = ids if isinstance(ids, list) else [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= len(self._tokens)):
            bad = next(i for i in ids if not 0 <= i < len(self._tokens))
            raise TinyLMError(f"token id {bad} is out of range (vocab size {self.vocab_size})")
        tokens = self._tokens
        return b"".join([tokens[i] for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        """The text of a sequence of ids; invalid UTF-8 (a cut character) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---- export -------------------------------------------------------------------------

    def to_tiktoken(self) -> tiktoken.Encoding:
        """A `tiktoken.Encoding` with the same pattern, merges (as ranks) and special tokens."""
        return to_tiktoken(self._state, f"tinylm-{self.fingerprint}")

    def __getstate__(self) -> dict[str, Any]:
        return {"state": self._state}

    def __setstate__(self, data: dict[str, Any]) -> None:
        self.__init__(data["state"])  # type: ignore[misc]
