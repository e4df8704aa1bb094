"""`tinylm rl`: GRPO with verifiable rewards, as a stage of the shared launcher and loop.

The stage loads a base run (usually a tuned one), renders each prompt with the chat template,
and hands the loop `GroupBatches` (sampling, rewards, advantages; `tinylm.rl.rollouts`) and
the clipped GRPO loss (`tinylm.rl.loss`). The settings and their defaults are TRL's
`GRPOConfig`'s where it has one (num_generations 8, temperature 1, beta 0, epsilon 0.2,
loss_type "dapo", scale_rewards "group", num_iterations 1), except the learning rates, which
suit tinylm's small models. The reference for `beta` > 0 is the starting model: a frozen
copy, or with LoRA the policy with its adapter disabled; with beta 0 there is none.

Logged per step, under TRL's names: reward, reward_std, rewards/NAME/mean and /std,
frac_reward_zero_std, completions/mean_length (min, max, clipped_ratio, *_terminated_length),
kl (when beta > 0), entropy, clip_ratio/low_mean, high_mean, region_mean. At each evaluation
on --val-data: val_reward and val_rewards/NAME/mean (`eval_generations` samples per prompt at
the sampling temperature), val_reward_greedy and val_rewards/NAME/greedy (temperature 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinylm.console import SILENT, Output
from tinylm.errors import TinyLMError
from tinylm.lora import LoraSettings, adapter_disabled
from tinylm.losses import LossOutput
from tinylm.rl.evaluate import encode_prompts, evaluate_rewards
from tinylm.rl.loss import LOSS_TYPES, SCALE_REWARDS, grpo_loss, token_logps
from tinylm.rl.rewards import parse_rewards
from tinylm.rl.rollouts import GroupBatches, SamplingSettings, clear_rollouts
from tinylm.rl.sampling import Rollouts, score_rollouts
from tinylm.train.loop import TrainResult, accumulation_steps
from tinylm.train.stage import Plan, Stage, StageContext, launch
from tinylm.tuning import (
    TuningTrainConfig,
    check_resume_data,
    describe_data,
    load_base,
    make_trainable,
    run_record,
)

# TRL's default 1e-6 is for models a thousand times larger. Measured on the quickstart's tuned
# tiny model (100 steps of 8 prompts x 8): 1e-4 and 2e-4 raise the reward steadily, 5e-4 is
# unstable, 1e-3 collapses every answer. LoRA: ten times the full rate, as finetune and dpo.
FULL_LR = 1e-4
LORA_LR = 1e-3


@dataclass
class RLTrainConfig(TuningTrainConfig):
    """The train section; `batch_size` counts prompts per optimizer step (each with
    num_generations completions), `micro_batch` completions per forward."""

    batch_size: int = 8
    micro_batch: int = 16
    warmup_steps: int = 0


@dataclass
class RLConfig:
    """Everything `tinylm rl` reads from --config, --set and its flags."""

    reward: str = "exact"  # see tinylm.rl.rewards: "exact", "exact,format=0.5", "mod:fn"
    epochs: float = 1.0  # passes over the prompts (sets max_steps when that is not given)
    num_generations: int = 8  # G: completions per prompt
    max_completion_length: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    beta: float = 0.0  # weight of the KL penalty to the reference (0: no reference at all)
    epsilon: float = 0.2  # clip ratios to [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # None: epsilon (DAPO's clip-higher uses e.g. 0.28)
    loss_type: str = "dapo"  # grpo, dapo or dr_grpo (see tinylm.rl.loss)
    scale_rewards: str = "group"  # group, batch or none (Dr. GRPO)
    num_iterations: int = 1  # mu: optimizer passes over each generation batch
    steps_per_generation: int = 1  # optimizer steps that one generation batch is split into
    eval_prompts: int = 64  # --val-data prompts scored at each evaluation (0: all)
    eval_generations: int = 4  # samples per prompt for val_reward
    train: RLTrainConfig = field(default_factory=RLTrainConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> TinyLMError:
            return TinyLMError(f"{key}: {why}", "fix the option or the rl config")

        if self.num_generations < 2:
            raise bad("num_generations", "must be at least 2 (advantages compare a group)")
        for key in ("max_completion_length", "num_iterations", "steps_per_generation",
                    "eval_generations"):
            if getattr(self, key) < 1:
                raise bad(key, f"must be at least 1, got {getattr(self, key)}")
        if self.epochs <= 0 or self.eval_prompts < 0:
            raise bad("epochs" if self.epochs <= 0 else "eval_prompts", "out of range")
        if self.temperature <= 0:
            raise bad("temperature", "must be > 0 (GRPO needs different samples per group)")
        if self.beta < 0 or self.epsilon <= 0 or (self.epsilon_high or 1) <= 0:
            raise bad("beta, epsilon", "beta must be >= 0 and the epsilons > 0")
        if self.loss_type not in LOSS_TYPES:
            raise bad("loss_type", f"one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise bad("scale_rewards", f"one of {', '.join(SCALE_REWARDS)}")
        if self.train.fsdp:
            raise bad("train.fsdp", "rl samples with the whole model; use DDP (no --fsdp)")


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere (TRL's `disable_dropout`, on by default): with it, the ratio of
    the policy's log-probs to the sampler's would be noise even before any update."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.0  # tinylm's blocks apply F.dropout with this rate


def make_loss_fn(cfg: RLConfig):
    """The loop's loss: the clipped GRPO objective of a micro-batch of completions, and its
    metrics as sums that the loop's division by the count turns into means."""
    eps_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high

    def loss_fn(model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        n = batch["completion_ids"].shape[1]
        logits = model(ids, attention_mask=mask, logits_to_keep=n + 1)[:, :-1]
        logps, entropy = token_logps(logits, batch["completion_ids"], cfg.temperature)
        out = grpo_loss(logps, batch.get("old_logps"), batch["advantages"],
                        batch["completion_mask"], loss_type=cfg.loss_type,
                        epsilon_low=cfg.epsilon, epsilon_high=eps_high, beta=cfg.beta,
                        ref_logps=batch.get("ref_logps"),
                        max_completion_length=cfg.max_completion_length, entropy=entropy)
        count = out.count.to(logps.device)
        tokens = out.tokens.clamp(min=1.0)
        # The loop logs sum / count over the step: weight each micro-batch's mean by its count.
        metrics = {k: v / tokens * count for k, v in out.sums.items()}
        metrics |= {k: torch.tensor(v, device=count.device) * count
                    for k, v in batch["stats"].items()}
        return LossOutput(out.loss_sum, count, int(mask.sum()), metrics)

    return loss_fn


def build(ctx: StageContext) -> Plan:
    """The rl stage: prompts, rewards, the policy (and reference), batches, loss, evaluation."""
    cfg, dist, out = ctx.cfg, ctx.dist, ctx.out
    assert ctx.base is not None
    rewards = parse_rewards(cfg.reward)
    model, tokenizer, context = load_base(ctx.base, None)
    needs = tuple(dict.fromkeys(k for r in rewards for k in r.needs))
    room = context - cfg.max_completion_length
    if room < 1:
        raise TinyLMError(f"max_completion_length ({cfg.max_completion_length}) leaves no room "
                          f"for a prompt in the model's context ({context})")
    prompts, prompt_ids, stats = encode_prompts(tokenizer, ctx.data, needs, room, "train", out)
    val_prompts, val_ids, val_stats = [], [], None
    if ctx.val_data:
        val_prompts, val_ids, val_stats = encode_prompts(tokenizer, ctx.val_data, needs, room,
                                                         "validation", out)
        if cfg.eval_prompts:
            val_prompts, val_ids = val_prompts[: cfg.eval_prompts], val_ids[: cfg.eval_prompts]
    data_meta = describe_data(ctx.data, ctx.val_data, stats, val_stats)
    if ctx.resume:
        check_resume_data(ctx.run_dir, data_meta["digests"])
    elif dist.is_main:
        clear_rollouts(ctx.run_dir)

    t, G = cfg.train, cfg.num_generations
    accum = accumulation_steps(t.batch_size * G, t.micro_batch, dist.world_size,
                               "train.batch_size x num_generations")
    model.eval()
    frozen = ctx.frozen_copy(model) if cfg.beta and not cfg.lora.enabled else None
    model, trainable, total = make_trainable(model, cfg.lora, t.seed, tokenizer)
    disable_dropout(model)
    model = ctx.place(model)
    lora = cfg.lora.enabled

    def reference(rollouts: Rollouts) -> torch.Tensor:
        if frozen is not None:
            return score_rollouts(frozen, rollouts, cfg.temperature, t.micro_batch)
        with adapter_disabled(model):
            return score_rollouts(model, rollouts, cfg.temperature, t.micro_batch)

    settings = SamplingSettings(G, cfg.max_completion_length, cfg.temperature, cfg.top_p,
                                cfg.top_k, cfg.scale_rewards, cfg.steps_per_generation,
                                cfg.num_iterations, t.micro_batch)
    source = GroupBatches(model, tokenizer, prompts, prompt_ids, rewards, settings,
                          batch_size=t.batch_size, accum_steps=accum, seed=t.seed,
                          rank=dist.rank, world_size=dist.world_size, run_dir=ctx.run_dir,
                          reference=reference if cfg.beta else None, out=out)
    train_cfg = t.resolved(source.steps_for(cfg.epochs), LORA_LR if lora else FULL_LR)
    ref_name = "none" if not cfg.beta else "adapter disabled" if lora else "frozen copy"
    out.info(f"GRPO ({cfg.loss_type}, G {G}, beta {cfg.beta}, reference {ref_name}, "
             f"{'LoRA' if lora else 'full'}): {trainable:,} of {total:,} parameters train; "
             f"{train_cfg.max_steps} steps of {t.batch_size} prompts x {G} completions; "
             f"reward {', '.join(f'{r.name} x {r.weight:g}' for r in rewards)}")
    saved, meta = run_record(ctx, "rl", train_cfg, data_meta, trainable, total)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return evaluate_rewards(model, tokenizer, val_prompts, val_ids, rewards,
                                max_new_tokens=cfg.max_completion_length,
                                temperature=cfg.temperature,
                                generations=cfg.eval_generations, seed=t.seed, dist=dist,
                                batch_size=4 * t.micro_batch)

    return Plan(model, source, make_loss_fn(cfg), train_cfg, accum, tokenizer, meta,
                report_config={**saved, "data_counts": {"train": stats.as_dict()}},
                evaluate=evaluate if val_prompts else None,
                adapter_base=ctx.base if lora else None)


STAGE = Stage("rl", RLConfig, build, what="an rl run",
              no_data=("no prompts", 'give --data PROMPTS.jsonl ({"prompt", "answer"} a line)'))


def rl(base: str | Path | None, data: list[str] | None, run_dir: str | Path, *,
       config: str | Path | None = None, val_data: list[str] | None = None,
       overrides: list[str] | None = None, values: dict[str, Any] | None = None,
       resume: bool = False, force: bool = False, out: Output = SILENT) -> TrainResult:
    """`tinylm rl`: GRPO of run `base` on prompts JSONL `data` against the config's reward,
    into `run_dir`. Config: defaults < `config` YAML < `overrides` < `values` (flags). With
    `resume`, the run's saved config, base run and data are the defaults."""
    return launch(STAGE, run_dir, base=base, data=data, val_data=val_data, config=config,
                  overrides=overrides, values=values, resume=resume, force=force, out=out)
