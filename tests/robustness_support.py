"""What the robustness tests share: tiny runs, a valid line of every kind of data, the CLI, and
the checks that a command failed as a user error should.

Not a test module (pytest collects only test_*.py); the test_robustness_*.py files import it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import typer
from click.testing import CliRunner, Result

import tinylm.cli  # noqa: F401  (registers the commands)
from tinylm.cli.app import app
from tinylm.lora import LoraSettings, apply_lora
from tinylm.model import ModelConfig, Transformer
from tinylm.run import TOKENIZER_FILE, load_run, save_adapter_run, save_run
from tinylm.tokenizer import Tokenizer

TOK = Tokenizer.bytes_only()
runner = CliRunner()
# Built once: Typer's own test runner builds the click command again on every call, which costs
# more than most of the commands it tests here.
CLI = typer.main.get_command(app)

# One valid JSONL object of each kind of data a command reads.
VALID = {
    "text": {"text": "To be, or not to be, that is the question: whether tis nobler."},
    "instruction": {"prompt": "Name: cat", "completion": "cat"},
    "preference": {"prompt": "Name: cat", "chosen": "cat", "rejected": "dog"},
    "prompts": {"prompt": "Once upon a time"},
}

# A pretraining preset small enough that one step takes a fraction of a second.
PRETRAIN_YAML = """\
model: {n_layers: 1, n_heads: 2, d_model: 16, max_seq_len: 16}
train: {max_steps: 1, batch_tokens: 32, micro_batch: 2, warmup_steps: 0, eval_every: 0,
        eval_tokens: 32, save_every: 0, device: cpu}
data: {seq_len: 16, val_fraction: 0.2}
"""
# Finetune and DPO: one step of two examples, no validation split.
TUNE_FAST = (
    "--max-steps 1 --batch-size 2 --set train.micro_batch=2 --val-fraction 0 --device cpu -q"
).split()


def tiny_config(**changes: Any) -> ModelConfig:
    """A one-layer model over the byte tokenizer (`changes` override any field)."""
    fields = {
        "vocab_size": TOK.vocab_size,
        "n_layers": 1,
        "n_heads": 2,
        "d_model": 16,
        "max_seq_len": 64,
        **changes,
    }
    return ModelConfig(**fields)


def make_run(
    path: Path, config: ModelConfig | None = None, tokenizer: Tokenizer = TOK, seed: int = 0
) -> Path:
    """A plain run directory (a "pretrained" model with random weights)."""
    path.mkdir(parents=True)
    torch.manual_seed(seed)
    save_run(path, Transformer(config or tiny_config()).eval(), tokenizer, {"stage": "pretrain"})
    return path


def make_adapter_run(path: Path, base: Path) -> Path:
    """A LoRA adapter run on `base`, saved as `tinylm finetune --lora` saves it."""
    torch.manual_seed(1)
    model = apply_lora(load_run(base).model, LoraSettings(enabled=True, rank=2))
    path.mkdir(parents=True)
    save_adapter_run(path, model, base, {"stage": "finetune"})
    load_run(base).tokenizer.save(path / TOKENIZER_FILE)
    return path


def jsonl(*objects: Any) -> bytes:
    """JSONL bytes: one object a line (a str or bytes item is written as it is)."""
    lines = []
    for obj in objects:
        if isinstance(obj, bytes):
            lines.append(obj)
        else:
            lines.append((obj if isinstance(obj, str) else json.dumps(obj)).encode())
    return b"".join(line + b"\n" for line in lines)


def invoke(*args: Any, input: str | bytes | None = None) -> Result:
    """`tinylm ARGS` in this process."""
    return runner.invoke(CLI, [str(a) for a in args], input=input)


def assert_user_error(result: Result, *needles: str) -> str:
    """Exit code 2, exactly one line on stderr (`error: ...`, holding every needle), no
    traceback. Returns the line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def assert_nothing_written(out: Path) -> None:
    """The output directory was not created, or is still empty."""
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))


