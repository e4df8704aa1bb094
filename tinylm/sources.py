"""Where data comes from: `--data` values (files, directories, globs, mixture weights) and the
kind of each file they name.

    corpus.txt  notes.md  docs.jsonl               plain text, JSONL
    shard_000.parquet                              parquet (a text column, or message lists)
    dump.jsonl.gz  code.txt.zst                    gzip or zstd of text or JSONL
    data/   "shards/*.parquet"   "web/**/*.jsonl.zst"   directories (recursive) and globs
    web.parquet:0.8                                a weight: the share of a mixture

Only a trailing `:number` is a weight, and only when the whole value does not name an existing
path, so a path that really contains ':' still works. Nothing here reads a file's content;
tinylm.textio and tinylm.formats do.
"""

from __future__ import annotations

import glob
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tinylm.errors import TinyLMError

TEXT_SUFFIXES = (".txt", ".md", ".text")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
DEFAULT_TEXT_FIELD = "text"
_WEIGHT = re.compile(r"(.+):([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class DataFile:
    """One input file: `kind` "text", "jsonl" or "parquet"; `compression` None, "gzip" or
    "zstd" (of text or JSONL); `text_field`: the JSONL key or parquet column of the text."""

    path: Path
    kind: str
    compression: str | None = None
    text_field: str = DEFAULT_TEXT_FIELD

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class Source:
    """One `--data` value: a file, directory or glob (`spec`), its mixture weight (None: not
    weighted) and the field its text is in."""

    spec: str
    weight: float | None = None
    text_field: str = DEFAULT_TEXT_FIELD

    def __str__(self) -> str:
        return self.spec if self.weight is None else f"{self.spec}:{self.weight:g}"


DataValue = str | os.PathLike | Source | DataFile
"""What every reader accepts as an input: a path or spec string, a Source, or a DataFile."""


def classify(path: Path) -> tuple[str, str | None] | None:
    """(kind, compression) from a file name's suffixes, or None for a name with no known kind."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = None
    if suffixes and suffixes[-1] in COMPRESSIONS:
        compression = COMPRESSIONS[suffixes.pop()]
    inner = suffixes[-1] if suffixes else None
    if inner == ".parquet":
        return None if compression else ("parquet", None)  # parquet compresses inside
    if inner == ".jsonl":
        return "jsonl", compression
    if inner in TEXT_SUFFIXES or compression:  # corpus.gz: compressed text
        return "text", compression
    return None


def parse_source(value: DataValue, text_field: str = DEFAULT_TEXT_FIELD) -> Source:
    """A `--data` value as a Source: `path`, `path:weight`, a directory or a glob."""
    if isinstance(value, Source):
        return value
    if isinstance(value, DataFile):
        return Source(str(value.path), None, value.text_field)
    spec = os.fspath(value)
    match = _WEIGHT.fullmatch(spec) if isinstance(value, str) else None
    if match is None or os.path.lexists(spec):
        return Source(spec, None, text_field)
    weight = float(match.group(2))
    if not math.isfinite(weight) or weight <= 0:
        raise TinyLMError(f"--data {spec}: the weight must be a positive number, got {weight:g}")
    return Source(match.group(1), weight, text_field)


def _file(path: Path, text_field: str) -> DataFile | None:
    """A DataFile for a file found in a directory or by a glob, None for an unknown kind."""
    kind = classify(path)
    return None if kind is None else DataFile(path, kind[0], kind[1], text_field)


def _expand_one(source: Source) -> list[DataFile]:
    path = Path(source.spec)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file())
        return [f for p in found if (f := _file(p, source.text_field)) is not None]
    if path.is_file():
        return [DataFile(path, *(classify(path) or ("text", None)), source.text_field)]
    if path.exists():
        raise TinyLMError(f"{path}: not a regular file or directory")
    if path.is_symlink():
        raise TinyLMError(f"{path}: no such file or directory (a dangling link)")
    if _GLOB_CHARS & set(source.spec):
        matches = [Path(m) for m in sorted(glob.glob(source.spec, recursive=True))]
        if not matches:
            raise TinyLMError(f"{source.spec}: the pattern matches no files",
                              "check the pattern (quote it so the shell does not expand it)")
        # Like the shell, a pattern names files: the directories it matches are not searched.
        return [f for m in matches if m.is_file()
                and (f := _file(m, source.text_field)) is not None]
    raise TinyLMError(f"{path}: no such file or directory", "check the path")


def source_files(source: Source) -> list[DataFile]:
    """The readable data files a Source names (directories recursively, globs sorted)."""
    files = _expand_one(source)
    if not files:
        raise TinyLMError(
            f"no input files found in {source.spec}",
            "expected .txt, .md, .jsonl, .parquet files, or .gz / .zst of text or JSONL",
        )
    for file in files:
        if not os.access(file.path, os.R_OK):
            raise TinyLMError(f"{file.path}: permission denied", "make it readable or leave it out")
    return files


def resolve_sources(
    values: Iterable[DataValue], text_field: str = DEFAULT_TEXT_FIELD
) -> list[Source]:
    """The `--data` values as Sources; weights on all of them (a mixture) or on none."""
    sources = [parse_source(v, text_field) for v in values]
    if not sources:
        raise TinyLMError("no input files given", "give --data FILES, directories or globs")
    weighted = [s for s in sources if s.weight is not None]
    if weighted and len(weighted) != len(sources):
        plain = next(s for s in sources if s.weight is None)
        raise TinyLMError(
            f"--data {plain.spec} has no weight but other --data values do",
            f"give every value a weight (e.g. {plain.spec}:0.5) or none",
        )
    return sources


def unweighted(values: Iterable[DataValue], text_field: str = DEFAULT_TEXT_FIELD
               ) -> list[Source]:
    """The values as Sources without their weights: a sample of them follows the files' sizes
    (pretraining's tokenizer, which must not read past each file's training part)."""
    return [Source(s.spec, None, s.text_field) for s in resolve_sources(values, text_field)]


def expand(values: Iterable[DataValue], text_field: str = DEFAULT_TEXT_FIELD) -> list[DataFile]:
    """Every data file of the values, in order (weights are ignored here)."""
    return [f for s in resolve_sources(values, text_field) for f in source_files(s)]


def mixture_weights(sources: Sequence[Source]) -> list[float] | None:
    """The sources' weights normalised to sum to 1, or None when they are not weighted."""
    if not sources or sources[0].weight is None:
        return None
    total = sum(s.weight or 0.0 for s in sources)
    return [(s.weight or 0.0) / total for s in sources]
