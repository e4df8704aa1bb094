"""The BPE tokenizer: hand-checked merges, a naive reference trainer, round trips, specials."""

from __future__ import annotations

from collections import Counter

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from tinylm.chat import DEFAULT_SPECIAL_TOKENS, END_OF_TEXT, TURN_END, TURN_START
from tinylm.errors import TinyLMError
from tinylm.tokenizer import GPT4_PATTERN, Tokenizer, bpe, pretokenize
from tinylm.tokenizer.training import count_chunks, learn_merges

NO_SPECIALS: tuple[str, ...] = ()


@pytest.fixture(scope="module")
def tok(shakespeare_text: str) -> Tokenizer:
    return Tokenizer.train([shakespeare_text], 1024 + 3)


# ---- pure functions, checked by hand ---------------------------------------------------------


def test_pair_counts_weights_words_and_counts_overlaps():
    counts = bpe.pair_counts({(1, 2, 1, 2): 1, (2, 1): 3, (5, 5, 5): 2})
    assert counts == {(1, 2): 2, (2, 1): 4, (5, 5): 4}


def test_merge_replaces_left_to_right_without_overlap():
    assert bpe.merge([1, 2, 1, 2, 3], (1, 2), 9) == [9, 9, 3]
    assert bpe.merge([5, 5, 5], (5, 5), 7) == [7, 5]
    assert bpe.merge([5, 5, 5, 5], (5, 5), 7) == [7, 7]
    assert bpe.merge([1, 3], (1, 2), 9) == [1, 3]


def test_known_answer_aaabdaaabac():
    # minbpe's example: 3 merges give [258, 100, 258, 97, 99]. (a,a) has count 4 (overlaps);
    # then (a,b) and (aa,a) tie at 2 and the smaller pair (97, 98) wins; then (aa, ab).
    tok = Tokenizer.train(["aaabdaaabac"], 256 + 3, special_tokens=NO_SPECIALS)
    assert tok.merges == [(97, 97), (97, 98), (256, 257)]
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tok.token_bytes(258) == b"aaab"


def test_ties_go_to_the_smallest_pair_whatever_the_order():
    first = Tokenizer.train(["cd", "ab"], 256 + 2, special_tokens=NO_SPECIALS)
    second = Tokenizer.train(["ab", "cd"], 256 + 2, special_tokens=NO_SPECIALS)
    assert first.merges == second.merges == [(97, 98), (99, 100)]


def test_overlapping_pairs_in_training():
    # "aaaa" holds (a,a) three times; merging gives [aa, aa], then (aa, aa).
    tok = Tokenizer.train(["aaaa"], 256 + 2, special_tokens=NO_SPECIALS)
    assert tok.merges == [(97, 97), (256, 256)]
    assert tok.encode("aaaa") == [257]
    assert tok.encode("aaa") == [256, 97]


def test_words_are_chunks_of_the_split_regex():
    # " the" is one chunk in the gpt4 pattern, so (space, t) merges before anything else here.
    tok = Tokenizer.train([" the the the"], 256 + 3, special_tokens=NO_SPECIALS)
    assert tok.merges[0] == (ord(" "), ord("t"))
    assert tok.token_bytes(258) == b" the"
    assert tok.vocab_size == 259


def test_training_stops_when_no_pair_is_left():
    # chunks "ab" and " ab": (a, b) twice, then (space, ab); nothing is left to merge after that
    tok = Tokenizer.train(["ab ab"], 256 + 50, special_tokens=NO_SPECIALS)
    assert tok.merges == [(97, 98), (32, 256)]
    assert tok.vocab_size == 256 + 2


# ---- a naive reference trainer: recount every pair at every merge ----------------------------


def naive_train(text: str, pattern: str, n_merges: int) -> list[tuple[int, int]]:
    words = Counter(tuple(chunk.encode()) for chunk in regex.findall(pattern, text))
    merges = []
    for k in range(n_merges):
        stats: Counter = Counter()
        for word, n in words.items():
            for i in range(len(word) - 1):
                stats[word[i], word[i + 1]] += n
        if not stats:
            break
        best = min(stats, key=lambda p: (-stats[p], p))
        merged: Counter = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(256 + k)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
        merges.append(best)
    return merges


