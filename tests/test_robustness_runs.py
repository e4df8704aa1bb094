"""Directories as input and output: broken run directories, runs that do not belong together
(a tokenizer and a model, an adapter and its base, a newer format), Hugging Face directories
to import, and output directories that must not be written. Each gives exit code 2 and one line
naming the directory or file, no traceback, and leaves every input as it was.

(Damaged weights and checkpoints, with their checksums, are tested in test_faults.py.)
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from robustness_support import (
    TOK,
    TUNE_FAST,
    VALID,
    assert_nothing_written,
    assert_user_error,
    digest,
    invoke,
    jsonl,
    lines_of,
    make_adapter_run,
    make_run,
    tiny_config,
)

from tinylm import FORMAT_VERSION
from tinylm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("runs")
    base = make_run(root / "base")
    text, instructions, pairs = root / "text.txt", root / "sft.jsonl", root / "pairs.jsonl"
    text.write_text(VALID["text"]["text"] * 4, encoding="utf-8")
    instructions.write_bytes(jsonl(*lines_of("instruction")))
    pairs.write_bytes(jsonl(*lines_of("preference")))
    return SimpleNamespace(
        root=root,
        base=base,
        adapter=make_adapter_run(root / "lora", base),
        text=text,
        instructions=instructions,
        pairs=pairs,
    )


pytestmark = pytest.mark.usefixtures("cache")  # conftest: a fresh token cache


# Every command that reads a run directory: argv(runs, run, out).
RUN_READERS: dict[str, Callable[[SimpleNamespace, Path, Path], list]] = {
    "generate": lambda r, m, o: ["generate", "-m", m, "hi", "-n", 1, "--device", "cpu"],
    "chat": lambda r, m, o: ["chat", "-m", m, "-n", 1, "--device", "cpu"],
    "eval": lambda r, m, o: ["eval", "-m", m, "-d", r.text, "--device", "cpu"],
    "export": lambda r, m, o: ["export", "-m", m, "-o", o],
    "merge": lambda r, m, o: ["merge", "-m", m, "-o", o],
    "info": lambda r, m, o: ["info", m],
    "finetune": lambda r, m, o: ["finetune", "-b", m, "-d", r.instructions, "-o", o, *TUNE_FAST],
    "dpo": lambda r, m, o: ["dpo", "-b", m, "-d", r.pairs, "-o", o, *TUNE_FAST],
}


def _config(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def mutate(run: Path) -> None:
        config = json.loads((run / "config.json").read_text())
        replaced = change(config)
        (run / "config.json").write_text(json.dumps(config if replaced is None else replaced))

    return mutate


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda run: (run / name).write_bytes(data)


BROKEN_RUNS: dict[str, tuple[Callable[[Path], None], str]] = {
    # name: (what to do to a copy of a good run, what the error says)
    "empty_dir": (lambda run: shutil.rmtree(run) or run.mkdir(), "no config.json"),
    "config_bad_json": (_write("config.json", b'{"model": {'), "not valid JSON"),
    "config_binary": (_write("config.json", b"\x89PNG\r\n\x1a\n\xff\x00"), "UTF-8"),
    "config_list": (_write("config.json", b"[1, 2]"), "no 'model' section"),
    "config_deep": (_write("config.json", b"[" * 5000 + b"]" * 5000), "nested too deeply"),
    "config_surrogate": (_write("config.json", b'{"model": {"family": "\\udc00"}}'), "surrogate"),
    "model_unknown_key": (_config(lambda c: c["model"].update(n_experts=8)), "n_experts"),
    "model_wrong_type": (_config(lambda c: c["model"].update(n_layers="two")), "n_layers"),
    "model_bad_heads": (_config(lambda c: c["model"].update(n_heads=3)), "n_heads"),
    "model_nan": (_config(lambda c: c["model"].update(norm_eps=float("nan"))), "norm_eps"),
    "newer_format": (_config(lambda c: c.update(format_version=FORMAT_VERSION + 1)), "newer"),
    "format_not_a_number": (_config(lambda c: c.update(format_version="2.0")), "format_version"),
    "no_tokenizer": (lambda run: (run / "tokenizer.json").unlink(), "tokenizer.json"),
    "tokenizer_garbage": (_write("tokenizer.json", b"\x00\x01garbage"), "tokenizer.json"),
    "tokenizer_not_bpe": (_write("tokenizer.json", b'{"model": {"type": "Unigram"}}'), "BPE"),
}
INFO_LOADS_NO_TOKENIZER = {"no_tokenizer"}  # info shows a run's config without its tokenizer


@pytest.mark.parametrize("case", BROKEN_RUNS)
@pytest.mark.parametrize("command", RUN_READERS)
def test_broken_run_directory(command, case, runs, tmp_path):
    if command == "info" and case in INFO_LOADS_NO_TOKENIZER:
        pytest.skip("info reads config.json only")
    run = tmp_path / "run"
    shutil.copytree(runs.base, run)
    mutate, says = BROKEN_RUNS[case]
    mutate(run)
    if command == "merge":  # merge reads adapter runs: break the adapter's base instead
        says = "is missing" if case == "empty_dir" else says
        adapter = tmp_path / "adapter"
        shutil.copytree(runs.adapter, adapter)
        config = json.loads((adapter / "config.json").read_text())
        config["base_run"] = {"path": str(run)}
        (adapter / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    argv = RUN_READERS[command](runs, adapter if command == "merge" else run, out)
    assert_user_error(invoke(*argv, input="hello\n"), str(run), says)
    assert_nothing_written(out)


@pytest.mark.parametrize("command", RUN_READERS)
def test_missing_run_and_a_file_for_a_run(command, runs, tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "nowhere"
    assert_user_error(invoke(*RUN_READERS[command](runs, missing, out)), str(missing))
    file = tmp_path / "notes.bin"
    file.write_bytes(b"\xff\xfe\x00binary")
    assert_user_error(invoke(*RUN_READERS[command](runs, file, out)), str(file))
    assert_nothing_written(out)


def test_a_config_json_with_a_byte_order_mark_loads(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs.base, run)
    (run / "config.json").write_bytes(b"\xef\xbb\xbf" + (run / "config.json").read_bytes())
    result = invoke("generate", "-m", run, "hi", "-n", 2, "-t", 0, "--device", "cpu")
    assert result.exit_code == 0, result.output


# --- things that do not belong together ----------------------------------------------------


def test_tokenizer_larger_than_the_model(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs.base, run)
    Tokenizer.train(["hello world, hello there " * 20], vocab_size=280).save(run)
    for command in ("generate", "eval", "export", "finetune"):
        out = tmp_path / f"out-{command}"
        result = invoke(*RUN_READERS[command](runs, run, out))
        assert_user_error(result, str(run), "tokenizer has", "only 259")
        assert_nothing_written(out)


def test_tokenizer_swapped_for_one_of_the_same_size(runs, tmp_path):
    """Same vocabulary size, other merges: only a record of the tokenizer can tell."""
    run = tmp_path / "run"
    shutil.copytree(runs.base, run)
    Tokenizer.from_merges([], special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"]).save(run)
    assert_user_error(invoke(*RUN_READERS["generate"](runs, run, tmp_path)), "tokenizer.json")


def test_pretrain_with_a_tokenizer_that_cannot_end_documents(runs, tmp_path):
    tokenizer = tmp_path / "tok.json"
    Tokenizer.bytes_only(special_tokens=["<|pad|>"]).save(tokenizer)
    yaml = tmp_path / "c.yaml"
    yaml.write_text("model: {n_layers: 1, n_heads: 2, d_model: 16, max_seq_len: 16}\n")
    out = tmp_path / "out"
    result = invoke("pretrain", "-c", yaml, "-d", runs.text, "-t", tokenizer, "-o", out, "-q")
    assert_user_error(result, "<|endoftext|>")
    assert_nothing_written(out)


def test_finetune_on_a_base_without_chat_tokens(runs, tmp_path):
    base = make_run(
        tmp_path / "base",
        tiny_config(vocab_size=257),
        Tokenizer.bytes_only(special_tokens=["<|endoftext|>"]),
    )
    out = tmp_path / "out"
    result = invoke(*RUN_READERS["finetune"](runs, base, out))
    assert_user_error(result, "<|im_start|>")
    assert_nothing_written(out)


WRONG_BASES = {  # a base run put where the adapter's base was: (model config, tokenizer, says)
    "wider": (tiny_config(d_model=32), TOK, "d_model=16"),
    "deeper": (tiny_config(n_layers=2), TOK, "n_layers=1"),
    # the same size, the special tokens in another order
    "other_tokenizer": (
        tiny_config(),
        Tokenizer.bytes_only(["<|im_start|>", "<|im_end|>", "<|endoftext|>"]),
        "tokenizer",
    ),
}


@pytest.mark.parametrize("case", WRONG_BASES)
@pytest.mark.parametrize("command", ["generate", "eval", "export", "merge", "finetune", "dpo"])
def test_adapter_on_the_wrong_base(command, case, runs, tmp_path):
    config, tokenizer, says = WRONG_BASES[case]
    base = make_run(tmp_path / "base", config, tokenizer)
    adapter = tmp_path / "adapter"
    shutil.copytree(runs.adapter, adapter)
    record = json.loads((adapter / "config.json").read_text())
    record["base_run"] = {"path": str(base)}
    (adapter / "config.json").write_text(json.dumps(record))
    out = tmp_path / "out"
    assert_user_error(invoke(*RUN_READERS[command](runs, adapter, out)), str(adapter), says)
    assert_nothing_written(out)


@pytest.mark.parametrize("command", ["generate", "eval", "export", "merge", "finetune", "info"])
def test_adapters_whose_bases_loop(command, runs, tmp_path):
    """An adapter run named as its own base (or two naming each other) is an error, not an
    endless recursion."""
    first, second = tmp_path / "first", tmp_path / "second"
    for adapter, base in ((first, second), (second, first)):
        shutil.copytree(runs.adapter, adapter)
        record = json.loads((adapter / "config.json").read_text())
        record["base_run"] = {"path": str(base)}
        (adapter / "config.json").write_text(json.dumps(record))
    out = tmp_path / "out"
    if command == "info":  # info reads the config alone; it needs no base
        assert invoke("info", first).exit_code == 0
        return
    assert_user_error(invoke(*RUN_READERS[command](runs, first, out)), "loop back")
    assert_nothing_written(out)


def test_adapter_whose_base_lacks_some_of_its_tensors(runs, tmp_path):
    """An adapter from elsewhere (no model record): the loader still names the misfit."""
    base = make_run(tmp_path / "base", tiny_config(d_model=32))
    adapter = tmp_path / "adapter"
    shutil.copytree(runs.adapter, adapter)
    record = json.loads((adapter / "config.json").read_text())
    record["base_run"] = {"path": str(base)}
    record["model"] = json.loads((base / "config.json").read_text())["model"]
    (adapter / "config.json").write_text(json.dumps(record))
    (adapter / "tokenizer.json").unlink()
    assert_user_error(
        invoke(*RUN_READERS["generate"](runs, adapter, tmp_path)),
        "adapter_model.safetensors",
        "does not fit",
    )


# --- output directories --------------------------------------------------------------------

WRITERS: dict[str, Callable[[SimpleNamespace, Path], list]] = {
    "tokenize": lambda r, o: ["tokenize", r.text, "-v", 260, "-o", o],
    "pretrain": lambda r, o: ["pretrain", "-c", "tiny", "-d", r.text, "-t", "bytes", "-o", o],
    "finetune": lambda r, o: ["finetune", "-b", r.base, "-d", r.instructions, "-o", o, *TUNE_FAST],
    "dpo": lambda r, o: ["dpo", "-b", r.base, "-d", r.pairs, "-o", o, *TUNE_FAST],
    "synth": lambda r, o: ["data", "synth", "-o", o],
    "export": lambda r, o: ["export", "-m", r.base, "-o", o],
    "merge": lambda r, o: ["merge", "-m", r.adapter, "-o", o],
}


@pytest.mark.parametrize("command", WRITERS)
def test_outputs_are_never_written_over(command, runs, tmp_path):
    file = tmp_path / "a-file"
    file.write_text("keep me")
    assert_user_error(invoke(*WRITERS[command](runs, file)), str(file), "not a directory")
    below = file / "run"
    assert_user_error(invoke(*WRITERS[command](runs, below)), str(below), "not a directory")
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("keep me too")
    assert_user_error(invoke(*WRITERS[command](runs, full)), str(full), "--force")
    assert file.read_text() == "keep me" and sorted(p.name for p in full.iterdir()) == ["notes.txt"]


OVER_INPUTS = {  # argv(runs) writing over an input with --force: (argv, the input)
    "finetune-base": lambda r: (
        ["finetune", "-b", r.base, "-d", r.instructions, "-o", r.base, *TUNE_FAST],
        r.base,
    ),
    "finetune-adapters-base": lambda r: (
        ["finetune", "-b", r.adapter, "-d", r.instructions, "-o", r.base, *TUNE_FAST],
        r.base,
    ),
    "dpo-base": lambda r: (["dpo", "-b", r.base, "-d", r.pairs, "-o", r.base, *TUNE_FAST], r.base),
    "merge-adapter": lambda r: (["merge", "-m", r.adapter, "-o", r.adapter], r.adapter),
    "merge-adapters-base": lambda r: (["merge", "-m", r.adapter, "-o", r.base], r.base),
    "export-run": lambda r: (["export", "-m", r.base, "-o", r.base], r.base),
}


@pytest.mark.parametrize("case", OVER_INPUTS)
def test_force_never_writes_over_an_input(case, runs, tmp_path):
    """`-o` naming the run a command reads (a base run, an adapter run or the adapter's base)
    is refused even with --force, which would otherwise clear it before reading it."""
    shutil.copytree(runs.root, tmp_path / "copy")
    copy = SimpleNamespace(
        **{
            k: tmp_path / "copy" / Path(v).relative_to(runs.root)
            for k, v in vars(runs).items()
            if k != "root"
        }
    )
    argv, target = OVER_INPUTS[case](copy)
    before = {p.name: digest(p) for p in target.iterdir() if p.is_file()}
    assert_user_error(invoke(*argv, "--force"), str(target), "input directory too")
    assert {p.name: digest(p) for p in target.iterdir() if p.is_file()} == before


# --- Hugging Face directories to import -----------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(runs: SimpleNamespace) -> Path:
    out = runs.root / "hf"
    assert invoke("export", "-m", runs.base, "-o", out, "-q").exit_code == 0
    return out


BROKEN_HF: dict[str, tuple[Callable[[Path], None], str]] = {
    "no_config": (lambda d: (d / "config.json").unlink(), "no config.json"),
    "config_bad_json": (_write("config.json", b"{'hidden_size': 16}"), "not valid JSON"),
    "config_list": (_write("config.json", b"[]"), "JSON object"),
    "config_deep": (_write("config.json", b"[" * 5000 + b"]" * 5000), "nested too deeply"),
    "unknown_architecture": (_config(lambda c: c.update(architectures=["BertModel"])), "BertModel"),
    "no_tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json"),
    "tokenizer_binary": (
        _write("tokenizer.json", b"\xff\xfe\x00"),
        "tokenizer.json: not valid UTF-8",
    ),
    "no_weights": (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    "weights_garbage": (_write("model.safetensors", b"not safetensors"), "safetensors"),
    "vocab_too_small": (_config(lambda c: c.update(vocab_size=100)), "only 100 embeddings"),
}


@pytest.mark.parametrize("case", BROKEN_HF)
def test_import_of_a_broken_hugging_face_directory(case, hf_dir, tmp_path):
    source = tmp_path / "hf"
    shutil.copytree(hf_dir, source)
    mutate, says = BROKEN_HF[case]
    mutate(source)
    out = tmp_path / "run"
    assert_user_error(invoke("import", source, "-o", out), str(source), says)
    assert_nothing_written(out)


def test_import_of_nothing(tmp_path):
    for source in (tmp_path / "missing", tmp_path):
        line = assert_user_error(invoke("import", source, "-o", tmp_path / "out"))
        assert str(source) in line
