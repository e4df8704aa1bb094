"""`tinylm tokenize`: output, inputs (directories, JSONL, --max-bytes), bad inputs, determinism."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import tinylm.cli  # noqa: F401  (registers the commands)
from tinylm.cli.app import app
from tinylm.cli.tokenize import parse_size
from tinylm.errors import TinyLMError
from tinylm.tokenizer import Tokenizer
from tinylm.tokenizer.corpus import CorpusReader

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, ["tokenize", *args])


def test_trains_writes_and_reports_json(shakespeare_path, tmp_path):
    result = run(
        str(shakespeare_path), "--vocab-size", "600", "-o", str(tmp_path / "tok"), "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["vocab_size"] == 600 and report["merges"] == 600 - 256 - 3
    assert 2.0 < report["bytes_per_token"] < 4.0  # held-out text, compressed by the merges
    assert report["held_out_bytes"] > 10_000
    assert report["train_bytes"] + report["held_out_bytes"] == shakespeare_path.stat().st_size
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.vocab_size == 600 and tok.fingerprint == report["fingerprint"]


def test_summary_table_and_refusal_to_overwrite(shakespeare_path, tmp_path):
    out = tmp_path / "tok"
    result = run(str(shakespeare_path), "-v", "300", "-o", str(out))
    assert result.exit_code == 0
    assert "bytes_per_token" in result.stdout and "train_s" in result.stdout
    again = run(str(shakespeare_path), "-v", "300", "-o", str(out))
    assert again.exit_code == 2 and "--force" in again.output
    assert run(str(shakespeare_path), "-v", "300", "-o", str(out), "--force", "-q").exit_code == 0


def test_same_corpus_gives_the_same_file(shakespeare_path, tmp_path):
    for name in ("a", "b"):
        assert (
            run(str(shakespeare_path), "-v", "800", "-o", str(tmp_path / name), "-q").exit_code == 0
        )
    first = (tmp_path / "a" / "tokenizer.json").read_bytes()
    assert first == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_directories_jsonl_special_tokens_and_pattern(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("the cat sat on the mat\n" * 50)
    (data / "sub" / "b.md").write_text("# the dog\n\nthe dog ran\n" * 50)
    (data / "c.jsonl").write_text(
        "\n".join(json.dumps({"text": f"the bird {i}"}) for i in range(50))
    )
    (data / "ignored.bin").write_bytes(b"\x00\x01")
    result = run(
        str(data),
        "-v",
        "300",
        "-o",
        str(tmp_path / "tok"),
        "--pattern",
        "gpt2",
        "--special-token",
        "<|pad|>",
        "--json",
    )
    assert result.exit_code == 0, result.output
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.special_tokens["<|pad|>"] == tok.vocab_size - 1
    assert tok.to_tiktoken().encode_ordinary(" the bird") == tok.encode(" the bird")
    assert len(tok.encode(" the dog")) == 2  # " the" and " dog" were learned from the .md file


def test_allow_special_reads_separators_as_tokens(tmp_path):
    """With --allow-special the corpus's <|endoftext|> separators are that token: no merge is
    learned from their spelling or across them (the same merges as training on the documents
    apart), and the held-out text counts each as one token. Without it they are plain text."""
    from tinylm.tokenizer.training import TrainResult, train_from_texts

    docs = ["the cat sat on the mat. " * 20 + "zq", "qz" + "a dog ate the log. " * 20] * 6
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("<|endoftext|>".join(docs), encoding="utf-8")
    (tmp_path / "sep.txt").write_text("<|endoftext|>" * 400 + "the cat", encoding="utf-8")
    plain, special = tmp_path / "plain", tmp_path / "special"
    files = [str(corpus), str(tmp_path / "sep.txt")]
    assert run(*files, "-v", "300", "-o", str(plain), "-q").exit_code == 0
    result = run(*files, "-v", "300", "-o", str(special), "--allow-special", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["allow_special"] is True
    learned = Tokenizer.load(special)
    pieces = [learned.token_bytes(i) for i in range(256, 256 + len(learned.merges))]
    assert not any(b"<|" in p or b"endof" in p or b"zqqz" in p for p in pieces)
    assert any(b"endof" in Tokenizer.load(plain).token_bytes(i) for i in range(256, 297))
    # the same merges as the documents given apart
    build = Tokenizer.from_merges
    joined = train_from_texts(["<|endoftext|>".join(docs)], 300, allow_special=True, build=build)
    assert joined.tokenizer.merges == train_from_texts(docs, 300, build=build).tokenizer.merges
    # bytes/token on held-out text counts a separator as one token
    held_out = ["<|endoftext|>" * 10]
    assert TrainResult(learned, 0, 0, 0, 0, held_out, True).bytes_per_token() == 13.0
    assert TrainResult(learned, 0, 0, 0, 0, held_out, False).bytes_per_token() < 13.0


def test_max_bytes_samples_every_file(tmp_path):
    (tmp_path / "a.txt").write_text("apple pie\n" * 1000)
    (tmp_path / "b.txt").write_text("zebra zoo\n" * 3000)
    result = run(
        str(tmp_path / "a.txt"),
        str(tmp_path / "b.txt"),
        "-v",
        "270",
        "-o",
        str(tmp_path / "tok"),
        "--max-bytes",
        "4k",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["train_bytes"] + report["held_out_bytes"] <= 4000
    tok = Tokenizer.load(tmp_path / "tok")
    assert len(tok.encode("apple")) < 5 and len(tok.encode("zebra")) < 5  # both files were read


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.txt", "-v", "300"], "no such file"),
        (["EMPTY", "-v", "300"], "no text to train on"),
        (["CORPUS", "-v", "258"], "smaller than 256 byte tokens + 3 special tokens"),
        (["CORPUS", "-v", "300", "--pattern", "([a-z"], "invalid split regex"),
        (["CORPUS", "-v", "300", "--max-bytes", "lots"], "--max-bytes"),
        (["CORPUS", "-v", "300", "--special-token", "<|endoftext|>"], "given twice"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(tmp_path, args, message):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "EMPTY" / "empty.txt").write_text("")
    (tmp_path / "CORPUS").write_text("some text\n")
    args = [str(tmp_path / a) if a in ("EMPTY", "CORPUS", "missing.txt") else a for a in args]
    result = run(*args, "-o", str(tmp_path / "out"))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_parse_size():
    assert parse_size("5000000") == 5_000_000
    assert parse_size("30M") == parse_size("30MB") == 30_000_000
    assert parse_size("1.5G") == 1_500_000_000
    assert parse_size("64MiB") == 64 * 2**20
    with pytest.raises(TinyLMError):
        parse_size("-3")


def test_corpus_reader_budgets_and_holdout(tmp_path):
    (tmp_path / "a.txt").write_text("one two\n" * 125)  # 1000 bytes
    (tmp_path / "b.txt").write_text("three four five\n" * 200)  # 3200 bytes
    reader = CorpusReader([tmp_path / "a.txt", tmp_path / "b.txt"], max_bytes=420)
    assert reader._budgets() == [100, 320]
    texts = list(reader)
    assert texts[0] == "one two\n" * 12 and texts[1] == "three four five\n" * 20
    held = CorpusReader([tmp_path / "b.txt"], holdout=0.1)
    train = list(held)
    assert train[0] + "".join(held.held_out) == "three four five\n" * 200
    assert held.held_out[0].startswith("three") and 300 <= held.held_out_bytes <= 340
