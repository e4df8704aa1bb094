"""Shared fixtures: the real-text corpus from ../shared/data (skipped with a reason when absent), a
fresh token cache, and the fault tests' runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run, so CI cannot fail by chance; explore new
# examples locally with `pytest --hypothesis-profile=explore`.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None, max_examples=1000)
settings.load_profile("ci")

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


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tests use tiny tensors: on a shared 2-core machine extra threads only contend (up to 40x
    slower). One thread also makes CPU results independent of the machine's core count."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a run-time dependency
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh token-shard cache (TINYLM_CACHE) for one test, never ~/.cache. Modules whose
    commands encode data use it for every test: pytestmark = pytest.mark.usefixtures("cache")."""
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def fault_setup(tmp_path_factory: pytest.TempPathFactory, shakespeare_text: str) -> dict[str, Path]:
    """The fault tests' tiny pretraining setup and its reference run (faults_support)."""
    from faults_support import make_setup

    return make_setup(tmp_path_factory.mktemp("faults"), shakespeare_text)


@pytest.fixture
def loop_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The fault tests' uninterrupted run of the shared loop on a tiny model (faults_support)."""
    from faults_support import make_loop_reference

    return make_loop_reference(tmp_path, monkeypatch)
