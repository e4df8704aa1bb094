"""Checkpoints that are either complete or absent, verified before they are trusted.

    RUN/checkpoints/step_0000100/   a complete run directory, plus train_state/:
        config.json, model.safetensors, tokenizer.json     (what the stage's save function writes)
        train_state/optimizer.safetensors                  moments, keyed "<param name>:<key>"
        train_state/state.json                             step, tokens, clock, optimizer groups,
                                                           file sizes and checksums
    RUN/config.json, model.safetensors, ...                hard links to the latest checkpoint

Atomic: a checkpoint is written into `checkpoints/.tmp-*`, flushed to disk, then renamed; a crash
or `kill -9` during a save leaves a `.tmp-*` directory (removed by the next run), never a
`step_*` directory that looks complete but is not. A save that fails (a full disk) removes its
partial files and raises a `TinyLMError`; the previous checkpoint and the run's files stay.

Verified: state.json, written last, records the size and SHA-256 of every file of the checkpoint
that config.json does not already record (config.json itself, train_state/optimizer.safetensors,
a LoRA run's adapter files), and a checksum of its own content. Resume checks the whole chain
(state.json -> its files -> config.json's files) with full checksums, because it trusts the
checkpoint with hours of work; when the newest checkpoint fails, it warns, sets it aside as
`checkpoints/damaged-step_*` and continues from the newest one that passes.

The data position is the step itself (the batch sources are pure functions of the step) and
random numbers are re-seeded from (seed, step, rank) every step, so state.json holds all the
rest resume needs. No pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tinylm.atomic import atomic_dir, fsync_dir
from tinylm.console import SILENT, Output
from tinylm.errors import TinyLMError
from tinylm.nesting import loads_json
from tinylm.run import CONFIG_FILE, FILES_KEY, file_records, verify_files

CHECKPOINTS = "checkpoints"
STATE_DIR = "train_state"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
STATE_FORMAT = 1
DAMAGED_PREFIX = "damaged-"
_NAME = re.compile(r"^step_(\d+)$")
_STATE_PATH = f"{STATE_DIR}/{STATE_FILE}"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint after `step` optimizer steps lives."""
    return Path(run_dir) / CHECKPOINTS / f"step_{step:07d}"


