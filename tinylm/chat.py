"""The chat template and its special tokens, defined once for tokenize, finetune, dpo and chat.

The template is ChatML, the one SmolLM and Qwen use, so users recognise it and `transformers`
renders it from a short Jinja string:

    <|im_start|>system\n{content}<|im_end|>\n
    <|im_start|>user\n{content}<|im_end|>\n
    <|im_start|>assistant\n{content}<|im_end|>\n

Training puts loss on an assistant turn's content and its closing `<|im_end|>` only. A prompt
for generation ends with `<|im_start|>assistant\n` (`add_generation_prompt`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tinylm.errors import TinyLMError

if TYPE_CHECKING:
    from tinylm.tokenizer import Tokenizer

END_OF_TEXT = "<|endoftext|>"
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"

# Reserved in every tokenizer tinylm trains, in this order, at the end of the vocabulary.
DEFAULT_SPECIAL_TOKENS = (END_OF_TEXT, TURN_START, TURN_END)

ROLES = ("system", "user", "assistant")


def chat_template_jinja() -> str:
    """The template as the Jinja `chat_template` of a Hugging Face tokenizer_config.json.

    `tokenizer.apply_chat_template(messages, add_generation_prompt=...)` renders exactly the text
    above (no system prompt added, no BOS), so exported models chat as they were trained.
    """
    turn = f"'{TURN_START}' + message['role'] + '\\n' + message['content'] + '{TURN_END}\\n'"
    return (
        "{%- for message in messages %}{{ " + turn + " }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '" + TURN_START + "assistant\\n' }}{%- endif %}"
    )


GENERATION_PROMPT = f"{TURN_START}assistant\n"  # what the model continues to answer


@dataclass(frozen=True)
class ChatSegment:
    """A piece of a rendered conversation: one control token (`special`) or plain text;
    `target` marks what training puts loss on (an assistant's content and its <|im_end|>)."""

    text: str
    special: bool = False
    target: bool = False


def chat_segments(
    messages: Sequence[Mapping[str, str]],
    targets: Sequence[bool] | None = None,
    add_generation_prompt: bool = False,
) -> list[ChatSegment]:
    """The template as segments; `targets[i]` marks message i as trained on (default: every
    assistant turn). Training and generation both encode these, segment by segment, so the
    model sees the same ids for a conversation when it learns and when it answers."""
    if targets is None:
        targets = [m["role"] == "assistant" for m in messages]
    segments = []
    for message, target in zip(messages, targets, strict=True):
        segments.append(ChatSegment(TURN_START, special=True))
        segments.append(ChatSegment(f"{message['role']}\n"))
        if message["content"]:
            segments.append(ChatSegment(message["content"], target=target))
        segments.append(ChatSegment(TURN_END, special=True, target=target))
        segments.append(ChatSegment("\n"))
    if add_generation_prompt:
        segments.append(ChatSegment(TURN_START, special=True))
        segments.append(ChatSegment("assistant\n"))
    return segments


def render_chat(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    """The conversation as template text (what `chat_template_jinja` renders)."""
    return "".join(s.text for s in chat_segments(messages, None, add_generation_prompt))


def encode_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool = False,
) -> list[int]:
    """The conversation's token ids: control tokens as specials, every text (a user's literal
    "<|im_end|>" included) as plain text."""
    specials = tokenizer.special_tokens
    for token in (TURN_START, TURN_END):
        if token not in specials:
            raise TinyLMError(
                f"the tokenizer has no {token} token, which the chat template needs",
                "train the tokenizer with tinylm's default special tokens",
            )
    ids: list[int] = []
    for segment in chat_segments(messages, None, add_generation_prompt):
        ids.extend([specials[segment.text]] if segment.special else tokenizer.encode(segment.text))
    return ids


def fit_history(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], max_tokens: int
) -> tuple[list[Mapping[str, str]], list[int]]:
    """The conversation, oldest turns dropped (a system message is kept), until its prompt for
    the next answer has at most `max_tokens` ids; returns the kept messages and those ids."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = list(messages[len(system):])
    while True:
        ids = encode_chat(tokenizer, [*system, *turns], add_generation_prompt=True)
        if len(ids) <= max_tokens:
            return [*system, *turns], ids
        if len(turns) <= 1:
            raise TinyLMError(
                f"the message needs {len(ids)} tokens with the chat template; at most "
                f"{max_tokens} fit the context", "send a shorter message")
        turns = turns[1:]
        while turns and turns[0]["role"] != "user":
            turns = turns[1:]  # keep the history starting at a user turn
