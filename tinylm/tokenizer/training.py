"""Training a tokenizer: count unique chunks (in parallel for large inputs), then learn merges.

1. Pre-tokenize the text and count each unique chunk. Texts are cut into batches of about
   BATCH_CHARS characters; when there is more than one batch, one worker per core counts
   batches while this process reads the next ones (threads with the C accelerator, which
   releases the GIL; processes otherwise, see parallel.py).
2. Learn merges from the chunk counts with incremental pair-count updates (bpe.train_merges, or
   the C accelerator, which gives the same merges faster).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinylm.chat import DEFAULT_SPECIAL_TOKENS
from tinylm.console import SILENT, Output
from tinylm.errors import TinyLMError
from tinylm.tokenizer import bpe, parallel
from tinylm.tokenizer.corpus import CorpusReader
from tinylm.tokenizer.pretokenize import native, pattern_name, resolve_pattern
from tinylm.tokenizer.special import check_special_tokens, special_splitter

if TYPE_CHECKING:
    from tinylm.tokenizer.tokenizer import Tokenizer

# (merges, pattern regex, special tokens) -> a tokenizer: `Tokenizer.from_merges`, passed in by
# the caller so that this module needs nothing of tokenizer.py (which calls it to train).
Build = Callable[[list[tuple[int, int]], str, list[str]], Any]

BATCH_CHARS = 1 << 22  # characters of text per counting task


@dataclass
class TrainResult:
    """A trained tokenizer and how the training went."""

    tokenizer: Tokenizer
    train_bytes: int
    unique_chunks: int
    count_seconds: float
    merge_seconds: float
    held_out: list[str]
    allow_special: bool = False  # the corpus's special-token spellings were read as tokens

    def bytes_per_token(self) -> float | None:
        """UTF-8 bytes per token on the held-out text (None when nothing was held out)."""
        n_bytes = sum(len(t.encode("utf-8")) for t in self.held_out)
        allowed = "all" if self.allow_special else frozenset()
        n_tokens = sum(len(ids) for ids in self.tokenizer.encode_batch(
            self.held_out, allowed_special=allowed, num_workers=1))
        return n_bytes / n_tokens if n_tokens else None


def n_merges_for(vocab_size: int, n_special: int, key: str = "--vocab-size") -> int:
    """Merges needed for a vocabulary size; an error if it cannot even hold the bytes + specials
    (`key`: the option or config key that set the size, named in the error)."""
    smallest = 256 + n_special
    if vocab_size < smallest:
        raise TinyLMError(
            f"{key} {vocab_size} is smaller than 256 byte tokens + {n_special} special tokens",
            f"use {key} {smallest} or more",
        )
    return vocab_size - smallest


def _batches(texts: Iterable[str], limit: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for text in texts:
        if not isinstance(text, str):
            raise TinyLMError(f"training texts must be strings, got {type(text).__name__}")
        batch.append(text)
        size += len(text)
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def count_chunks(
    texts: Iterable[str],
    pattern: str,
    out: Output = SILENT,
    total_bytes: int | None = None,
    workers: int | None = None,
) -> tuple[dict[bytes, int], int]:
    """Counts of unique chunks (as UTF-8 bytes) over texts, and the number of bytes read."""
    counts: dict[bytes, int] = {}
    n_bytes = 0
    batches = _batches(texts, BATCH_CHARS)
    head = list(itertools.islice(batches, 2))  # one batch only: no processes needed
    workers = workers or parallel.available_cpus()
    with out.progress("counting chunks", total=total_bytes) as bar:
        if len(head) < 2 or workers <= 1:
            for batch in itertools.chain(head, batches):
                done = parallel.count_texts(batch, pattern, counts)
                n_bytes += done
                bar.advance(done, chunks=len(counts))
        elif parallel.uses_threads(pattern):  # threads add to `counts` themselves
            tasks = ((batch, pattern, counts) for batch in itertools.chain(head, batches))
            with parallel.executor(workers, threads=True) as pool:
                for done in parallel.bounded_map(pool, parallel.count_texts, tasks, 2 * workers):
                    n_bytes += done
                    bar.advance(done, chunks=len(counts))
        else:
            tasks = ((batch, pattern) for batch in itertools.chain(head, batches))
            with parallel.executor(workers, threads=False) as pool:
                for part, done in parallel.bounded_map(
                    pool, parallel.count_task, tasks, 2 * workers
                ):
                    parallel.merge_counts(counts, part)
                    n_bytes += done
                    bar.advance(done, chunks=len(counts))
    return counts, n_bytes


def between_specials(texts: Iterable[str], spellings: Sequence[str]) -> Iterator[str]:
    """The pieces of each text between special-token spellings, which are dropped: read as
    control tokens (like document separators), they take no part in merges, and no chunk
    spans one."""
    splitter = special_splitter(spellings)
    for text in texts:
        if isinstance(text, str) and any(s in text for s in spellings):
            yield from filter(None, splitter.split(text))
        else:
            yield text


def learn_merges(
    counts: dict[bytes, int], n_merges: int, out: Output = SILENT
) -> list[tuple[int, int]]:
    """Merges from chunk counts (C accelerator when built, else pure Python; same result)."""
    fast = native()
    with out.progress("merging", total=n_merges) as bar:
        done = 0

        def progress(m: int) -> None:
            nonlocal done
            bar.advance(m - done)
            done = m

        if fast is not None:
            merges = fast.train(list(counts), list(counts.values()), n_merges, progress, 256)
        else:
            merges = bpe.train_merges(counts, n_merges, progress)
        progress(len(merges))
    return merges


def _train(
    texts: Iterable[str],
    vocab_size: int,
    pattern: str,
    special_tokens: Sequence[str],
    out: Output,
    total_bytes: int | None,
    held_out: list[str],
    source: str = "the texts",
    allow_special: bool = False,
    *,
    build: Build,
) -> TrainResult:
    specials = check_special_tokens(special_tokens)
    n_merges = n_merges_for(vocab_size, len(specials))
    regex_text = resolve_pattern(pattern)
    if allow_special:
        texts = between_specials(texts, specials)
    start = time.perf_counter()
    counts, n_bytes = count_chunks(texts, regex_text, out, total_bytes)
    if n_bytes == 0:
        raise TinyLMError(f"no text to train on: {source} hold no text", "give text files")
    counted = time.perf_counter()
    merges = learn_merges(counts, n_merges, out)
    if len(merges) < n_merges:
        out.warn(
            f"the text ran out of pairs to merge after {len(merges)} merges: the vocab has "
            f"{vocab_size - n_merges + len(merges)} tokens instead of {vocab_size}"
        )
    tokenizer = build(merges, regex_text, specials)
    return TrainResult(tokenizer, n_bytes, len(counts), counted - start,
                       time.perf_counter() - counted, held_out, allow_special)


def train_from_texts(
    texts: Iterable[str],
    vocab_size: int,
    pattern: str = "gpt4",
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    out: Output = SILENT,
    allow_special: bool = False,
    *,
    build: Build,
) -> TrainResult:
    """Train on an iterable of texts (each a document; chunks never cross documents); `build`
    makes the tokenizer (`Tokenizer.from_merges`; `Tokenizer.train` is the usual way in).
    `allow_special`: special-token spellings in the texts are those tokens, not text."""
    if isinstance(texts, str):
        texts = [texts]
    return _train(texts, vocab_size, pattern, special_tokens, out, None, [],
                  allow_special=allow_special, build=build)


def train_from_files(
    paths: Iterable[str | Path],
    vocab_size: int,
    pattern: str = "gpt4",
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    out: Output = SILENT,
    max_bytes: int | None = None,
    holdout: float = 0.02,
    allow_special: bool = False,
    *,
    build: Build,
) -> TrainResult:
    """Train on files and directories, holding out a `holdout` fraction to measure bytes/token.
    `allow_special`: special-token spellings in the files are those tokens, not text."""
    specials = check_special_tokens(special_tokens)
    n_merges_for(vocab_size, len(specials))  # fail before reading anything
    resolve_pattern(pattern)
    if max_bytes is not None and max_bytes <= 0:
        raise TinyLMError(f"max bytes must be positive, got {max_bytes}")
    paths = list(paths)
    reader = CorpusReader(paths, max_bytes=max_bytes, holdout=holdout)
    source = ", ".join(str(p) for p in paths)
    return _train(reader, vocab_size, pattern, specials, out, reader.total_bytes,
                  reader.held_out, source, allow_special, build=build)


def summary(result: TrainResult, path: Path | None = None) -> dict[str, Any]:
    """The numbers `tinylm tokenize` reports."""
    tok = result.tokenizer
    held_out_bytes = sum(len(t.encode("utf-8")) for t in result.held_out)
    rows: dict[str, Any] = {
        "vocab_size": tok.vocab_size,
        "pattern": pattern_name(tok.pattern),
        "merges": len(tok.merges),
        "special_tokens": len(tok.special_tokens),
        "train_bytes": result.train_bytes,
        "unique_chunks": result.unique_chunks,
        "count_s": round(result.count_seconds, 3),
        "merge_s": round(result.merge_seconds, 3),
        "train_s": round(result.count_seconds + result.merge_seconds, 3),
        "held_out_bytes": held_out_bytes,
        "bytes_per_token": result.bytes_per_token(),
        "allow_special": result.allow_special,
        "fingerprint": tok.fingerprint,
    }
    if path is not None:
        rows["output"] = str(path)
    return rows