def _step_dirs(run_dir: str | Path) -> list[Path]:
    """Every `step_*` directory of a run, oldest first (complete or not)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run (those with a state.json), oldest first."""
    return [p for p in _step_dirs(run_dir) if (p / STATE_DIR / STATE_FILE).is_file()]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def remove_partial(run_dir: str | Path) -> None:
    """Delete what saves that were cut short left: `checkpoints/.tmp-*` directories and the
    run's `.NAME.*.tmp` files (links of an interrupted update of its top-level files, and
    the temporary files of atomic writes)."""
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS
    if root.is_dir():
        for path in root.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)
    if run_dir.is_dir():
        for path in run_dir.glob(".*.tmp"):
            if path.is_file():
                path.unlink(missing_ok=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def _state_checksum(state: dict[str, Any]) -> str:
    """SHA-256 of state.json's content without its "checksum" key (canonical JSON)."""
    body = {k: v for k, v in state.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


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


def _write_failed(exc: Exception) -> bool:
    """True for the errors of a full disk, a quota, permissions or a failing device, which
    safetensors reports as a `SafetensorError` wrapping the OS error."""
    if isinstance(exc, OSError):
        return True
    return type(exc).__name__ == "SafetensorError" and "I/O error" in str(exc)


def write_checkpoint(
    run_dir: Path,
    step: int,
    write_model: Callable[[Path], None],
    optim_state: dict[str, Any],
    progress: dict[str, Any],
    keep: int,
) -> Path:
    """Write a checkpoint atomically, point the run's top-level files at it, keep the last
    `keep`. `write_model(dir)` writes the model files (config.json, weights, tokenizer).
    A write that fails (disk full, permissions) raises `TinyLMError` and leaves the previous
    checkpoint and the run's files as they were."""
    final = checkpoint_dir(run_dir, step)
    previous = latest_checkpoint(run_dir)
    try:
        # The same step saved again after a resume replaces its checkpoint.
        with atomic_dir(final, prefix=f".tmp-{final.name}-", durable=True) as tmp:
            write_model(tmp)
            (tmp / STATE_DIR).mkdir()
            optim_json = save_optimizer_state(tmp / STATE_DIR, optim_state)
            state = {"format": STATE_FORMAT, **progress, "optimizer": optim_json,
                     FILES_KEY: file_records(tmp, _unrecorded_files(tmp))}
            state["checksum"] = _state_checksum(state)
            (tmp / STATE_DIR / STATE_FILE).write_text(json.dumps(state, indent=1),
                                                      encoding="utf-8")
    except Exception as exc:
        if _write_failed(exc):
            kept = f"{previous} is intact" if previous else "no earlier checkpoint"
            raise TinyLMError(f"{final}: could not write the checkpoint ({exc}); {kept}",
                              "free disk space or fix permissions, then continue with --resume"
                              ) from None
        raise
    publish_latest(run_dir, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _unrecorded_files(directory: Path) -> list[str]:
    """The files of a checkpoint that its config.json does not record, but state.json must."""
    try:
        config = loads_json((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        recorded = set(config.get(FILES_KEY, {})) if isinstance(config, dict) else set()
    except (OSError, ValueError):
        recorded = set()
    names = (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    return sorted(n for n in names if n not in recorded and n != _STATE_PATH)


def publish_latest(run_dir: Path, checkpoint: Path) -> None:
    """Make the run's top-level files the checkpoint's: hard links (copies where the file
    system has none) made first under temporary names, then each renamed into place,
    config.json last. If a link cannot be made, nothing at the top level has changed."""
    run_dir = Path(run_dir)
    staged: list[tuple[Path, Path]] = []
    try:
        for src in sorted(checkpoint.iterdir(), key=lambda p: p.name == CONFIG_FILE):
            if not src.is_file():
                continue
            fd, tmp = tempfile.mkstemp(prefix=f".{src.name}.", suffix=".tmp", dir=run_dir)
            os.close(fd)
            os.unlink(tmp)
            staged.append((Path(tmp), run_dir / src.name))
            try:
                os.link(src, tmp)
            except OSError:  # no hard links on this file system: copy
                shutil.copyfile(src, tmp)
        for tmp, target in staged:
            os.replace(tmp, target)
            tmp.unlink(missing_ok=True)  # rename() does nothing when both name one file
        fsync_dir(run_dir, strict=False)  # the checkpoint is durable; resume republishes
    except OSError as exc:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise TinyLMError(f"{run_dir}: could not update the run's files from {checkpoint} "
                          f"({exc}); the checkpoint itself is complete",
                          "free disk space, then --resume restores the run's files") from None


def read_state(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's state.json, checked against its own checksum; a clear error if not."""
    file = checkpoint / STATE_DIR / STATE_FILE
    try:
        state = loads_json(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TinyLMError(f"{file}: missing; the checkpoint is incomplete") from None
    except (OSError, ValueError) as exc:
        raise TinyLMError(f"{file}: unreadable ({exc})") from None
    if not isinstance(state, dict):
        raise TinyLMError(f"{file}: not a training state")
    legacy = "checksum" not in state and FILES_KEY not in state  # written before the checks
    if not legacy and state.get("checksum") != _state_checksum(state):
        raise TinyLMError(f"{file}: its content does not match its checksum; it is damaged")
    if state.get("format") != STATE_FORMAT:
        raise TinyLMError(f"{file}: training state format {state.get('format')!r} unknown")
    return state


def verify_checkpoint(checkpoint: Path, json_only: bool = False) -> dict[str, Any]:
    """Check a checkpoint's files against state.json and config.json (sizes and SHA-256;
    with `json_only` only the small JSON files). Returns state.json; `TinyLMError` names the
    first file that fails."""
    state = read_state(checkpoint)
    if "checksum" not in state:
        return state  # a checkpoint from before the checks: nothing recorded to verify
    source = str(checkpoint / STATE_DIR / STATE_FILE)
    records = state.get(FILES_KEY)
    if not isinstance(records, dict) or CONFIG_FILE not in records:
        raise TinyLMError(f"{source}: no record of {CONFIG_FILE}; the checkpoint is damaged")
    pick = _json_records if json_only else dict
    verify_files(checkpoint, pick(records), source, hint=None)
    config = loads_json((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))  # verified
    if isinstance(config, dict) and FILES_KEY in config:
        verify_files(checkpoint, pick(config[FILES_KEY]), str(checkpoint / CONFIG_FILE),
                     hint=None)
    return state


def _json_records(records: Any) -> Any:
    if not isinstance(records, dict):
        return records  # verify_files reports it malformed
    return {k: v for k, v in records.items() if k.endswith(".json")}


def read_train_state(
    checkpoint: Path, state: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(progress, full optimizer state dict) of a checkpoint (its state.json, already read
    and verified, may be given); a clear error if unreadable."""
    from safetensors import SafetensorError

    state_dir = checkpoint / STATE_DIR
    progress = dict(read_state(checkpoint) if state is None else state)
    for key in ("checksum", FILES_KEY):
        progress.pop(key, None)
    try:
        optim_state = load_optimizer_state(state_dir, progress.pop("optimizer"))
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise TinyLMError(f"{state_dir}: unreadable training state ({exc})") from None
    return progress, optim_state


def require_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint; a clear error when there is none."""
    found = latest_checkpoint(run_dir)
    if found is None:
        raise TinyLMError(
            f"{run_dir}: no complete checkpoint to resume from",
            "start the run again without --resume (with --force)",
        )
    return found


def resume_source(run_dir: str | Path) -> Path:
    """Where `--resume` reads the run's settings (config.json, tokenizer.json) from: the newest
    checkpoint whose JSON files verify (cheap; the weights are checked when loaded), else the
    run directory itself (whose reader gives the errors for a missing or foreign run)."""
    run_dir = Path(run_dir)
    found = _step_dirs(run_dir)
    if not found:
        if run_dir.is_dir() and not (run_dir / CONFIG_FILE).exists():
            raise TinyLMError(f"{run_dir}: no checkpoint to resume from (the run stopped "
                              "before its first one)", "start it again with --force")
        return run_dir
    reasons = []
    for checkpoint in reversed(found):
        try:
            verify_checkpoint(checkpoint, json_only=True)
            return checkpoint
        except TinyLMError as exc:
            reasons.append(exc.args[0])
    raise _none_usable(run_dir, reasons)


def _none_usable(run_dir: Path, reasons: list[str]) -> TinyLMError:
    return TinyLMError(f"{run_dir}: no usable checkpoint to resume from; the newest: "
                       f"{reasons[0]}", "start the run again without --resume (with --force)")


def prepare_resume(run_dir: Path, out: Output = SILENT) -> tuple[Path, dict[str, Any]]:
    """(checkpoint, its verified state.json) that `--resume` continues from: the newest that
    passes `verify_checkpoint`. Newer ones that fail are set aside as `damaged-step_*` with a
    warning, and the run's top-level files are made the chosen checkpoint's again (they may
    have been the damaged one's, or half-updated by a save that was cut short)."""
    found = _step_dirs(run_dir)
    if not found:
        require_checkpoint(run_dir)
    damaged: list[tuple[Path, str]] = []
    chosen = None
    for checkpoint in reversed(found):
        try:
            state = verify_checkpoint(checkpoint)
            chosen = checkpoint
            break
        except TinyLMError as exc:
            damaged.append((checkpoint, exc.args[0]))
    if chosen is None:
        raise _none_usable(run_dir, [reason for _, reason in damaged])
    for checkpoint, reason in damaged:
        aside = checkpoint.with_name(DAMAGED_PREFIX + checkpoint.name)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(checkpoint, aside)
        out.warn(f"checkpoint {checkpoint.name} is damaged ({reason}); set aside as "
                 f"{aside.name}, resuming from {chosen.name}")
    publish_latest(run_dir, chosen)
    return chosen, state