def assert_no_partial_cache(cache: Path) -> None:
    """No temporary shard directory is left in the token cache."""
    assert not list(cache.glob("tokens/.tmp-*")), list(cache.glob("tokens/.tmp-*"))


def digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the commands that read a data file, and files for them ----------------------------------


def data_runs(root: Path) -> SimpleNamespace:
    """What the data commands need: a base run and a pretraining preset (`base`, `yaml`)."""
    yaml = root / "pretrain.yaml"
    yaml.write_text(PRETRAIN_YAML, encoding="utf-8")
    return SimpleNamespace(base=make_run(root / "base"), yaml=yaml)


@dataclass(frozen=True)
class Command:
    """A command reading one data file: `argv(runs, data, out)`; `kind` of data it reads."""

    name: str
    kind: str  # text, instruction, preference or prompts
    suffix: str  # .txt or .jsonl
    argv: Callable[[SimpleNamespace, Path, Path], list]
    writes: bool = True  # has an output directory


def _tokenize(r, d, o):
    return ["tokenize", d, "-v", 262, "-o", o, "-q"]


def _pretrain(r, d, o):
    return ["pretrain", "-c", r.yaml, "-d", d, "-t", "bytes", "-o", o, "-q"]


def _eval(r, d, o):
    return ["eval", "-m", r.base, "-d", d, *"--json --max-tokens 64 --device cpu".split()]


def _generate(r, d, o):
    return ["generate", "-m", r.base, "--prompts-file", d, *"-n 2 -t 0 --json --device cpu".split()]


def _finetune(r, d, o):
    return ["finetune", "-b", r.base, "-d", d, "-o", o, *TUNE_FAST]


def _dpo(r, d, o):
    return ["dpo", "-b", r.base, "-d", d, "-o", o, *TUNE_FAST]


COMMANDS = [
    Command("tokenize.txt", "text", ".txt", _tokenize),
    Command("tokenize.jsonl", "text", ".jsonl", _tokenize),
    Command("pretrain.txt", "text", ".txt", _pretrain),
    Command("pretrain.jsonl", "text", ".jsonl", _pretrain),
    Command("finetune", "instruction", ".jsonl", _finetune),
    Command("dpo", "preference", ".jsonl", _dpo),
    Command("eval.txt", "text", ".txt", _eval, writes=False),
    Command("eval.jsonl", "text", ".jsonl", _eval, writes=False),
    Command("eval-instruction", "instruction", ".jsonl", _eval, writes=False),
    Command("eval-preference", "preference", ".jsonl", _eval, writes=False),
    Command("generate.txt", "prompts", ".txt", _generate, writes=False),
    Command("generate.jsonl", "prompts", ".jsonl", _generate, writes=False),
]
JSONL_COMMANDS = [c for c in COMMANDS if c.suffix == ".jsonl"]
BY_NAME = {c.name: c for c in COMMANDS}


def lines_of(kind: str, n: int = 4) -> list[dict]:
    """`n` valid objects of a kind, each a little different."""
    return [{k: f"{v} {i}" for k, v in VALID[kind].items()} for i in range(n)]


def clean(command: Command) -> bytes:
    """A valid input file for the command."""
    objects = lines_of(command.kind)
    if command.suffix == ".txt":
        key = "prompt" if command.kind == "prompts" else "text"
        return "".join(o[key] + "\n" for o in objects).encode()
    return jsonl(*objects)


def run_case(
    command: Command,
    runs: SimpleNamespace,
    tmp_path: Path,
    content: bytes | None,
    name: str = "data",
):
    """Write `content` (None: leave the path absent) and run the command on it."""
    data = tmp_path / f"{name}{command.suffix}"
    if content is not None:
        data.write_bytes(content)
    out = tmp_path / "out"
    return data, out, invoke(*command.argv(runs, data, out))
