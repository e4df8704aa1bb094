"""Reading users' files: text corpora, JSONL and parquet, streamed, with errors that name the
file and the line (or row group and row).

Every stage reads its input through here, so every stage rejects a bad file the same way: one
`TinyLMError` naming the file (and the line for JSONL) and what to do about it. Files ending in
.gz or .zst are decompressed as they are read (tinylm.formats); which files a `--data` value
names, and of what kind, is tinylm.sources.
"""

from __future__ import annotations

import codecs
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regex

from tinylm.errors import TinyLMError
from tinylm.formats import (
    READ_BYTES,
    CorruptData,
    iter_parquet_texts,
    open_data,
)
from tinylm.nesting import TooDeep, loads_json
from tinylm.sources import DataFile, DataValue, classify, expand

# A JSONL line longer than this is a wrong file (a JSON array, a binary), not one example; the
# check keeps such a file from being read whole into memory before it fails.
MAX_LINE_BYTES = 64 << 20


@dataclass(frozen=True)
class TextPiece:
    """A piece of a document: `doc_end` is True on the last piece of each document."""

    text: str
    source: str
    doc_end: bool


def expand_paths(paths: Iterable[DataValue]) -> list[Path]:
    """Files as given, the files under directories (recursively, sorted, of a known kind) and
    those a glob matches; `path:weight` values count as their path (tinylm.sources)."""
    return [f.path for f in expand(paths)]


# A letter or digit followed by whitespace, searched from the end of the text.
_CUT = regex.compile(r"(?r)[\p{L}\p{N}](?=\s)")


def _safe_split(text: str) -> int:
    """The index of the last whitespace character that follows a letter or digit, or -1.

    GPT-2 and GPT-4 style split patterns end a chunk after a letter or digit that whitespace
    follows, and look no further back than the chunk they match, so encoding the two sides of
    such a cut gives the same tokens as encoding the whole. (Cutting after a newline does not:
    GPT-2's pattern splits "\n\nA" as "\n", "\n", "A" but a piece ending in "\n\n" as one.)
    """
    match = _CUT.search(text)
    return match.end() if match else -1


def _corrupt(where: str, exc: Exception, after: str = "") -> TinyLMError:
    """The error for a compressed stream that broke at `where` ("file" or "file:line")."""
    return TinyLMError(f"{where}: corrupt compressed data{after} ({exc})",
                       "the file is damaged or truncated; re-create or re-download it")


def _iter_file_text(
    path: Path, max_chars: int, hint: str = "check the path", compression: str | None = None
) -> Iterator[str]:
    """A UTF-8 file's text (decompressed as it is read when `compression` is "gzip" or "zstd")
    in pieces of at most about `max_chars`, cut at safe boundaries."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    pending = ""
    first = True
    with open_data(path, compression, hint) as f:
        while True:
            try:
                block = f.read1(READ_BYTES)  # what was read before a corrupt block counts
            except CorruptData as exc:
                raise _corrupt(str(path), exc, f" after {offset:,} bytes of text") from None
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                raise TinyLMError(
                    f"{path}: not valid UTF-8 at byte {offset + exc.start}",
                    "convert the file to UTF-8 (e.g. iconv -t utf-8)",
                ) from None
            offset += len(block)
            if first and text:  # the first character, even when the first block cut it
                if text.startswith("\ufeff"):
                    text = text[1:]
                first = False
            if "\x00" in text:
                raise TinyLMError(f"{path}: contains NUL bytes; is it a binary file?")
            pending += text
            while len(pending) > max_chars:
                cut = _safe_split(pending[:max_chars])
                if cut <= 0:
                    # No safe cut in the window: look further before giving up on the size bound.
                    cut = _safe_split(pending)
                    if cut <= 0:
                        break
                yield pending[:cut]
                pending = pending[cut:]
            if not block:
                break
    if pending:
        yield pending


def _parse_json(text: str, path: Path, lineno: int | None = None) -> Any:
    """`json.loads`; an error names the file and line (`lineno`: the line of a JSONL file that
    `text` is; else the line within `text`)."""
    where = f"{path}:{lineno}" if lineno else str(path)
    try:
        obj = loads_json(text)
    except json.JSONDecodeError as exc:
        where = f"{path}:{lineno or exc.lineno}"
        raise TinyLMError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except TooDeep as exc:
        raise TinyLMError(f"{where}: JSON {exc}") from None
    if "\\u" in text:  # JSON may escape half a surrogate pair, which no UTF-8 text can hold
        check_text(json.dumps(obj, ensure_ascii=False), where, "a \\u escape lacks its pair")
    return obj


def check_text(text: str, what: str, hint: str | None = None) -> str:
    """`text` when it is Unicode text; an error naming `what` when it holds half a surrogate
    pair (U+D800-U+DFFF): a JSON escape, or bytes that a command line could not decode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        half = f"U+{ord(text[exc.start]):04X}"
        raise TinyLMError(
            f"{what}: holds half a surrogate pair ({half}), which is not text", hint
        ) from None
    return text


