"""`tinylm data synth`: write the built-in synthetic data set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from tinylm.cli.app import Force, Json, Quiet, app, output

data_app = typer.Typer(
    help="Built-in data sets.", no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(data_app, name="data")


@data_app.command("synth")
def synth(
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Directory to write the files into.")
    ],
    seed: Annotated[int, typer.Option(help="Seed of the world: same seed, same bytes.")] = 0,
    size: Annotated[
        Literal["small", "medium"],
        typer.Option(help="small: for a ~10 minute CPU pipeline; medium: several times larger."),
    ] = "small",
    force: Force = False,
    quiet: Quiet = False,
    json: Json = False,
) -> None:
    """Generate a small invented world with checkable facts, and data about it.

    Writes corpus.txt (pretraining text that states every fact),
    sft.jsonl and sft_eval.jsonl (questions on training / held-out facts),
    prefs.jsonl and prefs_eval.jsonl (preference pairs), facts.jsonl,
    and a README.md on the world, the splits and the scoring rules.

    Examples:

        tinylm data synth -o data/synth

        tinylm data synth -o data/synth-medium --size medium --seed 1 --force
    """
    from tinylm.synth import synthesize

    out = output(quiet, json)
    stats = synthesize(out_dir, seed=seed, size=size, force=force, out=out)
    out.table(f"synthetic data in {stats['out_dir']}", stats)
