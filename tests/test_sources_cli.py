"""The new kinds of input through the commands: bad parquet, gzip and zstd files and empty globs
exit 2 with one line naming the file (and line or row group), writing nothing; tokenize,
pretrain and eval read parquet mixtures with --text-field; a SIGKILLed pretraining run on a
parquet mixture resumes exactly."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from robustness_support import (
    VALID,
    assert_no_partial_cache,
    assert_nothing_written,
    assert_user_error,
    data_runs,
    invoke,
    jsonl,
    lines_of,
)

from tinylm.train.checkpoint import latest_checkpoint
from tinylm.train.report import read_metrics

pytestmark = pytest.mark.usefixtures("cache")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return data_runs(tmp_path_factory.mktemp("runs"))


def _parquet(path: Path, columns: dict) -> bytes:
    pq.write_table(pa.table(columns), path, row_group_size=2)
    return path.read_bytes()


def _bad_inputs(tmp_path: Path, kind: str) -> dict[str, tuple[str, bytes | None, str]]:
    """name: (file name, content or None for a glob, what the error says) for `kind` data."""
    rows = lines_of(kind, 6)
    body = jsonl(*rows)
    good_parquet = _parquet(tmp_path / "good.parquet", {k: [r[k] for r in rows] for k in rows[0]})
    gz = bytearray(gzip.compress(body))
    gz[-8] ^= 0xFF  # a wrong CRC
    zst = zstandard.ZstdCompressor().compress(body * 50)
    key = next(iter(VALID[kind]))
    wrong = _parquet(tmp_path / "wrong.parquet", {k: list(range(6)) for k in rows[0]})
    missing = _parquet(tmp_path / "missing.parquet", {"other": ["x"] * 6})
    return {
        "truncated-parquet": ("data.parquet", good_parquet[:len(good_parquet) // 2],
                              "not a readable parquet file"),
        "missing-column": ("data.parquet", missing, "column"),
        "wrong-type": ("data.parquet", wrong, "row group 0, row 0" if kind != "text" else
                       f'column "{key}" holds int64'),
        "corrupt-gzip": ("data.jsonl.gz", bytes(gz), "corrupt compressed data"),
        "truncated-zstd": ("data.jsonl.zst", zst[:len(zst) // 2], "truncated"),
        "empty-glob": ("nothing-*.parquet", None, "nothing-*.parquet"),
    }


def _argv(command: str, runs: SimpleNamespace, data: Path, out: Path) -> list:
    return {
        "tokenize": ["tokenize", data, "-v", 262, "-o", out, "-q"],
        "pretrain": ["pretrain", "-c", runs.yaml, "-d", data, "-t", "bytes", "-o", out, "-q"],
        "eval": ["eval", "-m", runs.base, "-d", data, "--json", "--device", "cpu"],
        "finetune": ["finetune", "-b", runs.base, "-d", data, "-o", out, "--max-steps", 1, "-q"],
        "dpo": ["dpo", "-b", runs.base, "-d", data, "-o", out, "--max-steps", 1, "-q"],
    }[command]


CASES = [(c, k) for c in ("tokenize", "pretrain", "eval") for k in ["text"]] + [
    ("finetune", "instruction"), ("dpo", "preference"), ("eval", "instruction"),
    ("eval", "preference")]


@pytest.mark.parametrize(("command", "kind"), CASES, ids=[f"{c}-{k}" for c, k in CASES])
def test_bad_files_of_each_new_kind(command, kind, runs, tmp_path, cache):
    cases = _bad_inputs(tmp_path, kind)
    for case, (name, content, says) in cases.items():
        data = tmp_path / case / name
        data.parent.mkdir()
        if content is not None:
            data.write_bytes(content)
        out = tmp_path / case / "out"
        line = assert_user_error(invoke(*_argv(command, runs, data, out)), says)
        assert str(data.parent) in line, (case, line)
        assert_nothing_written(out)
        assert_no_partial_cache(cache)


def test_parquet_mixture_through_tokenize_pretrain_and_eval(runs, tmp_path):
    docs = [f"The {i}th record says hello to the world of parquet." for i in range(80)]
    pq.write_table(pa.table({"content": docs}), tmp_path / "web.parquet", row_group_size=16)
    (tmp_path / "code.jsonl.gz").write_bytes(gzip.compress(
        "".join(json.dumps({"content": f"def f{i}(x): return x + {i}"}) + "\n"
                for i in range(80)).encode()))
    mix = [f"{tmp_path / 'web.parquet'}:0.7", f"{tmp_path / 'code.jsonl.gz'}:0.3"]
    tok = invoke("tokenize", *mix, "-v", 300, "--text-field", "content", "-o",
                 tmp_path / "tok", "--json")
    assert tok.exit_code == 0, tok.output
    assert json.loads(tok.stdout)["train_bytes"] > 4000
    missing = invoke("tokenize", *mix, "-v", 300, "-o", tmp_path / "tok2")  # no --text-field
    assert_user_error(missing, 'no column "text" (columns: content)')
    run = tmp_path / "run"
    result = invoke("pretrain", "-c", runs.yaml, *[a for m in mix for a in ("-d", m)],
                    "--text-field", "content", "-t", tmp_path / "tok", "-o", run, "-q")
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "config.json").read_text())
    assert saved["pretrain"]["data"]["text_field"] == "content"
    scored = invoke("eval", "-m", run, "-d", tmp_path / "web.parquet", "--text-field", "content",
                    "--json", "--device", "cpu")
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["kind"] == "text"


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow
def test_resume_after_sigkill_on_a_parquet_mixture_is_exact(tmp_path, shakespeare_text):
    paragraphs = [p for p in shakespeare_text[:120_000].split("\n\n") if p.strip()]
    half = len(paragraphs) // 2
    pq.write_table(pa.table({"text": paragraphs[:half]}), tmp_path / "a.parquet",
                   row_group_size=64)
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": p}) + "\n" for p in paragraphs[half:]).encode()))
    config = tmp_path / "config.yaml"
    config.write_text(
        "model: {n_layers: 1, n_heads: 2, d_model: 32, max_seq_len: 32}\n"
        "train: {batch_tokens: 256, micro_batch: 4, warmup_steps: 2, lr: 3.0e-3,\n"
        "        log_every: 1, eval_tokens: 1024, device: cpu}\n"
        f"data: {{seq_len: 32, val_fraction: 0.1, cache_dir: {tmp_path / 'cache'}}}\n")
    common = [sys.executable, "-m", "tinylm", "pretrain", "-c", str(config), "-t", "bytes",
              "-d", f"{tmp_path / 'a.parquet'}:0.6", "-d", f"{tmp_path / 'b.jsonl.zst'}:0.4",
              "-q", "--max-steps", "40", "--save-every", "8", "--eval-every", "20"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run([*common, "-o", str(full)], env=env, check=True)
    proc = subprocess.Popen([*common, "-o", str(cut)], env=env)
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
    assert len(_losses(cut)) < 40
    resume = [sys.executable, "-m", "tinylm", "pretrain", "-o", str(cut), "--resume", "-q"]
    subprocess.run(resume, env=env, check=True)  # the mixture comes from the run's record
    assert _losses(cut) == _losses(full)
