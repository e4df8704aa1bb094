"""Reading users' files: text corpora and JSONL, streamed, with errors that name file and line.

Every stage reads its input through here, so every stage rejects a bad file the same way: one
`TinyLMError` naming the file (and the line for JSONL) and what to do about it.
"""

from __future__ import annotations

import codecs
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinylm.errors import TinyLMError

TEXT_SUFFIXES = (".txt", ".md", ".text", ".jsonl")
READ_BYTES = 1 << 20  # read files 1 MiB at a time so a corpus never has to fit in memory


@dataclass(frozen=True)
class TextPiece:
    """A piece of a document: `doc_end` is True on the last piece of each document."""

    text: str
    source: str
    doc_end: bool


def expand_paths(
    paths: Iterable[str | Path], suffixes: tuple[str, ...] = TEXT_SUFFIXES
) -> list[Path]:
    """Files as given, and the files under directories (recursively, sorted, by suffix)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            files.extend(sorted(found))
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise TinyLMError(f"{path}: not a regular file or directory")
        else:
            raise TinyLMError(f"{path}: no such file or directory", "check the path")
    if not files:
        shown = ", ".join(str(p) for p in paths) or "(none)"
        expected = ", ".join(suffixes)
        raise TinyLMError(f"no input files found in {shown}", f"expected {expected} files")
    for path in files:
        if not os.access(path, os.R_OK):
            raise TinyLMError(f"{path}: permission denied", "make it readable or leave it out")
    return files


def _safe_split(text: str) -> int:
    """The index after the last newline that is followed by a non-space character, or -1.

    Cutting there never splits what a GPT-2/GPT-4 style pre-tokenizer keeps together, so
    encoding the pieces gives the same tokens as encoding the whole.
    """
    i = len(text) - 1
    while True:
        i = text.rfind("\n", 0, i)
        if i < 0:
            return -1
        if i + 1 < len(text) and not text[i + 1].isspace():
            return i + 1


def _iter_file_text(path: Path, max_chars: int) -> Iterator[str]:
    """A UTF-8 file's text in pieces of at most about `max_chars`, cut at safe boundaries."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    pending = ""
    first = True
    with open(path, "rb") as f:
        while True:
            block = f.read(READ_BYTES)
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                raise TinyLMError(
                    f"{path}: not valid UTF-8 at byte {offset + exc.start}",
                    "convert the file to UTF-8 (e.g. iconv -t utf-8)",
                ) from None
            offset += len(block)
            if first:
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


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-empty line of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise TinyLMError(f"{path}: no such file", "check the path")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise TinyLMError(f"{path}:{lineno}: not valid UTF-8") from None
            if lineno == 1 and line.startswith("\ufeff"):
                line = line[1:]
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise TinyLMError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None


def _iter_jsonl_texts(path: Path) -> Iterator[TextPiece]:
    for lineno, obj in iter_jsonl(path):
        if not isinstance(obj, dict) or "text" not in obj:
            raise TinyLMError(f"{path}:{lineno}: expected an object with a \"text\" key")
        if not isinstance(obj["text"], str):
            raise TinyLMError(f"{path}:{lineno}: \"text\" must be a string")
        yield TextPiece(obj["text"], f"{path}:{lineno}", doc_end=True)


def iter_text(paths: Iterable[str | Path], max_chars: int = READ_BYTES) -> Iterator[TextPiece]:
    """The documents of text files (one per file) and JSONL files (one per line's "text").

    Large files come in pieces of about `max_chars` characters, cut only before a line that
    starts with a non-space character; `doc_end` marks each document's last piece.
    """
    for path in expand_paths(paths):
        if path.suffix.lower() == ".jsonl":
            yield from _iter_jsonl_texts(path)
            continue
        previous: str | None = None
        for piece in _iter_file_text(path, max_chars):
            if previous is not None:
                yield TextPiece(previous, str(path), doc_end=False)
            previous = piece
        if previous is not None:
            yield TextPiece(previous, str(path), doc_end=True)


def check_output_dir(path: str | Path, force: bool) -> Path:
    """An output directory that may be written: a non-empty one only with --force."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TinyLMError(f"{path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise TinyLMError(f"{path}: already exists and is not empty", "pass --force to overwrite")
    return path


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
