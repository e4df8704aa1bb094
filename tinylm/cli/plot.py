"""`tinylm plot`: loss / validation curves of several runs on one PNG."""

from __future__ import annotations

from typing import Annotated

import typer

from tinylm.cli.app import Force, Json, Quiet, app, output


@app.command()
def plot(
    runs: Annotated[list[str], typer.Argument(help="Run directories (each has metrics.jsonl).")],
    out_file: Annotated[str, typer.Option("--output", "-o", help="The PNG to write.")],
    x: Annotated[str, typer.Option("--x", help="The x axis: step or tokens.")] = "step",
    metric: Annotated[
        str, typer.Option("--metric", help="Comma-separated metrics.jsonl keys to draw, e.g. "
                          "loss,val_loss,val_bpb or rewards/margins.")
    ] = "loss,val_loss",
    force: Force = False,
    json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Draw the curves of several runs on one figure (by step or by tokens).

    Examples:

        tinylm plot runs/base runs/base-wsd -o loss.png

        tinylm plot runs/a runs/b --x tokens --metric val_loss,val_bpb -o val.png

        tinylm plot runs/dpo --metric rewards/margins,val_rewards/margins -o dpo.png --force
    """
    from tinylm.plot import plot_runs

    out = output(quiet, json)
    metrics = tuple(m.strip() for m in metric.split(",") if m.strip())
    result = plot_runs(runs, out_file, x=x, metrics=metrics, force=force)
    if json:
        out.result(result)
        return
    out.info(f"wrote {result['output']}: {', '.join(result['curves'])}")
