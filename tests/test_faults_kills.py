"""Kills: SIGKILL at every file operation of a save and at random moments of training never
leaves a run unable to resume, and the resumed losses equal the uninterrupted run's; Ctrl-C
saves, exits 130 and resumes exactly. Helpers in faults_support.py.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from faults_support import (
    WRITES,
    Faults,
    check_resumes_exactly,
    data_args,
    events_of_a_save,
    in_child,
    invoke,
    leftovers,
    losses,
    train_tiny,
)

from tinylm.errors import TinyLMError
from tinylm.pretrain import pretrain
from tinylm.run import load_run
from tinylm.train import checkpoint as ckpt

# ---- a kill at a chosen file operation of a save --------------------------------------------


def _kill_child(run: Path, at: int, mode: str) -> None:
    with pytest.MonkeyPatch.context() as patch:
        Faults(patch, step=3, at=at, mode=mode)
        train_tiny(run)


def _kill_trials(
    tmp_path: Path, events: list[str], trials: list[tuple[int, str]], reference: dict[str, Any]
) -> None:
    """Each (operation, mode): a child killed there, then the checks and an exact resume."""
    for i, (at, mode) in enumerate(trials):
        run = tmp_path / f"trial{i}"
        proc = in_child(_kill_child, run, at, mode)
        proc.join()
        what = f"{mode} at {events[at]} (operation {at})"
        assert proc.exitcode == -signal.SIGKILL, what
        complete = (ckpt.checkpoint_dir(run, 2), ckpt.checkpoint_dir(run, 3))
        assert ckpt.latest_checkpoint(run) in complete, what
        check_resumes_exactly(run, reference, what)


def test_a_kill_at_the_critical_moments_of_a_save_never_loses_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop_reference: dict[str, Any]
) -> None:
    """SIGKILL at the start of the save of step 3, in the middle of writing its weights,
    just before and just after the rename that completes it, half way through updating the
    run's files, and while old checkpoints are pruned: resume ends exactly as the reference."""
    events = events_of_a_save(tmp_path, monkeypatch)
    replaces = [i for i, name in enumerate(events) if name == "replace"]
    renamed, one_file_published = replaces[-4], replaces[-2]  # the last 3 publish the run
    trials = [
        (0, "kill"),
        (events.index("save_file"), "torn"),
        (renamed, "kill"),
        (renamed + 1, "kill"),
        (one_file_published, "kill"),
        (events.index("rmtree"), "kill"),
    ]
    _kill_trials(tmp_path, events, trials, loop_reference)


@pytest.mark.slow
def test_a_kill_at_every_file_operation_of_a_save_never_loses_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop_reference: dict[str, Any]
) -> None:
    """SIGKILL before each file operation of the save of step 3 (and in the middle of each
    write): the run resumes from step 2 or 3 and ends exactly as the uninterrupted one."""
    events = events_of_a_save(tmp_path, monkeypatch)
    expected = {"mkdtemp", "save_file", "write_text", "fsync", "link", "replace", "rmtree"}
    assert expected <= set(events)
    trials = [(i, "kill") for i in range(len(events))]
    trials += [(i, "torn") for i, name in enumerate(events) if name in WRITES]
    assert len(trials) >= 30
    _kill_trials(tmp_path, events, trials, loop_reference)


# ---- kills at random moments ----------------------------------------------------------------


def _run_pretrain(data: Path, config: Path, out: Path) -> None:
    pretrain([str(data)], out, config=config, tokenizer="bytes")


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_the_run(fault_setup: dict[str, Path]) -> None:
    """12 seeded trials: `tinylm pretrain`'s library call killed after a random delay (during
    training, evaluation, saving or the report); then --resume (or, killed before the first
    checkpoint, a fresh start) ends with exactly the reference run's losses. (A kill of the
    `tinylm pretrain` process itself: test_pretrain.py.)"""
    rng = random.Random(1234)
    clock = time.perf_counter()
    _run_pretrain(fault_setup["data"], fault_setup["config"], fault_setup["root"] / "timing")
    duration = time.perf_counter() - clock
    outcomes = []
    for trial in range(12):
        run = fault_setup["root"] / f"random{trial}"
        proc = in_child(_run_pretrain, fault_setup["data"], fault_setup["config"], run)
        time.sleep(rng.uniform(0.0, duration))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        try:
            pretrain(None, run, resume=True)
            outcomes.append("resumed" if proc.exitcode else "finished")
        except TinyLMError as exc:
            assert "no checkpoint to resume from" in str(exc) or "no such run" in str(exc)
            pretrain([str(fault_setup["data"])], run, config=fault_setup["config"],
                     tokenizer="bytes", force=True)
            outcomes.append("restarted")
        assert losses(run) == losses(fault_setup["reference"]), (trial, outcomes[-1])
        assert not leftovers(run)
        load_run(run)
    assert outcomes.count("resumed") >= 4, outcomes


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tinylm", "pretrain", *args]


@contextmanager
def _process(args: list[str]) -> Iterator[subprocess.Popen]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.communicate()


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int) -> None:
    while proc.poll() is None and not any(s >= step for s, _ in losses(run)):
        time.sleep(0.005)


# ---- Ctrl-C ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code", "prefix"), [(signal.SIGINT, 130, "warning: interrupted"),
                                                    (signal.SIGTERM, 143, "SIGTERM: interrupted")])
def test_stop_signal_saves_exits_and_resume_continues_exactly(
        fault_setup: dict[str, Path], sig: int, code: int, prefix: str) -> None:
    """Ctrl-C (or a scheduler's SIGTERM) in the middle of a run: the step under way finishes, a
    checkpoint is saved, the process exits 128 + the signal naming --resume; resuming gives the
    uninterrupted run's losses."""
    root = fault_setup["root"]
    run, reference = root / f"interrupted-{sig}", root / "not-interrupted"
    common = data_args(fault_setup, "--max-steps", "16")
    if not reference.exists():
        assert invoke("pretrain", *common, "-q", "-o", str(reference)).exit_code == 0
    only_the_signal_saves = ["--set", "train.save_every=100"]
    with _process(_command(*common, "-o", str(run), *only_the_signal_saves)) as proc:
        _wait_for_step(proc, run, 3)
        proc.send_signal(sig)
        _, stderr = proc.communicate()
    assert proc.returncode == code, stderr
    assert prefix in stderr, stderr
    step = int(stderr.split("interrupted at step ")[1].split(";")[0])
    assert 3 <= step < 16 and "--resume" in stderr
    assert ckpt.latest_checkpoint(run) == ckpt.checkpoint_dir(run, step)
    ckpt.verify_checkpoint(ckpt.checkpoint_dir(run, step))
    result = invoke("pretrain", "-o", str(run), "--resume", "-q", "--set", "train.save_every=2")
    assert result.exit_code == 0, result.output
    assert losses(run) == losses(reference)
