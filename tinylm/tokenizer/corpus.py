"""Training text from files: an even sample under --max-bytes, and a held-out slice.

Files of every kind (text, JSONL, parquet, .gz / .zst; tinylm.sources) are streamed piece by
piece (tinylm.textio), so a corpus larger than memory works; only the held-out slice (at most
HOLDOUT_CAP bytes) is kept. Under --max-bytes, weighted sources (`web.parquet:0.8`) give each
source its weight's share of the sample; else the sample follows the files' sizes on disk.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from tinylm.sources import DataValue, mixture_weights, resolve_sources, source_files
from tinylm.textio import iter_file_pieces

HOLDOUT_CAP = 2_000_000  # bytes of held-out text kept at most


def _cut(text: str, position: int) -> int:
    """A cut at or before `position`: after the last line break, else the last space, else 0."""
    cut = text.rfind("\n", 0, position) + 1
    if cut <= 0:
        cut = text.rfind(" ", 0, position) + 1
    return max(cut, 0)


def _truncate_bytes(text: str, limit: int) -> str:
    """The longest prefix within `limit` UTF-8 bytes, cut at a line break or space if any."""
    prefix = text.encode("utf-8", "surrogatepass")[:limit].decode("utf-8", "ignore")
    cut = _cut(prefix, len(prefix))
    return prefix[:cut] if cut > 0 else prefix


def _spread(limit: int, sizes: list[int]) -> list[int | None]:
    """`limit` bytes spread over files in proportion to their sizes (None: read it all)."""
    total = sum(sizes)
    if limit >= total:
        return [None] * len(sizes)
    budgets: list[int | None] = []
    seen = 0
    for size in sizes:
        start = limit * seen // total
        seen += size
        budgets.append(limit * seen // total - start)
    return budgets


@dataclass
class CorpusReader:
    """Streams the training text of files; fills `held_out` as it goes.

    `max_bytes` spreads the sample over the files in proportion to their sizes (each file's
    beginning), over weighted sources by weight first; `holdout` is the fraction of each
    piece's tail (cut at a line break or space) kept apart for measuring bytes/token, until
    HOLDOUT_CAP bytes are held out.
    """

    paths: Iterable[DataValue]
    max_bytes: int | None = None
    holdout: float = 0.0
    held_out: list[str] = field(default_factory=list)
    held_out_bytes: int = 0

    def __post_init__(self) -> None:
        sources = resolve_sources(self.paths)
        files_of = [source_files(s) for s in sources]
        self.files = [f for files in files_of for f in files]
        self.sizes = [f.path.stat().st_size for f in self.files]
        self._weights = mixture_weights(sources)
        self._counts = [len(files) for files in files_of]

    @property
    def total_bytes(self) -> int:
        """Bytes that will be read (the files' sizes, or max_bytes if smaller)."""
        total = sum(self.sizes)
        return min(total, self.max_bytes) if self.max_bytes is not None else total

    def _budgets(self) -> list[int | None]:
        if self.max_bytes is None:
            return [None] * len(self.files)
        if self._weights is None:
            return _spread(self.max_bytes, self.sizes)
        budgets: list[int | None] = []
        first, seen = 0, 0.0
        for count, weight in zip(self._counts, self._weights, strict=True):
            start = round(self.max_bytes * seen)  # cumulative: the shares add up to max_bytes
            seen += weight
            share = round(self.max_bytes * seen) - start
            budgets += _spread(share, self.sizes[first:first + count])
            first += count
        return budgets

    def _split_holdout(self, text: str) -> str:
        if self.holdout <= 0 or self.held_out_bytes >= HOLDOUT_CAP:
            return text
        cut = _cut(text, int(len(text) * (1 - self.holdout)))
        if cut <= 0 or cut >= len(text):
            return text
        tail = text[cut:]
        self.held_out.append(tail)
        self.held_out_bytes += len(tail.encode("utf-8", "surrogatepass"))
        return text[:cut]

    def __iter__(self) -> Iterator[str]:
        for path, budget in zip(self.files, self._budgets(), strict=True):
            if budget == 0:
                continue
            left = budget
            for piece in iter_file_pieces(path):
                text = piece.text
                if left is not None:
                    size = len(text.encode("utf-8", "surrogatepass"))
                    if size > left:
                        text = _truncate_bytes(text, left)
                        size = left
                    left -= size
                if text:
                    yield self._split_holdout(text)
                if left is not None and left <= 0:
                    break
