"""`tinylm finetune` and `tinylm merge`: instruction tuning (full or LoRA), merging adapters."""

from __future__ import annotations

from typing import Annotated

import typer

from tinylm.cli.app import Force, Json, Quiet, app, output


@app.command()
def finetune(
    out_dir: Annotated[str, typer.Option("--out", "-o", help="Run directory to write.")],
    base: Annotated[
        str | None, typer.Option("--base", "-b", help="The run to start from (pretrained, "
                                 "finetuned, or a LoRA run).")
    ] = None,
    data: Annotated[
        list[str] | None, typer.Option("--data", "-d", help="Instruction JSONL: messages, "
                                       "prompt/completion or Alpaca lines (repeatable).")
    ] = None,
    config: Annotated[str | None, typer.Option("--config", "-c", help="A YAML file.")] = None,
    val_data: Annotated[
        list[str] | None, typer.Option("--val-data", help="Validation JSONL (else a split).")
    ] = None,
    val_fraction: Annotated[
        float | None, typer.Option(help="Share of --data held out for validation.")
    ] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the data.")] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Optimizer steps (default: from --epochs).")
    ] = None,
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
    lora_rank: Annotated[int | None, typer.Option(help="LoRA rank r.")] = None,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha (scale alpha/r).")] = None,
    lora_dropout: Annotated[float | None, typer.Option(help="Dropout on LoRA's input.")] = None,
    lora_targets: Annotated[
        str | None, typer.Option(help="Layers to adapt: q_proj,v_proj (default) or all-linear.")
    ] = None,
    eval_every: Annotated[int | None, typer.Option(help="Steps between evaluations.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (split, order, init).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")
    ] = False,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key: KEY=VALUE, "
                                       "e.g. train.micro_batch=4 (repeatable).")
    ] = None,
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

    flags = {
        "data.val_fraction": val_fraction, "epochs": epochs, "train.max_steps": max_steps,
        "train.lr": lr, "train.batch_size": batch_size, "data.max_length": max_length,
        "data.packing": packing, "lora.enabled": lora, "lora.rank": lora_rank,
        "lora.alpha": lora_alpha, "lora.dropout": lora_dropout, "lora.targets": lora_targets,
        "train.eval_every": eval_every, "train.seed": seed, "train.device": device,
    }
    overrides = [*(set_ or []), *(f"{k}={v}" for k, v in flags.items() if v is not None)]
    out = output(quiet, json)
    result = run(base, data, out_dir, config=config, val_data=val_data, overrides=overrides,
                 resume=resume, force=force, out=out)
    if result.stopped == "interrupted":
        out.warn(f"interrupted at step {result.step}; continue with: tinylm finetune -o "
                 f"{out_dir} --resume")
        raise typer.Exit(130)


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
    from tinylm.lora import merge_run

    out = output(quiet, json)
    path = merge_run(model, out_dir, force=force, out=out)
    out.table(f"merge: {path}", {"adapter_run": model, "run": str(path)})
