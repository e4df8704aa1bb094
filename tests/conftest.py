"""Shared fixtures: the real-text corpus from ../shared/data, skipped with a reason when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    """Path to tinyshakespeare.txt (1.1 MB of real text); skips the test when it is absent."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not found (real-text tests need ../shared/data)")
    return SHAKESPEARE


@pytest.fixture(scope="session")
def shakespeare_text(shakespeare_path: Path) -> str:
    """The text of tinyshakespeare.txt."""
    return shakespeare_path.read_text(encoding="utf-8")
