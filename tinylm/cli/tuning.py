"""What `tinylm finetune` and `tinylm dpo` share: option types and the command body.

Registers no command (so importing it leaves the order of `tinylm --help` alone).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from tinylm.cli.app import exit_if_interrupted, output

if TYPE_CHECKING:
    from collections.abc import Callable

    from tinylm.train.loop import TrainResult

OutDir = Annotated[str, typer.Option("--out", "-o", help="Run directory to write.")]
Config = Annotated[str | None, typer.Option("--config", "-c", help="A YAML file.")]
ValData = Annotated[
    list[str] | None, typer.Option("--val-data", help="Validation JSONL (else a split).")
]
ValFraction = Annotated[
    float | None, typer.Option(help="Share of --data held out for validation.")
]
MaxSteps = Annotated[int | None, typer.Option(help="Optimizer steps (default: from --epochs).")]
LoraRank = Annotated[int | None, typer.Option(help="LoRA rank r.")]
LoraAlpha = Annotated[float | None, typer.Option(help="LoRA alpha (scale alpha/r).")]
LoraDropout = Annotated[float | None, typer.Option(help="Dropout on LoRA's input.")]
LoraTargets = Annotated[
    str | None, typer.Option(help="Layers to adapt: q_proj,v_proj (default) or all-linear.")
]
TemplateTokens = Annotated[
    bool | None, typer.Option("--train-template-tokens/--no-train-template-tokens",
                              help="With --lora: also train the embedding and head rows of "
                              "the chat template's tokens, so replies end their turn (on).")
]
EvalEvery = Annotated[int | None, typer.Option(help="Steps between evaluations.")]
Seed = Annotated[int | None, typer.Option(help="Random seed (split, order, init).")]
Device = Annotated[str | None, typer.Option(help="auto, cpu or cuda.")]
Resume = Annotated[
    bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")
]


def common_flags(
    *, val_fraction: float | None, epochs: float | None, max_steps: int | None,
    lr: float | None, batch_size: int | None, max_length: int | None, lora: bool | None,
    lora_rank: int | None, lora_alpha: float | None, lora_dropout: float | None,
    lora_targets: str | None, eval_every: int | None, seed: int | None, device: str | None,
    log: str | None = None, template_tokens: bool | None = None,
) -> dict[str, Any]:
    """The config keys of the options `finetune` and `dpo` share, by flag value."""
    return {
        "data.val_fraction": val_fraction, "epochs": epochs, "train.max_steps": max_steps,
        "train.lr": lr, "train.batch_size": batch_size, "data.max_length": max_length,
        "lora.enabled": lora, "lora.rank": lora_rank, "lora.alpha": lora_alpha,
        "lora.dropout": lora_dropout, "lora.targets": lora_targets,
        "train.eval_every": eval_every, "train.seed": seed, "train.device": device,
        "train.log": log, "lora.train_template_tokens": template_tokens,
    }


def run_command(
    command: str, run: Callable[..., TrainResult], flags: dict[str, Any], *,
    base: str | None, data: list[str] | None, out_dir: str, config: str | None,
    val_data: list[str] | None, set_: list[str] | None, resume: bool, force: bool,
    quiet: bool, json: bool,
) -> None:
    """The body of `tinylm finetune` and `tinylm dpo`: the run (`--set` overrides, then the
    flags' typed values), and on Ctrl-C or SIGTERM how to continue it (exit 130, 143)."""
    out = output(quiet, json)
    result = run(base, data, out_dir, config=config, val_data=val_data, overrides=set_,
                 values=flags, resume=resume, force=force, out=out)
    exit_if_interrupted(out, result, command, out_dir)
