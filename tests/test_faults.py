"""Damage, a full disk and numerics: runs and checkpoints are verified when loaded, `--resume`
falls back past a damaged checkpoint, a full disk fails a save cleanly at any point, and a
diverging loss stops at the first NaN with the last good checkpoint kept.

Kills (SIGKILL, SIGINT) are in test_faults_kills.py; the helpers in faults_support.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from faults_support import (
    NEED_SPACE,
    TOK,
    Faults,
    check_resumes_exactly,
    copy_run,
    damage,
    data_args,
    events_of_a_save,
    invoke,
    leftovers,
    losses,
    one_error_line,
    same,
    train_tiny,
    weights,
)

from tinylm.errors import TinyLMError
from tinylm.model import ModelConfig, Transformer
from tinylm.run import load_run, save_run, verify_files
from tinylm.train import checkpoint as ckpt
from tinylm.train import loop
from tinylm.train.report import MetricsLog

# ---- integrity of a run: load_run checks sizes and checksums --------------------------------


def test_a_run_records_the_size_and_checksum_of_its_files(fault_setup: dict[str, Path]) -> None:
    ref = fault_setup["reference"]
    config = json.loads((ref / "config.json").read_text())
    assert set(config["files"]) == {"model.safetensors", "tokenizer.json"}
    assert (
        config["files"]["model.safetensors"]["size"] == (ref / "model.safetensors").stat().st_size
    )
    verify_files(ref, config["files"], "config.json")  # the records are the files' own
    state = json.loads((ckpt.checkpoint_dir(ref, 8) / "train_state/state.json").read_text())
    assert set(state["files"]) == {"config.json", "train_state/optimizer.safetensors"}
    assert len(state["checksum"]) == 64
    assert (ref / "model.safetensors").samefile(ckpt.checkpoint_dir(ref, 8) / "model.safetensors")


@pytest.mark.parametrize(
    ("name", "how", "message"),
    [
        ("model.safetensors", "truncate", "bytes but .*config.json records"),
        ("model.safetensors", "flip", "does not match the SHA-256 recorded in .*config.json"),
        ("tokenizer.json", "append", "tokenizer.json: .* bytes but"),
    ],
)
def test_load_run_detects_a_damaged_file(
    fault_setup: dict[str, Path], tmp_path: Path, name: str, how: str, message: str
) -> None:
    run = copy_run(fault_setup["reference"], tmp_path / "run")
    damage(run / name, how)
    with pytest.raises(TinyLMError, match=message):
        load_run(run)
    line = one_error_line(invoke("generate", "--model", str(run), "hello", "-n", "2"))
    assert name in line and "--resume" in line


def test_a_flipped_weight_loads_silently_without_the_checksum(
    fault_setup: dict[str, Path], tmp_path: Path
) -> None:
    """What the checksum is for: a flipped bit in the tensor data passes every other check."""
    run = copy_run(fault_setup["reference"], tmp_path / "run")
    damage(run / "model.safetensors", "flip")
    config = json.loads((run / "config.json").read_text())
    del config["files"]  # as a run written before the records (or by hand): loads unchecked
    (run / "config.json").unlink()
    (run / "config.json").write_text(json.dumps(config))
    loaded = load_run(run).model.state_dict()
    good = weights(fault_setup["reference"] / "model.safetensors")
    assert not same({k: v for k, v in loaded.items() if k in good}, good)


def test_a_swapped_weights_file_of_the_same_shapes_is_detected(
    fault_setup: dict[str, Path], tmp_path: Path
) -> None:
    run = copy_run(fault_setup["reference"], tmp_path / "run")
    (run / "model.safetensors").unlink()
    shutil.copyfile(ckpt.checkpoint_dir(run, 6) / "model.safetensors", run / "model.safetensors")
    with pytest.raises(TinyLMError, match="damaged or comes from another run"):
        load_run(run)


# ---- resume falls back past damaged checkpoints ---------------------------------------------

DAMAGES = [
    ("model.safetensors", "truncate"),
    ("model.safetensors", "flip"),
    ("train_state/optimizer.safetensors", "truncate"),
    ("train_state/optimizer.safetensors", "flip"),
    ("train_state/state.json", "truncate"),
    ("train_state/state.json", "flip"),
    ("train_state/state.json", "edit"),
    ("train_state/state.json", "delete"),
    ("config.json", "flip"),
    ("tokenizer.json", "append"),
]


@pytest.mark.parametrize(("name", "how"), DAMAGES, ids=[f"{n}-{h}" for n, h in DAMAGES])
def test_resume_falls_back_past_a_damaged_checkpoint(
    fault_setup: dict[str, Path], tmp_path: Path, name: str, how: str
) -> None:
    """The finished run's newest checkpoint is damaged: --resume warns, sets it aside,
    continues from step 6 and ends with the reference run's losses and weights."""
    run = copy_run(fault_setup["reference"], tmp_path / "run")
    target = ckpt.checkpoint_dir(run, 8) / name
    if how == "edit":  # valid JSON, one number changed: only state.json's own checksum sees it
        state = json.loads(target.read_text())
        state["tokens"] += 1
        target.write_text(json.dumps(state, indent=1))
    elif how == "delete":
        target.unlink()
    else:
        damage(target, how)
    result = invoke("pretrain", "-o", str(run), "--resume")
    assert result.exit_code == 0, result.output
    assert "warning: checkpoint step_0000008 is damaged" in result.stderr
    assert "resuming from step_0000006" in result.stderr
    assert (run / ckpt.CHECKPOINTS / "damaged-step_0000008").is_dir()
    assert losses(run) == losses(fault_setup["reference"])
    reference = weights(fault_setup["reference"] / "model.safetensors")
    assert same(weights(run / "model.safetensors"), reference)
    assert ckpt.verify_checkpoint(ckpt.checkpoint_dir(run, 8))
    load_run(run)  # the top-level files are whole again