def test_trainers_equal_the_naive_reference(shakespeare_text: str):
    text = shakespeare_text[:30_000]
    expected = naive_train(text, GPT4_PATTERN, 150)
    counts, _ = count_chunks([text], GPT4_PATTERN)
    assert bpe.train_merges(counts, 150) == expected
    assert learn_merges(counts, 150) == expected  # the C trainer when built
    assert Tokenizer.train([text], 256 + 150, special_tokens=NO_SPECIALS).merges == expected


# ---- encoding and decoding -------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(text=st.text())
def test_decode_encode_round_trip(tok: Tokenizer, text: str):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, allowed_special="all")) == text


@settings(max_examples=60, deadline=None)
@given(text=st.text())
def test_round_trip_with_a_custom_regex_that_leaves_gaps(text: str):
    tok = Tokenizer.from_merges([(97, 98)], pattern=r"[a-z]+")
    assert tok.decode(tok.encode(text)) == text


def test_encoding_matches_the_tokens(tok: Tokenizer, shakespeare_text: str):
    text = shakespeare_text[:20_000]
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
    assert len(ids) < len(text.encode()) / 2.5  # merges compress (about 3 bytes per token here)


def test_bytes_only():
    tok = Tokenizer.bytes_only()
    assert tok.vocab_size == 256 + len(DEFAULT_SPECIAL_TOKENS)
    assert tok.encode("hé") == [104, 0xC3, 0xA9]
    assert tok.special_tokens == {END_OF_TEXT: 256, TURN_START: 257, TURN_END: 258}


def test_decode_of_a_cut_character_and_bad_ids(tok: Tokenizer):
    assert tok.decode([0xC3]) == "\ufffd"
    assert tok.decode_bytes([0xC3, 0xA9]) == "é".encode()
    with pytest.raises(TinyLMError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TinyLMError, match="out of range"):
        tok.decode([-1])


def test_lone_surrogates_become_replacement_characters(tok: Tokenizer):
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"


# ---- special tokens --------------------------------------------------------------------------


def test_special_tokens_sit_at_the_end_in_order(tok: Tokenizer):
    n = tok.vocab_size
    assert tok.special_tokens == {END_OF_TEXT: n - 3, TURN_START: n - 2, TURN_END: n - 1}
    assert tok.eot_id == n - 3
    assert tok.token_bytes(tok.eot_id) == END_OF_TEXT.encode()


def test_special_strings_are_plain_text_unless_allowed(tok: Tokenizer):
    text = f"hi{TURN_START}user\nforged{END_OF_TEXT}"
    plain = tok.encode(text)
    assert not set(plain) & set(tok.special_tokens.values())
    assert tok.decode(plain) == text
    only_eot = tok.encode(text, allowed_special={END_OF_TEXT})
    assert only_eot[-1] == tok.eot_id and tok.special_tokens[TURN_START] not in only_eot
    everything = tok.encode(text, allowed_special="all")
    assert tok.special_tokens[TURN_START] in everything and everything[-1] == tok.eot_id
    assert tok.decode(everything) == text
    with pytest.raises(TinyLMError, match="not in this tokenizer"):
        tok.encode(text, allowed_special={"<|nope|>"})


def test_extra_special_tokens_follow_the_defaults():
    specials = [*DEFAULT_SPECIAL_TOKENS, "<|pad|>"]
    tok = Tokenizer.train(["hello hello"], 256 + 5 + 4, special_tokens=specials)  # 5 merges
    assert tok.vocab_size == 265 and tok.special_tokens["<|pad|>"] == 264
    assert tok.encode("<|pad|>", allowed_special={"<|pad|>"}) == [264]
    with pytest.raises(TinyLMError, match="given twice"):
        Tokenizer.train(["x"], 300, special_tokens=[END_OF_TEXT, END_OF_TEXT])


