"""`tinylm dpo`: direct preference optimization on chosen/rejected pairs (full or LoRA)."""

from __future__ import annotations

from typing import Annotated

import typer

from tinylm.cli import tuning
from tinylm.cli.app import Force, Json, Log, Overrides, Quiet, app


@app.command()
def dpo(
    out_dir: tuning.OutDir,
    base: Annotated[
        str | None, typer.Option("--base", "-b", help="The run to start from (usually a "
                                 "finetuned run, or a LoRA run); also the reference policy.")
    ] = None,
    data: Annotated[
        list[str] | None, typer.Option("--data", "-d", help="Preference JSONL: prompt/chosen/"
                                       "rejected, strings or message lists (repeatable).")
    ] = None,
    config: tuning.Config = None,
    val_data: tuning.ValData = None,
    val_fraction: tuning.ValFraction = None,
    beta: Annotated[float | None, typer.Option(help="DPO beta (default 0.1).")] = None,
    loss: Annotated[
        str | None, typer.Option("--loss", help="Loss variant: sigmoid (default), ipo, hinge.")
    ] = None,
    label_smoothing: Annotated[
        float | None, typer.Option(help="Conservative DPO: assumed label noise, in [0, 0.5).")
    ] = None,
    sft_weight: Annotated[
        float | None, typer.Option(help="Add this times the chosen answers' NLL per token "
                                   "(RPO; moves generations, not only the margin). Default 0.")
    ] = None,
    precompute_ref: Annotated[
        bool | None, typer.Option("--precompute-ref/--no-precompute-ref", help="Compute the "
                                  "reference log-probs once up front; keep no reference model.")
    ] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the pairs.")] = None,
    max_steps: tuning.MaxSteps = None,
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

    common = tuning.common_flags(
        val_fraction=val_fraction, epochs=epochs, max_steps=max_steps, lr=lr,
        batch_size=batch_size, max_length=max_length, lora=lora, lora_rank=lora_rank,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=lora_targets,
        eval_every=eval_every, seed=seed, device=device, log=log,
        template_tokens=template_tokens)
    flags = {**common, "beta": beta, "loss_type": loss, "label_smoothing": label_smoothing,
             "sft_weight": sft_weight,
             "precompute_ref": precompute_ref}
    tuning.run_command("dpo", run, flags, base=base, data=data, out_dir=out_dir,
                       config=config, val_data=val_data, set_=set_, resume=resume, force=force,
                       quiet=quiet, json=json)
