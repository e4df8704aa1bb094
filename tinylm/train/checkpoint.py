"""Checkpoints that are either complete or absent, and what exact resume reads back.

    RUN/checkpoints/step_0000100/   a complete run directory, plus train_state/:
        config.json, model.safetensors, tokenizer.json     (what the stage's save function writes)
        train_state/optimizer.safetensors                  moments, keyed "<param name>:<key>"
        train_state/state.json                             step, tokens, clock, optimizer groups
    RUN/config.json, model.safetensors, ...                hard links to the latest checkpoint

A checkpoint is written into `checkpoints/.tmp-*`, flushed to disk, then renamed: a crash or
`kill -9` during a save leaves a `.tmp-*` directory (removed by the next run) and never a
`step_*` directory that looks complete but is not. The data position is the step itself (the
batch sources are pure functions of the step) and random numbers are re-seeded from
(seed, step, rank) every step, so `state.json` holds all the rest resume needs. No pickle.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tinylm.errors import TinyLMError

CHECKPOINTS = "checkpoints"
STATE_DIR = "train_state"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
STATE_FORMAT = 1
_NAME = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint after `step` optimizer steps lives."""
    return Path(run_dir) / CHECKPOINTS / f"step_{step:07d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_DIR / STATE_FILE).is_file()]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def remove_partial(run_dir: str | Path) -> None:
    """Delete the `.tmp-*` leftovers of saves that were cut short."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for path in root.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    for file in sorted(path.rglob("*")):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def save_optimizer_state(directory: Path, optim_state: dict[str, Any]) -> dict[str, Any]:
    """Write the tensors of a full optimizer state dict (keyed by parameter name) as
    safetensors; return the JSON part (non-tensor values and the parameter groups)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for name, entries in optim_state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}:{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{name}:{key}"] = value
    save_file(tensors, str(directory / OPTIMIZER_FILE))
    groups = [{k: _jsonable(v) for k, v in g.items()} for g in optim_state["param_groups"]]
    return {"scalars": scalars, "param_groups": groups}


def load_optimizer_state(directory: Path, saved: dict[str, Any]) -> dict[str, Any]:
    """The full optimizer state dict written by `save_optimizer_state`."""
    from safetensors.torch import load_file

    state: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {**load_file(str(directory / OPTIMIZER_FILE)), **saved["scalars"]}
    for flat_key, value in flat.items():
        name, _, key = flat_key.rpartition(":")
        state.setdefault(name, {})[key] = value
    groups = [
        {k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
        for g in saved["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def write_checkpoint(
    run_dir: Path,
    step: int,
    write_model: Callable[[Path], None],
    optim_state: dict[str, Any],
    progress: dict[str, Any],
    keep: int,
) -> Path:
    """Write a checkpoint atomically, point the run's top-level files at it, keep the last
    `keep`. `write_model(dir)` writes the model files (config.json, weights, tokenizer)."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(run_dir, step)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide the checkpoint from the group
    try:
        write_model(tmp)
        (tmp / STATE_DIR).mkdir()
        optim_json = save_optimizer_state(tmp / STATE_DIR, optim_state)
        state = {"format": STATE_FORMAT, **progress, "optimizer": optim_json}
        (tmp / STATE_DIR / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again after a resume: replace it
            old = root / f".tmp-old-{final.name}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_latest(run_dir, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def publish_latest(run_dir: Path, checkpoint: Path) -> None:
    """Make the run's top-level files the checkpoint's (hard links, each replaced atomically)."""
    for src in sorted(checkpoint.iterdir(), key=lambda p: p.name == "config.json"):
        if not src.is_file():
            continue
        fd, tmp = tempfile.mkstemp(prefix=f".{src.name}.", suffix=".tmp", dir=run_dir)
        os.close(fd)
        os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:  # no hard links on this file system: copy
            shutil.copyfile(src, tmp)
        os.replace(tmp, Path(run_dir) / src.name)


def read_train_state(checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(progress, full optimizer state dict) of a checkpoint; a clear error if unreadable."""
    state_dir = checkpoint / STATE_DIR
    try:
        progress = json.loads((state_dir / STATE_FILE).read_text(encoding="utf-8"))
        optim_state = load_optimizer_state(state_dir, progress.pop("optimizer"))
    except (OSError, ValueError, KeyError) as exc:
        raise TinyLMError(f"{state_dir}: unreadable training state ({exc})") from None
    if progress.get("format") != STATE_FORMAT:
        raise TinyLMError(f"{state_dir}: training state format {progress.get('format')!r} unknown")
    return progress, optim_state


def require_checkpoint(run_dir: Path) -> Path:
    """The checkpoint `--resume` continues from; a clear error when there is none."""
    found = latest_checkpoint(run_dir)
    if found is None:
        raise TinyLMError(
            f"{run_dir}: no complete checkpoint to resume from",
            "start the run without --resume",
        )
    return found

