"""Rewards that can be checked: built-in `exact` and `format`, and a user's own functions.

A reward function has the signature

    def my_reward(prompt: str, completion: str, example: dict) -> float

`prompt` is the question (the content of the prompt's last message), `completion` the text the
model wrote, ending with "<|im_end|>" when the model ended its turn (and cut off at the token
limit otherwise), `example` the JSONL row as read (its "answer" and any other field). It
returns a number for that one completion; True and False count as 1 and 0.

`--reward` takes a comma-separated list of rewards, each optionally weighted with `=W`:

    exact                    the synthetic world's scorer against the row's "answer"
    format                   1 when the answer is one sentence and the model ended its turn
    exact,format=0.5         their weighted sum (TRL's `reward_weights`, summed before the
                             group normalisation as its default `sum_then_normalize`)
    mymodule:my_reward       a function imported from a module (the current directory is
                             searched first, as `python -c` does), or from a file: path/r.py:fn

A reward that raises, or returns anything but a finite number, stops the run with one line
naming the example (file:line) and the reward.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinylm.chat import TURN_END
from tinylm.errors import TinyLMError
from tinylm.synth.scoring import exact_match

RewardFn = Callable[[str, str, dict[str, Any]], Any]
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_HINT = "a reward function(prompt, completion, example) returns one float (see tinylm rl --help)"


def exact_reward(prompt: str, completion: str, example: dict[str, Any]) -> float:
    """1.0 when the completion's first sentence ends with the row's "answer" as whole words
    (`tinylm.synth.scoring.exact_match`), else 0.0."""
    answer = example["answer"]
    if isinstance(answer, numbers.Real) and not isinstance(answer, bool):
        answer = str(answer)  # {"answer": 7} means "7"
    if not isinstance(answer, str):
        raise TypeError(f'"answer" must be a string, got {type(answer).__name__}')
    return float(exact_match(completion, answer))


def is_one_sentence(text: str) -> bool:
    """True for one non-empty line that ends its only sentence with ".", "!" or "?"."""
    text = text.strip()
    ends = list(_SENTENCE_END.finditer(text))
    return bool(text) and "\n" not in text and len(ends) == 1 and ends[0].end() == len(text)


def format_reward(prompt: str, completion: str, example: dict[str, Any]) -> float:
    """1.0 when the model ended its turn (the completion ends with <|im_end|>) after exactly
    one sentence, else 0.0."""
    if not completion.endswith(TURN_END):
        return 0.0
    return float(is_one_sentence(completion[: -len(TURN_END)]))


BUILTIN: dict[str, tuple[RewardFn, tuple[str, ...]]] = {
    "exact": (exact_reward, ("answer",)),
    "format": (format_reward, ()),
}
"""Built-in rewards by name: (function, the row fields it needs)."""


@dataclass(frozen=True)
class Reward:
    """One term of the reward: its name (as logged, `rewards/NAME/mean`), function and weight."""

    name: str
    fn: RewardFn
    weight: float = 1.0
    needs: tuple[str, ...] = ()


def load_function(ref: str) -> RewardFn:
    """The callable that `module:function` or `path/to/file.py:function` names."""
    module_name, sep, attr = ref.rpartition(":")
    if not sep or not module_name or not attr:
        raise TinyLMError(f"--reward {ref!r}: unknown reward",
                          f"use {', '.join(BUILTIN)}, or module:function for your own")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise TinyLMError(f"--reward {ref!r}: no file {path}")
            spec = importlib.util.spec_from_file_location(f"tinylm_reward_{path.stem}", path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            # As `python -c` does: the current directory first, so ./mymodule.py is found.
            added = "" not in sys.path and "." not in sys.path
            if added:
                sys.path.insert(0, "")
            try:
                module = importlib.import_module(module_name)
            finally:
                if added:
                    sys.path.remove("")
    except TinyLMError:
        raise
    except ImportError as exc:
        raise TinyLMError(f"--reward {ref!r}: cannot import {module_name} ({exc})",
                          "run from the directory that holds it, or add it to PYTHONPATH"
                          ) from exc
    except Exception as exc:  # the user's module failed while it was imported
        raise TinyLMError(f"--reward {ref!r}: importing {module_name} raised "
                          f"{type(exc).__name__}: {exc}", "fix the module") from exc
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        what = "no function" if fn is None else "a non-callable"
        raise TinyLMError(f"--reward {ref!r}: {module_name} has {what} {attr!r}", _HINT)
    return fn


def parse_rewards(spec: str | Sequence[str]) -> list[Reward]:
    """The rewards of a `--reward` value ("exact,format=0.5,mymod:fn"; a list of such parts
    works too). Raises `TinyLMError` for an unknown name, a bad weight or an import failure."""
    parts = [p.strip() for item in ([spec] if isinstance(spec, str) else spec)
             for p in item.split(",")]
    if not parts or not all(parts):
        raise TinyLMError(f"--reward {spec!r}: an empty reward name",
                          "e.g. --reward exact or --reward exact,format=0.5")
    rewards = []
    for part in parts:
        name, weight = part, 1.0
        if "=" in part:
            name, _, text = part.rpartition("=")
            try:
                weight = float(text)
            except ValueError:
                raise TinyLMError(f"--reward {part!r}: weight {text!r} is not a number") from None
            if not math.isfinite(weight):
                raise TinyLMError(f"--reward {part!r}: the weight must be finite")
        if name in BUILTIN:
            fn, needs = BUILTIN[name]
            rewards.append(Reward(name, fn, weight, needs))
        else:
            rewards.append(Reward(name, load_function(name), weight))
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise TinyLMError(f"--reward {spec!r}: a reward is named twice", "give each one once")
    return rewards


def checked_value(value: Any, reward: str, source: str) -> float:
    """`value` as a float, or a `TinyLMError` naming the example and the reward."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()  # a 0-dim torch or numpy value
    if not isinstance(value, numbers.Real):
        raise TinyLMError(f"{source}: reward {reward!r} returned {value!r} "
                          f"({type(value).__name__}), not a number", _HINT)
    value = float(value)
    if not math.isfinite(value):
        raise TinyLMError(f"{source}: reward {reward!r} returned {value}, not a finite number",
                          _HINT)
    return value


def score(rewards: Sequence[Reward], prompt: str, completions: Sequence[str],
          example: dict[str, Any], source: str) -> list[list[float]]:
    """Each completion's value under each reward: rows are completions, columns rewards."""
    table = []
    for completion in completions:
        row = []
        for reward in rewards:
            try:
                value = reward.fn(prompt, completion, dict(example))  # a row it cannot change
            except Exception as exc:
                raise TinyLMError(f"{source}: reward {reward.name!r} raised "
                                  f"{type(exc).__name__}: {exc}", "fix the reward function or "
                                  "this example (--debug shows the traceback)") from exc
            row.append(checked_value(value, reward.name, source))
        table.append(row)
    return table
