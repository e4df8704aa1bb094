"""The C accelerator gives exactly what the pure-Python code gives: chunks, counts, merges, ids."""

from __future__ import annotations

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from tinylm.tokenizer import GPT2_PATTERN, GPT4_PATTERN, Tokenizer, bpe, pretokenize

fast = pretokenize.native()
pytestmark = pytest.mark.skipif(fast is None, reason="the C accelerator is not built")

# Characters where the split rules have corner cases: apostrophes and case folding (ſ folds to
# s), every kind of space and line break, letters, digits and numbers of other scripts, marks,
# emoji with joiners and modifiers.
TRICKY = (
    "'sSdDmMtTlLvVeErRſkK \t\n\r\x0b\x0c\x1c\x85\u00a0\u1680\u2028\u3000"
    "aZé日ß1٣Ⅻ½_-.!?\u0301\u200d🎉🏽"
)
TRICKY_TEXT = st.text(alphabet=st.sampled_from(TRICKY), max_size=60)


@settings(max_examples=400, deadline=None)
@given(text=TRICKY_TEXT)
def test_scanner_equals_the_regex(text: str):
    assert fast.split(text, 1) == regex.findall(GPT4_PATTERN, text)
    assert fast.split(text, 2) == regex.findall(GPT2_PATTERN, text)


@settings(max_examples=100, deadline=None)
@given(text=st.text())
def test_scanner_equals_the_regex_on_any_text(text: str):
    text = pretokenize.clean_surrogates(text)
    assert fast.split(text, 1) == regex.findall(GPT4_PATTERN, text)
    assert fast.split(text, 2) == regex.findall(GPT2_PATTERN, text)


def test_scanner_on_real_text(shakespeare_text: str):
    for kind, pattern in ((1, GPT4_PATTERN), (2, GPT2_PATTERN)):
        assert fast.split(shakespeare_text, kind) == regex.findall(pattern, shakespeare_text)


@pytest.fixture(scope="module")
def both(shakespeare_text: str):
    """The same tokenizer twice: with the C encoder and with the pure-Python one."""
    c_tok = Tokenizer.train([shakespeare_text[:300_000], "ab" * 500], 800)
    py_tok = Tokenizer.from_merges(c_tok.merges)
    py_tok._native_encoder = lambda: None  # type: ignore[method-assign]
    return c_tok, py_tok


@settings(max_examples=200, deadline=None)
@given(
    text=st.one_of(
        st.text(),
        TRICKY_TEXT,
        # long chunks take the C encoder's heap path
        st.text(alphabet="ab", min_size=60, max_size=400),
        st.text(alphabet="eths ", min_size=60, max_size=400),
    )
)
def test_c_encoder_equals_python(both, text: str):
    c_tok, py_tok = both
    assert c_tok.encode(text) == py_tok.encode(text)


def test_c_encoder_equals_python_on_real_text(both, shakespeare_text: str):
    c_tok, py_tok = both
    text = shakespeare_text[300_000:400_000]
    assert c_tok.encode(text) == py_tok.encode(text)
    assert c_tok.encode_packed(text) == py_tok.encode_packed(text)


def test_a_full_cache_starts_over(both, shakespeare_text: str):
    c_tok, py_tok = both
    state = c_tok._state
    tiny = fast.Encoder(state.byte_ids, state.merges, 1, 5)  # clears every 5 new chunks
    text = shakespeare_text[500_000:520_000]
    assert tiny.encode(text) == tiny.encode(text) == py_tok.encode(text)


def test_custom_pattern_goes_through_the_c_encoder_too(shakespeare_text: str):
    c_tok = Tokenizer.train([shakespeare_text[:100_000]], 600, pattern=r"[A-Za-z]+")
    py_tok = Tokenizer.from_merges(c_tok.merges, pattern=r"[A-Za-z]+")
    py_tok._native_encoder = lambda: None  # type: ignore[method-assign]
    text = shakespeare_text[100_000:130_000]
    assert c_tok.encode(text) == py_tok.encode(text)


def test_c_counts_and_merges_equal_python(shakespeare_text: str):
    texts = [shakespeare_text[:200_000], "x" * 3000, " \n\t  end"]
    counts: dict[bytes, int] = {}
    fast.count_chunks(texts, 1, counts)
    expected: dict[bytes, int] = {}
    for text in texts:
        for chunk in regex.findall(GPT4_PATTERN, text):
            expected[chunk.encode()] = expected.get(chunk.encode(), 0) + 1
    assert counts == expected
    merged = dict(counts)
    fast.merge_counts(merged, {b"zz": 2, next(iter(counts)): 1})
    assert merged[b"zz"] == 2 and merged[next(iter(counts))] == counts[next(iter(counts))] + 1
    assert fast.train(list(counts), list(counts.values()), 400, None, 256) == bpe.train_merges(
        counts, 400
    )


def test_pure_python_tokenizer_trains_the_same(shakespeare_text: str, monkeypatch):
    text = shakespeare_text[:100_000]
    with_c = Tokenizer.train([text], 500)
    monkeypatch.setattr(pretokenize, "_native", None)
    without_c = Tokenizer.train([text], 500)
    assert without_c.merges == with_c.merges
    assert without_c._native_encoder() is None
    assert without_c.encode(text) == with_c.encode(text)


def test_one_tokenizer_shared_by_threads(both, shakespeare_text: str):
    """The C encoder releases the GIL; its lock keeps concurrent calls on one encoder apart."""
    from concurrent.futures import ThreadPoolExecutor

    c_tok, py_tok = both
    fresh = Tokenizer.from_merges(c_tok.merges)
    texts = [shakespeare_text[i : i + 50_000] for i in range(0, 800_000, 50_000)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(fresh.encode, texts))
    assert got == [py_tok.encode(t) for t in texts]


@pytest.mark.slow
def test_c_trainer_at_a_32k_vocabulary_equals_python(shakespeare_text: str, monkeypatch):
    """The full 32,768-token vocabulary (32,509 merges), where the counts run low and ties
    between pairs of equal count are many: Shakespeare plus 1.8 MB of seeded random words
    (letters of three scripts, so multi-byte characters merge too)."""
    import random

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyzéüßøçñ日本語кирилица"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 12)))
             for _ in range(12_000)]
    texts = [shakespeare_text, " ".join(rng.choice(words) for _ in range(150_000))]
    with_c = Tokenizer.train(texts, 32768)
    monkeypatch.setattr(pretokenize, "_native", None)
    without_c = Tokenizer.train(texts, 32768)
    assert without_c._native_encoder() is None
    assert with_c.vocab_size == 32768 and len(with_c.merges) == 32509
    assert without_c.merges == with_c.merges
    sample = shakespeare_text[-20_000:] + texts[1][-20_000:]
    assert without_c.encode(sample) == with_c.encode(sample)
