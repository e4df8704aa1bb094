"""What the user sees: progress bars, messages, summary tables and `--json` output.

Library functions take an `Output` (default: silent) instead of printing, so that the CLI, the
Python API and tests decide how much is shown. Human-readable text goes to stderr; the result of
a command (a table, or one JSON object per result with `--json`) goes to stdout.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


def format_value(value: Any) -> str:
    """A number as a person reads it in a table: 3 significant decimals, thousands separated."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.1f}"
    return str(value)


class ProgressHandle:
    """One running task: `advance(n, loss=2.1, tok_s=1234)` moves the bar and shows the fields."""

    def __init__(self, progress: Progress | None, task: TaskID | None) -> None:
        self._progress = progress
        self._task = task

    def advance(self, n: float = 1, **fields: Any) -> None:
        """Move the bar by `n` units and replace the shown fields (loss, tokens/s, ...)."""
        if self._progress is None or self._task is None:
            return
        shown = "  ".join(f"{k} {format_value(v)}" for k, v in fields.items())
        self._progress.update(self._task, advance=n, fields=shown)

    def set_total(self, total: float | None) -> None:
        """Change the bar's length (when the amount of work becomes known)."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, total=total)


@dataclass
class Output:
    """Where a command reports. `quiet` hides progress and messages; `json` prints JSON results."""

    quiet: bool = False
    json: bool = False
    err: Console = field(default_factory=lambda: Console(stderr=True))
    out: Console = field(default_factory=lambda: Console(soft_wrap=True))

    @property
    def interactive(self) -> bool:
        """True when progress bars should be drawn (not quiet, not JSON, a terminal on stderr)."""
        return not (self.quiet or self.json) and self.err.is_terminal

    def info(self, message: str) -> None:
        """A line of narration on stderr (hidden by --quiet and --json)."""
        if not (self.quiet or self.json):
            self.err.print(message, highlight=False)

    def warn(self, message: str) -> None:
        """A warning on stderr; shown even with --quiet, because it asks for attention. One
        line, never broken by Rich (a path or command in it stays whole for copying)."""
        self.err.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)

    @contextmanager
    def progress(self, description: str, total: float | None = None) -> Iterator[ProgressHandle]:
        """A Rich progress bar with elapsed time, ETA and free-form fields (loss, tokens/s)."""
        if not self.interactive:
            yield ProgressHandle(None, None)
            return
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[fields]}"),
        )
        with Progress(*columns, console=self.err, transient=False) as progress:
            task = progress.add_task(description, total=total, fields="")
            yield ProgressHandle(progress, task)

    def table(self, title: str, rows: dict[str, Any]) -> None:
        """A two-column summary table on stdout, or one JSON object with `--json`."""
        if self.json:
            self.result(rows)
            return
        if self.quiet:
            return
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column("what", style="bold")
        table.add_column("value", justify="right")
        for key, value in rows.items():
            table.add_row(key, format_value(value))
        self.out.print(table)

    def result(self, obj: dict[str, Any]) -> None:
        """One JSON object per line on stdout (only with `--json`)."""
        if self.json:
            sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
            sys.stdout.flush()


class Stopwatch:
    """Seconds since creation, for the `elapsed_s` and rates that every command reports."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        """Seconds since the stopwatch was made."""
        return time.perf_counter() - self.start


SILENT = Output(quiet=True)
