"""The global batch is kept and split over the processes (issue 17): the arithmetic as a pure
function, every preset on 1-8 processes, and 2 gloo processes giving the losses of 1 where each
process runs fewer sequences per micro-batch than the config's micro_batch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinylm.errors import TinyLMError
from tinylm.train.batching import split_batch, split_tokens

PRESETS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def rows_of(units: int, micro_batch: int, world_size: int) -> list[list[tuple[int, int]]]:
    """Per rank, the (source micro-batch, row) pairs it runs in one step, in order."""
    split = split_batch(units, micro_batch, world_size, "train.batch_size")
    per_rank = []
    for rank in range(world_size):
        seen = []
        for k in range(split.accum):
            source, rows = split.part(rank, k)
            assert 0 <= source < split.micros_per_step
            assert rows.stop - rows.start == split.micro and rows.stop <= split.nominal
            seen += [(source, row) for row in range(rows.start, rows.stop)]
        per_rank.append(seen)
    return per_rank


def test_one_process_is_unchanged_and_two_halve_the_micro_batch() -> None:
    one = split_batch(8, 8, 1, "train.batch_size")
    assert (one.micro, one.accum, one.nominal, one.micros_per_step) == (8, 1, 8, 1)
    assert rows_of(8, 8, 1) == [[(0, r) for r in range(8)]]
    two = split_batch(8, 8, 2, "train.batch_size")
    assert (two.micro, two.accum, two.nominal) == (4, 1, 8)
    assert rows_of(8, 8, 2) == [[(0, r) for r in range(4)], [(0, r) for r in range(4, 8)]]
    # A batch that is no multiple of micro_batch: the largest micro-batch that divides it.
    assert (split_batch(6, 8, 1, "b").micro, split_batch(12, 8, 2, "b").micro) == (6, 6)
    # Whole micro-batches per process when they divide: today's behaviour, rows untouched.
    four = split_batch(32, 8, 2, "train.batch_size")
    assert (four.micro, four.accum) == (8, 2)
    assert rows_of(32, 8, 2)[1] == [(m, r) for m in (2, 3) for r in range(8)]


@given(units=st.integers(1, 96), micro_batch=st.integers(1, 24), world=st.integers(1, 12))
def test_every_row_of_the_global_batch_runs_once(units: int, micro_batch: int,
                                                 world: int) -> None:
    if units % world:
        with pytest.raises(TinyLMError):
            split_batch(units, micro_batch, world, "train.batch_size")
        return
    split = split_batch(units, micro_batch, world, "train.batch_size")
    assert split.micro <= micro_batch and split.nominal <= micro_batch
    assert split.micro * split.accum * world == units
    per_rank = rows_of(units, micro_batch, world)
    # The same rows as one process, in the same order when the ranks are concatenated.
    assert sum(per_rank, []) == [(j // split.nominal, j % split.nominal) for j in range(units)]
    if units % micro_batch == 0:  # a config that already worked draws the same micro-batches
        assert split.nominal == micro_batch
        if world == 1:
            assert split.micro == micro_batch


def test_a_batch_that_cannot_be_split_names_what_would_work() -> None:
    with pytest.raises(TinyLMError) as err:
        split_batch(8, 4, 3, "train.batch_size")
    text = str(err.value)
    assert "train.batch_size (8)" in text and "3 processes" in text
    assert "6 or 9" in text and "1, 2, 4 or 8 processes" in text
    with pytest.raises(TinyLMError) as err:
        split_tokens(256, 32, 4, 3)
    text = str(err.value)
    assert "train.batch_tokens (256" in text and "8 sequences of 32" in text
    assert "192 or 288" in text and "1, 2, 4 or 8 processes" in text
    with pytest.raises(TinyLMError) as err:
        split_tokens(1000, 128, 8, 1)
    assert "data.seq_len (128)" in str(err.value) and "896 or 1,024" in str(err.value)


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_every_preset_splits_over_2_and_4_processes(preset: Path, world: int) -> None:
    from tinylm.pretrain import load_config

    cfg = load_config(preset)
    t, seq_len = cfg.train, cfg.data.seq_len or cfg.model.max_seq_len
    if preset.stem == "classic" and world == 8:  # nanoGPT's 12 sequences: no 8-way split
        with pytest.raises(TinyLMError, match=r"12 sequences .* 1, 2, 3, 4, 6 or 12 processes"):
            split_tokens(t.batch_tokens, seq_len, t.micro_batch, world)
        return
    split = split_tokens(t.batch_tokens, seq_len, t.micro_batch, world)
    assert split.micro * seq_len * split.accum * world == t.batch_tokens
    assert split.micro <= t.micro_batch
    if world == 1:
        assert (split.micro, split.accum) == (t.micro_batch, t.batch_tokens // seq_len
                                              // t.micro_batch)
    if preset.stem == "shakespeare" and world == 2:  # the case issue 17 reported
        assert (split.micro, split.accum) == (4, 1)


@pytest.mark.parametrize("stage", ["finetune", "dpo"])
@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_tuning_defaults_split_over_up_to_8_processes(stage: str, world: int) -> None:
    from importlib import import_module

    t = import_module(f"tinylm.{stage}").load_config(None).train
    split = split_batch(t.batch_size, t.micro_batch, world, "train.batch_size")
    assert split.micro * split.accum * world == t.batch_size and split.micro <= t.micro_batch


def test_the_loop_runs_parts_of_micro_batches_with_the_losses_of_whole_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One process running each micro-batch as 2 parts of 4 rows (what rank 0 and rank 1 of
    2 run) trains like one running it whole, also when a short micro-batch leaves the second
    part no row (a zero-weight stand-in runs instead)."""
    import torch

    from tinylm.losses import lm_loss
    from tinylm.model import ModelConfig, Transformer
    from tinylm.train import loop
    from tinylm.train.batching import BatchSplit
    from tinylm.train.config import TrainConfig

    monkeypatch.setattr(loop, "finish_report", lambda *args: None)
    asked: list[slice | None] = []

    def batches(step: int, micro: int, rows: slice | None = None) -> object:
        asked.append(rows)
        n = [8, 5, 3][step % 3]  # micro-batches at an epoch's end are short
        x = torch.randint(0, 64, (n, 9), generator=torch.Generator().manual_seed(step))
        x = x if rows is None else x[rows]
        return None if len(x) == 0 else (x[:, :-1], x[:, 1:])

    def run(name: str, split: BatchSplit) -> tuple[list[float], torch.Tensor]:
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=64, n_layers=1, n_heads=2, d_model=16,
                                        max_seq_len=16))
        cfg = TrainConfig(max_steps=6, micro_batch=8, lr=1e-2, warmup_steps=1, log_every=1,
                          save_every=0, eval_every=0, device="cpu")
        loop.train(model, batches, lambda m, b: lm_loss(m(b[0]), b[1]), cfg,
                   run_dir=tmp_path / name, accum_steps=split,
                   save_model=lambda d, m, info: None)
        return _losses(tmp_path / name), model.lm_head.weight.detach().clone()

    whole_losses, whole_weights = run("whole", BatchSplit(8, 8, 8, 1, 1))
    assert asked == [None] * 6
    asked.clear()
    part_losses, part_weights = run("parts", BatchSplit(8, 8, 4, 2, 1))
    assert slice(0, 1) in asked  # the stand-in ran for the 3-row micro-batches
    assert part_losses == pytest.approx(whole_losses, rel=1e-5)
    assert torch.allclose(part_weights, whole_weights, atol=1e-6)


