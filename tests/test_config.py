"""Config building: defaults < base < YAML < --set, with typed validation and named keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from tinylm.config import build_config, parse_override, read_yaml, to_dict
from tinylm.errors import TinyLMError


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, ...] = (0.9, 0.95)


@dataclass
class Example:
    name: str = "x"
    steps: int = 10
    family: Literal["llama", "gpt2"] = "llama"
    dropout: float | None = None
    optim: Optim = field(default_factory=Optim)

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError("steps must be >= 0")


def test_defaults_yaml_and_overrides_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 20\noptim:\n  lr: 0.01\n")
    cfg = build_config(Example, path, ["optim.lr=3e-4", "family=gpt2"], base={"name": "base"})
    assert cfg == Example(name="base", steps=20, family="gpt2", optim=Optim(lr=3e-4))
    # A partly given section keeps its other defaults.
    assert cfg.optim.betas == (0.9, 0.95)


def test_int_to_float_and_list_from_string():
    cfg = build_config(Example, overrides=["optim.lr=1", "optim.betas=0.8,0.99"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.8, 0.99)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("stepz=3", "unknown config key 'stepz'; valid keys: name, steps, family"),
        ("optim.lrr=3", "unknown config key 'optim.lrr'; valid keys: optim.lr, optim.betas"),
        ("steps=abc", "steps must be an integer"),
        ("family=bert", "family must be one of 'llama', 'gpt2'"),
        ("steps=-1", "steps must be >= 0"),
        ("optim=3", "optim is a section"),
        ("noequals", "expected KEY=VALUE"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(TinyLMError) as info:
        build_config(Example, overrides=[override])
    assert needle in str(info.value)


def test_yaml_errors_name_file_and_line(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(TinyLMError, match="nope.yaml: config file not found"):
        read_yaml(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\nb: [1, 2\n")
    with pytest.raises(TinyLMError, match=r"bad.yaml:\d+: not valid YAML"):
        read_yaml(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(TinyLMError, match="must be a mapping"):
        read_yaml(scalar)
    unknown = tmp_path / "u.yaml"
    unknown.write_text("stpes: 3\n")
    with pytest.raises(TinyLMError, match=r"u.yaml: unknown config key 'stpes'"):
        build_config(Example, unknown)


def test_parse_override_parses_yaml_values():
    assert parse_override("a.b=4") == ("a.b", 4)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=hello world") == ("a", "hello world")
    assert parse_override("a=") == ("a", "")


def test_to_dict_round_trips():
    cfg = build_config(Example, overrides=["steps=7"])
    assert build_config(Example, base=to_dict(cfg)) == cfg
