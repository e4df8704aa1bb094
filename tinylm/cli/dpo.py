"""`tinylm dpo`: direct preference optimization on chosen/rejected pairs (full or LoRA)."""

from __future__ import annotations

from typing import Annotated

import typer

from tinylm.cli.app import Force, Json, Quiet, app, output


@app.command()
def dpo(
    out_dir: Annotated[str, typer.Option("--out", "-o", help="Run directory to write.")],
    base: Annotated[
        str | None, typer.Option("--base", "-b", help="The run to start from (usually a "
                                 "finetuned run, or a LoRA run); also the reference policy.")
    ] = None,
    data: Annotated[
        list[str] | None, typer.Option("--data", "-d", help="Preference JSONL: prompt/chosen/"
                                       "rejected, strings or message lists (repeatable).")
    ] = None,
    config: Annotated[str | None, typer.Option("--config", "-c", help="A YAML file.")] = None,
    val_data: Annotated[
        list[str] | None, typer.Option("--val-data", help="Validation JSONL (else a split).")
    ] = None,
    val_fraction: Annotated[
        float | None, typer.Option(help="Share of --data held out for validation.")
    ] = None,
    beta: Annotated[float | None, typer.Option(help="DPO beta (default 0.1).")] = None,
    loss: Annotated[
        str | None, typer.Option("--loss", help="Loss variant: sigmoid (default), ipo, hinge.")
    ] = None,
    label_smoothing: Annotated[
        float | None, typer.Option(help="Conservative DPO: assumed label noise, in [0, 0.5).")
    ] = None,
    precompute_ref: Annotated[
        bool | None, typer.Option("--precompute-ref/--no-precompute-ref", help="Compute the "
                                  "reference log-probs once up front; keep no reference model.")
    ] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the pairs.")] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Optimizer steps (default: from --epochs).")
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="Peak learning rate (default 5e-5; 5e-4 with LoRA).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Pairs per optimizer step.")] = None,
    max_length: Annotated[
        int | None, typer.Option(help="Tokens per side (default: the context).")
    ] = None,
    lora: Annotated[
        bool | None, typer.Option("--lora/--no-lora", help="Train LoRA adapters only; the "
                                  "reference is the model with the adapter disabled.")
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
                                       "e.g. train.micro_batch=2 (repeatable).")
    ] = None,
    force: Force = False,
    quiet: Quiet = False,
    json: Json = False,
) -> None:
    """Align a run to preference pairs with DPO (sigmoid, IPO or hinge loss).

    Each JSONL line is {"prompt", "chosen", "rejected"} with strings, or with message lists
    (prompt: the conversation so far; chosen/rejected: the assistant turn). Log-probabilities
    are summed over the response tokens; the reference is the starting model. Logs, like TRL,
    rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen and
    logps/rejected (val_* on the validation split). Pairs with identical answers are reported.

    Examples:

        tinylm dpo -b runs/sft -d pairs.jsonl -o runs/dpo

        tinylm dpo -b runs/sft -d pairs.jsonl -o runs/dpo-lora --lora --beta 0.2

        tinylm dpo -b runs/sft -d pairs.jsonl -o runs/ipo --loss ipo --precompute-ref

        tinylm dpo -o runs/dpo --resume
    """
    from tinylm.dpo import dpo as run

    flags = {
        "data.val_fraction": val_fraction, "beta": beta, "loss_type": loss,
        "label_smoothing": label_smoothing, "precompute_ref": precompute_ref, "epochs": epochs,
        "train.max_steps": max_steps, "train.lr": lr, "train.batch_size": batch_size,
        "data.max_length": max_length, "lora.enabled": lora, "lora.rank": lora_rank,
        "lora.alpha": lora_alpha, "lora.dropout": lora_dropout, "lora.targets": lora_targets,
        "train.eval_every": eval_every, "train.seed": seed, "train.device": device,
    }
    overrides = [*(set_ or []), *(f"{k}={v}" for k, v in flags.items() if v is not None)]
    out = output(quiet, json)
    result = run(base, data, out_dir, config=config, val_data=val_data, overrides=overrides,
                 resume=resume, force=force, out=out)
    if result.stopped == "interrupted":
        out.warn(f"interrupted at step {result.step}; continue with: tinylm dpo -o "
                 f"{out_dir} --resume")
        raise typer.Exit(130)
