"""Token shards: text encoded once into memory-mapped `.bin` files, and windows sampled from them.

    CACHE/tokens/<key>/index.json         dtype, token / document / byte counts, files, shards
    CACHE/tokens/<key>/tokens_00000.bin   raw uint16 (vocab <= 65536) or uint32 token ids

`key` hashes the tokenizer's fingerprint and, for every input file, its content, its kind, its
decompression, its text field and (parquet) its row groups, so a second run on the same data
starts at once, and changed data, another text field or another tokenizer is encoded again.
Encoding streams the files (`tinylm.textio.iter_file_pieces`) in groups of about a MiB to one
worker per core (`tinylm.tokenizer.parallel.encode_stream`) while the next groups are read,
appending the end-of-text token after each document; at most two groups per core are in
memory, so memory stays flat however large the corpus. Special-token spellings in the text
("<|endoftext|>") are plain text unless `allowed_special` lists them (then they are control
tokens, and the key says so). The shard directory is written under a temporary name and
renamed, so an interrupted encode leaves nothing that looks complete.

Weighted `--data` values (`web.parquet:0.8 code.jsonl.zst:0.2`) are a `TokenMixture`: each
source is its own cached stream, and each training window comes from a source drawn by weight.
Training windows are a pure function of (seed, step, micro-batch index): a run resumed at step
N, or split over several processes, reads exactly the windows of the uninterrupted run.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tinylm.atomic import atomic_dir
from tinylm.console import SILENT, Output
from tinylm.errors import TinyLMError
from tinylm.formats import parquet_record
from tinylm.nesting import loads_json
from tinylm.sources import (
    DEFAULT_TEXT_FIELD,
    DataFile,
    DataValue,
    mixture_weights,
    resolve_sources,
    source_files,
)
from tinylm.textio import iter_file_pieces
from tinylm.tokenizer.parallel import encode_stream

if TYPE_CHECKING:
    from tinylm.tokenizer import Tokenizer

INDEX_FILE = "index.json"
SHARD_FORMAT = 2  # 2: corpora cut where GPT-2 patterns cut too (textio._safe_split)
SHARD_TOKENS = 1 << 28  # tokens per shard file (512 MiB as uint16)
GROUP_CHARS = 1 << 20  # characters of text per encoding task
PIECE_CHARS = 1 << 18  # text files come in pieces of this size, a few to a task
PARALLEL_MIN_BYTES = 4 << 20  # smaller corpora are encoded in this thread (no pool to start)
TRIM_BYTES = 64 << 20  # text encoded between two returns of free memory to the system


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The shard cache: `cache_dir`, else $TINYLM_CACHE, else $XDG_CACHE_HOME/tinylm."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("TINYLM_CACHE"):
        return Path(os.environ["TINYLM_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "tinylm"


def file_digest(path: Path) -> str:
    """BLAKE2b of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def file_record(file: DataFile) -> dict[str, Any]:
    """What the cache key and index.json record of one input file."""
    record: dict[str, Any] = {"path": str(file.path), "bytes": file.path.stat().st_size,
                              "blake2b": file_digest(file.path), "kind": file.kind,
                              "jsonl": file.kind == "jsonl"}
    if file.compression:
        record["compression"] = file.compression
    if file.kind != "text":
        record["text_field"] = file.text_field
    if file.kind == "parquet":

        record.update(parquet_record(file.path))
    return record


def _record_key(record: dict[str, Any]) -> str:
    if record["kind"] == "parquet" or record.get("compression") or record.get(
            "text_field", DEFAULT_TEXT_FIELD) != DEFAULT_TEXT_FIELD:
        return (f"/{record['blake2b']}:{record['kind']}:{record.get('compression')}:"
                f"{record.get('text_field')}:{record.get('row_groups')}")
    return f"/{record['blake2b']}:{record['jsonl']}"  # plain text and JSONL keep their old keys


