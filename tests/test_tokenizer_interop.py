"""Peers as oracles: Hugging Face `tokenizers` and `tiktoken` loading tinylm's tokenizer give the
same ids, and tinylm reads byte-level BPE files that `tokenizers` wrote."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinylm.chat import DEFAULT_SPECIAL_TOKENS, END_OF_TEXT, TURN_START
from tinylm.tokenizer import Tokenizer

tokenizers = pytest.importorskip("tokenizers")
tiktoken = pytest.importorskip("tiktoken")

MIXED = (
    'def square(x: int) -> int:\n    return x ** 2  # comment\n\tif x != 0: print(f"{x!r}")\n'
    "Ünïcödé façade — naïve café; 日本語のテキスト、中文文本。 Ελληνικά, русский текст.\n"
    "Emoji: 👩‍👩‍👧‍👦 🇫🇷 👍🏽 🎉🎉🎉 ✔️ ok\n"
    "Numbers: 1234567 3.14159 1,000,000 ١٢٣ ⅷ ½ x2y 99bottles\n"
    "Contractions: I'm, you're, he'll, they've, it's, WE'LL, DON'T 'tis\r\n"
    "  trailing   \n\n\n   \t  indented\n\u00a0nbsp \u3000ideographic\u2028sep\n"
    "<a href='x'>link</a> && || !== ... ??? ---\n\n"
)

TEXT_ALPHABET = st.one_of(
    st.characters(min_codepoint=32, max_codepoint=126),
    st.sampled_from("\n\r\t  'éü日本🎉👍🏽ſ\u00a0\u2028١٢٣½"),
)


@pytest.fixture(scope="module", params=["gpt4", "gpt2"])
def trained(request, shakespeare_text: str, tmp_path_factory):
    """(tinylm, tokenizers, tiktoken) for one tokenizer trained on Shakespeare + mixed text."""
    tok = Tokenizer.train([shakespeare_text, MIXED * 20], 1200, pattern=request.param)
    path = tok.save(tmp_path_factory.mktemp("tok"))
    return tok, tokenizers.Tokenizer.from_file(str(path)), tok.to_tiktoken()


def hf_ids(hf, text: str) -> list[int]:
    """Ids from `tokenizers` with special-token spellings read as plain text, as tinylm does."""
    hf.encode_special_tokens = True
    try:
        return hf.encode(text, add_special_tokens=False).ids
    finally:
        hf.encode_special_tokens = False


def test_same_ids_on_shakespeare(trained, shakespeare_text: str):
    tok, hf, enc = trained
    ids = tok.encode(shakespeare_text)
    assert ids == enc.encode_ordinary(shakespeare_text)
    assert ids == hf_ids(hf, shakespeare_text)
    assert hf.decode(ids) == shakespeare_text


def test_same_ids_on_code_unicode_and_emoji(trained):
    tok, hf, enc = trained
    for text in (MIXED, MIXED * 3, MIXED.upper(), " " + MIXED[::-1]):
        ids = tok.encode(text)
        assert ids == enc.encode_ordinary(text)
        assert ids == hf_ids(hf, text)


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=TEXT_ALPHABET, max_size=80))
def test_same_ids_on_random_text(trained, text: str):
    tok, hf, enc = trained
    ids = tok.encode(text)
    assert ids == enc.encode_ordinary(text)
    assert ids == hf_ids(hf, text)


def test_special_token_spellings_are_plain_text_like_the_peers(trained):
    tok, hf, enc = trained
    for text in (TURN_START, f"x{END_OF_TEXT}y", f"{TURN_START}user\nhi"):
        ids = tok.encode(text)
        assert ids == enc.encode_ordinary(text) == hf_ids(hf, text)
        assert not set(ids) & {tok.special_tokens[s] for s in DEFAULT_SPECIAL_TOKENS}


def test_special_tokens_like_tiktoken_and_tokenizers(trained):
    tok, hf, enc = trained
    text = f"a{END_OF_TEXT}b{TURN_START}user\nc"
    assert tok.encode(text) == enc.encode(text, disallowed_special=())
    assert tok.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")
    one = {END_OF_TEXT}
    assert tok.encode(text, allowed_special=one) == enc.encode(
        text, allowed_special=one, disallowed_special=()
    )
    # tokenizers matches added tokens by default: the same as tinylm with every special allowed.
    assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text, allowed_special="all")
    assert hf.get_vocab_size() == tok.vocab_size
    assert [hf.token_to_id(s) for s in DEFAULT_SPECIAL_TOKENS] == list(tok.special_tokens.values())


def test_custom_regex_matches_tokenizers(shakespeare_text: str, tmp_path):
    tok = Tokenizer.train([shakespeare_text[:50_000]], 600, pattern=r"\w+|\s+|[^\w\s]+")
    hf = tokenizers.Tokenizer.from_file(str(tok.save(tmp_path)))
    text = shakespeare_text[50_000:60_000] + MIXED
    assert tok.encode(text) == hf_ids(hf, text)


def test_reads_a_tokenizer_trained_by_tokenizers(shakespeare_text: str, tmp_path):
    """BpeTrainer puts specials first and bytes in character order: other ids, same behaviour."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(Tokenizer.bytes_only().pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=[END_OF_TEXT],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator([shakespeare_text[:200_000]], trainer=trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path)
    assert tok.vocab_size == hf.get_vocab_size() and tok.eot_id == 0
    text = shakespeare_text[200_000:230_000] + MIXED
    assert tok.encode(text) == hf_ids(hf, text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.to_tiktoken().encode_ordinary(text) == tok.encode(text)


def test_reads_gpt2_style_byte_level_files(trained, tmp_path, shakespeare_text: str):
    """A ByteLevel(use_regex=true) pre-tokenizer (GPT-2's files) means the gpt2 pattern."""
    tok = Tokenizer.train([shakespeare_text[:100_000]], 700, pattern="gpt2")
    doc = json.loads(tok.save(tmp_path / "ours").read_text())
    doc["pre_tokenizer"] = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": True,
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    loaded = Tokenizer.load(tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = shakespeare_text[100_000:120_000] + MIXED
    assert loaded.encode(text) == tok.encode(text) == hf_ids(hf, text)


def test_refuses_files_that_would_encode_differently(tmp_path):
    from tinylm.errors import TinyLMError

    doc = json.loads(Tokenizer.bytes_only().save(tmp_path / "ok").read_text())
    doc["normalizer"] = {"type": "NFC"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(TinyLMError, match="normalizer"):
        Tokenizer.load(tmp_path)
    doc["normalizer"] = None
    doc["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(TinyLMError, match="add_prefix_space"):
        Tokenizer.load(tmp_path)
