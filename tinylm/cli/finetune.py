"""`tinylm finetune` and `tinylm merge`: instruction tuning (full or LoRA), merging adapters."""

from __future__ import annotations

from typing import Annotated

import typer

from tinylm.cli import tuning
from tinylm.cli.app import Force, Json, Log, Overrides, Quiet, app, output


@app.command()
def finetune(
    out_dir: tuning.OutDir,
    base: Annotated[
        str | None, typer.Option("--base", "-b", help="The run to start from (pretrained, "
                                 "finetuned, or a LoRA run).")
    ] = None,
    data: Annotated[
        list[str] | None, typer.Option("--data", "-d", help="Instruction JSONL: messages, "
                                       "prompt/completion or Alpaca lines (repeatable).")
    ] = None,
    config: tuning.Config = None,
    val_data: tuning.ValData = None,
    val_fraction: tuning.ValFraction = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the data.")] = None,
    max_steps: tuning.MaxSteps = None,
    lr: Annotated[
        float | None, typer.Option(help="Peak learning rate (default 3e-4; 3e-3 with LoRA).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Examples (packed windows) per optimizer step.")
    ] = None,
    max_length: Annotated[
        int | None, typer.Option(help="Tokens per example window (default: the context).")
    ] = None,
    packing: Annotated[
        bool | None, typer.Option("--packing/--no-packing", help="Pack several examples into "
                                  "each window (each still sees only itself).")
    ] = None,
    lora: Annotated[
        bool | None, typer.Option("--lora/--no-lora", help="Train LoRA adapters only (PEFT).")
    ] = None,
    lora_rank: tuning.LoraRank = None,
    lora_alpha: tuning.LoraAlpha = None,
    lora_dropout: tuning.LoraDropout = None,
    lora_targets: tuning.LoraTargets = None,
    template_tokens: tuning.TemplateTokens = None,
    eval_every: tuning.EvalEvery = None,
    seed: tuning.Seed = None,
    device: tuning.Device = None,
    resume: tuning.Resume = False,
    log: Log = None,
    set_: Overrides = None,
    force: Force = False,
    quiet: Quiet = False,
    json: Json = False,
) -> None:
    """Instruction-tune a run: loss on the assistant's tokens only; full weights or LoRA.

    Each JSONL line is {"messages": [...]}, {"prompt", "completion"} or {"instruction",
    "input", "output"}, rendered with the ChatML template. Logs val_loss and, when the data
    has reference answers, the exact-match accuracy of greedy answers (val_exact_match).
    A LoRA run holds PEFT's adapter_config.json + adapter_model.safetensors and names its base;
    every command loads it, and `tinylm merge` turns it into a plain run.

    Examples:

        tinylm finetune -b runs/base -d chat.jsonl -o runs/sft

        tinylm finetune -b runs/base -d alpaca.jsonl -o runs/lora --lora --lora-rank 16

        tinylm finetune -b runs/base -d train.jsonl --val-data val.jsonl -o runs/sft --packing

        tinylm finetune -o runs/sft --resume
    """
    from tinylm.finetune import finetune as run

    common = tuning.common_flags(
        val_fraction=val_fraction, epochs=epochs, max_steps=max_steps, lr=lr,
        batch_size=batch_size, max_length=max_length, lora=lora, lora_rank=lora_rank,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=lora_targets,
        eval_every=eval_every, seed=seed, device=device, log=log,
        template_tokens=template_tokens)
    flags = {**common, "data.packing": packing}
    tuning.run_command("finetune", run, flags, base=base, data=data, out_dir=out_dir,
                       config=config, val_data=val_data, set_=set_, resume=resume, force=force,
                       quiet=quiet, json=json)


@app.command()
def merge(
    model: Annotated[str, typer.Option("--model", "-m", help="A LoRA adapter run.")],
    out_dir: Annotated[str, typer.Option("--out", "-o", help="Run directory to write.")],
    force: Force = False,
    quiet: Quiet = False,
    json: Json = False,
) -> None:
    """Merge a LoRA run's adapter into its base's weights and write a plain run.

    The merged run needs no base run and no PEFT to load; its outputs equal the adapter
    run's (within float rounding).

    Examples:

        tinylm merge -m runs/lora -o runs/merged

        tinylm merge -m runs/lora -o runs/merged --force --json
    """
    from tinylm.run import merge_run

    out = output(quiet, json)
    path = merge_run(model, out_dir, force=force, out=out)
    out.table(f"merge: {path}", {"adapter_run": model, "run": str(path)})
