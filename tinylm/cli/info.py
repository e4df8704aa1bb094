"""`tinylm info`: a model's config, parameters by component, training FLOPs per token."""

from __future__ import annotations

from typing import Annotated

import typer

from tinylm.cli.app import Json, Quiet, app, output


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
    from tinylm.info import describe

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