def corpus_key(
    files: Sequence[DataFile], fingerprint: str, allowed_special: AbstractSet[str] = frozenset()
) -> tuple[str, list[dict[str, Any]]]:
    """The cache key of encoding `files` with a tokenizer (and `allowed_special` read as control
    tokens), and the per-file records."""
    records = [file_record(f) for f in files]
    h = hashlib.blake2b(digest_size=16)
    h.update(f"shards/{SHARD_FORMAT}/{fingerprint}".encode())
    for r in records:  # content and how it is read: renaming or moving a file keeps its cache
        h.update(_record_key(r).encode())
    if allowed_special:  # absent by default, so the default keys stay what they were
        h.update(json.dumps(sorted(allowed_special)).encode())
    return h.hexdigest(), records


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits in it, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class _ShardWriter:
    """Appends token ids to numbered shard files of at most `SHARD_TOKENS` tokens."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file: Any = None

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._file is None or self.shards[-1]["n_tokens"] == self.shard_tokens:
                self._next()
            room = self.shard_tokens - self.shards[-1]["n_tokens"]
            self._file.write(np.ascontiguousarray(ids[:room], dtype=self.dtype).data)
            self.shards[-1]["n_tokens"] += len(ids[:room])
            ids = ids[room:]

    def _next(self) -> None:
        self.close()
        name = f"tokens_{len(self.shards):05d}.bin"
        self._file = open(self.directory / name, "wb")  # noqa: SIM115 (closed in close())
        self.shards.append({"file": name, "n_tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


def _groups(files: Sequence[DataFile], counts: dict[str, int], bar: Any
            ) -> Iterator[tuple[list[str], list[bool]]]:
    """The files' pieces in groups of about GROUP_CHARS characters, counting bytes and docs."""
    texts: list[str] = []
    ends: list[bool] = []
    chars = 0
    for file in files:
        for piece in iter_file_pieces(file, PIECE_CHARS):
            text = piece.text
            n_bytes = len(text) if text.isascii() else len(text.encode("utf-8"))
            counts["n_bytes"] += n_bytes
            counts["n_docs"] += piece.doc_end
            bar.advance(n_bytes)
            texts.append(text)
            ends.append(piece.doc_end)
            chars += len(text)
            if chars >= GROUP_CHARS:
                yield texts, ends
                texts, ends, chars = [], [], 0
    if texts:
        yield texts, ends


def _encode_into(
    files: Sequence[DataFile], tokenizer: Tokenizer, writer: _ShardWriter,
    total_bytes: int | None, out: Output, allowed_special: AbstractSet[str],
) -> dict[str, int]:
    """Stream the files through the tokenizer into `writer`; token, doc and byte counts."""

    counts = {"n_tokens": 0, "n_docs": 0, "n_bytes": 0}
    workers = None if (total_bytes or PARALLEL_MIN_BYTES) >= PARALLEL_MIN_BYTES else 1
    with out.progress("encoding", total=total_bytes) as bar:
        groups = _groups(files, counts, bar)
        trimmed = 0
        for ids in encode_stream(tokenizer, groups, allowed_special, writer.dtype.name,
                                 workers):
            writer.write(ids)
            counts["n_tokens"] += len(ids)
            if counts["n_bytes"] - trimmed >= TRIM_BYTES:
                release_free_memory()
                trimmed = counts["n_bytes"]
    return counts


def release_free_memory() -> None:
    """Give the C allocator's free memory back to the system (glibc's malloc_trim; elsewhere
    nothing). Why: the texts and id buffers of a long encode are large and short-lived, freed
    on other threads than they were made on, and glibc keeps such freed memory in its arenas,
    so without this the resident memory creeps up with the size of the corpus."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim(0)


def _text_bytes(records: list[dict[str, Any]]) -> int | None:
    """The text's size for the progress bar: known for plain files only (else None)."""
    if any(r["kind"] == "parquet" or r.get("compression") for r in records):
        return None
    return sum(r["bytes"] for r in records)


def _encode_files(
    files: Sequence[DataFile], tokenizer: Tokenizer, cache_dir: str | Path | None,
    out: Output, shard_tokens: int, allowed: frozenset[str],
) -> TokenStream:
    """The token stream of `files`, from the cache or encoded now."""
    key, records = corpus_key(files, tokenizer.fingerprint, allowed)
    root = cache_root(cache_dir) / "tokens"
    final = root / key
    if (final / INDEX_FILE).is_file():
        return TokenStream.open(final)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TinyLMError(f"{root}: cannot write the token cache there ({exc.strerror})",
                          "set data.cache_dir or $TINYLM_CACHE to a writable directory") from None
    # Another process may encode the same corpus meanwhile: the first to finish wins.
    with atomic_dir(final, prefix=f".tmp-{key}-", replace=False) as tmp:
        dtype = token_dtype(tokenizer.vocab_size)
        writer = _ShardWriter(tmp, dtype, shard_tokens)
        try:
            counts = _encode_into(files, tokenizer, writer, _text_bytes(records), out, allowed)
        finally:
            writer.close()
        index = {"format": SHARD_FORMAT, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
                 "eot_id": tokenizer.eot_id, "tokenizer": tokenizer.fingerprint, **counts,
                 "files": records, "shards": writer.shards}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1), encoding="utf-8")
    out.info(f"encoded {counts['n_bytes']:,} bytes into {counts['n_tokens']:,} tokens ({final})")
    return TokenStream.open(final)


