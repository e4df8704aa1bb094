"""`tinylm info`: a model's config, parameters by component, training FLOPs per token."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tinylm.cli.app import Json, Quiet, app, output
from tinylm.config import find_preset
from tinylm.errors import TinyLMError


def _tokenizer_summary(path: Path) -> dict[str, Any]:
    from tinylm.tokenizer import Tokenizer

    tok = Tokenizer.load(path)
    return {
        "vocab_size": tok.vocab_size,
        "special_tokens": dict(tok.special_tokens),
        "fingerprint": tok.fingerprint,
    }


def describe(target: str) -> dict[str, Any]:
    """What `tinylm info` shows for a run directory, a preset YAML file or a preset name."""
    from tinylm.config import read_yaml
    from tinylm.model import flops_per_token, param_breakdown
    from tinylm.run import TOKENIZER_FILE, model_config_from, read_run_config

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
    from tinylm.config import to_dict

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


@app.command()
def info(
    target: Annotated[
        str, typer.Argument(help="A run directory, a preset YAML file or a preset name.")
    ],
    json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Show a model's config, its parameters by component and its training FLOPs per token.

    Examples:

        tinylm info runs/base

        tinylm info tiny

        tinylm info configs/gpt2-124m.yaml --json
    """
    out = output(quiet, json)
    result = describe(target)
    if json:
        out.result(result)
        return
    out.table(f"model ({result['source']})", result["model"])
    params = result["params"]
    total = params["total"]
    rows = {k: v for k, v in params.items() if k != "total"}
    shown = {f"{k} ({100 * v / total:.1f}%)": v for k, v in rows.items()}
    out.table("parameters", {**shown, "total": total})
    out.table("compute", {
        "training FLOPs per token": result["flops_per_token"],
        "at sequence length": result["seq_len"],
    })
    if "tokenizer" in result:
        tok = result["tokenizer"]
        out.table("tokenizer", {
            "vocab size": tok["vocab_size"],
            "special tokens": ", ".join(f"{k}={v}" for k, v in tok["special_tokens"].items()),
            "fingerprint": tok["fingerprint"],
        })
