"""The bytes of gzip and zstd files, and the rows of parquet files, streamed.

Decompression runs as the file is read, a block at a time (gzip from the standard library,
zstd through `zstandard`), so a compressed corpus never has to fit in memory; a corrupt or
truncated stream raises `CorruptData`, which the readers in tinylm.textio turn into one error
naming the file and the line or byte. Parquet files are read one row group at a time with
pyarrow, and only the columns asked for; errors name the file, the row group and the row
(both counted from 0, as pyarrow and pandas count them).
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from tinylm.errors import TinyLMError

READ_BYTES = 1 << 20  # read files 1 MiB at a time so a corpus never has to fit in memory


def check_file(path: str | Path, hint: str = "check the path") -> Path:
    """`path` when it is a regular file; else one clear error: missing, a directory, a device."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        raise TinyLMError(f"{path}: is a directory, not a file", "give the files inside it")
    if path.exists():
        raise TinyLMError(f"{path}: not a regular file")
    raise TinyLMError(f"{path}: no such file", hint)


@contextmanager
def open_file(path: str | Path, hint: str = "check the path") -> Iterator[BinaryIO]:
    """A regular file opened for binary reading; `TinyLMError` when it is missing, not a file
    or unreadable (permissions), naming the file."""
    path = check_file(path, hint)
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed by the with below)
    except OSError as exc:
        raise TinyLMError(
            f"{path}: cannot read it ({exc.strerror})", "check its permissions"
        ) from None
    with f:
        yield f

# Compressed bytes handed to zstd at a time: one call's output stays a few MiB for text.
ZSTD_FEED = 1 << 16
ROWS_PER_SLICE = 4096  # rows of a row group turned into Python objects at a time
_DAMAGED = "the file is damaged or truncated; re-create or re-download it"


class CorruptData(Exception):
    """A compressed stream that cannot be decompressed (the reader adds file and place)."""


class _ZstdReader(io.RawIOBase):
    """zstd frames, one after another, decompressed; a stream cut inside a frame is an error
    (zstandard's own stream reader ends quietly there)."""

    def __init__(self, raw: BinaryIO) -> None:
        import zstandard

        self._raw = raw
        self._zstd = zstandard
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._in_frame = False
        self._out = b""
        self._pos = 0

    def readable(self) -> bool:
        return True

    def _feed(self, data: bytes) -> bytes:
        parts = []
        while data:
            try:
                parts.append(self._obj.decompress(data))
            except self._zstd.ZstdError as exc:
                raise CorruptData(f"zstd: {exc}") from None
            self._in_frame = True
            if not self._obj.eof:
                break
            data = self._obj.unused_data  # the next frame starts here
            self._obj = self._dctx.decompressobj()
            self._in_frame = False
        return b"".join(parts)

    def readinto(self, buffer: Any) -> int:
        while self._pos >= len(self._out):
            data = self._raw.read(ZSTD_FEED)
            if not data:
                if self._in_frame:
                    raise CorruptData("zstd: the stream ends inside a frame (truncated)")
                return 0
            self._out, self._pos = self._feed(data), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos:self._pos + n]
        self._pos += n
        return n


class _GzipReader(io.RawIOBase):
    """gzip members, one after another, with their errors as `CorruptData`."""

    def __init__(self, raw: BinaryIO) -> None:
        self._gz = gzip.GzipFile(fileobj=raw, mode="rb")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            return self._gz.readinto(buffer)
        except EOFError:
            raise CorruptData("gzip: the stream ends early (truncated)") from None
        except (OSError, zlib.error) as exc:
            raise CorruptData(f"gzip: {exc}") from None


@contextmanager
def open_data(path: str | Path, compression: str | None, hint: str = "check the path"
              ) -> Iterator[BinaryIO]:
    """A file's bytes for reading, decompressed as they are read when `compression` is
    "gzip" or "zstd"; reads may raise `CorruptData`."""
    with open_file(path, hint) as raw:
        if compression is None:
            yield raw
            return
        inner = _GzipReader(raw) if compression == "gzip" else _ZstdReader(raw)
        yield io.BufferedReader(inner, READ_BYTES)  # type: ignore[arg-type]


# ---- parquet ----------------------------------------------------------------------------------


def open_parquet(path: str | Path) -> Any:
    """A `pyarrow.parquet.ParquetFile`; one clear error for a file that is not (or no longer,
    when truncated) a parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    with open_file(path):  # missing, a directory, unreadable: the usual errors
        pass
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise TinyLMError(f"{path}: not a readable parquet file ({exc})", _DAMAGED) from None


def text_column(parquet: Any, path: Path, field: str) -> None:
    """Check that the file has a string column `field`; an error names what it has instead."""
    import pyarrow as pa

    schema = parquet.schema_arrow
    if field not in schema.names:
        shown = ", ".join(schema.names) or "none"
        raise TinyLMError(f'{path}: no column "{field}" (columns: {shown})',
                          "name the text column with --text-field")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise TinyLMError(f'{path}: column "{field}" holds {kind}, not text (strings)',
                          "name the text column with --text-field")


def _batches(parquet: Any, path: Path, group: int, columns: list[str]) -> Iterator[Any]:
    """Row group `group` in record batches of ROWS_PER_SLICE rows, only `columns`; an error
    names the row group when its data cannot be read."""
    import pyarrow as pa

    try:
        yield from parquet.iter_batches(ROWS_PER_SLICE, row_groups=[group], columns=columns,
                                        use_threads=False)
    except (OSError, pa.ArrowException) as exc:
        raise TinyLMError(f"{path}: row group {group}: cannot read it ({exc})", _DAMAGED) from None


def iter_parquet_texts(path: str | Path, field: str) -> Iterator[tuple[str, str]]:
    """(where, text) for each row's `field` ("file: row group G, row R"); a null is an error."""
    path = Path(path)
    parquet = open_parquet(path)
    text_column(parquet, path, field)
    row = 0
    for group in range(parquet.num_row_groups):
        for batch in _batches(parquet, path, group, [field]):
            try:
                values = batch.column(0).to_pylist()
            except UnicodeDecodeError:
                raise TinyLMError(f'{path}: row group {group}: a string in column "{field}" '
                                  "is not valid UTF-8", _DAMAGED) from None
            for text in values:
                if text is None:
                    raise TinyLMError(f'{path}: row group {group}, row {row}: "{field}" is null',
                                      "drop the row or fill in its text")
                yield f"{path}: row group {group}, row {row}", text
                row += 1


def iter_parquet_rows(path: str | Path, columns: set[str] | None = None
                      ) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row as a dict) for each row, with only `columns` (those the file has; None:
    all) and without null values, so a row reads like a JSONL object."""
    path = Path(path)
    parquet = open_parquet(path)
    wanted = [n for n in parquet.schema_arrow.names if columns is None or n in columns]
    row = 0
    for group in range(parquet.num_row_groups):
        for batch in _batches(parquet, path, group, wanted):
            for obj in batch.to_pylist():
                yield (f"{path}: row group {group}, row {row}",
                       {k: v for k, v in obj.items() if v is not None})
                row += 1


def parquet_record(path: str | Path) -> dict[str, Any]:
    """What the token cache records of a parquet file besides its bytes: its row groups."""
    parquet = open_parquet(path)
    return {"row_groups": parquet.num_row_groups, "rows": parquet.metadata.num_rows}
