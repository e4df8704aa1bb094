"""RL prompts: JSONL of {"prompt", "answer", ...} rows, validated line by line.

`prompt` is a string (one user turn) or a message list (the conversation so far, TRL's
conversational form); the model answers it as the next assistant turn through the chat
template. Every other field of the row is kept and handed to the reward functions, so a
reward can check an `answer`, a list of test cases, or anything else the row carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinylm.errors import TinyLMError
from tinylm.sft.data import BadExample, Message, check_messages
from tinylm.textio import iter_jsonl


@dataclass(frozen=True)
class RLPrompt:
    """One row: the conversation to answer, the row as read, and where it came from."""

    messages: tuple[Message, ...]
    row: dict[str, Any]
    source: str  # "file:line", for error messages

    @property
    def text(self) -> str:
        """The question as the reward functions see it: the last message's content."""
        return self.messages[-1]["content"]


def to_prompt_messages(value: Any) -> tuple[Message, ...]:
    """A row's "prompt" as messages; `BadExample` says what is wrong with it."""
    if isinstance(value, str):
        if not value.strip():
            raise BadExample('"prompt" is empty')
        return ({"role": "user", "content": value},)
    if not isinstance(value, list):
        raise BadExample('"prompt" must be a string or a list of {"role", "content"} messages')
    messages = check_messages(value, "prompt")
    if messages[-1]["role"] == "assistant":
        raise BadExample('"prompt" ends with an assistant turn; the model writes the next one, '
                         "so end it with a user turn")
    return messages


def read_rl_prompts(paths: list[Path], required: tuple[str, ...] = ()) -> list[RLPrompt]:
    """Every row of the JSONL files, in order. `required` names fields each row must have
    (for example "answer" for the `exact` reward). Errors name file:line."""
    prompts = []
    for path in paths:
        path, before = Path(path), len(prompts)
        for lineno, obj in iter_jsonl(path, "check the path given to --data"):
            where = f"{path}:{lineno}"
            if not isinstance(obj, dict) or "prompt" not in obj:
                raise TinyLMError(f'{where}: expected an object with a "prompt" (a string or '
                                  "messages)", 'RL data is {"prompt": ..., "answer": ...} a line')
            try:
                messages = to_prompt_messages(obj["prompt"])
            except BadExample as exc:
                raise TinyLMError(f"{where}: {exc}") from None
            for key in required:
                if key not in obj:
                    raise TinyLMError(f'{where}: no "{key}" field, which the reward needs',
                                      f'add "{key}" to every line, or choose another --reward')
            prompts.append(RLPrompt(messages, obj, where))
        if len(prompts) == before:
            raise TinyLMError(f"{path}: no prompts (the file is empty)")
    return prompts
