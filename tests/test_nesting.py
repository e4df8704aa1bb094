"""A document's depth is tinylm's own bound, not the interpreter's recursion limit."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from tinylm.nesting import MAX_DEPTH, TooDeep, json_depth, loads_json, loads_yaml, yaml_depth


@pytest.fixture(params=[150, 1_000, 100_000], ids=["low", "default", "high"])
def recursion_limit(request):
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(request.param)
    yield request.param
    sys.setrecursionlimit(old)


def nested_json(depth: int) -> str:
    return '{"x": ' * depth + "1" + "}" * depth


def nested_yaml(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("text, depth", [
    ("1", 0), ("[]", 1), ('{"a": [1, {"b": []}]}', 4), ('["[[[[", "{{{"]', 1),
    ('["\\"[[["]', 1), ("[" * 300 + "]" * 300, 300), ('[{"a": "}}}"}, [[]]]', 3),
])
def test_json_depth_counts_brackets_outside_strings(text, depth):
    assert json_depth(text) == depth


@pytest.mark.parametrize("depth", [MAX_DEPTH - 1, MAX_DEPTH])
def test_within_the_bound_parses_at_any_recursion_limit(recursion_limit, depth):
    obj = loads_json(nested_json(depth))
    for _ in range(depth):
        obj = obj["x"]
    assert obj == 1
    assert yaml_depth(nested_yaml(depth)) == depth
    assert loads_yaml(nested_yaml(depth)) == json.loads(nested_yaml(depth))
    assert sys.getrecursionlimit() == recursion_limit  # restored


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 700, 5_000])
def test_past_the_bound_refused_at_any_recursion_limit(recursion_limit, depth):
    with pytest.raises(TooDeep, match="nested too deeply"):
        loads_json(nested_json(depth))
    with pytest.raises(TooDeep, match="nested too deeply"):
        loads_yaml(nested_yaml(depth))


def test_invalid_documents_keep_their_parser_errors():
    with pytest.raises(json.JSONDecodeError):
        loads_json('{"a": [1,')
    with pytest.raises(yaml.YAMLError):
        loads_yaml("a: [1, 2\n")
    assert loads_json(b'{"a": "\xc3\xa9"}') == {"a": "é"}
