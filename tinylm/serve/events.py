"""What the engine tells the server about a request, on the engine's thread, in this order:
`TextEvent`s and one `FinishEvent` per choice, then one `DoneEvent`; or an `ErrorEvent`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TextEvent:
    """New text of choice `index`, safe to show (whole characters, no part of a stop string)."""

    index: int
    text: str


@dataclass
class FinishEvent:
    """Choice `index` is complete: `reason` is "stop" (end token or stop string) or "length"."""

    index: int
    reason: str
    completion_tokens: int


@dataclass
class DoneEvent:
    """Every choice of the request is complete; token counts for the usage record."""

    prompt_tokens: int
    completion_tokens: int


@dataclass
class ErrorEvent:
    """The request failed inside the engine (a bug, or out of memory); the server carries on."""

    message: str


Event = TextEvent | FinishEvent | DoneEvent | ErrorEvent
