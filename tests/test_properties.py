"""Properties that must hold for any input (hypothesis; derandomized by the "ci" profile in
conftest.py, so a failure repeats):

- the tokenizer round-trips every string (all of Unicode but lone surrogates, special-token
  spellings included), whatever its split pattern (test_tokenizer.py checks the gpt4 one);
- encoding is a pure function of the text: alone or in a batch, on threads or processes, by
  the C or the pure-Python encoder, and streamed from a file in pieces of any size;
- the SFT loss mask marks exactly the assistant turns' content and their <|im_end|>, never a
  prompt token, in every instruction format, truncated or not; for DPO only the responses;
- the DPO loss is symmetric: swapping chosen and rejected negates the margin.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinylm import data, textio
from tinylm.chat import DEFAULT_SPECIAL_TOKENS, TURN_END
from tinylm.losses import DPO_LOSS_TYPES, dpo_loss
from tinylm.sft import encode_conversations, encode_pairs, read_conversations
from tinylm.sft.data import read_preference_pairs
from tinylm.tokenizer import Tokenizer
from tinylm.tokenizer import tokenizer as tokenizer_module

CORPUS = [
    "Hello world! It's 2024: naïve café, Ünïcödé; 東京 and emoji 👩‍👩‍👧 ok.\n\n"
    "  indented  lines\r\n\ttabs and <|im_end|> <|endoftext|> 12345 67\n" * 20
]
TOKENIZERS = {
    "bytes": Tokenizer.bytes_only(),
    "gpt4": Tokenizer.train(CORPUS, 400, pattern="gpt4"),
    "gpt2": Tokenizer.train(CORPUS, 400, pattern="gpt2"),
    "custom": Tokenizer.train(CORPUS, 320, pattern=r"\w+|\s+|[^\w\s]+"),
}
END = TOKENIZERS["bytes"].special_tokens[TURN_END]

# Text as users have it: any Unicode, plus the pieces that stress a tokenizer or a template.
PIECES = st.sampled_from(
    [
        *DEFAULT_SPECIAL_TOKENS,
        "\r\n",
        "\n\n",
        "   ",
        "\t",
        "'s",
        "123456",
        "👩‍👩‍👧",
        "é",
        "\u200b",
        "\ufeff",
        "<|",
        "|>",
        "assistant\n",
    ]
)
TEXT = st.lists(st.one_of(st.text(max_size=12), PIECES), max_size=8).map("".join)


@settings(max_examples=60, deadline=None)
@given(text=TEXT, name=st.sampled_from(sorted(TOKENIZERS)))
def test_any_text_round_trips(text: str, name: str):
    tok = TOKENIZERS[name]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(tok.encode(text, allowed_special="all")) == text


@settings(max_examples=25, deadline=None)
@given(
    texts=st.lists(TEXT, min_size=1, max_size=6), name=st.sampled_from(["gpt4", "gpt2", "custom"])
)
def test_encoding_does_not_depend_on_the_batch(texts: list[str], name: str):
    """Threads for the built-in patterns, processes for a custom one (a few examples only:
    each starts a pool)."""
    tok = TOKENIZERS[name]
    alone = [tok.encode(t) for t in texts]
    python = Tokenizer.from_merges(tok.merges, tok.pattern)
    python._native_encoder = lambda: None  # type: ignore[method-assign]
    assert [python.encode(t) for t in texts] == alone
    assert tok.encode_batch(texts, num_workers=1) == alone
    assert tok.encode_batch(texts[::-1], num_workers=1) == alone[::-1]
    if name != "custom" or len(texts) > 4:  # keep the process pools few
        with mock.patch.object(tokenizer_module, "_PARALLEL_MIN_CHARS", 0):
            assert tok.encode_batch(texts, num_workers=2) == alone


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(TEXT, min_size=1, max_size=8),
    read_bytes=st.integers(1, 9),
    max_chars=st.integers(1, 40),
    bom=st.booleans(),
    name=st.sampled_from(["bytes", "gpt4", "gpt2"]),
)
def test_a_file_streamed_in_pieces_encodes_like_the_whole(lines, read_bytes, max_chars, bom, name):
    """textio cuts a corpus only where a GPT-style split pattern would cut it anyway, and
    data.py encodes piece by piece: the ids equal those of the whole text, for any block and
    piece size (a character or the byte order mark cut by a block included)."""
    tok = TOKENIZERS[name]
    written = "\n".join(lines).replace("\x00", "")  # a NUL makes it a binary file
    text = written if bom else written.removeprefix("\ufeff")  # a leading one is a BOM
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        path = Path(tmp) / "corpus.txt"
        path.write_bytes(b"\xef\xbb\xbf" * bom + written.encode("utf-8"))
        stack.enter_context(mock.patch.object(textio, "READ_BYTES", read_bytes))
        stack.enter_context(mock.patch.object(data, "PIECE_CHARS", max_chars))
        pieces = list(textio.iter_text([path], max_chars=max_chars))
        assert "".join(p.text for p in pieces) == text
        if not text:
            return
        assert [p.doc_end for p in pieces] == [False] * (len(pieces) - 1) + [True]
        assert [i for p in pieces for i in tok.encode(p.text)] == tok.encode(text)
        stream = data.encode_corpus([path], tok, Path(tmp) / "cache")
        assert stream.read(0, len(stream)).tolist() == [*tok.encode(text), tok.eot_id]


# --- the response mask --------------------------------------------------------------------

CONTENT = TEXT
ANSWER = TEXT.filter(lambda s: s.strip())
TURN = st.tuples(st.sampled_from(["user", "assistant"]), CONTENT)


def _messages(turns, system) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system is not None else []
    for role, content in turns:
        content = content if role == "user" or content.strip() else "fine"
        messages.append({"role": role, "content": content})
    return messages


def _assistant(messages) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "assistant"]


@st.composite
def instruction_lines(draw) -> tuple[dict, list[str]]:
    """(a JSONL object in one of the formats, the texts of its assistant turns in order)."""
    fmt = draw(st.sampled_from(["messages", "strings", "lists", "alpaca", "alpaca_no_input"]))
    if fmt == "messages":
        messages = _messages(
            draw(st.lists(TURN, min_size=1, max_size=5)), draw(st.none() | CONTENT)
        )
        if not _assistant(messages):
            messages.append({"role": "assistant", "content": draw(ANSWER)})
        return {"messages": messages}, _assistant(messages)
    if fmt == "strings":
        answer = draw(ANSWER)
        return {"prompt": draw(CONTENT), "completion": answer}, [answer]
    if fmt == "lists":
        prompt = _messages(draw(st.lists(TURN, min_size=1, max_size=3)), None)
        completion = [
            {"role": "assistant", "content": a}
            for a in draw(st.lists(ANSWER, min_size=1, max_size=2))
        ]
        return {"prompt": prompt, "completion": completion}, _assistant(prompt + completion)
    answer = draw(ANSWER)
    line = {"instruction": draw(CONTENT), "output": answer, "id": 7}
    if fmt == "alpaca":
        line["input"] = draw(CONTENT)
    return line, [answer]


def masked_runs(example) -> list[list[int]]:
    """The token ids of each maximal run of trained positions."""
    runs: list[list[int]] = []
    previous = False
    for token, masked in zip(example.input_ids, example.loss_mask, strict=True):
        if masked:
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = masked
    return runs


def assert_runs_are_the_answers(tok, example, answers, context) -> None:
    """Every trained run is an answer's ids + <|im_end|>, in order; only the last may be cut
    short, and only when the example was cut to the window."""
    expected = [[*tok.encode(a), tok.special_tokens[TURN_END]] for a in answers]
    runs = masked_runs(example)
    truncated = len(example.input_ids) == context + 1
    assert runs[:-1] == expected[: len(runs) - 1]
    last, whole = runs[-1], expected[len(runs) - 1]
    assert last == whole or (truncated and last == whole[: len(last)])
    if not truncated:
        assert runs == expected


@settings(max_examples=80, deadline=None)
@given(
    item=instruction_lines(), context=st.integers(2, 200), name=st.sampled_from(["bytes", "gpt4"])
)
def test_the_loss_mask_marks_only_assistant_turns(item, context, name):
    line, answers = item
    tok = TOKENIZERS[name]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sft.jsonl"
        path.write_text(json.dumps(line) + "\n", encoding="utf-8")
        (conversation,) = read_conversations(path)
    examples, stats = encode_conversations(tok, [conversation], context)
    assert stats.kept + stats.skipped == 1
    if examples:
        assert_runs_are_the_answers(tok, examples[0], answers, context)


@st.composite
def preference_lines(draw) -> tuple[dict, list[str], list[str]]:
    """(a preference JSONL object, the chosen and the rejected assistant texts)."""
    as_messages = draw(st.booleans())
    chosen, rejected = (
        draw(st.lists(ANSWER, min_size=1, max_size=2)),
        draw(st.lists(ANSWER, min_size=1, max_size=2)),
    )
    if not as_messages:
        return (
            {"prompt": draw(CONTENT), "chosen": chosen[0], "rejected": rejected[0]},
            chosen[:1],
            rejected[:1],
        )
    prompt = _messages(draw(st.lists(TURN, min_size=1, max_size=3)), draw(st.none() | CONTENT))

    def side(answers):
        return [{"role": "assistant", "content": a} for a in answers]

    if draw(st.booleans()):  # TRL's implicit prompt: two whole conversations
        line = {"chosen": prompt + side(chosen), "rejected": prompt + side(rejected)}
        if chosen[0] == rejected[0]:
            return line, [], []  # the shared start then takes the first answer too: skip
        return line, chosen, rejected
    return {"prompt": prompt, "chosen": side(chosen), "rejected": side(rejected)}, chosen, rejected


@settings(max_examples=60, deadline=None)
@given(
    item=preference_lines(), context=st.integers(2, 200), name=st.sampled_from(["bytes", "gpt4"])
)
def test_dpo_masks_mark_only_the_responses(item, context, name):
    line, chosen, rejected = item
    if not chosen:
        return
    tok = TOKENIZERS[name]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pairs.jsonl"
        path.write_text(json.dumps(line) + "\n", encoding="utf-8")
        pairs = read_preference_pairs(path)
    encoded, _ = encode_pairs(tok, pairs, context)
    for chosen_example, rejected_example in encoded:
        assert_runs_are_the_answers(tok, chosen_example, chosen, context)
        assert_runs_are_the_answers(tok, rejected_example, rejected, context)


# --- DPO's loss -----------------------------------------------------------------------------

LOGP = st.floats(-60, 0, allow_nan=False)


@settings(max_examples=100, deadline=None)
@given(
    logps=st.tuples(LOGP, LOGP, LOGP, LOGP),
    beta=st.floats(0.01, 2.0),
    smoothing=st.floats(0.0, 0.49),
    loss_type=st.sampled_from(DPO_LOSS_TYPES),
    shift=st.floats(-20, 20),
)
def test_dpo_loss_swapping_chosen_and_rejected_negates_the_margin(
    logps, beta, smoothing, loss_type, shift
):
    pc, pr, rc, rr = (torch.tensor([x], dtype=torch.float64) for x in logps)
    smoothing = smoothing if loss_type == "sigmoid" else 0.0
    loss, chosen_reward, rejected_reward = dpo_loss(pc, pr, rc, rr, beta, loss_type, smoothing)
    swapped, swapped_chosen, swapped_rejected = dpo_loss(pr, pc, rr, rc, beta, loss_type, smoothing)
    # The rewards trade places, so the margin (chosen - rejected) changes sign.
    assert torch.equal(swapped_chosen, rejected_reward)
    assert torch.equal(swapped_rejected, chosen_reward)
    margin = (chosen_reward - rejected_reward).item()
    # The loss depends on the margin alone: the same margin from other log-probs, the swapped
    # pair equals a pair whose margin is the negated one.
    zero = torch.zeros(1, dtype=torch.float64)
    negated, _, _ = dpo_loss(
        zero,
        torch.tensor([margin / beta], dtype=torch.float64),
        zero,
        zero,
        beta,
        loss_type,
        smoothing,
    )
    assert swapped.item() == pytest.approx(negated.item(), rel=1e-9, abs=1e-9)
    shifted, _, _ = dpo_loss(
        pc + shift, pr + shift, rc - shift, rr - shift, beta, loss_type, smoothing
    )
    assert shifted.item() == pytest.approx(loss.item(), rel=1e-9, abs=1e-9)
    # And in closed form: -log s(x) + log s(-x) = -x for the sigmoid loss, with smoothing e
    # the swapped pair is the pair smoothed by 1 - e; IPO's (m - c)^2 - (m + c)^2 = -4mc.
    if loss_type == "sigmoid":
        assert (loss - swapped).item() == pytest.approx(
            -(1 - 2 * smoothing) * margin, rel=1e-9, abs=1e-9
        )
    elif loss_type == "ipo":
        delta = margin / beta
        assert (loss - swapped).item() == pytest.approx(-2 * delta / beta, rel=1e-9, abs=1e-6)
    else:
        assert (loss - swapped).item() == pytest.approx(
            max(0.0, 1 - margin) - max(0.0, 1 + margin), abs=1e-12
        )
