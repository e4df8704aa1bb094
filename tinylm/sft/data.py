"""Reading instruction and preference data: three instruction formats, TRL's preference pairs.

Instruction data is JSONL (one example a line; .jsonl.gz and .jsonl.zst too) or parquet (one
example a row, as Hugging Face `datasets` exports them: a `messages` column of message lists
like SmolTalk, `chosen` / `rejected` message lists like UltraFeedback), in one of three formats
(detected per file from its first example; every example must then fit it):

    messages            {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
    prompt_completion   {"prompt": ..., "completion": ...}   (strings, or message lists as TRL)
    alpaca              {"instruction": ..., "input": ..., "output": ...}   ("input" optional)

All become a list of messages; the assistant turns are what the model learns to write.
Preference data is `{"prompt", "chosen", "rejected"}` with strings or message lists, or, as TRL
also accepts, just `{"chosen", "rejected"}` conversations whose shared start is the prompt (also
when a "prompt" string comes with two whole conversations, as in UltraFeedback; TRL then takes
the prompt from the conversations too).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinylm.chat import ROLES
from tinylm.errors import TinyLMError
from tinylm.formats import iter_parquet_rows, open_parquet
from tinylm.sources import classify
from tinylm.textio import iter_jsonl

Message = dict[str, str]
"""One turn: {"role": "system" | "user" | "assistant", "content": str}."""

FORMATS = ("messages", "prompt_completion", "alpaca")
FORMAT_KEYS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
}
_EXPECTED = (
    'expected {"messages": [...]}, {"prompt", "completion"} or {"instruction", "input", "output"}'
)


INSTRUCTION_COLUMNS = {"messages", "prompt", "completion", "instruction", "input", "output",
                       "chosen", "rejected"}
PREFERENCE_COLUMNS = {"prompt", "chosen", "rejected"}


class BadExample(ValueError):
    """What is wrong with one line; the reader adds the file and line number."""


def iter_records(path: str | Path, columns: set[str]) -> Iterator[tuple[str, Any]]:
    """(where, object) for each example of a JSONL file ("file:line") or a parquet file
    ("file: row group G, row R"; only `columns`, null values left out)."""

    path = Path(path)
    if (classify(path) or ("",))[0] != "parquet":
        for lineno, obj in iter_jsonl(path):
            yield f"{path}:{lineno}", obj
        return

    names = open_parquet(path).schema_arrow.names
    if not columns & set(names):
        raise TinyLMError(f"{path}: no column of an instruction or preference format "
                          f"(columns: {', '.join(names) or 'none'})", _EXPECTED)
    yield from iter_parquet_rows(path, columns)


@dataclass(frozen=True)
class Conversation:
    """One instruction example as messages, and where it came from ("file:line")."""

    messages: tuple[Message, ...]
    source: str = ""

    @property
    def reference(self) -> tuple[tuple[Message, ...], str] | None:
        """(the conversation before the last assistant turn, that turn's text), for exact match."""
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i]["role"] == "assistant":
                return self.messages[:i], self.messages[i]["content"]
        return None


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (the conversation so far) and a preferred and a dispreferred continuation."""

    prompt: tuple[Message, ...]
    chosen: tuple[Message, ...]
    rejected: tuple[Message, ...]
    source: str = ""

    @property
    def identical(self) -> bool:
        """True when chosen and rejected are the same text (such a pair teaches nothing)."""
        return self.chosen == self.rejected


def detect_format(obj: Any) -> str | None:
    """The instruction format a parsed JSONL line fits ("messages", ...), or None."""
    if not isinstance(obj, dict):
        return None
    for name in FORMATS:
        if all(key in obj for key in FORMAT_KEYS[name]):
            return name
    return None


def check_messages(messages: Any, what: str = "messages") -> tuple[Message, ...]:
    """Validate a message list (roles, string contents, non-empty assistant turns)."""
    if not isinstance(messages, list) or not messages:
        raise BadExample(f'"{what}" must be a non-empty list of {{"role", "content"}} objects')
    checked = []
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise BadExample(f'{what}[{i}] must be an object with "role" and "content"')
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise BadExample(f"{what}[{i}] has role {role!r}; expected one of {', '.join(ROLES)}")
        if role == "system" and i > 1:
            raise BadExample(f'{what}[{i}] is a "system" message; only the first may be one')
        if not isinstance(content, str):
            raise BadExample(f'{what}[{i}] "content" must be a string')
        if role == "assistant" and not content.strip():
            raise BadExample(f"{what}[{i}] is an empty assistant turn; give it text or drop it")
        checked.append({"role": role, "content": content})
    return tuple(checked)


def _as_turns(value: Any, key: str, role: str) -> tuple[Message, ...]:
    """A string as one `role` message, or a message list as is (TRL's two conventions)."""
    if isinstance(value, str):
        if role == "assistant" and not value.strip():
            raise BadExample(f'"{key}" is empty; the assistant turn needs text')
        return ({"role": role, "content": value},)
    if isinstance(value, list):
        return check_messages(value, key)
    raise BadExample(f'"{key}" must be a string or a list of messages')


def _require_assistant(messages: Sequence[Message], what: str) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise BadExample(f"{what} has no assistant turn; there is nothing to learn")


def to_messages(obj: dict[str, Any], fmt: str) -> tuple[Message, ...]:
    """A parsed line of format `fmt` as a message list; `BadExample` says what is wrong."""
    if fmt == "messages":
        messages = check_messages(obj["messages"])
        _require_assistant(messages, '"messages"')
        return messages
    if fmt == "prompt_completion":
        prompt = _as_turns(obj["prompt"], "prompt", "user")
        completion = _as_turns(obj["completion"], "completion", "assistant")
        if completion[0]["role"] == "system":
            raise BadExample('"completion" cannot start with a system message')
        _require_assistant(completion, '"completion"')
        return prompt + completion
    instruction, output, extra = obj["instruction"], obj["output"], obj.get("input", "")
    for key, value in (("instruction", instruction), ("input", extra), ("output", output)):
        if not isinstance(value, str):
            raise BadExample(f'"{key}" must be a string')
    if not output.strip():
        raise BadExample('"output" is empty; the assistant turn needs text')
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return ({"role": "user", "content": user}, {"role": "assistant", "content": output})


def read_conversations(path: str | Path) -> list[Conversation]:
    """All examples of an instruction JSONL or parquet file; the format is detected from the
    first example.

    Raises `TinyLMError` naming `file:line` (or row group and row) for bad JSON, an example that
    fits no format (or not the file's format), a wrong role or an empty assistant turn, and for
    a file with no examples.
    """
    path = Path(path)
    fmt: str | None = None
    conversations = []
    for where, obj in iter_records(path, INSTRUCTION_COLUMNS):
        if not isinstance(obj, dict):
            raise TinyLMError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        found = detect_format(obj)
        if found is None:
            hint = "for preference pairs use tinylm dpo" if "chosen" in obj else None
            keys = ", ".join(sorted(obj)) or "none"
            message = f"{where}: fits no instruction format (keys: {keys}); {_EXPECTED}"
            raise TinyLMError(message, hint)
        if fmt is None:
            fmt = found
        elif found != fmt:
            raise TinyLMError(
                f"{where}: line is in the {found!r} format but the file started in {fmt!r}",
                "use one format per file",
            )
        try:
            conversations.append(Conversation(to_messages(obj, fmt), where))
        except BadExample as exc:
            raise TinyLMError(f"{where}: {exc}") from None
    if not conversations:
        raise TinyLMError(f"{path}: no examples (the file is empty)")
    return conversations


def _shared_prefix(a: Sequence[Message], b: Sequence[Message]) -> int:
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    return n


def _is_conversation(value: Any) -> bool:
    """A message list that starts before the answer (with a user or system turn)."""
    return (isinstance(value, list) and bool(value) and isinstance(value[0], dict)
            and value[0].get("role") in ("user", "system"))


def to_pair(obj: Any) -> tuple[tuple[Message, ...], tuple[Message, ...], tuple[Message, ...]]:
    """A parsed preference line as (prompt, chosen, rejected) message tuples."""
    if not isinstance(obj, dict) or "chosen" not in obj or "rejected" not in obj:
        raise BadExample('expected {"prompt", "chosen", "rejected"} (strings or message lists)')
    whole = (isinstance(obj.get("prompt"), str) and _is_conversation(obj["chosen"])
             and _is_conversation(obj["rejected"]))
    if "prompt" in obj and not whole:
        prompt = _as_turns(obj["prompt"], "prompt", "user")
        chosen = _as_turns(obj["chosen"], "chosen", "assistant")
        rejected = _as_turns(obj["rejected"], "rejected", "assistant")
    else:
        # TRL's implicit prompt: two whole conversations whose shared start is the prompt (a
        # "prompt" string beside them, as UltraFeedback has, repeats their first user turn).
        whole_chosen = _as_turns(obj["chosen"], "chosen", "assistant")
        whole_rejected = _as_turns(obj["rejected"], "rejected", "assistant")
        n = _shared_prefix(whole_chosen, whole_rejected)
        if n == 0:
            raise BadExample('no "prompt" and chosen/rejected share no opening messages')
        prompt, chosen, rejected = whole_chosen[:n], whole_chosen[n:], whole_rejected[n:]
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[0]["role"] == "system":
            raise BadExample(f'"{key}" cannot start with a system message')
        _require_assistant(turns, f'"{key}"')
    return prompt, chosen, rejected


def read_preference_pairs(path: str | Path) -> list[PreferencePair]:
    """All pairs of a preference JSONL or parquet file; `TinyLMError` naming `file:line` (or
    row group and row) for a bad example."""
    path = Path(path)
    pairs = []
    for where, obj in iter_records(path, PREFERENCE_COLUMNS):
        try:
            prompt, chosen, rejected = to_pair(obj)
        except BadExample as exc:
            raise TinyLMError(f"{where}: {exc}") from None
        pairs.append(PreferencePair(prompt, chosen, rejected, where))
    if not pairs:
        raise TinyLMError(f"{path}: no preference pairs (the file is empty)")
    return pairs


def read_all(paths: Iterable[str | Path]) -> list[Conversation]:
    """`read_conversations` over several files (each may use its own format)."""
    return [c for path in paths for c in read_conversations(path)]