def test_tiktoken_spelling_of_cl100k_means_gpt4():
    # tiktoken writes \p{N}{1,3}+, which Hugging Face's regex engine reads differently.
    tok = Tokenizer.from_merges([], pattern=pretokenize._TIKTOKEN_CL100K)
    assert tok.pattern == GPT4_PATTERN
    assert pretokenize.split_text("x 1234567", tok.pattern) == ["x", " ", "123", "456", "7"]


def test_merges_must_use_existing_tokens():
    with pytest.raises(TinyLMError, match="merge 1"):
        Tokenizer.from_merges([(97, 98), (256, 257)])


def test_bad_training_arguments():
    with pytest.raises(TinyLMError, match="smaller than 256"):
        Tokenizer.train(["text"], 258)
    with pytest.raises(TinyLMError, match="invalid split regex"):
        Tokenizer.train(["text"], 300, pattern="(unclosed")
    with pytest.raises(TinyLMError, match="no text"):
        Tokenizer.train(["", ""], 300)


# ---- save, load, fingerprint, batches --------------------------------------------------------


def test_save_load_round_trip(tok: Tokenizer, tmp_path, shakespeare_text: str):
    path = tok.save(tmp_path / "t")
    assert path == tmp_path / "t" / "tokenizer.json"
    for source in (tmp_path / "t", path):
        loaded = Tokenizer.load(source)
        assert loaded.fingerprint == tok.fingerprint
        assert loaded.special_tokens == tok.special_tokens
        assert loaded.encode(shakespeare_text[:5000]) == tok.encode(shakespeare_text[:5000])
    assert tok.save(tmp_path / "x.json") == tmp_path / "x.json"


def test_load_errors(tmp_path):
    with pytest.raises(TinyLMError, match="no such tokenizer"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TinyLMError, match="not valid JSON"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "WordPiece", "vocab": {}}}')
    with pytest.raises(TinyLMError, match="not a BPE"):
        Tokenizer.load(tmp_path)


def test_fingerprint_depends_on_merges_pattern_and_specials():
    base = Tokenizer.from_merges([(97, 98)])
    assert base.fingerprint == Tokenizer.from_merges([(97, 98)]).fingerprint
    assert len(base.fingerprint) == 16 and int(base.fingerprint, 16) >= 0
    others = [
        Tokenizer.from_merges([(97, 99)]),
        Tokenizer.from_merges([(97, 98)], pattern="gpt2"),
        Tokenizer.from_merges([(97, 98)], special_tokens=[END_OF_TEXT]),
    ]
    assert len({base.fingerprint, *(t.fingerprint for t in others)}) == 4


@pytest.mark.parametrize("pattern", ["gpt4", r"\w+|\W+"])  # threads (C), processes (regex)
def test_encode_batch_in_parallel_equals_encode(pattern: str, shakespeare_text: str, monkeypatch):
    from tinylm.tokenizer import tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "_PARALLEL_MIN_CHARS", 1000)
    texts = [shakespeare_text[i : i + 3000] for i in range(0, 60_000, 3000)] + [END_OF_TEXT]
    tok = Tokenizer.train(texts, 500, pattern=pattern)
    expected = [tok.encode(t, allowed_special="all") for t in texts]
    assert tok.encode_batch(texts, allowed_special="all", num_workers=2) == expected
    plain = tok.encode_batch(texts, num_workers=2)
    assert plain[:-1] == expected[:-1] and plain[-1] == tok.encode(END_OF_TEXT)
    assert tok.encode_batch(texts, num_workers=1) == plain


@pytest.mark.parametrize("pattern", [GPT4_PATTERN, r"\w+|\W+"])  # threads (C), processes
def test_parallel_counting_equals_serial(pattern: str, shakespeare_text: str, monkeypatch):
    from tinylm.tokenizer import training

    texts = [shakespeare_text[i : i + 20_000] for i in range(0, 200_000, 20_000)]
    serial, n_serial = training.count_chunks(texts, pattern, workers=1)
    monkeypatch.setattr(training, "BATCH_CHARS", 30_000)
    parallel, n_parallel = training.count_chunks(texts, pattern, workers=2)
    assert parallel == serial and n_parallel == n_serial == len("".join(texts).encode())
    assert serial == Counter(c.encode() for t in texts for c in pretokenize.split_text(t, pattern))
