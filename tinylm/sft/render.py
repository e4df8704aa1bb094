"""Conversations to token ids and a loss mask, built segment by segment from the chat template.

`tinylm.chat.chat_segments` renders the ChatML template as segments: control tokens, role
headers and contents. Each segment is encoded on its own and carries its own `target` flag,
so the mask is known exactly while rendering; nothing ever searches for the template in the
ids (searching silently drops examples when a boundary tokenizes differently). Control tokens
are looked up as specials; every text, a user's literal "<|im_end|>" included, is plain text.

A `TokenizedExample` of n tokens trains n - 1 predictions: token t + 1 is the target of position
t, counted when `loss_mask[t + 1]` is True (see `tinylm.sft.batch`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tinylm.chat import TURN_END, TURN_START, ChatSegment, chat_segments
from tinylm.errors import TinyLMError
from tinylm.sft.data import Conversation, Message, PreferencePair

if TYPE_CHECKING:
    from tinylm.tokenizer import Tokenizer


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids and, per token, whether the model is trained to produce it."""

    input_ids: list[int]
    loss_mask: list[bool]

    @property
    def n_targets(self) -> int:
        """How many tokens are trained on (the first token has nothing before it to predict it)."""
        return sum(self.loss_mask[1:])


@dataclass
class EncodeStats:
    """What happened to the examples: kept, truncated to the context, skipped (no target left)."""

    examples: int = 0
    kept: int = 0
    truncated: int = 0
    skipped: int = 0
    tokens: int = 0
    target_tokens: int = 0
    skipped_sources: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        """The counts, for printing and metrics.jsonl."""
        return {
            "examples": self.examples,
            "kept": self.kept,
            "truncated": self.truncated,
            "skipped": self.skipped,
            "tokens": self.tokens,
            "target_tokens": self.target_tokens,
        }


def response_mask(lengths: Sequence[int], targets: Sequence[bool]) -> list[bool]:
    """The per-token loss mask of segments of `lengths` tokens, each trained on or not."""
    mask: list[bool] = []
    for length, target in zip(lengths, targets, strict=True):
        mask.extend([bool(target)] * length)
    return mask


def _special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    specials = tokenizer.special_tokens
    for token in (TURN_START, TURN_END):
        if token not in specials:
            raise TinyLMError(
                f"the tokenizer has no {token} token, which the chat template needs",
                "train the tokenizer with tinylm's default special tokens",
            )
    return specials


def encode_segments_batch(
    tokenizer: Tokenizer, conversations: Sequence[Sequence[ChatSegment]]
) -> list[TokenizedExample]:
    """Encode many segment lists: texts as plain text (one batched call), controls as specials."""
    specials = _special_ids(tokenizer)
    texts = sorted({s.text for segs in conversations for s in segs if not s.special})
    encoded = dict(zip(texts, tokenizer.encode_batch(texts), strict=True)) if texts else {}
    examples = []
    for segments in conversations:
        pieces = [[specials[s.text]] if s.special else encoded[s.text] for s in segments]
        ids = [i for piece in pieces for i in piece]
        mask = response_mask([len(p) for p in pieces], [s.target for s in segments])
        examples.append(TokenizedExample(ids, mask))
    return examples


def encode_segments(tokenizer: Tokenizer, segments: Sequence[ChatSegment]) -> TokenizedExample:
    """Encode one segment list (see `encode_segments_batch`)."""
    return encode_segments_batch(tokenizer, [segments])[0]


def encode_example(
    tokenizer: Tokenizer, messages: Sequence[Message], targets: Sequence[bool] | None = None
) -> TokenizedExample:
    """A conversation's ids and loss mask; by default every assistant turn (content and its
    <|im_end|>) is a target. The ids equal `tinylm.chat.encode_chat`'s."""
    return encode_segments(tokenizer, chat_segments(messages, targets))


def truncate(example: TokenizedExample, max_tokens: int) -> TokenizedExample:
    """The first `max_tokens` tokens of an example (the start of a conversation is kept)."""
    return TokenizedExample(example.input_ids[:max_tokens], example.loss_mask[:max_tokens])


def _fit(example: TokenizedExample, max_tokens: int, stats: EncodeStats) -> TokenizedExample | None:
    """Truncate to the window and count; None (counted as skipped) when no target is left."""
    if len(example.input_ids) > max_tokens:
        example = truncate(example, max_tokens)
        stats.truncated += 1
    if example.n_targets == 0:
        return None
    return example


def encode_conversations(
    tokenizer: Tokenizer, conversations: Sequence[Conversation], context_length: int
) -> tuple[list[TokenizedExample], EncodeStats]:
    """Tokenize instruction examples for a model of `context_length` positions.

    A window trains `context_length` predictions, so an example keeps at most
    `context_length + 1` tokens; longer ones are truncated (counted) and any with no target
    token left are skipped (counted, their sources kept in `stats.skipped_sources`).
    """
    stats = EncodeStats(examples=len(conversations))
    encoded = encode_segments_batch(tokenizer, [chat_segments(c.messages) for c in conversations])
    kept = []
    for conversation, example in zip(conversations, encoded, strict=True):
        fitted = _fit(example, context_length + 1, stats)
        if fitted is None:
            stats.skipped += 1
            stats.skipped_sources.append(conversation.source)
            continue
        kept.append(fitted)
        stats.tokens += len(fitted.input_ids)
        stats.target_tokens += fitted.n_targets
    stats.kept = len(kept)
    return kept, stats


def pair_segments(pair: PreferencePair) -> tuple[list[ChatSegment], list[ChatSegment]]:
    """Segments of prompt + chosen and prompt + rejected; only the responses' assistant turns
    are targets (assistant turns inside the prompt are context)."""

    def render(response: Iterable[Message]) -> list[ChatSegment]:
        messages = [*pair.prompt, *response]
        targets = [False] * len(pair.prompt) + [m["role"] == "assistant" for m in response]
        return chat_segments(messages, targets)

    return render(pair.chosen), render(pair.rejected)


def encode_pairs(
    tokenizer: Tokenizer, pairs: Sequence[PreferencePair], context_length: int
) -> tuple[list[tuple[TokenizedExample, TokenizedExample]], EncodeStats]:
    """Tokenize preference pairs as (prompt + chosen, prompt + rejected) with response masks.

    Truncation and skipping work as in `encode_conversations`, per side; a pair is skipped when
    either side has no target left. `stats` counts pairs (truncated: pairs with a side cut).
    """
    stats = EncodeStats(examples=len(pairs))
    flat = [segs for pair in pairs for segs in pair_segments(pair)]
    encoded = encode_segments_batch(tokenizer, flat)
    kept = []
    for i, pair in enumerate(pairs):
        side_stats = EncodeStats()
        chosen = _fit(encoded[2 * i], context_length + 1, side_stats)
        rejected = _fit(encoded[2 * i + 1], context_length + 1, side_stats)
        stats.truncated += side_stats.truncated > 0
        if chosen is None or rejected is None:
            stats.skipped += 1
            stats.skipped_sources.append(pair.source)
            continue
        kept.append((chosen, rejected))
        stats.tokens += len(chosen.input_ids) + len(rejected.input_ids)
        stats.target_tokens += chosen.n_targets + rejected.n_targets
    stats.kept = len(kept)
    return kept, stats