def test_resume_goes_back_as_far_as_needed_and_says_when_nothing_is_left(
    fault_setup: dict[str, Path], tmp_path: Path
) -> None:
    run = copy_run(fault_setup["reference"], tmp_path / "run")
    damage(ckpt.checkpoint_dir(run, 8) / "model.safetensors", "flip")
    damage(ckpt.checkpoint_dir(run, 6) / "train_state/optimizer.safetensors", "truncate")
    result = invoke("pretrain", "-o", str(run), "--resume")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("warning: checkpoint step_") == 2
    assert "resuming from step_0000004" in result.stderr
    assert losses(run) == losses(fault_setup["reference"])

    broken = copy_run(fault_setup["reference"], tmp_path / "broken")
    for checkpoint in ckpt.list_checkpoints(broken):
        damage(checkpoint / "model.safetensors", "truncate")
    line = one_error_line(invoke("pretrain", "-o", str(broken), "--resume", "-q"))
    assert "no usable checkpoint to resume from" in line and "model.safetensors" in line
    assert "--force" in line


def test_checkpoints_from_before_the_records_still_resume(
    fault_setup: dict[str, Path], tmp_path: Path
) -> None:
    """Runs written before sizes and checksums were recorded resume as they did (unchecked)."""
    run = copy_run(fault_setup["reference"], tmp_path / "run")
    for checkpoint in ckpt.list_checkpoints(run):
        for name in ("train_state/state.json", "config.json"):
            record = json.loads((checkpoint / name).read_text())
            for key in ("checksum", "files"):
                record.pop(key, None)
            (checkpoint / name).unlink()  # not through the hard link: the run's own stays
            (checkpoint / name).write_text(json.dumps(record))
    shutil.rmtree(ckpt.checkpoint_dir(run, 8))
    result = invoke("pretrain", "-o", str(run), "--resume", "-q")
    assert result.exit_code == 0 and not result.stderr, result.output
    assert losses(run) == losses(fault_setup["reference"])


