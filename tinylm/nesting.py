"""A fixed bound on how deeply a user's JSON or YAML may nest, checked before it is parsed.

Python's parsers recurse once per level, so what a deep file does depends on the interpreter's
recursion limit (which any library may raise): the same file would parse in one process and
fail in another. tinylm measures the depth itself, without recursion, and refuses a document
deeper than `MAX_DEPTH` whatever the limit is; a document within the bound is parsed with
enough recursion headroom for that depth, even where the limit was set low.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import yaml

# Real configs nest under 10 levels and chat records under 10; 100 leaves room for any data.
MAX_DEPTH = 100
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
# Python frames one level of parsing may take (PyYAML's composer and constructor use several).
_FRAMES_PER_LEVEL = 8
T = TypeVar("T")


class TooDeep(ValueError):
    """A document nested deeper than `MAX_DEPTH`; the caller names the file."""

    def __init__(self, depth: int) -> None:
        super().__init__(f"nested too deeply ({depth} levels; tinylm reads at most {MAX_DEPTH})")
        self.depth = depth


def json_depth(text: str) -> int:
    """How deeply the arrays and objects of JSON `text` nest (0 for a scalar): the largest
    count of brackets open at once, outside strings. Malformed text gives some count; the parser
    reports what is wrong with it."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).encode("ascii")
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max(initial=0))


def yaml_depth(text: str) -> int:
    """How deeply the sequences and mappings of YAML `text` nest, from PyYAML's event stream
    (its parser keeps a state stack, not the call stack). Invalid YAML raises `yaml.YAMLError`."""
    depth = deepest = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_DEPTH:
                return deepest
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1
    return deepest


def _frames() -> int:
    frame, count = sys._getframe(), 0
    while frame is not None:
        frame, count = frame.f_back, count + 1
    return count


@contextmanager
def _headroom(depth: int) -> Iterator[None]:
    """The recursion limit raised, for this block, to what parsing `depth` levels needs."""
    old = sys.getrecursionlimit()
    need = _frames() + _FRAMES_PER_LEVEL * (depth + 1) + 100
    if need > old:
        sys.setrecursionlimit(need)
    try:
        yield
    finally:
        if need > old:
            sys.setrecursionlimit(old)


def _parse(parse: Callable[[str], T], text: str, depth: int) -> T:
    if depth > MAX_DEPTH:
        raise TooDeep(depth)
    try:
        return parse(text)
    except RecursionError:  # the limit was set low: parse again with room for `depth`
        with _headroom(depth):
            return parse(text)


def loads_json(text: str | bytes) -> Any:
    """`json.loads` of text no deeper than `MAX_DEPTH`; `TooDeep` otherwise, whatever the
    recursion limit. Invalid JSON raises `json.JSONDecodeError` as usual."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    opens = text.count("[") + text.count("{")  # a bound on the depth, cheaper than the scan
    return _parse(json.loads, text, opens if opens <= MAX_DEPTH else json_depth(text))


def loads_yaml(text: str) -> Any:
    """`yaml.safe_load` of text no deeper than `MAX_DEPTH`; `TooDeep` otherwise."""
    return _parse(yaml.safe_load, text, yaml_depth(text))