def encode_corpus(
    paths: Iterable[DataValue],
    tokenizer: Tokenizer,
    cache_dir: str | Path | None = None,
    out: Output = SILENT,
    shard_tokens: int = SHARD_TOKENS,
    allowed_special: AbstractSet[str] = frozenset(),
    text_field: str = DEFAULT_TEXT_FIELD,
) -> TokenStream:
    """The token stream of `--data` values (text, JSONL, parquet, .gz / .zst, directories,
    globs; tinylm.sources), from the cache or encoded now. Weighted values give a
    `TokenMixture` of one stream per value; unweighted ones one stream of all their files.

    Special-token spellings in the text are plain text unless named in `allowed_special`;
    `text_field` is the JSONL key or parquet column holding the text.
    """

    sources = resolve_sources(paths, text_field)
    allowed = frozenset(allowed_special)
    weights = mixture_weights(sources)
    if weights is None:
        files = [f for s in sources for f in source_files(s)]
        return _encode_files(files, tokenizer, cache_dir, out, shard_tokens, allowed)
    files_of = [source_files(s) for s in sources]  # every path checked before encoding any
    parts = [_encode_files(files, tokenizer, cache_dir, out, shard_tokens, allowed)
             for files in files_of]
    return TokenMixture.of(parts, weights, [str(s) for s in sources])


@dataclass
class TokenStream:
    """A contiguous range [start, stop) of the tokens of a shard directory, read lazily."""

    index: dict[str, Any]
    arrays: list[np.ndarray]
    offsets: np.ndarray  # offsets[i] = first token of arrays[i] in the whole stream
    start: int = 0
    stop: int = 0

    @classmethod
    def open(cls, directory: str | Path) -> TokenStream:
        """Memory-map the shards listed in `directory`/index.json."""
        directory = Path(directory)
        try:
            index = loads_json((directory / INDEX_FILE).read_text(encoding="utf-8"))
            dtype = np.dtype(index["dtype"])
            arrays = [
                np.memmap(directory / s["file"], dtype=dtype, mode="r", shape=(s["n_tokens"],))
                if s["n_tokens"] else np.zeros(0, dtype=dtype)
                for s in index["shards"]
            ]
        except (OSError, ValueError, KeyError) as exc:
            raise TinyLMError(f"{directory}: damaged token cache ({exc})", "delete it") from None
        offsets = np.cumsum([0] + [len(a) for a in arrays])
        return cls(index, arrays, offsets, 0, int(offsets[-1]))

    def __len__(self) -> int:
        return self.stop - self.start

    def view(self, start: int, stop: int) -> TokenStream:
        """Tokens [start, stop) of this stream, as a stream."""
        start, stop = max(0, start), min(len(self), stop)
        return TokenStream(self.index, self.arrays, self.offsets, self.start + start,
                           self.start + max(start, stop))

    def read(self, start: int, length: int) -> np.ndarray:
        """`length` tokens from `start` (relative to this stream) as int64, across shards."""
        lo, hi = self.start + start, self.start + start + length
        if start < 0 or hi > self.stop:
            raise IndexError(f"tokens [{start}, {start + length}) outside a stream of {len(self)}")
        parts = []
        i = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        while lo < hi:
            a, base = self.arrays[i], int(self.offsets[i])
            take = min(hi, base + len(a)) - lo
            parts.append(np.asarray(a[lo - base: lo - base + take], dtype=np.int64))
            lo += take
            i += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def pieces(self) -> list[np.ndarray]:
        """The stream's tokens as memory-mapped arrays, in order (views, nothing is read)."""
        found = []
        for a, base in zip(self.arrays, self.offsets[:-1].tolist(), strict=True):
            lo, hi = max(self.start, base), min(self.stop, base + len(a))
            if lo < hi:
                found.append(a[lo - base:hi - base])
        return found


def concat_streams(streams: Sequence[TokenStream]) -> TokenStream:
    """One stream of the streams' tokens one after another (their counts summed)."""
    arrays = [a for s in streams for a in s.pieces()]
    offsets = np.cumsum([0] + [len(a) for a in arrays])
    index = {**streams[0].index, "shards": [], "files": [],
             **{k: sum(s.index.get(k, 0) for s in streams)
                for k in ("n_tokens", "n_docs", "n_bytes")}}
    return TokenStream(index, arrays, offsets, 0, int(offsets[-1]))


