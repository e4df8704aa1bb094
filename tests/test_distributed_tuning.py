"""Tuning and resuming under torchrun on CPU (gloo): finetune and dpo on 2 processes give the
losses of one; a DDP and an FSDP2 run resumed from a mid-run checkpoint end with the same
checkpoint and losses as the run that never stopped; dpo --precompute-ref resumes exactly.

Interrupted runs are made cheaply: a copy of the finished run loses its newest checkpoint, as
a run killed after the earlier one would (its metrics.jsonl still holds the later steps)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import tinylm.cli  # noqa: F401  (registers the commands)
from tinylm.cli.app import app
from tinylm.model import ModelConfig, Transformer
from tinylm.run import save_run
from tinylm.tokenizer import Tokenizer
from tinylm.train.checkpoint import latest_checkpoint
from tinylm.train.report import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("cache")]
runner = CliRunner()
ANIMALS = ["cat", "dog", "cow", "owl", "bee", "ant", "elk", "fox"]
# 8 examples a step in micro-batches of 2: 4 micro-batches on one process, 2 on each of two
TUNE = ["--max-steps", "4", "--batch-size", "8", "--lr", "3e-3", "-q",
        "--set", "train.micro_batch=2", "--set", "train.log_every=1",
        "--set", "train.eval_every=0", "--set", "data.val_fraction=0",
        "--set", "train.warmup_steps=1"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _torchrun(*args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "tinylm", *args]
    proc = subprocess.run(command, env=_env(), capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def _tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The weights and optimizer moments a checkpoint holds."""
    state = load_file(str(checkpoint / "train_state" / "optimizer.safetensors"))
    weights = load_file(str(checkpoint / "model.safetensors"))
    return {**{f"w:{k}": v for k, v in weights.items()}, **{f"o:{k}": v for k, v in state.items()}}


def _assert_same_tensors(a: Path, b: Path) -> None:
    ours, theirs = _tensors(a), _tensors(b)
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-6, atol=1e-7, msg=key)


def _cut_after(run: Path, step: int, to: Path) -> Path:
    """A copy of `run` as if killed after its checkpoint at `step` (later ones gone)."""
    shutil.copytree(run, to)
    for checkpoint in (to / "checkpoints").glob("step_*"):
        if int(checkpoint.name.split("_")[1]) > step:
            shutil.rmtree(checkpoint)
    assert latest_checkpoint(to).name == f"step_{step:07d}"
    return to


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A tiny random-init run with the byte tokenizer (and its chat tokens)."""
    tok = Tokenizer.bytes_only()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layers=1, n_heads=2,
                                    d_model=32, max_seq_len=64))
    (tmp_path / "base").mkdir()
    save_run(tmp_path / "base", model, tok, {"stage": "pretrain"})
    return tmp_path / "base"


def _sft_data(path: Path) -> Path:
    rows = [{"prompt": f"Name: {ANIMALS[i % 8]}", "completion": ANIMALS[(i * 3) % 8] * (i % 3 + 1)}
            for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pairs(path: Path) -> Path:
    rows = [{"prompt": f"Say {a}", "chosen": a, "rejected": ANIMALS[(i + 1) % 8] * 2}
            for i, a in enumerate(ANIMALS * 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("stage", ["finetune", "dpo"])
def test_two_processes_tune_like_one(tmp_path: Path, base: Path, stage: str) -> None:
    data = _sft_data(tmp_path / "d.jsonl") if stage == "finetune" else _pairs(tmp_path / "d.jsonl")
    common = [stage, "-b", str(base), "-d", str(data), *TUNE]
    one = runner.invoke(app, [*common, "-o", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    _torchrun(*common, "-o", str(tmp_path / "two"))
    ones, twos = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in twos] == [1, 2, 3, 4]
    assert [v for _, v in twos] == pytest.approx([v for _, v in ones], rel=1e-5)
    assert ones[-1][1] < ones[0][1]  # it trains: the comparison is not of two constants


CONFIG = """\
model: {family: llama, n_layers: 1, n_heads: 2, d_model: 32, max_seq_len: 32}
train: {max_steps: 6, batch_tokens: 256, micro_batch: 2, warmup_steps: 2, lr: 3.0e-3,
        eval_every: 0, save_every: 3, log_every: 1, device: cpu}
data: {seq_len: 32, val_fraction: 0.1}
"""


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_resume_of_a_two_process_run_is_exact(tmp_path: Path, shakespeare_text: str,
                                              fsdp: bool) -> None:
    data = tmp_path / "shakes.txt"
    data.write_text(shakespeare_text[:40_000], encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    common = ["pretrain", "-c", str(config), "-d", str(data), "-t", "bytes", "-q",
              *(["--fsdp"] if fsdp else [])]
    full = tmp_path / "full"
    _torchrun(*common, "-o", str(full))
    cut = _cut_after(full, 3, tmp_path / "cut")
    _torchrun(*common, "-o", str(cut), "--resume")
    assert _losses(cut) == _losses(full)
    assert [s for s, _ in _losses(cut)] == list(range(1, 7))
    _assert_same_tensors(latest_checkpoint(cut), latest_checkpoint(full))


def test_dpo_precompute_ref_resumes_exactly(tmp_path: Path, base: Path) -> None:
    """The precomputed reference is the base model's on resume too, not the resumed policy's
    (a reference taken from the tuned weights would change every loss after the resume)."""
    data = _pairs(tmp_path / "pairs.jsonl")
    args = ["dpo", "-b", str(base), "-d", str(data), "--precompute-ref", *TUNE,
            "--max-steps", "6", "--set", "train.save_every=3"]
    full = tmp_path / "full"
    result = runner.invoke(app, [*args, "-o", str(full)])
    assert result.exit_code == 0, result.output
    cut = _cut_after(full, 3, tmp_path / "cut")
    result = runner.invoke(app, ["dpo", "-o", str(cut), "--resume", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads((cut / "config.json").read_text())["dpo"]["precompute_ref"] is True
    assert [s for s, _ in _losses(cut)] == list(range(1, 7))
    assert [v for _, v in _losses(cut)] == pytest.approx([v for _, v in _losses(full)], rel=1e-6)
    _assert_same_tensors(latest_checkpoint(cut), latest_checkpoint(full))