def _compression(path: Path) -> str | None:
    kind = classify(path)
    return kind[1] if kind else None


def iter_jsonl(path: str | Path, hint: str = "check the path") -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-empty line of a JSONL file (a .jsonl.gz or
    .jsonl.zst is decompressed as it is read).

    Accepted and read as the plain file would be: a UTF-8 byte order mark, CRLF line ends,
    blank lines (skipped). Errors name the file and line: invalid UTF-8, invalid or too deeply
    nested JSON, a line over `MAX_LINE_BYTES`, corrupt compressed data.
    """
    path = Path(path)
    with open_data(path, _compression(path), hint) as f:
        lineno = 0
        while True:
            try:
                raw = f.readline(MAX_LINE_BYTES + 1)
            except CorruptData as exc:
                raise _corrupt(f"{path}:{lineno + 1}", exc) from None
            if not raw:
                break
            lineno += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise TinyLMError(
                    f"{path}:{lineno}: line longer than {MAX_LINE_BYTES:,} bytes",
                    "is it a JSONL file, one JSON object a line?",
                )
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise TinyLMError(
                    f"{path}:{lineno}: not valid UTF-8 (byte {exc.start + 1} of the line)",
                    "convert the file to UTF-8",
                ) from None
            if lineno == 1 and line.startswith("\ufeff"):
                line = line[1:]
            if line.strip():
                yield lineno, _parse_json(line, path, lineno)


def read_text(path: str | Path, hint: str = "check the path") -> str:
    """A whole UTF-8 text file, its byte order mark dropped; a clear error for a missing or
    unreadable file, invalid UTF-8 or NUL bytes (a binary file). Line ends are kept."""
    return "".join(_iter_file_text(Path(path), sys.maxsize, hint))


def read_json(path: str | Path, hint: str = "check the path") -> Any:
    """A JSON file's content; errors name the file (and the line of a syntax error)."""
    return _parse_json(read_text(path, hint), Path(path))


def _iter_jsonl_texts(path: Path, field: str) -> Iterator[TextPiece]:
    for lineno, obj in iter_jsonl(path):
        if not isinstance(obj, dict) or field not in obj:
            raise TinyLMError(f'{path}:{lineno}: expected an object with a "{field}" key',
                              None if field != "text" else "name the text key with --text-field")
        if not isinstance(obj[field], str):
            raise TinyLMError(f'{path}:{lineno}: "{field}" must be a string')
        yield TextPiece(obj[field], f"{path}:{lineno}", doc_end=True)


def iter_file_pieces(file: DataFile, max_chars: int = READ_BYTES) -> Iterator[TextPiece]:
    """The documents of one data file: the whole of a text file, each JSONL line's or parquet
    row's text field; text files come in pieces of about `max_chars` characters."""
    if file.kind == "jsonl":
        yield from _iter_jsonl_texts(file.path, file.text_field)
        return
    if file.kind == "parquet":
        for where, text in iter_parquet_texts(file.path, file.text_field):
            yield TextPiece(text, where, doc_end=True)
        return
    previous: str | None = None
    for piece in _iter_file_text(file.path, max_chars, compression=file.compression):
        if previous is not None:
            yield TextPiece(previous, str(file.path), doc_end=False)
        previous = piece
    if previous is not None:
        yield TextPiece(previous, str(file.path), doc_end=True)


def iter_text(
    paths: Iterable[DataValue], max_chars: int = READ_BYTES, text_field: str = "text"
) -> Iterator[TextPiece]:
    """The documents of the data files that `paths` name (tinylm.sources: text files, JSONL,
    parquet, .gz / .zst, directories, globs): one per text file, one per JSONL line's or
    parquet row's `text_field`.

    Large text files come in pieces of about `max_chars` characters, cut only where a
    GPT-style pre-tokenizer cuts anyway (before whitespace that follows a letter or digit);
    `doc_end` marks each document's last piece.
    """
    for file in expand(paths, text_field):
        yield from iter_file_pieces(file, max_chars)


def check_output_dir(path: str | Path, force: bool) -> Path:
    """An output directory that may be written: a non-empty one only with --force."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TinyLMError(f"{path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise TinyLMError(f"{path}: already exists and is not empty", "pass --force to overwrite")
    existing = next(p for p in path.parents if p.exists())  # the root always exists
    if not existing.is_dir():
        raise TinyLMError(f"{path}: cannot be created, {existing} is not a directory")
    return path


def check_distinct(source: str | Path, out_dir: str | Path) -> None:
    """Refuse an output directory that is also an input: --force would write over the input."""
    if Path(out_dir).exists() and Path(out_dir).resolve() == Path(source).resolve():
        raise TinyLMError(
            f"{out_dir}: is the input directory too ({source})", "choose another -o directory"
        )


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file under a temporary name in the same directory, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """`atomic_write_bytes` for an indented JSON document."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
