"""Bad input files, for every command that reads one: exit code 2, one line on stderr naming
the file (and the line of a JSONL file), no traceback, and nothing written.

What counts as valid is one rule for every reader (tinylm.textio):

- JSONL: a UTF-8 byte order mark, CRLF line ends, blank or whitespace-only lines (skipped), a
  last line without its newline, and keys that a format does not use (ignored, like the "id"
  or "source" that data sets carry) are accepted, and read exactly as the clean file is.
- Plain text: a byte order mark is dropped. A corpus keeps its line ends as they are (CRLF is
  text a model may learn, and bits per byte are of the file's bytes); a prompts file splits
  lines at "\\n" or "\\r\\n" only.
- Rejected: invalid UTF-8 (a UTF-16 or Latin-1 file), NUL bytes (a binary file), bad or too
  deeply nested JSON, a lone surrogate escape, a line over `textio.MAX_LINE_BYTES`, a value of
  the wrong type, a missing key, an empty file, a directory where a file is expected, a FIFO, a
  missing path, an unreadable file.

Every case runs each command for real on a one-layer model (one training step at most).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from robustness_support import (
    COMMANDS,
    JSONL_COMMANDS,
    assert_no_partial_cache,
    assert_nothing_written,
    assert_user_error,
    clean,
    data_runs,
    invoke,
    jsonl,
    lines_of,
    run_case,
)

from tinylm import formats, textio


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return data_runs(tmp_path_factory.mktemp("runs"))


pytestmark = pytest.mark.usefixtures("cache")  # conftest: a fresh token cache


def assert_failed_cleanly(result, out: Path, cache: Path, *needles: str) -> None:
    assert_user_error(result, *needles)
    assert_nothing_written(out)
    assert_no_partial_cache(cache)


# --- files that are not text, or not there ---------------------------------------------------

BINARY = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
FILE_CASES = {
    # name: (content, what the error says)
    "binary": (BINARY, "UTF-8"),
    "utf16": ("hello world\n".encode("utf-16"), "UTF-8"),
    "latin1": ("café au lait\n".encode("latin-1"), "UTF-8"),
    "missing": (None, "no such file"),
}


@pytest.mark.parametrize("case", FILE_CASES)
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_unreadable_content_and_missing_files(command, case, runs, tmp_path, cache):
    content, says = FILE_CASES[case]
    data, out, result = run_case(command, runs, tmp_path, content)
    assert_failed_cleanly(result, out, cache, str(data), says)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_empty_file(command, runs, tmp_path, cache):
    data, out, result = run_case(command, runs, tmp_path, b"")
    assert_failed_cleanly(result, out, cache, str(data))


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_nul_bytes(command, runs, tmp_path, cache):
    data, out, result = run_case(command, runs, tmp_path, b"hello\x00world\n")
    says = "not valid JSON" if command.suffix == ".jsonl" else "NUL"
    assert_failed_cleanly(result, out, cache, str(data), says)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_invalid_utf8_after_valid_text_names_the_place(command, runs, tmp_path, cache):
    good = clean(command)
    data, out, result = run_case(command, runs, tmp_path, good + b"caf\xe9\n")
    where = f"{data}:5" if command.suffix == ".jsonl" else f"at byte {len(good) + 3}"
    assert_failed_cleanly(result, out, cache, str(data), where, "UTF-8")


@pytest.mark.parametrize("command", JSONL_COMMANDS, ids=lambda c: c.name)
def test_blank_jsonl_has_no_examples(command, runs, tmp_path, cache):
    data, out, result = run_case(command, runs, tmp_path, b"\n   \n\t\r\n")
    assert_failed_cleanly(result, out, cache, str(data))


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_special_paths(command, runs, tmp_path, cache):
    """A directory where a file is expected (or one with no text in it), a FIFO and a dangling
    symbolic link: each is refused by name before anything is opened."""
    out = tmp_path / "out"
    folder = tmp_path / f"folder{command.suffix}"
    folder.mkdir()
    (folder / "image.png").write_bytes(BINARY)
    reads_dirs = command.kind == "text" or command.name.startswith("eval")  # text dirs
    says = "no input files found" if reads_dirs else "is a directory"
    assert_failed_cleanly(invoke(*command.argv(runs, folder, out)), out, cache, str(folder), says)
    fifo = tmp_path / f"fifo{command.suffix}"
    os.mkfifo(fifo)
    result = invoke(*command.argv(runs, fifo, out))
    assert_failed_cleanly(result, out, cache, str(fifo), "not a regular file")
    dangling = tmp_path / f"dangling{command.suffix}"
    dangling.symlink_to(tmp_path / "nowhere")
    result = invoke(*command.argv(runs, dangling, out))
    assert_failed_cleanly(result, out, cache, str(dangling), "no such file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file, whatever its mode")
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_unreadable_file_and_directory_holding_one(command, runs, tmp_path, cache):
    data = tmp_path / f"locked{command.suffix}"
    data.write_bytes(clean(command))
    data.chmod(0)
    out = tmp_path / "out"
    result = invoke(*command.argv(runs, data, out))
    assert_failed_cleanly(result, out, cache, str(data))
    if command.kind == "text":
        folder = tmp_path / "folder"
        folder.mkdir()
        (folder / "ok.txt").write_bytes(clean(command))
        (folder / "locked.txt").write_bytes(clean(command))
        (folder / "locked.txt").chmod(0)
        result = invoke(*command.argv(runs, folder, out))
        assert_failed_cleanly(result, out, cache, "locked.txt", "permission")


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_a_file_that_cannot_be_opened(command, runs, tmp_path, cache, monkeypatch):
    """The same as above for any user (root included): every reader opens files through
    tinylm.formats.open_file, which is made to fail for this one file as the kernel would."""
    data = tmp_path / f"locked{command.suffix}"
    data.write_bytes(clean(command))

    def refuse(file, *args, **kwargs):
        if Path(file) == data:
            raise PermissionError(13, "Permission denied", str(file))
        return open(file, *args, **kwargs)

    monkeypatch.setattr(formats, "open", refuse, raising=False)
    out = tmp_path / "out"
    result = invoke(*command.argv(runs, data, out))
    assert_failed_cleanly(result, out, cache, str(data), "Permission denied")


# --- malformed JSONL: line 1 is valid, line 2 is not -------------------------------------------

JSONL_CASES = {
    "bad_json": ('{"text": "unterminated', "not valid JSON"),
    "trailing_comma": ('{"text": "a",}', "not valid JSON"),
    "single_quotes": ("{'prompt': 'x'}", "not valid JSON"),
    "array": ('["a", "b"]', ""),
    "number": ("42", ""),
    "null": ("null", ""),
    "string": ('"just text"', ""),
    "deep_nesting": ('{"x": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
    "invalid_utf8": (b'{"text": "caf\xe9"}', "UTF-8"),
    "raw_nul": (b'{"text": "a\x00b"}', "not valid JSON"),
    "lone_surrogate": (
        '{"text": "\\ud800", "prompt": "\\udfff", "chosen": "\\ud83d"}',
        "surrogate",
    ),
    "overlong": ('{"text": "' + "x" * 30_000 + '"}', "longer than"),
}


@pytest.mark.parametrize("case", JSONL_CASES)
@pytest.mark.parametrize("command", JSONL_COMMANDS, ids=lambda c: c.name)
def test_malformed_jsonl_line(command, case, runs, tmp_path, cache, monkeypatch):
    monkeypatch.setattr(textio, "MAX_LINE_BYTES", 20_000)
    line, says = JSONL_CASES[case]
    data, out, result = run_case(command, runs, tmp_path, jsonl(lines_of(command.kind)[0], line))
    assert_failed_cleanly(result, out, cache, f"{data}:2", says)


def test_truncated_last_line_is_reported(runs, tmp_path, cache):
    for command in JSONL_COMMANDS:
        cut = jsonl(*lines_of(command.kind, 2))[:-4]  # a copy cut short: no closing brace
        data, out, result = run_case(command, runs, tmp_path, cut, command.name)
        assert_failed_cleanly(result, out, cache, f"{data}:2", "not valid JSON")


MISSHAPEN = {  # kind: lines that have the wrong types or keys for it
    "text": [{"text": 5}, {"text": None}, {"text": ["a"]}, {"body": "x"}, {}],
    "instruction": [
        {"messages": "hi"},
        {"messages": []},
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "a"},
            ]
        },
        {"prompt": 1, "completion": "a"},
        {"prompt": "q", "completion": ""},
        {"prompt": "q", "completion": {"text": "a"}},
        {"prompt": "q"},
        {"instruction": "q", "output": 3},
        {"instruction": "q", "input": 3, "output": "a"},
        {"instruction": "q", "output": "a"},  # a second format in one file
        {"question": "q", "answer": "a"},
    ],
    "preference": [
        {"prompt": "q", "chosen": 5, "rejected": "b"},
        {"prompt": "q", "chosen": "a"},
        {"prompt": "q", "rejected": "b"},
        {"prompt": "q", "chosen": "", "rejected": "b"},
        {"prompt": 3, "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
        {
            "prompt": "q",
            "chosen": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
            "rejected": "b",
        },
        {
            "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
        },
    ],
    "prompts": [{"prompt": 5}, {"prompt": None}, {"prompt": ["a"]}, {"text": "x"}],
}
MISSHAPEN_CASES = [
    pytest.param(c, i, id=f"{c.name}-{i}")
    for c in JSONL_COMMANDS
    for i in range(len(MISSHAPEN[c.kind]))
]


@pytest.mark.parametrize(("command", "index"), MISSHAPEN_CASES)
def test_wrong_types_and_missing_keys(command, index, runs, tmp_path, cache):
    bad = MISSHAPEN[command.kind][index]
    data, out, result = run_case(command, runs, tmp_path, jsonl(lines_of(command.kind)[0], bad))
    assert_failed_cleanly(result, out, cache, f"{data}:2")


# --- text typed at the chat prompt, or given on the command line ----------------------------


def test_chat_skips_a_typed_line_that_is_not_utf8(runs, monkeypatch):
    import tinylm.session

    answered = []
    real = tinylm.session.generate
    monkeypatch.setattr(
        tinylm.session,
        "generate",
        lambda *args, **kwargs: answered.append(1) or real(*args, **kwargs),
    )
    typed = b"caf\xe9 latin-1\nhello\n/exit\n"
    result = invoke("chat", "-m", runs.base, "-n", 1, "-t", 0, "--device", "cpu", input=typed)
    assert result.exit_code == 0, result.output
    assert "warning: that line is not valid UTF-8" in result.stderr
    assert answered == [1]  # the session went on and answered "hello"


@pytest.mark.parametrize(
    "extra", [["PROMPT"], ["hi", "--chat", "--system", "SYSTEM"], ["hi", "--stop", "STOP"]]
)
def test_command_line_text_that_was_not_utf8(extra, runs, tmp_path):
    """Bytes a terminal could not decode reach Python as lone surrogates (U+DC80-U+DCFF)."""
    undecodable = "caf\udce9"
    argv = [undecodable if arg.isupper() else arg for arg in extra]
    named = {"PROMPT": "PROMPT", "SYSTEM": "--system", "STOP": "--stop"}[
        next(a for a in extra if a.isupper())
    ]
    result = invoke("generate", "-m", runs.base, *argv, "-n", 1, "--device", "cpu")
    assert_user_error(result, named, "surrogate")
    if "--system" in extra:
        chat = invoke("chat", "-m", runs.base, "--system", undecodable, input="/exit\n")
        assert_user_error(chat, "--system", "surrogate")
