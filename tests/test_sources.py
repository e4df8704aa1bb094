"""Inputs of every kind (tinylm.sources, tinylm.formats): specs and weights, directories and
globs, gzip / zstd / parquet read exactly as the plain file, bad files named with the place,
the cache key, weighted mixtures, and instruction / preference data in parquet."""

from __future__ import annotations

import gzip
import json
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard

from tinylm.data import TokenMixture, encode_corpus, sample_windows, split_stream
from tinylm.errors import TinyLMError
from tinylm.sft.data import read_conversations, read_preference_pairs
from tinylm.sources import Source, classify, expand, parse_source, resolve_sources
from tinylm.textio import iter_jsonl, iter_text
from tinylm.tokenizer import Tokenizer, parallel

TOK = Tokenizer.bytes_only()
DOCS = ["First document, with some words.\n", "Zweites Dokument: grüße! ✓\n", "third " * 50]


def write_parquet(path: Path, columns: dict, row_group_size: int = 2) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def write_zstd(path: Path, data: bytes, frames: int = 1) -> Path:
    """zstd of `data` in `frames` frames one after another (as pzstd or `cat a.zst b.zst`)."""
    step = -(-len(data) // frames)
    cctx = zstandard.ZstdCompressor()
    path.write_bytes(b"".join(cctx.compress(data[i:i + step]) for i in range(0, len(data), step)))
    return path


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def texts(values) -> list[str]:
    return [p.text for p in iter_text(values)]


# --- specs, kinds, directories and globs ---------------------------------------------------


def test_weights_only_on_a_trailing_number_and_only_when_the_path_is_not_there(tmp_path):
    assert parse_source("web.parquet:0.8") == Source("web.parquet", 0.8)
    assert parse_source("a:b/c.txt") == Source("a:b/c.txt")
    assert parse_source("x.txt:1e-1", "content") == Source("x.txt", 0.1, "content")
    real = tmp_path / "odd:0.5"  # a file whose name really ends in :number
    real.write_text("x")
    assert parse_source(str(real)) == Source(str(real))
    for bad in ("a.txt:0", "a.txt:0.0"):
        with pytest.raises(TinyLMError, match="weight must be a positive"):
            parse_source(bad)
    with pytest.raises(TinyLMError, match="b.txt has no weight"):
        resolve_sources(["a.txt:1", "b.txt"])


@pytest.mark.parametrize(("name", "kind"), [
    ("a.txt", ("text", None)), ("a.MD", ("text", None)), ("a.jsonl", ("jsonl", None)),
    ("a.jsonl.gz", ("jsonl", "gzip")), ("a.txt.zst", ("text", "zstd")),
    ("a.gz", ("text", "gzip")), ("shard.parquet", ("parquet", None)), ("a.png", None),
    ("a.parquet.gz", None),
])
def test_classify(name, kind):
    assert classify(Path(name)) == kind


def test_directories_and_globs(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/a.txt", "d/sub/b.jsonl.gz", "d/c.parquet", "d/skip.png"):
        (tmp_path / name).write_bytes(b"")
    names = [f.path.relative_to(tmp_path).as_posix() for f in expand([tmp_path / "d"])]
    assert names == ["d/a.txt", "d/c.parquet", "d/sub/b.jsonl.gz"]
    globbed = expand([str(tmp_path / "d" / "**" / "*.gz")])
    assert [f.path.name for f in globbed] == ["b.jsonl.gz"]
    with pytest.raises(TinyLMError, match=r"nothing\*.txt: the pattern matches no files"):
        expand([str(tmp_path / "nothing*.txt")])
    with pytest.raises(TinyLMError, match="no input files found"):
        expand([str(tmp_path / "d" / "*.png")])


# --- every kind reads as the plain file ----------------------------------------------------


def test_compressed_and_parquet_read_as_the_plain_files(tmp_path):
    rows = [{"text": d, "id": i} for i, d in enumerate(DOCS)]
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(rows))
    plain = texts([tmp_path / "a.jsonl"])
    assert plain == DOCS
    with gzip.open(tmp_path / "a.jsonl.gz", "wb") as f:
        f.write(jsonl_bytes(rows))
    write_zstd(tmp_path / "a.jsonl.zst", jsonl_bytes(rows), frames=3)
    write_parquet(tmp_path / "a.parquet", {"text": DOCS, "id": [0, 1, 2]})
    for name in ("a.jsonl.gz", "a.jsonl.zst", "a.parquet"):
        assert texts([tmp_path / name]) == plain, name
    body = "".join(DOCS).encode() * 2000  # several MiB-blocks of text, cut in pieces
    (tmp_path / "b.txt").write_bytes(body)
    write_zstd(tmp_path / "b.txt.zst", body, frames=4)
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(body[:9999]) + gzip.compress(body[9999:]))
    for name in ("b.txt.zst", "b.txt.gz"):
        assert "".join(texts([tmp_path / name])) == body.decode(), name


