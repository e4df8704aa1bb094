"""`tinylm info` on presets, preset files and run directories; bad targets exit 2 with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tinylm.cli  # noqa: F401  (registers the commands)
from tinylm.cli.app import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["info", *args])


def test_preset_name_prints_breakdown_and_flops() -> None:
    result = invoke("classic")
    assert result.exit_code == 0, result.output
    for word in ("embedding", "attention", "mlp", "norms", "head", "total", "FLOPs per token"):
        assert word in result.output
    assert "834,304" in result.output  # the classic recipe's parameter count


def test_json_output_of_a_preset_file(tmp_path: Path) -> None:
    preset = tmp_path / "mine.yaml"
    preset.write_text("model:\n  family: gpt2\n  vocab_size: 100\n  n_layers: 1\n  n_heads: 2\n"
                      "  d_model: 16\n  max_seq_len: 8\ntrain:\n  lr: 0.001\n")
    result = invoke(str(preset), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["model"]["d_ff"] == 64
    # embedding 100*16 + 8*16; attention 4*16*16 + 4*16; mlp 2*16*64 + 64 + 16; norms 3*32
    assert info["params"] == {"embedding": 1728, "attention": 1088, "mlp": 2128, "norms": 96,
                              "head": 0, "total": 5040}
    assert info["flops_per_token"] == 6 * (1088 + 2128 + 96 + 1600) + 12 * 1 * 16 * 8


def test_run_directory_with_tokenizer(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    model = {"family": "llama", "vocab_size": 300, "n_layers": 1, "n_heads": 2, "d_model": 16}
    (run / "config.json").write_text(json.dumps({"format_version": 1, "model": model}))
    tokenizer = pytest.importorskip("tinylm.tokenizer")
    tokenizer.Tokenizer.bytes_only().save(run)
    result = invoke(str(run), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["params"]["embedding"] == 300 * 16
    assert info["tokenizer"]["vocab_size"] == 259
    assert info["tokenizer"]["special_tokens"]["<|endoftext|>"] == 256
    text = invoke(str(run)).output
    assert "tokenizer" in text and "<|im_end|>=258" in text


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, "no such run directory, config file or preset"),
        (lambda p: p.mkdir(), "not a tinylm run"),
        (lambda p: p.write_text("train:\n  lr: 1\n"), "no 'model:' section"),
        (lambda p: p.write_text("model:\n  d_model: 30\n  n_heads: 4\n"), "model.d_model"),
        (lambda p: p.write_text("model:\n  width: 3\n"), "unknown config key 'model.width'"),
    ],
)
def test_bad_target_is_one_line_and_exit_2(tmp_path: Path, setup, message: str) -> None:
    target = tmp_path / "target"
    setup(target)
    result = invoke(str(target))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
