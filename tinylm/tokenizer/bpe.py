"""Byte-pair encoding as small pure functions: pair counts, one merge, training, encoding a chunk.

These are the reference implementation and the fallback when the C accelerator is not built;
the C code (`_c/train.c`, `_c/encode.c`) follows the same rules and tests compare the two.

Rules (the same everywhere):
- A word (a pre-tokenized chunk) starts as its UTF-8 bytes; byte b is token id b while training.
- A pair's count is the sum over words of (word count) x (occurrences of the pair in the word),
  overlapping occurrences included ("aaa" holds (a, a) twice).
- Each step merges the pair with the highest count; ties go to the smallest (left id, right id).
  The new token's id is 256 + the merge's index. Merging replaces the pair's occurrences left to
  right without overlap ("aaa" -> "aa" "a").
- Encoding applies merges lowest rank first, each at its leftmost occurrence, which gives the
  same ids as tiktoken and Hugging Face tokenizers.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence

Pair = tuple[int, int]


def pair_counts(words: Mapping[tuple[int, ...], int]) -> Counter[Pair]:
    """Count of every adjacent pair over words (token tuples) weighted by the word counts."""
    counts: Counter[Pair] = Counter()
    for word, n in words.items():
        for pair in zip(word, word[1:], strict=False):
            counts[pair] += n
    return counts


def merge(ids: Sequence[int], pair: Pair, new_id: int) -> list[int]:
    """Replace each occurrence of `pair` in `ids`, left to right, by `new_id`."""
    out: list[int] = []
    i = 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class _PairStats:
    """Pair counts, which words hold each pair, and the pairs that gained count in this step."""

    def __init__(self) -> None:
        self.count: defaultdict[Pair, int] = defaultdict(int)
        self.where: defaultdict[Pair, set[int]] = defaultdict(set)
        self.gained: set[Pair] = set()

    def add(self, pair: Pair, delta: int, word: int) -> None:
        self.count[pair] += delta
        if delta > 0:
            self.where[pair].add(word)
            self.gained.add(pair)


def _merge_word(
    tokens: list[int], pair: Pair, new_id: int, n: int, w: int, stats: _PairStats
) -> None:
    """Merge `pair` in one word in place, moving the neighbours' pair counts as it goes."""
    a, b = pair
    out: list[int] = []
    r = 0
    while r < len(tokens):
        if r + 1 < len(tokens) and tokens[r] == a and tokens[r + 1] == b:
            if out:
                stats.add((out[-1], a), -n, w)
                stats.add((out[-1], new_id), n, w)
            stats.add(pair, -n, w)
            if r + 2 < len(tokens):
                stats.add((b, tokens[r + 2]), -n, w)
                stats.add((new_id, tokens[r + 2]), n, w)
            out.append(new_id)
            r += 2
        else:
            out.append(tokens[r])
            r += 1
    tokens[:] = out


def train_merges(
    counts: Mapping[bytes, int],
    n_merges: int,
    progress: Callable[[int], object] | None = None,
    every: int = 256,
) -> list[Pair]:
    """Up to `n_merges` merges learned from chunk counts, with incremental pair-count updates.

    Each merge visits only the words holding the pair; a heap of (-count, pair) with lazy
    deletion (an entry whose count is out of date is pushed back with the right one) finds the
    next pair. `progress(done)` is called every `every` merges. Stops early when no pair is left.
    """
    words = [list(word) for word in counts]
    word_counts = list(counts.values())
    stats = _PairStats()
    for w, (tokens, n) in enumerate(zip(words, word_counts, strict=True)):
        for pair in zip(tokens, tokens[1:], strict=False):
            stats.add(pair, n, w)
    heap = [(-n, pair) for pair, n in stats.count.items() if n > 0]
    heapq.heapify(heap)
    merges: list[Pair] = []
    while len(merges) < n_merges and heap:
        neg, pair = heapq.heappop(heap)
        now = stats.count[pair]
        if now != -neg:
            if now > 0:
                heapq.heappush(heap, (-now, pair))
            continue
        new_id = 256 + len(merges)
        merges.append(pair)
        stats.gained = set()
        for w in sorted(stats.where.pop(pair)):
            _merge_word(words[w], pair, new_id, word_counts[w], w, stats)
        for gained in stats.gained:
            if stats.count[gained] > 0:
                heapq.heappush(heap, (-stats.count[gained], gained))
        if progress is not None and len(merges) % every == 0:
            progress(len(merges))
    return merges


def merge_table(merges: Iterable[tuple[int, int, int]]) -> dict[Pair, tuple[int, int]]:
    """(left, right) -> (rank, new id) from merges (left, right, new id) in rank order."""
    table: dict[Pair, tuple[int, int]] = {}
    for rank, (a, b, new_id) in enumerate(merges):
        table.setdefault((a, b), (rank, new_id))
    return table


_NO_MERGE = (float("inf"), -1)


def encode_chunk(
    data: bytes, byte_ids: Sequence[int], table: Mapping[Pair, tuple[int, int]]
) -> list[int]:
    """The ids of one chunk: its bytes' ids, then merges by rank (lowest first, leftmost first)."""
    ids = [byte_ids[b] for b in data]
    while len(ids) > 1:
        pair = min(zip(ids, ids[1:], strict=False), key=lambda p: table.get(p, _NO_MERGE))
        found = table.get(pair)
        if found is None:
            break
        # Merging every occurrence at once is the same as merging the leftmost one repeatedly:
        # new pairs all contain the new token, whose rank is higher.
        ids = merge(ids, pair, found[1])
    return ids
