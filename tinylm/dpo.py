"""Direct preference optimization (`tinylm dpo`): its config, loss glue and stage.

Each pair is rendered as prompt + chosen and prompt + rejected (`tinylm.sft.encode_pairs`);
log-probabilities are summed over the response tokens only. Per step, the chosen and rejected
sides of the micro-batch go through the model as ONE batch (chosen rows first). The reference
policy is the starting model: a frozen copy, or with LoRA the same PEFT model with its adapter
disabled (no second copy), or with `precompute_ref` log-probabilities computed once up front.
Every forward pass, the reference's included, runs on the training device; the up-front
log-probabilities are computed once, each process its share.

The loss is `tinylm.losses.dpo_batch_loss`. Metrics are named as in TRL: rewards/chosen,
rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected (and
val_* on the validation split).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinylm.console import Output
from tinylm.errors import TinyLMError
from tinylm.evaluate import evaluate_pairs, pair_logps
from tinylm.lora import LoraSettings, adapter_disabled
from tinylm.losses import DPO_LOSS_TYPES, LossOutput, dpo_batch_loss, sequence_logps
from tinylm.sft import encode_pairs, read_preference_pairs
from tinylm.sft.batch import PairBatches, Pairs
from tinylm.train.batching import split_batch
from tinylm.train.loop import TrainResult
from tinylm.train.stage import Plan, Stage, StageContext, launch
from tinylm.tuning import (
    TuningTrainConfig,
    check_resume_data,
    check_tuning,
    describe_data,
    make_trainable,
    run_record,
    start,
)

FULL_LR = 5e-5  # DPO moves the policy gently away from its reference
LORA_LR = 5e-4


@dataclass
class DPODataConfig:
    """Pair windows and the validation split."""

    max_length: int | None = None  # tokens per side; None: the model's max_seq_len
    val_fraction: float = 0.1  # held out from --data when no --val-data is given


@dataclass
class DPOConfig:
    """Everything `tinylm dpo` reads from --config, --set and its flags."""

    epochs: float = 1.0
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    sft_weight: float = 0.0  # + this times the chosen side's mean NLL per token (RPO)
    precompute_ref: bool = False
    train: TuningTrainConfig = field(default_factory=lambda: TuningTrainConfig(
        batch_size=16, micro_batch=4))
    data: DPODataConfig = field(default_factory=DPODataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        check_tuning(self.epochs, self.data.val_fraction)
        if self.beta <= 0:
            raise TinyLMError(f"beta must be positive, got {self.beta}")
        if self.loss_type not in DPO_LOSS_TYPES:
            raise TinyLMError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, "
                              f"got {self.loss_type!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise TinyLMError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.sft_weight < 0:
            raise TinyLMError(f"sft_weight must be >= 0, got {self.sft_weight}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise TinyLMError(f"label_smoothing applies to the sigmoid loss only, not "
                              f"{self.loss_type}", "drop --label-smoothing or use --loss sigmoid")


def loss_settings(cfg: DPOConfig) -> dict[str, Any]:
    """The keyword arguments of `dpo_batch_loss` that the config sets."""
    return {"beta": cfg.beta, "loss_type": cfg.loss_type,
            "label_smoothing": cfg.label_smoothing, "sft_weight": cfg.sft_weight}


def make_loss_fn(cfg: DPOConfig, ref_model: nn.Module | None):
    """The loop's loss: summed DPO loss over the pairs, with TRL-named metric sums.

    Reference log-probabilities come from batch["ref_logps"] when precomputed, else from
    `ref_model`, else from the policy itself with its LoRA adapter disabled."""
    settings = loss_settings(cfg)

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["loss_mask"]
        logps = sequence_logps(model(ids), labels, mask)
        if "ref_logps" in batch:
            ref = batch["ref_logps"].to(logps.dtype)
        elif ref_model is not None:
            with torch.no_grad():
                ref = sequence_logps(ref_model(ids), labels, mask)
        else:
            with adapter_disabled(model):
                ref = sequence_logps(model(ids), labels, mask)
        result = dpo_batch_loss(logps, ref, mask, **settings)
        return result._replace(tokens=batch.get("n_tokens", result.tokens))

    return loss_fn


def _report(what: str, stats: Any, identical: int, out: Output) -> None:
    out.info(f"{what}: {stats.kept:,} pairs, {stats.tokens:,} tokens")
    if identical:
        out.warn(f"{what}: {identical:,} pairs have identical chosen and rejected answers "
                 f"(they teach nothing; their loss stays ln 2)")
    if stats.truncated:
        out.warn(f"{what}: {stats.truncated:,} pairs had a side truncated to the context")
    if stats.skipped:
        out.warn(f"{what}: {stats.skipped:,} pairs had no response token left within the "
                 f"context and were skipped (first: {stats.skipped_sources[0]})")


def build(ctx: StageContext) -> Plan:
    """The dpo stage: pairs, the policy and its reference, batches, loss and evaluation."""
    cfg, dist, out = ctx.cfg, ctx.dist, ctx.out
    train_pairs, val_pairs, model, tokenizer, context = start(ctx, read_preference_pairs)
    train_enc, train_stats = encode_pairs(tokenizer, train_pairs, context)
    identical = sum(p.identical for p in train_pairs)
    _report("train", train_stats, identical, out)
    val_enc: Pairs = []
    val_stats = None
    if val_pairs:
        val_enc, val_stats = encode_pairs(tokenizer, val_pairs, context)
        _report("validation", val_stats, sum(p.identical for p in val_pairs), out)
    if not train_enc:
        raise TinyLMError("no preference pair has response tokens within the context",
                          "raise data.max_length or shorten the prompts")
    data_meta = describe_data(ctx.data, ctx.val_data, train_stats, val_stats)
    data_meta["identical_pairs"] = identical
    if ctx.resume:
        check_resume_data(ctx.run_dir, data_meta["digests"])

    t, pad = cfg.train, tokenizer.eot_id
    split = split_batch(t.batch_size, t.micro_batch, dist.world_size, "train.batch_size")
    model.eval()
    ref_model = None
    if not cfg.lora.enabled and not cfg.precompute_ref:
        ref_model = ctx.frozen_copy(model)
    model, trainable, total = make_trainable(model, cfg.lora, t.seed, tokenizer)
    model = ctx.place(model)
    # The reference is the starting model: with LoRA, the policy with its adapter disabled.
    lora = cfg.lora.enabled
    train_ref = pair_logps(model, train_enc, t.micro_batch, pad, dist, lora) \
        if cfg.precompute_ref else None
    val_ref = pair_logps(model, val_enc, t.micro_batch, pad, dist, lora) if val_enc else None
    source = PairBatches(train_enc, split.nominal, split.micros_per_step, t.seed, pad,
                         train_ref)
    train_cfg = t.resolved(source.steps_for(cfg.epochs), LORA_LR if lora else FULL_LR)
    out.info(f"DPO ({cfg.loss_type}, beta {cfg.beta}, {'LoRA' if lora else 'full'}):"
             f" {trainable:,} of {total:,} parameters train; {train_cfg.max_steps} steps of "
             f"{t.batch_size} pairs")
    saved, meta = run_record(ctx, "dpo", train_cfg, data_meta, trainable, total)

    def evaluate(m: nn.Module) -> dict[str, float]:
        assert val_ref is not None
        return evaluate_pairs(m, val_enc, val_ref, t.micro_batch, pad, dist,
                              **loss_settings(cfg))

    return Plan(model, source, make_loss_fn(cfg, ref_model), train_cfg, split, tokenizer, meta,
                report_config={**saved, "data_counts": {"train": train_stats.as_dict()}},
                evaluate=evaluate if val_enc else None,
                adapter_base=ctx.base if lora else None)


STAGE = Stage("dpo", DPOConfig, build, what="a DPO run",
              no_data=("no preference data", "give --data PAIRS.jsonl"))
load_config = STAGE.load_config


def dpo(base: str | Path | None, data: list[str] | None, run_dir: str | Path,
        **options: Any) -> TrainResult:
    """`tinylm dpo`: align run `base` on preference JSONL `data`, into `run_dir`.

    `options` are `tinylm.train.stage.launch`'s (config, overrides, values, val_data, resume,
    force, out). With `resume`, the run's saved config is the base, and the base run and data
    default to the ones it was started with."""
    return launch(STAGE, run_dir, base=base, data=data, **options)