def test_resume_before_the_first_checkpoint_says_so(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.5}\n')  # killed before step 2
    line = one_error_line(invoke("pretrain", "-o", str(run), "--resume"))
    assert "no checkpoint to resume from" in line and "--force" in line


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_finetune_resume_falls_back_too(tmp_path: Path, lora: bool) -> None:
    base = tmp_path / "base"
    base.mkdir()
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=TOK.vocab_size, n_layers=1, n_heads=2, d_model=32, max_seq_len=64
    )
    save_run(base, Transformer(config), TOK, {"stage": "pretrain"})
    data = tmp_path / "train.jsonl"
    rows = [{"prompt": f"Say {w}", "completion": w} for w in ["cat", "dog", "owl", "emu"] * 8]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = (
        "--quiet --max-steps 6 --batch-size 4 --set train.micro_batch=4 --set "
        "train.save_every=2 --set train.log_every=1 --set train.keep_checkpoints=5 "
        "--set data.exact_match=0" + (" --lora" if lora else "")
    ).split()
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    for run in (straight, cut):
        done = invoke("finetune", "-b", str(base), "-d", str(data), "-o", str(run), *options)
        assert done.exit_code == 0, done.output
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    newest = ckpt.checkpoint_dir(cut, 6)
    recorded = json.loads((newest / "train_state/state.json").read_text())["files"]
    recorded |= json.loads((newest / "config.json").read_text()).get("files", {})
    assert name in recorded
    damage(newest / name, "flip")  # the run's own file too: a hard link to the newest
    with pytest.raises(TinyLMError, match=f"{name}: does not match the SHA-256"):
        load_run(cut)
    result = invoke("finetune", "-o", str(cut), "--resume", "--quiet")
    assert result.exit_code == 0, result.output
    assert "checkpoint step_0000006 is damaged" in result.stderr
    assert losses(cut) == losses(straight)
    assert same(weights(cut / name), weights(straight / name))
    load_run(cut)


# ---- a full disk ----------------------------------------------------------------------------


def _snapshot(run: Path) -> dict[str, bytes]:
    files = [p for p in run.rglob("*") if p.is_file() and p.name != "metrics.jsonl"]
    return {str(p.relative_to(run)): p.read_bytes() for p in files}


def _full_disk_trials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trials: list[int], reference: dict[str, Any]
) -> int:
    """The disk fills up at each of `trials` (indices among the space-needing operations of
    the tiny run's save of step 3): one TinyLMError naming the cause, no partial files, step 2
    and the run's files byte for byte as they were; then --resume ends as the reference.
    Syncing the run directory after its files were renamed is best effort: a disk full only
    there lets the save succeed. Returns how many saves failed."""
    failed = 0
    for at in trials:
        run = tmp_path / f"full{at}"
        before: dict[str, bytes] = {}
        with monkeypatch.context() as patch:
            faults = Faults(patch, step=3, at=at, mode="full")
            write = ckpt.write_checkpoint

            def snapshot_first(run_dir: Path, step: int, *args: Any, **kw: Any) -> Path:
                if step == 3:
                    before.update(_snapshot(run_dir))  # noqa: B023 (used in this iteration)
                return write(run_dir, step, *args, **kw)  # noqa: B023

            patch.setattr(ckpt, "write_checkpoint", snapshot_first)
            try:
                train_tiny(run)
                error = None
            except TinyLMError as exc:
                error = str(exc)
        what = f"ENOSPC from {faults.events[at]} (operation {at}) on"
        assert not leftovers(run), (what, leftovers(run))
        if error is None:
            assert faults.events[at:] == ["fsync"], what
            assert losses(run) == reference["losses"], what
            continue
        failed += 1
        assert "No space left on device" in error and "--resume" in error, (what, error)
        after = _snapshot(run)
        kept = {k: v for k, v in after.items() if not k.startswith("checkpoints/step_0000003")}
        assert kept == before, what  # step 2 and the top-level files, byte for byte
        if ckpt.checkpoint_dir(run, 3).exists():  # failed after it was complete
            ckpt.verify_checkpoint(ckpt.checkpoint_dir(run, 3))
        check_resumes_exactly(run, reference, what)
    return failed


def test_a_full_disk_in_a_save_or_in_updating_the_run_fails_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop_reference: dict[str, Any]
) -> None:
    """ENOSPC while the checkpoint is written (its state.json) and after it is complete,
    while the run's top-level files are staged: both fail cleanly."""
    space = [e for e in events_of_a_save(tmp_path, monkeypatch) if e in NEED_SPACE]
    trials = [space.index("write_text", space.index("write_text") + 1), space.index("link")]
    assert _full_disk_trials(tmp_path, monkeypatch, trials, loop_reference) == 2
    assert ckpt.verify_checkpoint(ckpt.checkpoint_dir(tmp_path / f"full{trials[1]}", 3))


