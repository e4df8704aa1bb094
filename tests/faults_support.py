"""What the fault tests share: a tiny pretraining setup with a reference run, ways to damage
files, to kill a training process at a chosen file operation of a save or to make that
operation find the disk full, and the check that a run then resumes exactly.

Not a test module (pytest collects only test_*.py); test_faults*.py import it. Kills run the
training in a forked child (torch already imported, so a trial costs a fraction of a second)
and resume in the test process.
"""

from __future__ import annotations

import errno
import io
import multiprocessing
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import typer
from click.testing import CliRunner, Result
from rich.console import Console
from safetensors.torch import load_file

import tinylm.cli  # noqa: F401  (registers the commands)
from tinylm.cli.app import app
from tinylm.console import Output
from tinylm.errors import TinyLMError
from tinylm.losses import lm_loss
from tinylm.model import ModelConfig, Transformer
from tinylm.pretrain import pretrain
from tinylm.run import load_run, save_run
from tinylm.tokenizer import Tokenizer
from tinylm.train import checkpoint as ckpt
from tinylm.train import loop
from tinylm.train.config import TrainConfig
from tinylm.train.report import read_metrics

TOK = Tokenizer.bytes_only()
runner = CliRunner()
CLI = typer.main.get_command(app)  # built once, not on every call

CONFIG = """\
model: {family: llama, n_layers: 1, n_heads: 2, d_model: 32, max_seq_len: 32}
train: {max_steps: 8, batch_tokens: 256, micro_batch: 4, warmup_steps: 2, lr: 3.0e-3,
        eval_every: 4, save_every: 2, keep_checkpoints: 10, log_every: 1, eval_tokens: 512,
        device: cpu}
data: {seq_len: 32, val_fraction: 0.1, cache_dir: CACHE}
"""


def invoke(*args: str) -> Result:
    """`tinylm ARGS...` in this process."""
    return runner.invoke(CLI, list(args))


