"""`tinylm rl`: GRPO against a reward that can be checked (built-in or a Python function)."""

from __future__ import annotations

from typing import Annotated

import typer

from tinylm.cli import tuning
from tinylm.cli.app import Force, Json, Log, Overrides, Quiet, app


@app.command()
def rl(
    out_dir: tuning.OutDir,
    base: Annotated[
        str | None, typer.Option("--base", "-b", help="The run to start from (a tuned run, or "
                                 "a LoRA run); also the reference when --beta > 0.")
    ] = None,
    data: Annotated[
        list[str] | None, typer.Option("--data", "-d", help='Prompts JSONL: {"prompt": a '
                                       'string or messages, "answer": ..., ...} (repeatable).')
    ] = None,
    reward: Annotated[
        str | None, typer.Option("--reward", "-r", help="exact (default), format, "
                                 "module:function, or a weighted sum: exact,format=0.5.")
    ] = None,
    config: tuning.Config = None,
    val_data: Annotated[
        list[str] | None, typer.Option("--val-data", help="Held-out prompts JSONL, scored at "
                                       "each evaluation (val_reward, val_reward_greedy).")
    ] = None,
    num_generations: Annotated[
        int | None, typer.Option("--num-generations", "-G", help="Completions per prompt "
                                 "(default 8).")
    ] = None,
    max_completion_length: Annotated[
        int | None, typer.Option(help="Tokens per completion (default 64).")
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help="Sampling temperature (default 1.0).")
    ] = None,
    beta: Annotated[
        float | None, typer.Option(help="KL penalty to the reference (default 0: none).")
    ] = None,
    epsilon: Annotated[float | None, typer.Option(help="Clip range (default 0.2).")] = None,
    loss: Annotated[
        str | None, typer.Option("--loss", help="Loss normalisation (TRL's loss_type): dapo "
                                 "(default, token-level), grpo (per sequence), dr_grpo.")
    ] = None,
    scale_rewards: Annotated[
        str | None, typer.Option(help="Advantage scaling: group (default), batch, none "
                                 "(Dr. GRPO).")
    ] = None,
    num_iterations: Annotated[
        int | None, typer.Option("--num-iterations", "--mu", help="Optimizer passes over "
                                 "each generation batch (default 1).")
    ] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the prompts.")] = None,
    max_steps: tuning.MaxSteps = None,
    lr: Annotated[
        float | None, typer.Option(help="Peak learning rate (default 1e-4; 1e-3 with LoRA).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Prompts per optimizer step (default 8).")
    ] = None,
    lora: Annotated[
        bool | None, typer.Option("--lora/--no-lora", help="Train LoRA adapters only; the "
                                  "reference is the model with the adapter disabled.")
    ] = None,
    lora_rank: tuning.LoraRank = None,
    lora_alpha: tuning.LoraAlpha = None,
    lora_dropout: tuning.LoraDropout = None,
    lora_targets: tuning.LoraTargets = None,
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
    """Reinforce a run's right answers with GRPO (group-relative policy optimization).

    For each prompt, G completions are sampled with the KV-cache generator and scored by the
    reward; each completion's advantage is its reward against its group's mean (over the
    group's std), and the clipped policy-gradient loss (TRL's GRPO, with an optional KL
    penalty) raises the likelihood of the better ones. Rewards:

      exact            1 when the answer's first sentence ends with the row's "answer"

      format           1 when the answer is one sentence and the model ended its turn

      mod:fn           your function fn(prompt: str, completion: str, example: dict) -> float
                       from mod.py (current directory or PYTHONPATH) or path/to/file.py:fn;
                       completion ends with "<|im_end|>" when the model ended its turn

    A reward that raises or returns a non-number stops the run naming the example. Logs, as
    TRL: reward, reward_std, rewards/NAME/mean, completions/mean_length, kl, clip_ratio/*.
    More settings (top_p, epsilon_high, steps_per_generation, ...) with --set.

    Examples:

        tinylm rl -b runs/sft -d data/rl.jsonl --val-data data/rl_eval.jsonl -o runs/rl

        tinylm rl -b runs/sft -d data/rl.jsonl -o runs/rl --reward exact,format=0.5 -G 4

        tinylm rl -b runs/sft -d prompts.jsonl -o runs/rl-lora --lora --reward myrewards:fn

        tinylm rl -b runs/sft -d data/rl.jsonl -o runs/rl --beta 0.04 --mu 2 --loss grpo

        tinylm rl -o runs/rl --resume
    """
    from tinylm.rl.stage import rl as run

    common = tuning.common_flags(
        val_fraction=None, epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size,
        max_length=None, lora=lora, lora_rank=lora_rank, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, lora_targets=lora_targets, eval_every=eval_every,
        seed=seed, device=device, log=log)
    flags = {**common, "reward": reward, "num_generations": num_generations,
             "max_completion_length": max_completion_length, "temperature": temperature,
             "beta": beta, "epsilon": epsilon, "loss_type": loss,
             "scale_rewards": scale_rewards, "num_iterations": num_iterations}
    tuning.run_command("rl", run, flags, base=base, data=data, out_dir=out_dir, config=config,
                       val_data=val_data, set_=set_, resume=resume, force=force, quiet=quiet,
                       json=json)
