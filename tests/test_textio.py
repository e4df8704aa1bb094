"""Reading users' files: streaming text, JSONL with line numbers, atomic writes, output dirs."""

from __future__ import annotations

import json

import pytest

from tinylm.errors import TinyLMError
from tinylm.textio import (
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    expand_paths,
    iter_jsonl,
    iter_text,
)


def test_expand_paths_recurses_sorted_and_filters(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("z")
    (tmp_path / "a.md").write_text("a")
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    assert expand_paths([tmp_path]) == [tmp_path / "a.md", tmp_path / "b" / "z.txt"]


def test_expand_paths_errors(tmp_path):
    with pytest.raises(TinyLMError, match="no such file or directory"):
        expand_paths([tmp_path / "missing.txt"])
    with pytest.raises(TinyLMError, match="no input files found"):
        expand_paths([tmp_path])


def test_iter_text_pieces_join_to_the_file_and_cut_after_a_word(tmp_path):
    lines = [f"line {i} with some words\n" + ("  indented\n" if i % 3 else "") for i in range(500)]
    text = "".join(lines)
    path = tmp_path / "t.txt"
    path.write_text(text)
    pieces = list(iter_text([path], max_chars=300))
    assert len(pieces) > 10
    assert "".join(p.text for p in pieces) == text
    assert [p.doc_end for p in pieces] == [False] * (len(pieces) - 1) + [True]
    for before, piece in zip(pieces, pieces[1:], strict=False):
        # cut only between a letter or digit and whitespace, where GPT-style patterns cut
        assert before.text[-1].isalnum() and piece.text[0].isspace()


def test_iter_text_documents_from_jsonl_and_bom(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    (tmp_path / "b.txt").write_bytes("\ufeffhello".encode())
    got = [(p.text, p.doc_end) for p in iter_text([tmp_path])]
    assert got == [("one", True), ("two", True), ("hello", True)]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"good\n\xff\xfe", "not valid UTF-8 at byte 5"),
        (b"abc\x00def", "contains NUL bytes"),
    ],
)
def test_iter_text_rejects_bad_files(tmp_path, content, needle):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(TinyLMError, match=needle):
        list(iter_text([path]))


def test_iter_jsonl_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(TinyLMError, match=r"d.jsonl:2: not valid JSON"):
        list(iter_jsonl(path))
    path.write_text('{"text": "ok"}\n["no"]\n')
    with pytest.raises(TinyLMError, match=r"d.jsonl:2: expected an object"):
        list(iter_text([path]))
    path.write_text('{"text": 3}\n')
    with pytest.raises(TinyLMError, match=r"d.jsonl:1: \"text\" must be a string"):
        list(iter_text([path]))


def test_check_output_dir(tmp_path):
    assert check_output_dir(tmp_path / "new", force=False) == tmp_path / "new"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(TinyLMError, match="pass --force"):
        check_output_dir(tmp_path / "full", force=False)
    assert check_output_dir(tmp_path / "full", force=True) == tmp_path / "full"
    with pytest.raises(TinyLMError, match="not a directory"):
        check_output_dir(tmp_path / "full" / "x", force=True)


def test_atomic_write_replaces_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "sub" / "f.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_text(path, '{"a": 2}')
    assert json.loads(path.read_text()) == {"a": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.json"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]
