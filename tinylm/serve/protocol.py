"""The OpenAI request bodies, checked: what `/v1/completions` and `/v1/chat/completions` accept,
turned into prompt ids and a `SamplingConfig`, or an `APIError` with OpenAI's error JSON.

Accepted: `model` (the served one; may be left out), `prompt` (a string, a list of strings, a
list of token ids or a list of such lists) or `messages` (roles system/developer/user/assistant,
content a string or a list of text parts), `max_tokens` (or `max_completion_tokens`),
`temperature` (0 to 2; 0 is greedy), `top_p` (0 to 1; 0 keeps only the likeliest token), `n`,
`stop` (a string or up to 4), `seed` (choice i draws from its own generator seeded `seed + i`,
so choice 0 repeats `tinylm generate --seed S --top-k 0`), `stream`,
`stream_options.include_usage`. Other fields (`logprobs`, `presence_penalty`, `user`, ...) are
ignored, as OpenAI-compatible servers do, so clients that send them keep working.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tinylm.chat import encode_chat
from tinylm.errors import TinyLMError
from tinylm.generate import SamplingConfig
from tinylm.nesting import loads_json

if TYPE_CHECKING:
    from tinylm.tokenizer import Tokenizer

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_STOPS = 4


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        """OpenAI's error type for the status."""
        if self.status >= 500:
            return "server_error"
        return "authentication_error" if self.status == 401 else "invalid_request_error"

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass
class Job:
    """A checked request: prompts (one engine request each), how to sample, how to answer."""

    prompts: list[list[int]]
    config: SamplingConfig
    n: int
    stream: bool
    include_usage: bool


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400."""
    try:
        body = loads_json(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def check_model(body: dict[str, Any], served: str) -> None:
    """A 400 unless `model` is absent or names the served model."""
    model = body.get("model")
    if model is not None and model != served:
        raise APIError(400, f"the model {model!r} does not exist; this server has {served!r}",
                       "model", "model_not_found")


def _number(body: dict[str, Any], key: str, default: float | None, low: float, high: float,
            integer: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise APIError(400, f"{key} must be {'an integer' if integer else 'a number'}, "
                       f"got {json.dumps(value)}", key)
    if not low <= value <= high:
        raise APIError(400, f"{key} must be between {low} and {high}, got {value}", key)
    return value


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "stop must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"stop takes at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    return tuple(stops)


def _flag(body: dict[str, Any], key: str, where: dict[str, Any] | None = None) -> bool:
    value = (body if where is None else where).get(key)
    if value is not None and not isinstance(value, bool):
        raise APIError(400, f"{key} must be true or false, got {json.dumps(value)}", key)
    return bool(value)


def build_job(body: dict[str, Any], prompts: list[list[int]], context: int, max_n: int,
              chat: bool) -> Job:
    """The sampling settings of `body` for `prompts`, checked against the context."""
    key = "max_completion_tokens" if body.get("max_tokens") is None else "max_tokens"
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise APIError(400, f"the prompt is {longest} tokens; this model's maximum context "
                       f"length is {context} tokens", "messages" if chat else "prompt",
                       "context_length_exceeded")
    room = context - longest
    default = room if chat else min(DEFAULT_COMPLETION_TOKENS, room)
    max_tokens = _number(body, key, default, 1, 2**31, integer=True)
    if longest + max_tokens > context:
        raise APIError(400, f"this model's maximum context length is {context} tokens; you "
                       f"asked for {longest + max_tokens} ({longest} in the prompt, {max_tokens} "
                       f"in the completion)", key, "context_length_exceeded")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = max(_number(body, "top_p", 1.0, 0.0, 1.0), 1e-9)  # 0: only the likeliest token
    seed = _number(body, "seed", None, -(2**63), 2**63 - 1, integer=True)
    n = _number(body, "n", 1, 1, max_n, integer=True)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", "stream_options")
    try:
        config = SamplingConfig(max_tokens, float(temperature), 0, float(top_p), 1.0,
                                _stops(body), None if seed is None else seed % 2**63)
    except TinyLMError as exc:
        raise APIError(400, str(exc)) from None
    return Job(prompts, config, n, _flag(body, "stream"),
               _flag(body, "include_usage", options or {}))


def completion_prompts(body: dict[str, Any], tokenizer: Tokenizer) -> list[list[int]]:
    """`prompt` as token ids: text (special-token spellings stay text), or ids in the vocab."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                   and all(isinstance(p, int) for p in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise APIError(400, "prompt must be a string, a list of strings, or token ids",
                       "prompt")
    prompts = []
    for p in prompt:
        if isinstance(p, str):
            prompts.append(tokenizer.encode(p) if p else [tokenizer.eot_id])
        elif isinstance(p, list) and p and all(
                isinstance(t, int) and not isinstance(t, bool) for t in p):
            if not all(0 <= t < tokenizer.vocab_size for t in p):
                raise APIError(400, f"prompt token ids must be in [0, {tokenizer.vocab_size})",
                               "prompt")
            prompts.append(list(p))
        else:
            raise APIError(400, "prompt must be a string, a list of strings, or token ids",
                           "prompt")
    return prompts


def _content(message: dict[str, Any], i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                   f"messages[{i}].content")


def chat_prompt(body: dict[str, Any], tokenizer: Tokenizer) -> list[int]:
    """`messages` in the run's chat template, ending with the assistant's generation prompt."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", "messages")
    turns = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role must be system, user or assistant, got "
                           f"{json.dumps(role)}", f"messages[{i}].role")
        turns.append({"role": role, "content": _content(message, i)})
    try:
        return encode_chat(tokenizer, turns, add_generation_prompt=True)
    except TinyLMError as exc:
        raise APIError(400, str(exc), "messages") from None