def test_text_field_names_the_key_and_the_column(tmp_path):
    (tmp_path / "c.jsonl").write_bytes(jsonl_bytes([{"content": d} for d in DOCS]))
    write_parquet(tmp_path / "c.parquet", {"content": DOCS})
    for name in ("c.jsonl", "c.parquet"):
        assert [p.text for p in iter_text([tmp_path / name], text_field="content")] == DOCS
    with pytest.raises(TinyLMError, match='c.jsonl:1: expected an object with a "text" key'):
        texts([tmp_path / "c.jsonl"])


# --- bad files: one error naming the file and the place ------------------------------------


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    body = jsonl_bytes([{"text": d * 400} for d in DOCS * 30])
    good_zst = zstandard.ZstdCompressor().compress(body)
    corrupt_zst = bytearray(good_zst)
    corrupt_zst[len(good_zst) // 2:len(good_zst) // 2 + 8] = b"\xff" * 8
    good_gz = gzip.compress(body)
    corrupt_gz = bytearray(good_gz)
    corrupt_gz[-8] ^= 0xFF  # the CRC of the data (damage inside the data may read as bad JSON)
    parquet = write_parquet(tmp_path / "ok.parquet", {"text": DOCS * 4}).read_bytes()
    files = {
        "truncated.jsonl.gz": (good_gz[: len(good_gz) // 2], "truncated"),
        "corrupt.jsonl.gz": (bytes(corrupt_gz), "corrupt compressed data"),
        "notgzip.jsonl.gz": (b"plain text, not gzip\n", "corrupt compressed data"),
        "truncated.jsonl.zst": (good_zst[: len(good_zst) // 2], "truncated"),
        "corrupt.jsonl.zst": (bytes(corrupt_zst), "corrupt compressed data"),
        "truncated.parquet": (parquet[: len(parquet) // 2], "not a readable parquet file"),
    }
    out = {}
    for name, (content, says) in files.items():
        (tmp_path / name).write_bytes(content)
        out[name] = (tmp_path / name, says)
    write_parquet(tmp_path / "nocolumn.parquet", {"body": DOCS})
    out["nocolumn.parquet"] = (tmp_path / "nocolumn.parquet", 'no column "text" (columns: body)')
    write_parquet(tmp_path / "ints.parquet", {"text": [1, 2, 3]})
    out["ints.parquet"] = (tmp_path / "ints.parquet", 'column "text" holds int64, not text')
    write_parquet(tmp_path / "null.parquet", {"text": ["a", "b", None]})
    out["null.parquet"] = (tmp_path / "null.parquet", 'row group 1, row 2: "text" is null')
    return out


def test_bad_files_name_the_file_and_the_place(tmp_path):
    for name, (path, says) in _bad_files(tmp_path).items():
        with pytest.raises(TinyLMError) as caught:
            texts([path])
        message = str(caught.value)
        assert str(path) in message and says in message, (name, message)
        if name.endswith(".jsonl.gz") or name.endswith(".jsonl.zst"):
            assert f"{path}:" in message  # the line the stream broke in
    with pytest.raises(TinyLMError, match=r"truncated.jsonl.gz:\d+: corrupt"):
        list(iter_jsonl(tmp_path / "truncated.jsonl.gz"))


def test_a_damaged_row_group_is_named(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["x" * 5000] * 4}), path, row_group_size=2,
                   use_dictionary=False)
    start = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[start:start + 16] = b"\xee" * 16  # the header of row group 1's first data page
    path.write_bytes(bytes(data))
    with pytest.raises(TinyLMError, match=r"d.parquet: row group 1: cannot read it"):
        texts([path])


def test_bad_files_leave_no_cache_entry(tmp_path):
    for path, _ in _bad_files(tmp_path).values():
        with pytest.raises(TinyLMError):
            encode_corpus([path], TOK, tmp_path / "cache")
    assert list((tmp_path / "cache" / "tokens").iterdir()) == []


# --- the token cache and mixtures ----------------------------------------------------------


def test_tokens_of_every_kind_match_and_the_key_follows_content_and_field(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes([{"text": d, "alt": d[:5]} for d in DOCS]))
    write_parquet(tmp_path / "a.parquet", {"text": DOCS, "alt": [d[:5] for d in DOCS]})
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress((tmp_path / "a.jsonl").read_bytes()))
    cache = tmp_path / "cache"
    streams = {n: encode_corpus([tmp_path / n], TOK, cache)
               for n in ("a.jsonl", "a.parquet", "a.jsonl.gz")}
    expected = [i for d in DOCS for i in (*TOK.encode(d), TOK.eot_id)]
    for name, stream in streams.items():
        assert stream.read(0, len(stream)).tolist() == expected, name
    entries = lambda: sorted(p.name for p in (cache / "tokens").iterdir())  # noqa: E731
    assert len(entries()) == 3  # one entry per kind of file, even for the same text
    before = entries()
    alt = encode_corpus([tmp_path / "a.parquet"], TOK, cache, text_field="alt")
    assert alt.read(0, len(alt)).tolist() == [i for d in DOCS for i in (*TOK.encode(d[:5]),
                                                                         TOK.eot_id)]
    assert len(entries()) == 4 and set(before) < set(entries())
    again = encode_corpus([tmp_path / "a.parquet"], TOK, cache)  # cached: same entry
    assert len(entries()) == 4 and again.index == streams["a.parquet"].index
    write_parquet(tmp_path / "a.parquet", {"text": DOCS[::-1], "alt": DOCS})
    encode_corpus([tmp_path / "a.parquet"], TOK, cache)
    assert len(entries()) == 5


def _mixture(tmp_path: Path) -> TokenMixture:
    write_parquet(tmp_path / "web.parquet", {"text": ["a" * 300] * 10})
    (tmp_path / "code.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        jsonl_bytes([{"text": "b" * 300}] * 10)))
    stream = encode_corpus([f"{tmp_path / 'web.parquet'}:3", f"{tmp_path / 'code.jsonl.zst'}:1"],
                           TOK, tmp_path / "cache")
    assert isinstance(stream, TokenMixture)
    return stream


def test_mixture_windows_follow_the_weights_and_are_a_pure_function(tmp_path):
    mixture = _mixture(tmp_path)
    assert mixture.weights == [0.75, 0.25] and len(mixture) == 2 * 10 * 301
    a, b = TOK.encode("a")[0], TOK.encode("b")[0]
    picks = []
    for step in range(40):
        x, y = sample_windows(mixture, 16, 8, seed=3, step=step, micro=0)
        x2, y2 = sample_windows(mixture, 16, 8, seed=3, step=step, micro=0)
        assert torch.equal(x, x2) and torch.equal(y, y2)
        for row in x.tolist():
            assert set(row) - {TOK.eot_id} in ({a}, {b})  # each window from one source
            picks.append(a in row)
    assert 0.65 < sum(picks) / len(picks) < 0.85  # 320 draws at 0.75
    assert not torch.equal(sample_windows(mixture, 16, 8, 3, 0, 0)[0],
                           sample_windows(mixture, 16, 8, 3, 0, 1)[0])
    train, val = split_stream(mixture, 0.2)
    assert isinstance(train, TokenMixture) and not isinstance(val, TokenMixture)
    assert len(train) + len(val) == len(mixture)
    assert set(val.read(0, len(val)).tolist()) == {a, b, TOK.eot_id}  # both sources' tails
    with pytest.raises(TinyLMError, match="web.parquet:3 has"):
        sample_windows(mixture, 5000, 2, 0, 0, 0)


# --- streaming: bounded memory ---------------------------------------------------------------


def test_encode_stream_keeps_few_groups_in_flight():
    """The reader runs at most 2 x workers groups ahead of the results: a corpus larger than
    memory streams through."""
    pulled = 0
    lock = threading.Lock()

    def groups():
        nonlocal pulled
        for i in range(50):
            with lock:
                pulled += 1
            yield [f"text {i} " * 100], [True]

    seen = []
    for i, packed in enumerate(parallel.encode_stream(TOK, groups(), frozenset(), "uint16", 2)):
        seen.append(packed)
        assert pulled <= i + 1 + 2 * 2
    assert len(seen) == 50
    assert seen[7].tolist() == [*TOK.encode("text 7 " * 100), TOK.eot_id]
    assert seen[7].dtype == "uint16"


# --- instruction and preference data in parquet --------------------------------------------


def test_finetune_and_dpo_data_in_parquet_read_as_the_jsonl(tmp_path):
    user = {"role": "user", "content": "Name: cat"}
    messages = [[user, {"role": "assistant", "content": f"cat {i}"}] for i in range(3)]
    write_parquet(tmp_path / "smoltalk.parquet", {"messages": messages, "source": ["x"] * 3})
    (tmp_path / "smoltalk.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        jsonl_bytes([{"messages": m} for m in messages])))
    from_parquet = read_conversations(tmp_path / "smoltalk.parquet")
    from_jsonl = read_conversations(tmp_path / "smoltalk.jsonl.zst")
    assert [c.messages for c in from_parquet] == [c.messages for c in from_jsonl]
    assert from_parquet[2].source.endswith("smoltalk.parquet: row group 1, row 2")
    write_parquet(tmp_path / "pc.parquet", {"prompt": ["P", None], "completion": ["C", None],
                                            "instruction": [None, "I"], "output": [None, "O"]})
    with pytest.raises(TinyLMError, match=r"pc.parquet: row group 0, row 1: .*'alpaca'"):
        read_conversations(tmp_path / "pc.parquet")  # nulls left out: the second row is Alpaca

    chosen = [[user, {"role": "assistant", "content": "cat"}]] * 2
    rejected = [[user, {"role": "assistant", "content": "dog"}]] * 2
    uf = write_parquet(tmp_path / "uf.parquet", {"prompt": ["Name: cat"] * 2, "chosen": chosen,
                                                 "rejected": rejected, "score": [1.0, 2.0]})
    pairs = read_preference_pairs(uf)
    assert pairs[0].prompt == (user,)  # UltraFeedback: the prompt string repeats the user turn
    assert pairs[0].chosen == ({"role": "assistant", "content": "cat"},)
    assert pairs[0].rejected == ({"role": "assistant", "content": "dog"},)
    write_parquet(tmp_path / "other.parquet", {"question": ["q"], "answer": ["a"]})
    for read in (read_conversations, read_preference_pairs):
        with pytest.raises(TinyLMError, match="other.parquet: no column of an instruction"):
            read(tmp_path / "other.parquet")


def test_encode_stream_on_processes_gives_the_ids_of_one_thread():
    """A custom split regex runs on processes (the C scanner knows only the built-in ones):
    the same packed ids, in order, with the end-of-text ids in place."""
    custom = Tokenizer.train(["some words, some more words; and code(x) = 1"] * 20, 300,
                             pattern=r"\w+|\s+|[^\w\s]+")
    assert not parallel.uses_threads(custom.pattern)
    groups = [([f"words {i} and code({i})", " more"], [False, True]) for i in range(6)]
    pooled = list(parallel.encode_stream(custom, iter(groups), frozenset(), "uint32", 2))
    alone = [parallel.pack_group(custom, t, e, frozenset(), "uint32") for t, e in groups]
    assert [a.tolist() for a in pooled] == [a.tolist() for a in alone]
    assert alone[0].tolist() == [*custom.encode("words 0 and code(0)"), *custom.encode(" more"),
                                 custom.eot_id]
