"""What `tinylm info` shows: a model's config, parameters by component, training FLOPs per
token, and its tokenizer, for a run directory, a preset YAML file or a preset name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinylm.config import find_preset, read_yaml, to_dict
from tinylm.errors import TinyLMError
from tinylm.model import flops_per_token, param_breakdown
from tinylm.run import TOKENIZER_FILE, model_config_from, read_run_config
from tinylm.tokenizer import Tokenizer


def _tokenizer_summary(path: Path) -> dict[str, Any]:
    tok = Tokenizer.load(path)
    return {
        "vocab_size": tok.vocab_size,
        "special_tokens": dict(tok.special_tokens),
        "fingerprint": tok.fingerprint,
    }


def describe(target: str) -> dict[str, Any]:
    """What `tinylm info` shows for a run directory, a preset YAML file or a preset name."""
    path = Path(target)
    tokenizer = None
    if path.is_dir():
        run_config = read_run_config(path)
        source = str(path / "config.json")
        if (path / TOKENIZER_FILE).is_file():
            tokenizer = _tokenizer_summary(path / TOKENIZER_FILE)
    else:
        path = find_preset(target)
        run_config = read_yaml(path)
        source = str(path)
        if not isinstance(run_config.get("model"), dict):
            raise TinyLMError(f"{path}: no 'model:' section", "a preset starts with model: ...")
    config = model_config_from(run_config, source)
    info: dict[str, Any] = {
        "source": source,
        "model": to_dict(config),
        "params": param_breakdown(config),
        "seq_len": config.max_seq_len,
        "flops_per_token": flops_per_token(config, config.max_seq_len),
    }
    if tokenizer is not None:
        info["tokenizer"] = tokenizer
    return info