@dataclass
class TokenMixture(TokenStream):
    """Streams drawn from by weight: `sample_windows` takes each window from a source drawn by
    `weights`; as a plain stream (evaluation) it is the sources one after another."""

    parts: list[TokenStream] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, parts: Sequence[TokenStream], weights: Sequence[float], names: Sequence[str]
           ) -> TokenMixture:
        """The mixture of `parts` with `weights` (summing to 1) and the sources' `names`."""
        whole = concat_streams(parts)
        index = {**whole.index, "sources": [{"source": n, "weight": w, "tokens": len(p)}
                                            for p, w, n in zip(parts, weights, names,
                                                               strict=True)]}
        return cls(index, whole.arrays, whole.offsets, whole.start, whole.stop,
                   list(parts), list(weights), list(names))


def split_stream(stream: TokenStream, val_fraction: float) -> tuple[TokenStream, TokenStream]:
    """(train, val): the last `val_fraction` of the token stream is validation (like nanoGPT's
    90/10 split of Shakespeare; a document may straddle the boundary). A mixture splits each
    source so: training is the mixture of their heads, validation all their tails."""
    if not 0.0 < val_fraction < 1.0:
        raise TinyLMError(f"data.val_fraction must be between 0 and 1, got {val_fraction}")
    if isinstance(stream, TokenMixture):
        splits = [split_stream(part, val_fraction) for part in stream.parts]
        train = TokenMixture.of([s[0] for s in splits], stream.weights, stream.names)
        return train, concat_streams([s[1] for s in splits])
    cut = len(stream) - max(1, round(len(stream) * val_fraction))
    return stream.view(0, cut), stream.view(cut, len(stream))


def window_seed(seed: int, step: int, micro: int) -> int:
    """The 63-bit seed of micro-batch `micro` of step `step` (independent of everything else)."""
    digest = hashlib.blake2b(f"windows/{seed}/{step}/{micro}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_windows(
    stream: TokenStream, seq_len: int, batch_size: int, seed: int, step: int, micro: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (batch_size, seq_len) int64: random windows of the stream and
    the same windows shifted by one token. A pure function of its arguments. From a
    `TokenMixture`, each window's source is drawn by weight first."""
    if isinstance(stream, TokenMixture):
        return _sample_mixture(stream, seq_len, batch_size, seed, step, micro)
    n = len(stream)
    if n < seq_len + 1:
        raise TinyLMError(
            f"the training data has {n:,} tokens, fewer than one window of {seq_len + 1}",
            "give more text or a shorter data.seq_len",
        )
    generator = torch.Generator().manual_seed(window_seed(seed, step, micro))
    starts = torch.randint(0, n - seq_len, (batch_size,), generator=generator).tolist()
    rows = np.stack([stream.read(s, seq_len + 1) for s in starts])
    windows = torch.from_numpy(rows)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def _sample_mixture(
    mixture: TokenMixture, seq_len: int, batch_size: int, seed: int, step: int, micro: int
) -> tuple[torch.Tensor, torch.Tensor]:
    for part, name in zip(mixture.parts, mixture.names, strict=True):
        if len(part) < seq_len + 1:
            raise TinyLMError(
                f"--data {name} has {len(part):,} training tokens, fewer than one window of "
                f"{seq_len + 1}", "give that source more text or use a shorter data.seq_len",
            )
    generator = torch.Generator().manual_seed(window_seed(seed, step, micro))
    # Two float64 draws a row (53 random bits each): the source by its weight, then the start.
    draws = torch.rand((batch_size, 2), generator=generator, dtype=torch.float64).tolist()
    bounds = np.cumsum(mixture.weights)
    rows = []
    for pick, where in draws:
        i = min(int(np.searchsorted(bounds, pick, side="right")), len(mixture.parts) - 1)
        part = mixture.parts[i]
        rows.append(part.read(int(where * (len(part) - seq_len)), seq_len + 1))
    windows = torch.from_numpy(np.stack(rows))
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def eval_windows(
    stream: TokenStream, seq_len: int, max_tokens: int = 0, what: str = "the validation data",
    hint: str = "give more validation text (--val-data) or a larger --val-fraction",
) -> tuple[int, int]:
    """(number of windows, window length) covering the stream once with consecutive,
    non-overlapping windows; at most `max_tokens` targets (0: all). A stream too short to
    score is an error naming it as `what`, with `hint`."""
    if len(stream) < 2:
        raise TinyLMError(f"{what} has {len(stream)} tokens; at least 2 are needed", hint)
    length = min(seq_len, len(stream) - 1)
    count = (len(stream) - 1) // length
    if max_tokens:
        count = max(1, min(count, max_tokens // length))
    return count, length


def eval_window(stream: TokenStream, i: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Window `i` of `eval_windows`: (inputs, targets) of `length` tokens."""
    row = stream.read(i * length, length + 1)
    return row[:-1], row[1:]