@pytest.mark.slow
def test_a_full_disk_at_any_point_of_a_save_fails_it_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop_reference: dict[str, Any]
) -> None:
    """Every operation of the save of step 3 that needs space, in turn, finds the disk full."""
    space = [e for e in events_of_a_save(tmp_path, monkeypatch) if e in NEED_SPACE]
    assert len(space) >= 15
    failed = _full_disk_trials(tmp_path, monkeypatch, list(range(len(space))), loop_reference)
    assert failed == len(space) - 1  # all but the best-effort sync


def test_a_full_disk_is_one_line_and_exit_2(
    fault_setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    Faults(monkeypatch, step=4, at=0, mode="full", only="save_file")  # step 4's weights
    line = one_error_line(invoke("pretrain", *data_args(fault_setup, "-o", str(run), "-q")))
    assert "step_0000004: could not write the checkpoint" in line
    assert "No space left on device" in line and "step_0000002 is intact" in line
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_0000002"]
    assert not leftovers(run)
    assert invoke("pretrain", "-o", str(run), "--resume", "-q").exit_code == 0
    assert losses(run) == losses(fault_setup["reference"])


def test_a_full_disk_while_logging_fails_cleanly_and_resumes(
    fault_setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The metrics line of step 5 is cut short by ENOSPC: exit 2; --resume drops it."""
    original = MetricsLog.write

    def write(self: MetricsLog, record: dict[str, Any]) -> None:
        if record.get("step") == 5 and "loss" in record:
            self._file.write(json.dumps(record)[:20])
            self._file.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(self, record)

    monkeypatch.setattr(MetricsLog, "write", write)
    run = tmp_path / "run"
    line = one_error_line(invoke("pretrain", *data_args(fault_setup, "-o", str(run), "-q")))
    assert "could not write the run's files" in line and "No space left" in line
    monkeypatch.undo()
    assert invoke("pretrain", "-o", str(run), "--resume", "-q").exit_code == 0
    assert losses(run) == losses(fault_setup["reference"])


# ---- numerics -------------------------------------------------------------------------------


def test_a_diverging_learning_rate_stops_at_the_first_nan(
    fault_setup: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    diverging = ["--save-every", "1", "--set", "train.lr=1e6", "--set", "train.warmup_steps=0"]
    args = data_args(fault_setup, "-o", str(run), "-q", *diverging)
    line = one_error_line(invoke("pretrain", *args))
    assert "training diverged at step 3: gradient norm nan" in line
    assert "last good checkpoint is" in line and "step_0000002" in line
    assert "lower the learning rate" in line and "check the data" in line
    assert [p.name for p in ckpt.list_checkpoints(run)][-1] == "step_0000002"
    good = weights(ckpt.checkpoint_dir(run, 2) / "model.safetensors")
    assert same(weights(run / "model.safetensors"), good)
    assert all(torch.isfinite(t).all() for t in good.values())
    assert [s for s, _ in losses(run)] == [1, 2]  # nothing logged for the step that diverged


def test_weights_that_stop_being_finite_are_never_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finite loss, then an update that leaves inf in the weights: the save of that step is
    refused, so step 2 stays the last checkpoint and the run's files remain step 2's."""
    original = loop._Session.save

    def save(self: Any, step: int) -> Any:
        if step == 3:  # as if the update of step 3 overflowed
            with torch.no_grad():
                self.model.model.norm.weight[0] = float("inf")
        return original(self, step)

    monkeypatch.setattr(loop._Session, "save", save)
    run = tmp_path / "run"
    expected = r"diverged at step 3: the update left NaN or inf.*step_0000002.*lower the"
    with pytest.raises(TinyLMError, match=expected):
        train_tiny(run)
    assert ckpt.latest_checkpoint(run) == ckpt.checkpoint_dir(run, 2)
    assert all(torch.isfinite(t).all() for t in weights(run / "model.safetensors").values())
    assert not leftovers(run)
