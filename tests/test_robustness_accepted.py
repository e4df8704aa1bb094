"""Variations of valid input that every reader accepts and reads exactly as the clean file:
a byte order mark, CRLF line ends, blank lines, a last line without its newline, extra keys in
JSONL; and what plain text keeps (a corpus's line ends) or splits on (a prompts file's lines).
See test_robustness_inputs.py for the rule, and for what is rejected.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from robustness_support import (
    BY_NAME,
    COMMANDS,
    Command,
    clean,
    data_runs,
    digest,
    jsonl,
    lines_of,
    run_case,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return data_runs(tmp_path_factory.mktemp("runs"))


pytestmark = pytest.mark.usefixtures("cache")  # conftest: a fresh token cache


def _blank_lines(data: bytes) -> bytes:
    return b"\n  \n" + data.replace(b"\n", b"\n\n\t\n") + b" \n"


def _extra_keys(command: Command) -> bytes:
    return jsonl(
        *({**o, "id": i, "meta": {"source": "web"}} for i, o in enumerate(lines_of(command.kind)))
    )


def _all_at_once(command: Command) -> bytes:
    crlf = _blank_lines(_extra_keys(command)).replace(b"\n", b"\r\n")
    return b"\xef\xbb\xbf" + crlf.rstrip(b"\r\n \t")


VARIANTS = {
    "bom": lambda c: b"\xef\xbb\xbf" + clean(c),
    "crlf": lambda c: clean(c).replace(b"\n", b"\r\n"),
    "blank_lines": lambda c: _blank_lines(clean(c)),
    "no_final_newline": lambda c: clean(c).rstrip(b"\n"),
    "extra_keys": _extra_keys,
    "all_at_once": _all_at_once,
}


def _variants(command: Command) -> list[str]:
    """The variations a command's data may have. A corpus keeps its bytes (CRLF, blank lines
    and a missing final newline are text in it); a prompts file has no keys. The training
    commands read through the same readers as eval, so one run with every variation at once
    covers them end to end."""
    if command.suffix == ".txt":
        return (
            ["bom", "crlf", "blank_lines", "no_final_newline"]
            if command.kind == "prompts"
            else ["bom"]
        )
    if command.name.startswith(("pretrain", "finetune", "dpo")):
        return ["all_at_once"]
    return list(VARIANTS)


VARIANT_CASES = [pytest.param(c, v, id=f"{c.name}-{v}") for c in COMMANDS for v in _variants(c)]


def outcome(command: Command, out: Path, result) -> object:
    """What a run produced, with what depends on time or paths left out."""
    assert result.exit_code == 0, (result.output, result.exception)
    if command.name.startswith("tokenize"):
        return digest(out / "tokenizer.json")
    if command.writes:
        return digest(out / "model.safetensors")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    return [{k: v for k, v in row.items() if not k.endswith("_s")} for row in rows]


@pytest.fixture(scope="module")
def clean_outcomes(runs, tmp_path_factory) -> Callable[[Command], object]:
    """What each command makes of its clean file (computed once, when first asked for)."""
    root = tmp_path_factory.mktemp("clean")
    found: dict[str, object] = {}

    def get(command: Command) -> object:
        if command.name not in found:
            work = root / command.name
            work.mkdir()
            _, out, result = run_case(command, runs, work, clean(command))
            found[command.name] = outcome(command, out, result)
        return found[command.name]

    return get


@pytest.mark.parametrize(("command", "variant"), VARIANT_CASES)
def test_accepted_variations_read_as_the_clean_file(
    command, variant, runs, tmp_path, clean_outcomes
):
    expected = clean_outcomes(command)
    _, out, result = run_case(command, runs, tmp_path, VARIANTS[variant](command))
    assert outcome(command, out, result) == expected


def test_a_corpus_keeps_its_line_ends_byte_for_byte(tmp_path):
    from tinylm.data import encode_corpus
    from tinylm.tokenizer import Tokenizer

    tok = Tokenizer.bytes_only()
    text = "line one\r\nline two\r\n\r\n  indented\rold mac\n"
    (tmp_path / "crlf.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    stream = encode_corpus([tmp_path / "crlf.txt"], tok, tmp_path / "cache")
    assert tok.decode(stream.read(0, len(stream)).tolist()) == text + "<|endoftext|>"


def test_prompt_lines_split_only_at_newlines(runs, tmp_path):
    """U+2028, form feeds and lone CRs are characters of a prompt, not line breaks."""
    from tinylm.generate import read_prompts

    prompts = ["one\u2028still one", "two\x0cform feed", "three\rcarriage"]
    path = tmp_path / "p.txt"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(prompts).encode() + b"\r\n\r\n")
    assert read_prompts(path) == prompts


@pytest.mark.parametrize("name", ["eval.txt", "eval.jsonl", "tokenize.jsonl"])
def test_a_gigantic_line_below_the_limit_is_read_whole(name, runs, tmp_path):
    command = BY_NAME[name]
    text = "word " * 400_000  # 2 MB, one line
    body = (json.dumps({"text": text}) + "\n" if command.suffix == ".jsonl" else text).encode()
    _, out, result = run_case(command, runs, tmp_path, body)
    assert result.exit_code == 0, result.output
    if command.writes:
        assert (out / "tokenizer.json").is_file()
    else:
        assert json.loads(result.stdout)["bytes"] == len(text)
