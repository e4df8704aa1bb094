"""Token shards: encoding, caching, dtypes, reading across shards, deterministic windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tinylm.data import (
    INDEX_FILE,
    TokenStream,
    encode_corpus,
    eval_window,
    eval_windows,
    sample_windows,
    split_stream,
    token_dtype,
)
from tinylm.errors import TinyLMError
from tinylm.tokenizer import Tokenizer, parallel


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.bytes_only()


def _corpus(tmp_path: Path) -> list[Path]:
    a = tmp_path / "a.txt"
    a.write_text("First document.\nIt has two lines.\n", encoding="utf-8")
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps({"text": "héllo"}) + "\n" + json.dumps({"text": "<|endoftext|>"})
                 + "\n", encoding="utf-8")
    return [a, b]


def test_round_trip_documents_end_with_eot(tmp_path: Path, tok: Tokenizer) -> None:
    files = _corpus(tmp_path)
    stream = encode_corpus(files, tok, cache_dir=tmp_path / "cache")
    texts = [files[0].read_text(encoding="utf-8"), "héllo", "<|endoftext|>"]
    expected = [i for t in texts for i in (*tok.encode(t), tok.eot_id)]
    assert stream.read(0, len(stream)).tolist() == expected
    # a special-token string in user text stays text: only 3 real end-of-text tokens
    assert expected.count(tok.eot_id) == 3
    assert stream.index["n_docs"] == 3
    assert stream.index["n_bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert stream.index["dtype"] == "uint16"


def test_second_run_uses_the_cache_and_changed_content_does_not(
    tmp_path: Path, tok: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _corpus(tmp_path)
    first = encode_corpus(files, tok, cache_dir=tmp_path / "cache")

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("encoded again")

    monkeypatch.setattr(parallel, "pack_group", fail)
    again = encode_corpus([tmp_path], tok, cache_dir=tmp_path / "cache")  # same files via the dir
    assert again.read(0, len(again)).tolist() == first.read(0, len(first)).tolist()
    files[0].write_text("Changed.\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="encoded again"):
        encode_corpus(files, tok, cache_dir=tmp_path / "cache")


def test_interrupted_encoding_leaves_nothing_that_looks_complete(
    tmp_path: Path, tok: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _corpus(tmp_path)

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(parallel, "pack_group", crash)
    with pytest.raises(KeyboardInterrupt):
        encode_corpus(files, tok, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "tokens").iterdir()) == []


class _BigVocab:
    """The byte tokenizer with every id moved past 65535, to exercise uint32 shards."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.vocab_size, self.eot_id = tok, 70000, 69999
        self.fingerprint, self.pattern = "big-" + tok.fingerprint, tok.pattern

    def encode_many(self, texts: list[str], allowed_special=frozenset()) -> list[list[int]]:
        return [[66000 + i for i in self.tok.encode(t, allowed_special)] for t in texts]

    def encode_packed(self, text: str, allowed_special=frozenset()) -> bytes:
        return np.asarray(self.encode_many([text])[0], dtype=np.uint32).tobytes()


def test_uint16_and_uint32(tmp_path: Path, tok: Tokenizer) -> None:
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    files = _corpus(tmp_path)
    stream = encode_corpus(files, _BigVocab(tok), cache_dir=tmp_path / "cache")  # type: ignore[arg-type]
    assert stream.index["dtype"] == "uint32"
    ids = stream.read(0, len(stream))
    assert ids.max() == 69999 and ids.min() >= 66000
    shard = tmp_path / "cache" / "tokens" / Path(stream.arrays[0].filename).parent.name
    assert (shard / "tokens_00000.bin").stat().st_size == 4 * len(stream)


def test_reads_across_shard_boundaries(tmp_path: Path, tok: Tokenizer) -> None:
    files = _corpus(tmp_path)
    one = encode_corpus(files, tok, cache_dir=tmp_path / "one")
    whole = one.read(0, len(one))
    stream = encode_corpus(files, tok, cache_dir=tmp_path / "many", shard_tokens=7)
    assert len(stream.index["shards"]) == -(-len(one) // 7)
    for start in range(0, len(one) - 10, 3):
        assert stream.read(start, 10).tolist() == whole[start:start + 10].tolist()
    reopened = TokenStream.open(Path(stream.arrays[0].filename).parent)
    assert len(reopened) == len(stream)
    assert json.loads((Path(stream.arrays[0].filename).parent / INDEX_FILE).read_text())


def test_split_takes_the_tail(tmp_path: Path, tok: Tokenizer) -> None:
    stream = encode_corpus(_corpus(tmp_path), tok, cache_dir=tmp_path / "cache")
    train, val = split_stream(stream, 0.25)
    assert len(train) + len(val) == len(stream)
    assert len(val) == round(0.25 * len(stream))
    assert val.read(0, len(val)).tolist() == stream.read(len(train), len(val)).tolist()
    with pytest.raises(TinyLMError):
        split_stream(stream, 1.5)


def test_windows_are_a_pure_function_of_seed_step_micro(
    shakespeare_path: Path, tmp_path: Path, tok: Tokenizer
) -> None:
    stream = encode_corpus([shakespeare_path], tok, cache_dir=tmp_path / "cache")
    x1, y1 = sample_windows(stream, 32, 4, seed=1, step=5, micro=2)
    x2, y2 = sample_windows(stream, 32, 4, seed=1, step=5, micro=2)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (4, 32) and x1.dtype == torch.int64
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one
    for other in ((2, 5, 2), (1, 6, 2), (1, 5, 3)):
        assert not torch.equal(x1, sample_windows(stream, 32, 4, *other)[0])
    text = shakespeare_path.read_bytes()
    for row in x1.tolist():  # every window is a real stretch of the text
        assert bytes(row) in text


def test_too_little_data_is_a_clear_error(tmp_path: Path, tok: Tokenizer) -> None:
    stream = encode_corpus(_corpus(tmp_path), tok, cache_dir=tmp_path / "cache")
    with pytest.raises(TinyLMError, match="fewer than one window"):
        sample_windows(stream, 1000, 2, 0, 0, 0)
    with pytest.raises(TinyLMError, match="no such file"):
        encode_corpus([tmp_path / "missing.txt"], tok, cache_dir=tmp_path / "cache")


def test_eval_windows_cover_the_stream_once(tmp_path: Path, tok: Tokenizer) -> None:
    stream = encode_corpus(_corpus(tmp_path), tok, cache_dir=tmp_path / "cache")
    n, length = eval_windows(stream, 8)
    assert n == (len(stream) - 1) // 8 and length == 8
    targets = np.concatenate([eval_window(stream, i, length)[1] for i in range(n)])
    assert targets.tolist() == stream.read(1, n * 8).tolist()
    assert eval_windows(stream, 8, max_tokens=16) == (2, 8)
    assert eval_windows(stream.view(0, 5), 8) == (1, 4)  # shorter than a window: one shorter window
