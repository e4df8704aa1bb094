"""The stage launcher and what it owns: placement before any forward pass, --force clearing,
and the atomic directories every writer uses."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

import tinylm.cli  # noqa: F401  (registers the commands)
import tinylm.dpo
import tinylm.train.stage as stage
from tinylm.atomic import atomic_dir
from tinylm.model import ModelConfig, Transformer
from tinylm.run import RUN_FILES, clear_run, merge_run, save_run
from tinylm.tokenizer import Tokenizer
from tinylm.train.distributed import DistInfo

TOK = Tokenizer.bytes_only()
pytestmark = pytest.mark.usefixtures("cache")


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=1, n_heads=2,
                                   n_kv_heads=2, d_ff=64, max_seq_len=64))


def write_pairs(path: Path, n: int = 12) -> Path:
    rows = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad answer"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


class _Device:
    """A stand-in training device: `place_model` marks the parameters it moves there, and
    every forward pass of a Transformer (any, placed or not) checks them."""

    placed: set[int]

    def __init__(self) -> None:
        self.placed = set()
        self.forwards = 0

    def place(self, original):
        def place_model(model, dist, fsdp=False, keep_shadow=True):
            placed = original(model, dist, fsdp, keep_shadow)
            self.placed.update(id(p) for p in model.parameters())
            return placed
        return place_model

    def check(self, module, args) -> None:
        if not isinstance(module, Transformer):
            return
        self.forwards += 1
        off = [n for n, p in module.named_parameters() if id(p) not in self.placed]
        assert not off, f"forward pass with parameters not on the training device: {off[:3]}"


@pytest.mark.parametrize("extra", [[], ["--precompute-ref"], ["--lora"]])
def test_dpo_runs_every_forward_pass_on_the_training_device(tmp_path, monkeypatch, extra):
    """Reference log-probs (precomputed, validation) and the frozen reference copy run on the
    model placed by the launcher: a forward pass of an unplaced model fails the hook."""
    from typer.testing import CliRunner

    from tinylm.cli.app import app

    base = tmp_path / "base"
    base.mkdir()
    save_run(base, tiny_model(), TOK, {"stage": "pretrain"})
    device = _Device()
    monkeypatch.setattr(stage, "place_model", device.place(stage.place_model))
    monkeypatch.setattr(stage, "setup_distributed", lambda _device: DistInfo())
    calls = []
    original = tinylm.dpo.pair_logps

    def pair_logps(model, *args, **kwargs):
        calls.append(all(id(p) in device.placed for p in model.parameters()))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(tinylm.dpo, "pair_logps", pair_logps)
    data = write_pairs(tmp_path / "pairs.jsonl")
    hook = torch.nn.modules.module.register_module_forward_pre_hook(device.check)
    try:
        result = CliRunner().invoke(app, ["dpo", "-b", str(base), "-d", str(data), "-o",
                                          str(tmp_path / "out"), "--max-steps", "2",
                                          "--batch-size", "4", "--set", "train.micro_batch=2",
                                          "--eval-every", "1", "--quiet", *extra])
    finally:
        hook.remove()
    assert result.exit_code == 0, result.output
    assert calls and all(calls)  # reference and validation log-probs: placed models only
    assert len(calls) == (2 if "--precompute-ref" in extra else 1)
    assert device.forwards > 0


def test_a_stage_that_forgets_to_place_its_model_is_a_programming_error(tmp_path):
    def build(ctx: stage.StageContext) -> stage.Plan:
        return stage.Plan(tiny_model(), lambda s, m: None, lambda m, b: None, ctx.cfg.train, 1,
                          TOK, {"stage": "broken"}, {})

    from tinylm.pretrain import PretrainConfig

    broken = stage.Stage("broken", PretrainConfig, build, what="a broken run",
                         no_data=("no data", "give --data"), needs_base=False)
    with pytest.raises(RuntimeError, match="not placed"):
        stage.launch(broken, tmp_path / "run", data=["x"])


def test_force_clears_every_stages_files_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000001").mkdir(parents=True)
    for name in RUN_FILES:
        (run / name).write_text("old")
    (run / "notes.txt").write_text("mine")
    clear_run(run)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_atomic_dir_publishes_with_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
            assert not (tmp_path / "out").exists()
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "out").stat().st_mode)
    assert mode == 0o755  # as mkdir gives, not mkdtemp's 0700
    assert (tmp_path / "out" / "f").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left


def test_atomic_dir_keeps_the_old_directory_until_the_new_one_is_complete(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "new").write_text("half")
        raise RuntimeError("the writer failed")
    assert [p.name for p in target.iterdir()] == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_dir(target) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_without_replace_lets_a_finished_entry_win(tmp_path):
    target = tmp_path / "entry"
    with atomic_dir(target, replace=False) as tmp:
        (tmp / "a").write_text("mine")
        target.mkdir()  # another process published the same entry meanwhile
        (target / "a").write_text("theirs")
    assert (target / "a").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_merge_with_force_replaces_the_output_only_when_the_merged_run_is_written(
        tmp_path, monkeypatch):
    from tinylm.lora import LoraSettings, apply_lora
    from tinylm.run import save_adapter_run

    base = tmp_path / "base"
    base.mkdir()
    save_run(base, tiny_model(), TOK, {"stage": "pretrain"})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_adapter_run(adapter, apply_lora(tiny_model(), LoraSettings(enabled=True)), base,
                     {"stage": "finetune"}, TOK)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("previous output")

    def failing_save(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tinylm.run.save_run", failing_save)
    with pytest.raises(OSError):
        merge_run(adapter, out, force=True)
    assert (out / "keep.txt").read_text() == "previous output"
    monkeypatch.undo()
    merge_run(adapter, out, force=True)
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
    mode = stat.S_IMODE(out.stat().st_mode)
    assert mode & 0o055 == 0o055 & ~_umask()  # readable by group and others as the umask says


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