def losses(run: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training line of a run's metrics.jsonl."""
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def weights(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file."""
    return load_file(str(file))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """True when two state dicts hold the same names and exactly equal tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def damage(file: Path, how: str) -> None:
    """Damage a file in place (its hard links see the damage too): "truncate" to half,
    "flip" one bit of the last byte (tensor data, or JSON's end), "append" a newline."""
    data = file.read_bytes()
    with open(file, "r+b") as f:
        if how == "truncate":
            f.truncate(len(data) // 2)
        elif how == "flip":
            f.seek(len(data) - 1)
            f.write(bytes([data[-1] ^ 0x01]))
        elif how == "append":
            f.seek(len(data))
            f.write(b"\n")
        else:
            raise AssertionError(how)


def leftovers(run: Path) -> list[str]:
    """What an interrupted save may leave: temporary directories and links."""
    found = [p.name for p in (run / ckpt.CHECKPOINTS).glob(".tmp*")]
    return found + [p.name for p in run.glob(".*.tmp")]


def one_error_line(result: Result) -> str:
    """The single `error: ...` line of a command that failed as a user error (exit 2)."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _single_threaded(target: Callable[..., Any], *args: Any) -> None:
    # An OpenMP pool started in the parent does not survive a fork; one thread never uses it.
    torch.set_num_threads(1)
    target(*args)


def in_child(target: Callable[..., Any], *args: Any) -> multiprocessing.Process:
    """Start `target(*args)` in a forked copy of this process (no new interpreter start)."""
    context = multiprocessing.get_context("fork")
    proc = context.Process(target=_single_threaded, args=(target, *args))
    proc.start()
    return proc


# ---- a tiny pretraining setup ----------------------------------------------------------------


def make_setup(root: Path, shakespeare_text: str) -> dict[str, Path]:
    """Config, 30 kB of Shakespeare (its tokens cached) and an 8-step reference run that
    checkpoints every 2 steps and keeps them all, in `root`."""
    data = root / "shakes.txt"
    data.write_text(shakespeare_text[:30_000], encoding="utf-8")
    config = root / "config.yaml"
    config.write_text(CONFIG.replace("CACHE", str(root / "cache")), encoding="utf-8")
    reference = root / "reference"
    pretrain([str(data)], reference, config=config, tokenizer="bytes")
    return {"data": data, "config": config, "reference": reference, "root": root}


def data_args(setup: dict[str, Path], *extra: str) -> list[str]:
    """`tinylm pretrain` options for the setup's config and data, then `extra`."""
    return ["-c", str(setup["config"]), "-d", str(setup["data"]), "-t", "bytes", *extra]


def copy_run(source: Path, target: Path) -> Path:
    """A copy of a run whose top-level files are hard links to its newest checkpoint again,
    as `tinylm pretrain` leaves them."""
    shutil.copytree(source, target)
    ckpt.publish_latest(target, ckpt.latest_checkpoint(target))
    return target


# ---- the shared loop on a tiny model, with faults in its saves --------------------------------

# Where a save touches the file system, and which of those a full disk can make fail.
OPERATIONS: list[tuple[Any, str]] = [
    (tempfile, "mkdtemp"),
    (tempfile, "mkstemp"),
    (os, "mkdir"),
    (os, "fsync"),
    (os, "link"),
    (os, "replace"),
    (os, "unlink"),
    (shutil, "rmtree"),
    (shutil, "copyfile"),
    (Path, "write_text"),
    (safetensors.torch, "save_file"),
]
NEED_SPACE = {"mkdtemp", "mkstemp", "mkdir", "fsync", "link", "copyfile", "write_text", "save_file"}
WRITES = {"write_text", "save_file"}


class Faults:
    """Wraps the file operations of a save (only while the save of step `step` runs): records
    them, and at operation number `at` kills the process (`mode` "kill"; "torn": the write
    happens, is cut to half its size, then the kill) or raises ENOSPC ("full": from operation
    `at` on, as a disk stays full; only the operations that need space count, or only
    `only`)."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        step: int,
        at: int = -1,
        mode: str = "kill",
        only: str | None = None,
    ) -> None:
        self.events: list[str] = []
        self.armed, self.step, self.at, self.mode = False, step, at, mode
        self.counted = {only} if only else NEED_SPACE if mode == "full" else None
        for owner, name in OPERATIONS:
            monkeypatch.setattr(owner, name, self._wrap(name, getattr(owner, name)))
        original = ckpt.write_checkpoint

        def write_checkpoint(run_dir: Path, step: int, *args: Any, **kwargs: Any) -> Path:
            self.armed = step == self.step
            try:
                return original(run_dir, step, *args, **kwargs)
            finally:
                self.armed = False

        monkeypatch.setattr(ckpt, "write_checkpoint", write_checkpoint)

    def _wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            ignored = self.counted is not None and name not in self.counted
            if name == "mkdir" and Path(args[0]).exists():
                ignored = True  # fails with EEXIST whatever the free space (mkdir -p)
            if not self.armed or ignored:
                return function(*args, **kwargs)
            self.events.append(name)
            index = len(self.events) - 1
            if index != self.at and not (self.mode == "full" and index > self.at >= 0):
                return function(*args, **kwargs)
            if self.mode == "full":
                if name == "save_file":  # what safetensors raises on a full disk
                    from safetensors import SafetensorError

                    raise SafetensorError(
                        "Error while serializing: I/O error: No space left on device (os error 28)"
                    )
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if self.mode == "torn":
                function(*args, **kwargs)
                written = Path(args[0] if name == "write_text" else args[1])
                os.truncate(written, written.stat().st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
            return None

        return wrapper


def _tiny(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(
        ModelConfig(vocab_size=TOK.vocab_size, n_layers=1, n_heads=2, d_model=16, max_seq_len=16)
    )


def _batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, 256, (4, 9), generator=torch.Generator().manual_seed(step))
    return x[:, :-1], x[:, 1:]


def _loss(model: torch.nn.Module, batch: Any) -> Any:
    return lm_loss(model(batch[0]), batch[1])


def _save(directory: Path, model: torch.nn.Module, info: dict[str, Any]) -> None:
    save_run(directory, model, TOK, {"stage": "pretrain", "progress": info})  # type: ignore[arg-type]


LOOP_CFG = TrainConfig(
    max_steps=4,
    micro_batch=4,
    lr=3e-3,
    warmup_steps=1,
    log_every=1,
    save_every=1,
    keep_checkpoints=2,
    eval_every=0,
    device="cpu",
)


def train_tiny(run: Path, resume: bool = False, seed: int = 0) -> Any:
    """4 steps of the shared loop on a tiny model, saving every step, keeping 2 checkpoints."""
    out = Output(quiet=True, err=Console(file=io.StringIO()))
    return loop.train(
        _tiny(seed),
        _batch,
        _loss,
        LOOP_CFG,
        run_dir=run,
        accum_steps=1,
        save_model=_save,
        resume=resume,
        out=out,
    )


def make_loop_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The uninterrupted tiny run: its losses, and the weights after each step. Leaves the
    loop's report (a PNG) off for the test, so that trials stay fast."""
    monkeypatch.setattr(loop, "finish_report", lambda *args: None)
    run = tmp_path / "reference"
    after: dict[int, dict[str, torch.Tensor]] = {}
    original = ckpt.publish_latest

    def publish(run_dir: Path, checkpoint: Path) -> None:
        after[int(checkpoint.name.split("_")[1])] = weights(checkpoint / "model.safetensors")
        original(run_dir, checkpoint)

    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "publish_latest", publish)
        train_tiny(run)
    return {"losses": losses(run), "weights": after}


def events_of_a_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The file operations of the tiny run's save of step 3, in order."""
    with monkeypatch.context() as patch:
        faults = Faults(patch, step=3)
        train_tiny(tmp_path / "count")
    return faults.events


def check_resumes_exactly(run: Path, reference: dict[str, Any], what: str) -> None:
    """Whatever a fault left: the top-level run either loads as one of the complete
    checkpoints or is reported damaged, and --resume ends exactly as the reference."""
    try:
        loaded = load_run(run).model.state_dict()
        state = {k: v for k, v in loaded.items() if k in reference["weights"][1]}
        assert any(same(state, w) for w in reference["weights"].values()), what
    except TinyLMError:
        pass  # a half-updated run is reported, never loaded
    train_tiny(run, resume=True, seed=99)
    assert losses(run) == reference["losses"], what
    assert same(weights(run / "model.safetensors"), reference["weights"][4]), what
    assert not leftovers(run), (what, leftovers(run))
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_0000003", "step_0000004"], what
