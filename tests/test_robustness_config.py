"""Config errors: unknown keys, wrong types, non-finite numbers, zero or negative sizes, heads
that do not divide the width, a context longer than the model's positions, a vocabulary smaller
than the 256 bytes + the special tokens. From `--set`, from YAML files (`--config`, `tinylm
info`), and from options: exit code 2 and one line on stderr naming the key, before any data
is read or anything is written.

RoPE angles are computed for the positions in use (there is no table to outgrow), so "a
context longer than the RoPE tables" is a window longer than `model.max_seq_len`: the training
window (data.seq_len, data.max_length), --seq-len of eval, or a prompt that does not fit.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from robustness_support import (
    PRETRAIN_YAML,
    TUNE_FAST,
    assert_nothing_written,
    assert_user_error,
    data_runs,
    invoke,
    jsonl,
    lines_of,
)

from tinylm.errors import TinyLMError
from tinylm.model import ModelConfig


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    runs = data_runs(tmp_path_factory.mktemp("runs"))
    runs.text = runs.yaml.parent / "text.txt"
    runs.text.write_text(
        "All the world's a stage, and all the men and women merely players. " * 8, encoding="utf-8"
    )
    runs.sft = runs.yaml.parent / "sft.jsonl"
    runs.sft.write_bytes(jsonl(*lines_of("instruction")))
    runs.pairs = runs.yaml.parent / "pairs.jsonl"
    runs.pairs.write_bytes(jsonl(*lines_of("preference")))
    return runs


pytestmark = pytest.mark.usefixtures("cache")  # conftest: a fresh token cache


def sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


MODEL_ERRORS = {  # --set overrides: the key the error names
    ("model.n_layers=0",): "model.n_layers",
    ("model.n_layers=-1",): "model.n_layers",
    ("model.n_heads=0",): "model.n_heads",
    ("model.d_model=0",): "model.d_model",
    ("model.d_model=-16",): "model.d_model",
    ("model.max_seq_len=0",): "model.max_seq_len",
    ("model.vocab_size=0",): "model.vocab_size",
    ("model.d_ff=-5",): "model.d_ff",
    ("model.n_heads=3",): "n_heads (3)",  # 16 is not divisible by 3
    ("model.d_model=18",): "model.n_heads",  # head size 9: RoPE needs an even one
    ("model.n_kv_heads=3",): "model.n_kv_heads",  # does not divide 2 heads
    ("model.n_kv_heads=-2",): "model.n_kv_heads",
    ("model.family=gpt2", "model.n_kv_heads=1"): "model.n_kv_heads",
    ("model.dropout=1.5",): "model.dropout",
    ("model.dropout=-0.1",): "model.dropout",
    ("model.norm_eps=0",): "model.norm_eps",
    ("model.norm_eps=nan",): "model.norm_eps",
    ("model.rope_theta=-1",): "model.rope_theta",
    ("model.rope_theta=.inf",): "model.rope_theta",
    ("model.family=bert",): "model.family",
    ("model.norm_position=middle",): "model.norm_position",
    ("model.n_layers=abc",): "model.n_layers",
    ("model.n_layers=2.5",): "model.n_layers",
    ("model.n_layers=true",): "model.n_layers",
    ("model.n_layers=[1, 2]",): "model.n_layers",
    ("model.n_layers={a: 1}",): "model.n_layers",
    ("model.tie_embeddings=maybe",): "model.tie_embeddings",
    ("model.family=gpt2", "model.max_seq_len=1000000000000"): "model.d_model",  # 16 TB of positions
    ("model.d_model=1048576", "model.n_heads=2"): "model.d_model",  # fits no machine's memory
    ("model.n_layer=2",): "model.n_layer",
    ("model=3",): "model",
    ("model.n_layers.deep=3",): "model.n_layers",
    ("foo.bar=1",): "foo",
}
PRETRAIN_ERRORS = {
    **MODEL_ERRORS,
    ("data.seq_len=64",): "data.seq_len",  # longer than model.max_seq_len (16)
    ("data.seq_len=-1",): "data.seq_len",
    ("data.val_fraction=1.5",): "data.val_fraction",
    ("data.allow_special=sometimes",): "data.allow_special",
    ("tokenizer.vocab_size=100",): "tokenizer.vocab_size",
    ("tokenizer.vocab_size=258",): "tokenizer.vocab_size",  # 256 bytes + 3 specials = 259
    ("train.lr=nan",): "train.lr",
    ("train.lr=.inf",): "train.lr",
    ("train.lr=-1",): "train.lr",
    ("train.lr=0",): "train.lr",
    ("train.max_steps=0",): "train.max_steps",
    ("train.micro_batch=0",): "train.micro_batch",
    ("train.batch_tokens=0",): "train.batch_tokens",
    ("train.batch_tokens=33",): "train.batch_tokens",
    ("train.warmup_steps=-1",): "train.warmup_steps",
    ("train.max_time=-5",): "train.max_time",
    ("train.keep_checkpoints=0",): "train.keep_checkpoints",
    ("train.beta1=1.5",): "train.beta1",
    ("train.grad_clip=-1",): "grad_clip",
    ("train.device=tpu",): "train.device",
    ("train.schedule=linear",): "train.schedule",
}


@pytest.mark.parametrize("overrides", PRETRAIN_ERRORS, ids=" ".join)
def test_pretrain_config_errors(overrides, runs, tmp_path):
    out = tmp_path / "run"
    argv = ["pretrain", "-c", runs.yaml, "-d", runs.text, "-t", "bytes", "-o", out, "-q"]
    assert_user_error(invoke(*argv, *sets(*overrides)), PRETRAIN_ERRORS[overrides])
    assert_nothing_written(out)


TUNE_ERRORS = {  # arguments: the key the error names (flags win over --set for the same key)
    ("--set", "train.lr=nan"): "train.lr",
    ("--set", "train.lr=-1"): "train.lr",
    ("--batch-size", "0"): "train.batch_size",
    ("--set", "train.micro_batch=0"): "train.micro_batch",  # (3 runs: micro-batches of 2)
    ("--epochs", "0"): "epochs",
    ("--set", "epochs=-1"): "epochs",
    ("--val-fraction", "1.0"): "data.val_fraction",
    ("--max-length", "1"): "data.max_length",
    ("--max-length", "1000"): "data.max_length",  # longer than the model's 64 positions
    ("--lora-rank", "0"): "lora.rank",
    ("--lora-alpha", "-1"): "lora.alpha",
    ("--set", "lora.dropout=1.0"): "lora.dropout",
    ("--set", "lora.enabled=perhaps"): "lora.enabled",
    ("--lora", "--lora-targets", "nope"): "--lora-targets",
    ("--set", "model.n_layers=2"): "model",  # tuning keeps the base's shape
    ("--set", "train.lrr=1"): "train.lrr",
}
DPO_ERRORS = {
    **TUNE_ERRORS,
    ("--beta", "0"): "beta",
    ("--set", "beta=nan"): "beta",
    ("--loss", "kto"): "loss_type",
    ("--label-smoothing", "0.5"): "label_smoothing",
    ("--label-smoothing", "0.1", "--loss", "ipo"): "label_smoothing",
}


@pytest.mark.parametrize("args", TUNE_ERRORS, ids=" ".join)
def test_finetune_config_errors(args, runs, tmp_path):
    out = tmp_path / "run"
    argv = ["finetune", "-b", runs.base, "-d", runs.sft, "-o", out, *TUNE_FAST]
    assert_user_error(invoke(*argv, *args), TUNE_ERRORS[args])
    assert_nothing_written(out)


@pytest.mark.parametrize("args", DPO_ERRORS, ids=" ".join)
def test_dpo_config_errors(args, runs, tmp_path):
    out = tmp_path / "run"
    argv = ["dpo", "-b", runs.base, "-d", runs.pairs, "-o", out, *TUNE_FAST]
    assert_user_error(invoke(*argv, *args), DPO_ERRORS[args])
    assert_nothing_written(out)


@pytest.mark.parametrize("bad", ["model.n_layers", "=4", " = 4"])
def test_malformed_set_option(bad, runs, tmp_path):
    argv = ["pretrain", "-c", runs.yaml, "-d", runs.text, "-t", "bytes", "-o", tmp_path / "o"]
    assert_user_error(invoke(*argv, "--set", bad), "KEY=VALUE")


def _laughs() -> str:
    """model.n_layers as a YAML list that aliases its way to 9^7 items (4.8 million)."""
    items = ["  - &a [" + ", ".join(['"x"'] * 9) + "]"]
    items += [
        f"  - &{n} [" + ", ".join([f"*{p}"] * 9) + "]"
        for p, n in zip("abcdef", "bcdefg", strict=True)
    ]
    return "model:\n n_layers:\n" + "\n".join(" " + item for item in items) + "\n"


# file content: what the error says for pretrain and info, and for finetune and dpo (which
# have no model section, so a file about the model fails on its first key)
YAML_ERRORS = {
    "model: [1, 2\n": (":2: not valid YAML", ":2: not valid YAML"),
    "model:\n\tn_layers: 2\n": ("not valid YAML", "not valid YAML"),
    "- 1\n- 2\n": ("mapping", "mapping"),
    "just words\n": ("mapping", "mapping"),
    "modle: {n_layers: 2}\n": ("modle", "modle"),
    "model: {n_layers: two}\n": ("model.n_layers", "'model'"),
    "model: {n_heads: 5, d_model: 16}\n": ("n_heads (5)", "'model'"),
    "model: {d_model: 16.5}\n": ("model.d_model", "'model'"),
    "model: {norm_eps: .nan}\n": ("model.norm_eps", "'model'"),
    "model: {n_layers: 2}\nmodel: {n_layers: -2}\n": ("model.n_layers", "'model'"),
    "!!python/object/apply:os.system ['echo owned']\n": ("not valid YAML", "not valid YAML"),
    "[" * 700 + "]" * 700: ("nested too deeply", "nested too deeply"),
    _laughs(): ("model.n_layers must be an integer", "'model'"),
    b"model: {n_layers: 2}\x00\n": ("NUL", "NUL"),
    b"\x89PNG\r\n\x1a\n\xff\xfe": ("UTF-8", "UTF-8"),
}


@pytest.mark.parametrize("command", ["pretrain", "finetune", "dpo", "info"])
@pytest.mark.parametrize("content", YAML_ERRORS, ids=range(len(YAML_ERRORS)))
def test_yaml_config_file_errors(command, content, runs, tmp_path):
    says = YAML_ERRORS[content][command in ("finetune", "dpo")]
    if command == "info" and says == "modle":
        says = "no 'model:' section"
    config = tmp_path / "config.yaml"
    config.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "run"
    argv = {
        "pretrain": ["pretrain", "-c", config, "-d", runs.text, "-t", "bytes", "-o", out],
        "finetune": ["finetune", "-c", config, "-b", runs.base, "-d", runs.sft, "-o", out],
        "dpo": ["dpo", "-c", config, "-b", runs.base, "-d", runs.pairs, "-o", out],
        "info": ["info", config],
    }[command]
    line = assert_user_error(invoke(*argv), str(config), says)
    assert len(line) < 1000  # values are quoted short, however large
    assert_nothing_written(out)


@pytest.mark.parametrize("command", ["pretrain", "finetune", "info"])
def test_config_file_missing_or_a_directory(command, runs, tmp_path):
    for config in (tmp_path / "nope.yaml", tmp_path):
        out = tmp_path / "run"
        argv = {
            "pretrain": ["pretrain", "-c", config, "-d", runs.text, "-t", "bytes", "-o", out],
            "finetune": ["finetune", "-c", config, "-b", runs.base, "-d", runs.sft, "-o", out],
            "info": ["info", config],
        }[command]
        assert_user_error(invoke(*argv), str(config))


def test_a_yaml_config_with_a_byte_order_mark_is_read(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_bytes(b"\xef\xbb\xbf" + PRETRAIN_YAML.encode())
    result = invoke("info", config, "--json")
    assert result.exit_code == 0, result.output


# --- windows longer than the model's context; vocabularies too small -----------------------


def test_windows_longer_than_the_context(runs, tmp_path):
    eval_ = invoke("eval", "-m", runs.base, "-d", runs.text, "--seq-len", 65, "--device", "cpu")
    assert_user_error(eval_, "--seq-len 65", "(64)")
    prompt = "x" * 70
    generate = invoke("generate", "-m", runs.base, prompt, "-n", 1, "--device", "cpu")
    assert_user_error(generate, "70 tokens", "64")
    truncated = invoke(
        "generate", "-m", runs.base, prompt, "-n", 1, "--truncate", "--device", "cpu"
    )
    assert truncated.exit_code == 0, truncated.output


@pytest.mark.parametrize(("vocab", "extra"), [(100, []), (258, []), (259, ["<|pad|>"])])
def test_tokenizer_vocab_smaller_than_bytes_and_specials(vocab, extra, runs, tmp_path):
    out = tmp_path / "tok"
    specials = [arg for s in extra for arg in ("--special-token", s)]
    result = invoke("tokenize", runs.text, "-v", vocab, "-o", out, *specials)
    assert_user_error(result, f"{vocab}", f"256 byte tokens + {3 + len(extra)} special")
    assert_nothing_written(out)


MODEL_CONFIGS = [  # ModelConfig keyword arguments a library user might pass: the key named
    ({"n_layers": 0}, "model.n_layers"),
    ({"d_model": 30, "n_heads": 4}, "model.d_model"),
    ({"n_heads": 4, "n_kv_heads": 3}, "model.n_kv_heads"),
    ({"d_model": 12, "n_heads": 4}, "model.n_heads"),  # head size 3
    ({"vocab_size": -1}, "model.vocab_size"),
    ({"family": "gpt3"}, "model.family"),
    ({"dropout": 1.0}, "model.dropout"),
    ({"d_ff": -1}, "model.d_ff"),
    ({"rope_theta": 0.0}, "model.rope_theta"),
    ({"norm_eps": float("nan")}, "model.norm_eps"),
    ({"norm_eps": float("inf")}, "model.norm_eps"),
    ({"rope_theta": float("nan")}, "model.rope_theta"),
    ({"rope_theta": float("inf")}, "model.rope_theta"),
    ({"dropout": float("nan")}, "model.dropout"),
]


@pytest.mark.parametrize(("kwargs", "key"), MODEL_CONFIGS)
def test_model_config_checks_itself(kwargs, key):
    with pytest.raises(TinyLMError, match=key.replace(".", r"\.")):
        ModelConfig(**kwargs)


def test_a_model_larger_than_memory_fails_before_allocating(monkeypatch):
    import os

    from tinylm.model import Transformer

    config = ModelConfig(vocab_size=1000, n_layers=2, n_heads=2, d_model=64, max_seq_len=8)
    monkeypatch.setattr(os, "sysconf", {"SC_PHYS_PAGES": 100, "SC_PAGE_SIZE": 4096}.__getitem__)
    with pytest.raises(TinyLMError, match=r"needs 0\.0 GiB .* this machine has 0\.0 GiB"):
        Transformer(config)  # 400 KB of memory
    monkeypatch.setattr(os, "sysconf", {"SC_PHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}.__getitem__)
    Transformer(config)  # 4 MB: fits


def test_forward_past_the_context_is_a_user_error():
    import torch

    from tinylm.model import Transformer

    model = Transformer(ModelConfig(vocab_size=16, n_layers=1, n_heads=2, d_model=8, max_seq_len=8))
    model(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(TinyLMError, match="longer than the model's context"):
        model(torch.zeros(1, 9, dtype=torch.long))
