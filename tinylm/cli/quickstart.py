"""`tinylm quickstart`: the whole life of a small model on built-in data, with a report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tinylm.cli.app import Force, Json, Quiet, app, output


@app.command()
def quickstart(
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Directory for the data, runs and report.")
    ] = Path("quickstart"),
    fast: Annotated[
        bool, typer.Option("--fast", help="About 2 minutes on a CPU: fewer steps, smaller vocab.")
    ] = False,
    device: Annotated[
        str, typer.Option(help="auto (cuda when present: larger presets), cpu or cuda.")
    ] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the world and of every stage.")] = 0,
    force: Force = False,
    quiet: Quiet = False,
    json: Json = False,
) -> None:
    """Run every stage on a synthetic world and report what each one achieved.

    Generates the data, trains a tokenizer, pretrains, tunes (full and LoRA), aligns with DPO,
    scores every model on held-out facts and on the preferred answer style, and writes
    DIR/report.md and DIR/report.json. About 10 minutes on 2 CPU cores; --fast about 2.

    Examples:

        tinylm quickstart

        tinylm quickstart -o qs --fast --force

        tinylm quickstart --json --quiet > report.json
    """
    from tinylm.quickstart import run_quickstart

    out = output(quiet, json)
    report = run_quickstart(out_dir, fast=fast, device=device, seed=seed, force=force, out=out)
    if json:
        out.result(report)
        return
    out.table(
        f"quickstart: report in {out_dir / 'report.md'}",
        {
            "pretrain val bpb (unigram)": f"{report['pretrain']['val_bpb']:.3f} "
            f"({report['pretrain']['unigram_bpb']:.3f})",
            "exact match: base / sft / lora / dpo": " / ".join(
                f"{report[s]['exact_match']:.0%}" for s in ("base", "sft", "lora", "dpo")
            ),
            "lora trainable share": f"{report['lora']['trainable_fraction']:.1%}",
            "dpo preference accuracy": f"{report['dpo']['pref_accuracy']:.0%}",
            "preferred style before -> after": f"{report['dpo']['preferred_share_before']:.0%}"
            f" -> {report['dpo']['preferred_share_after']:.0%}",
            "wall time (s)": round(report["wall_s"], 1),
        },
    )