# ---- 2 gloo processes = 1 process, where the split needs smaller micro-batches -------------

CONFIG = """\
model: {family: llama, n_layers: 1, n_heads: 2, d_model: 32, max_seq_len: 32}
train: {max_steps: 4, batch_tokens: 256, micro_batch: 8, warmup_steps: 1, lr: 3.0e-3,
        eval_every: 2, save_every: 2, log_every: 1, eval_tokens: 1024, device: cpu}
data: {seq_len: 32, val_fraction: 0.1, cache_dir: CACHE}
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={n}", "-m", "tinylm"]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)


def _losses(run: Path, key: str = "loss") -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r[key] for r in map(json.loads, lines) if key in r]


@pytest.fixture
def pretrain_setup(tmp_path: Path, shakespeare_text: str) -> list[str]:
    """The arguments of a tiny pretraining run on 20 kB of Shakespeare: 8 sequences per step,
    micro_batch 8, so 2 processes must run micro-batches of 4."""
    data = tmp_path / "shakes.txt"
    data.write_text(shakespeare_text[:20_000], encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.replace("CACHE", str(tmp_path / "cache")), encoding="utf-8")
    return ["pretrain", "-c", str(config), "-d", str(data), "-t", "bytes", "-q"]


@pytest.mark.slow
@pytest.mark.parametrize(("fsdp", "optimizer"), [(False, "adamw"), (True, "adamw"),
                                                 (True, "muon")],
                         ids=["ddp", "fsdp", "fsdp-muon"])
def test_pretrain_two_processes_split_the_micro_batch(pretrain_setup: list[str], tmp_path: Path,
                                                      fsdp: bool, optimizer: str) -> None:
    """(Muon, as configs/shakespeare.yaml uses it, orthogonalises whole matrices: under FSDP2
    each process gathers them.)"""
    args = [*pretrain_setup, "--set", f"train.optimizer={optimizer}"]
    one = _run([sys.executable, "-m", "tinylm", *args, "-o", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = _run([*_torchrun(2), *args, "-o", str(tmp_path / "two"),
                *(["--fsdp"] if fsdp else [])])
    assert two.returncode == 0, two.stderr
    assert len(_losses(tmp_path / "two")) == 4
    for key in ("loss", "val_loss"):
        assert _losses(tmp_path / "two", key) == pytest.approx(_losses(tmp_path / "one", key),
                                                               rel=1e-5)


ANIMALS = ["cat", "dog", "cow", "owl", "bee", "ant", "elk", "fox", "yak", "emu"]


@pytest.fixture
def base_run(tmp_path: Path) -> Path:
    """A random tiny llama run with the byte tokenizer: the base for finetune and dpo."""
    import torch

    from tinylm.model import ModelConfig, Transformer
    from tinylm.run import save_run
    from tinylm.tokenizer import Tokenizer

    tok = Tokenizer.bytes_only()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(family="llama", vocab_size=tok.vocab_size, n_layers=1,
                                    n_heads=2, d_model=32, max_seq_len=64))
    path = tmp_path / "base"
    path.mkdir()
    save_run(path, model, tok, {"stage": "pretrain"})
    return path


def _tuning_data(tmp_path: Path, stage: str) -> Path:
    path = tmp_path / f"{stage}.jsonl"
    rows = []
    for i in range(21):  # 21 is odd: micro-batches at the end of an epoch are short
        name = ANIMALS[i % 10] * (1 + i % 3)  # uneven lengths: padding differs per split
        rows.append({"prompt": f"Name: {name}", "completion": name} if stage == "finetune" else
                    {"prompt": f"Name: {name}", "chosen": name, "rejected": "no"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["finetune", "dpo"])
def test_tuning_two_processes_split_the_micro_batch(base_run: Path, tmp_path: Path,
                                                    stage: str) -> None:
    """batch_size 6 = micro_batch 6: each of 2 processes runs 3 of each micro-batch's rows; at
    an epoch's end the micro-batch is shorter, and a process may have no row at all."""
    common = [stage, "-b", str(base_run), "-d", str(_tuning_data(tmp_path, stage)), "-q",
              "--batch-size", "6", "--set", "train.micro_batch=6", "--max-steps", "5",
              "--set", "train.log_every=1", "--set", "train.eval_every=5", "--lr", "3e-3"]
    if stage == "finetune":
        common += ["--set", "data.exact_match=0"]
    one = _run([sys.executable, "-m", "tinylm", *common, "-o", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = _run([*_torchrun(2), *common, "-o", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr
    assert len(_losses(tmp_path / "two")) == 5
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)


# ---- a user's error under torchrun: one line, not one per process ---------------------------

@pytest.mark.slow
@pytest.mark.parametrize("bad", [
    ("--set", "train.no_such_key=1"),  # refused before the process group starts
    ("--set", "train.batch_tokens=96"),  # 3 sequences over 2 processes: after it starts
], ids=["config-key", "unsplittable"])
def test_an_error_under_torchrun_is_printed_once(pretrain_setup: list[str], tmp_path: Path,
                                                 bad: tuple[str, str]) -> None:
    result = _run([*_torchrun(2), *pretrain_setup, "-o", str(tmp_path / "run"), *bad])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert bad[1].split("=")[0] in errors[0]
    assert "/tinylm/" not in result.stderr  # no traceback from inside the package
    # torchrun itself exits 1 when a worker fails; each worker's own status is the CLI's 2.
    assert result.returncode != 0
    assert re.search(r"exitcode\s*:\s*2\b", result.stderr), result.stderr
    assert not re.search(r"exitcode\s*:\s*1\b", result.stderr), result.stderr


ONE_RANK_FAILS = """\
import torch.distributed as dist

from tinylm.cli.app import app
from tinylm.errors import TinyLMError


@app.command("boom")
def boom(rank: int) -> None:
    dist.init_process_group("gloo")
    if dist.get_rank() == rank:
        raise TinyLMError(f"only rank {rank} met this")
    dist.barrier()  # the others wait for it; its exit must end their wait, not hang it


app()
"""


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_an_error_on_one_rank_is_printed_by_it_and_the_others_exit(tmp_path: Path,
                                                                   rank: int) -> None:
    script = tmp_path / "one_rank_fails.py"
    script.write_text(ONE_RANK_FAILS, encoding="utf-8")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(script), "boom", str(rank)]
    result = _run(command)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: only rank {rank} met this"], result.stderr
    assert f'File "{script}"' not in result.stderr  # no traceback, the waiting rank's neither
    assert result.returncode != 0
