"""Pretraining end to end: lm_loss, bits per byte, the CLI, errors, SIGKILL + resume, DDP."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import tinylm.cli  # noqa: F401  (registers the commands)
from tinylm.cli.app import app
from tinylm.data import encode_corpus
from tinylm.evaluate import text_scores, token_byte_lengths
from tinylm.losses import lm_loss
from tinylm.model import ModelConfig, Transformer
from tinylm.tokenizer import Tokenizer
from tinylm.train.checkpoint import latest_checkpoint
from tinylm.train.report import read_metrics

runner = CliRunner()

CONFIG = """\
model: {family: llama, n_layers: 1, n_heads: 2, d_model: 32, max_seq_len: 32}
train: {max_steps: 8, batch_tokens: 256, micro_batch: 4, warmup_steps: 2, lr: 3.0e-3,
        eval_every: 4, save_every: 4, log_every: 1, eval_tokens: 2048, device: cpu}
data: {seq_len: 32, val_fraction: 0.1, cache_dir: CACHE}
"""


@pytest.fixture
def setup(tmp_path: Path, shakespeare_text: str) -> tuple[Path, Path]:
    """(config.yaml, data file with 60 kB of Shakespeare) in tmp_path."""
    data = tmp_path / "shakes.txt"
    data.write_text(shakespeare_text[:60_000], encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.replace("CACHE", str(tmp_path / "cache")), encoding="utf-8")
    return config, data


def _pretrain(config: Path, data: Path, out: Path, *extra: str) -> object:
    args = ["pretrain", "-c", str(config), "-d", str(data), "-t", "bytes", "-o", str(out), "-q"]
    return runner.invoke(app, [*args, *extra])


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def test_lm_loss_by_hand() -> None:
    # vocab 2, logits (0, ln 3): p(token 1) = 3/4, p(token 0) = 1/4
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)], [0.0, math.log(3)]]])
    total, count = lm_loss(logits, torch.tensor([[1, 0, 1]]))
    assert count.item() == 3
    assert total.item() == pytest.approx(2 * math.log(4 / 3) + math.log(4))
    total, count = lm_loss(logits, torch.tensor([[1, -100, 1]]))  # -100 is skipped
    assert (count.item(), total.item()) == (2, pytest.approx(2 * math.log(4 / 3)))
    total, count = lm_loss(logits, torch.tensor([[1, 0, 1]]), loss_mask=torch.tensor([[0, 1, 0]]))
    assert (count.item(), total.item()) == (1, pytest.approx(math.log(4)))


def test_evaluate_matches_a_direct_computation(tmp_path: Path) -> None:
    tok = Tokenizer.bytes_only()
    (tmp_path / "a.txt").write_text("To be, or not to be: that is the question.\n" * 5)
    (tmp_path / "b.jsonl").write_text('{"text": "Whether tis nobler in the mind"}\n')
    stream = encode_corpus([tmp_path / "a.txt", tmp_path / "b.jsonl"], tok, tmp_path / "cache")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layers=1, n_heads=2,
                                    d_model=16, max_seq_len=16)).eval()
    lengths = token_byte_lengths(tok)
    assert lengths[:256].tolist() == [1] * 256 and lengths[256:].tolist() == [0, 0, 0]
    result = text_scores(model, stream, 16, batch_size=3, byte_lengths=lengths)
    ids = torch.from_numpy(stream.read(0, len(stream)))
    n = (len(ids) - 1) // 16
    x, y = ids[: n * 16].view(n, 16), ids[1: n * 16 + 1].view(n, 16)
    with torch.no_grad():
        nats = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none")
    text = y.flatten() < 256
    assert result["val_tokens"] == n * 16
    assert result["val_loss"] == pytest.approx(nats.mean().item(), rel=1e-5)
    bpb = nats[text].sum().item() / math.log(2) / text.sum().item()
    assert result["val_bpb"] == pytest.approx(bpb, rel=1e-5)


def test_pretrain_writes_a_complete_run_and_eval_agrees(
    setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path / "cache"))  # where `tinylm eval` caches
    config, data = setup
    text = data.read_text(encoding="utf-8")
    cut = text.index("\n", 50_000) + 1
    train_file, val_file = tmp_path / "train.txt", tmp_path / "val.txt"
    train_file.write_text(text[:cut], encoding="utf-8")
    val_file.write_text(text[cut:], encoding="utf-8")
    run = tmp_path / "run"
    result = _pretrain(config, train_file, run, "--val-data", str(val_file),
                       "--set", "train.eval_tokens=0", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 8 and summary["stopped"] == "finished"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl",
                 "report.md", "loss_curve.png"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["vocab_size"] == Tokenizer.bytes_only().vocab_size
    assert saved["pretrain"]["train"]["batch_tokens"] == 256
    assert saved["progress"]["step"] == 8
    records = read_metrics(run / "metrics.jsonl")
    train_lines = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_lines] == list(range(1, 9))
    assert {"step", "loss", "lr", "tokens", "elapsed_s", "tokens_per_s"} <= set(train_lines[0])
    assert train_lines[-1]["tokens"] == 8 * 256
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert latest_checkpoint(run).name == "step_0000008"

    scored = runner.invoke(app, ["eval", "-m", str(run), "-d", str(val_file), "--json"])
    assert scored.exit_code == 0, scored.output
    numbers = json.loads(scored.stdout.strip().splitlines()[-1])
    assert numbers["val_loss"] == pytest.approx(evals[-1]["val_loss"], rel=1e-6)
    assert numbers["val_bpb"] == pytest.approx(evals[-1]["val_bpb"], rel=1e-6)


def test_trains_its_tokenizer_when_the_config_asks(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    config, data = setup
    with open(config, "a", encoding="utf-8") as f:
        f.write("tokenizer: {vocab_size: 300}\n")
    run = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", "-c", str(config), "-d", str(data), "-o", str(run),
                                 "-q", "--max-steps", "2"])
    assert result.exit_code == 0, result.output
    assert Tokenizer.load(run).vocab_size == 300
    assert json.loads((run / "config.json").read_text())["model"]["vocab_size"] == 300


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "train.lrr=1"], "unknown config key 'train.lrr'; valid keys: train.max_steps"),
        (["--set", "train.lr=fast"], "train.lr must be a number"),
        (["--set", "model.n_heads=3"], "model.d_model"),
        (["--set", "train.batch_tokens=100"], "must be a multiple of"),
        (["--set", "data.seq_len=64"], "data.seq_len (64)"),
        (["--val-fraction", "2"], "val_fraction"),
        (["--resume"], "no such run directory"),
    ],
)
def test_bad_settings_exit_2_with_one_line(
    setup: tuple[Path, Path], tmp_path: Path, extra: list[str], message: str
) -> None:
    config, data = setup
    result = _pretrain(config, data, tmp_path / "run", *extra)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_bad_data_and_outputs_exit_2(setup: tuple[Path, Path], tmp_path: Path) -> None:
    config, data = setup
    missing = _pretrain(config, tmp_path / "nope.txt", tmp_path / "run")
    assert missing.exit_code == 2 and "nope.txt: no such file" in missing.stderr
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    bad = _pretrain(config, binary, tmp_path / "run2")
    assert bad.exit_code == 2 and "bin.txt" in bad.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    nothing = _pretrain(config, empty, tmp_path / "run4")
    assert nothing.exit_code == 2 and "fewer than one window" in nothing.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    exists = _pretrain(config, data, tmp_path / "full")
    assert exists.exit_code == 2 and "--force" in exists.stderr
    no_tok = runner.invoke(app, ["pretrain", "-c", str(config), "-d", str(data), "-o",
                                 str(tmp_path / "run3")])
    assert no_tok.exit_code == 2 and "no tokenizer" in no_tok.stderr
    (tmp_path / "empty").mkdir()
    no_ckpt = runner.invoke(app, ["pretrain", "-o", str(tmp_path / "empty"), "--resume"])
    assert no_ckpt.exit_code == 2


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tinylm", "pretrain", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(setup: tuple[Path, Path], tmp_path: Path) -> None:
    config, data = setup
    common = ["-c", str(config), "-d", str(data), "-t", "bytes", "-q", "--max-steps", "60",
              "--save-every", "10", "--eval-every", "20"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(_command(*common, "-o", str(full)), env=_env(), check=True)
    proc = subprocess.Popen(_command(*common, "-o", str(cut)), env=_env())
    try:
        while proc.poll() is None:  # kill it after a checkpoint, with steps logged past it
            ckpt = latest_checkpoint(cut)
            steps = [s for s, _ in _losses(cut)] if ckpt else []
            if ckpt and steps and steps[-1] >= int(ckpt.name.split("_")[1]) + 2:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait()
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert len(_losses(cut)) < 60
    subprocess.run(_command(*common, "-o", str(cut), "--resume"), env=_env(), check=True)
    assert _losses(cut) == _losses(full)
    evals = [(r["step"], r["val_loss"]) for r in read_metrics(cut / "metrics.jsonl")
             if "val_loss" in r]
    assert evals == [(r["step"], r["val_loss"]) for r in read_metrics(full / "metrics.jsonl")
                     if "val_loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_match_one(setup: tuple[Path, Path], tmp_path: Path, fsdp: bool) -> None:
    """2 gloo processes with micro_batch 2 (x2 accumulation) = 1 process with 4 micro-batches."""
    config, data = setup
    common = ["-c", str(config), "-d", str(data), "-t", "bytes", "-q", "--max-steps", "6",
              "--set", "train.micro_batch=2", "--save-every", "3"]
    subprocess.run(_command(*common, "-o", str(tmp_path / "one")), env=_env(), check=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "-m", "tinylm", "pretrain"]
    extra = ["--fsdp"] if fsdp else []
    subprocess.run([*torchrun, *common, "-o", str(tmp_path / "two"), *extra], env=_env(),
                   check=True, capture_output=True)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in two] == list(range(1, 7))
    assert [v for _, v in two] == pytest.approx([v for _, v in one], rel=1e-5)
    assert latest_checkpoint(tmp_path / "two").name == "step_0000006"
