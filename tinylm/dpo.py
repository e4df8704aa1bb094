"""Direct preference optimization (`tinylm dpo`): the loss, its config, and the loop glue.

Each pair is rendered as prompt + chosen and prompt + rejected (`tinylm.sft.encode_pairs`);
log-probabilities are summed over the response tokens only. Per step, the chosen and rejected
sides of the micro-batch go through the model as ONE batch (chosen rows first). The reference
policy is the starting model: a frozen copy, or with LoRA the same PEFT model with its adapter
disabled (no second copy), or with `precompute_ref` log-probabilities computed once up front.

Metrics are named as in TRL: rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected (and val_* on the validation split).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from tinylm.config import build_config, to_dict
from tinylm.console import SILENT, Output
from tinylm.errors import TinyLMError
from tinylm.finetune import (
    FinetuneTrainConfig,
    check_resume_data,
    checkpoint_callbacks,
    describe_data,
    launch,
    load_start,
    make_trainable,
    read_splits,
    start_run,
)
from tinylm.lora import LoraSettings
from tinylm.sft import collate_padded, encode_pairs, read_preference_pairs, sequence_logps

if TYPE_CHECKING:
    from torch import nn

    from tinylm.sft import TokenizedExample
    from tinylm.train.distributed import DistInfo
    from tinylm.train.loop import TrainResult

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
FULL_LR = 5e-5  # DPO moves the policy gently away from its reference
LORA_LR = 5e-4
Pairs = list[tuple["TokenizedExample", "TokenizedExample"]]


def dpo_loss(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
    beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the implicit rewards beta * (logp_policy - logp_ref).

    With d = (pc - rc) - (pr - rr): sigmoid: -(1-e) log s(beta d) - e log s(-beta d)
    (e = label_smoothing, conservative DPO); hinge: relu(1 - beta d); ipo: (d - 1/(2 beta))^2.
    """
    if loss_type not in LOSS_TYPES:
        raise TinyLMError(f"unknown DPO loss {loss_type!r}", f"use one of {', '.join(LOSS_TYPES)}")
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                  - label_smoothing * F.logsigmoid(-beta * delta))
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:
        losses = (delta - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


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
    train: FinetuneTrainConfig = field(default_factory=lambda: FinetuneTrainConfig(
        batch_size=16, micro_batch=4))
    data: DPODataConfig = field(default_factory=DPODataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise TinyLMError(f"epochs must be positive, got {self.epochs}")
        if self.beta <= 0:
            raise TinyLMError(f"beta must be positive, got {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            raise TinyLMError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, "
                              f"got {self.loss_type!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise TinyLMError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.sft_weight < 0:
            raise TinyLMError(f"sft_weight must be >= 0, got {self.sft_weight}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise TinyLMError(f"label_smoothing applies to the sigmoid loss only, not "
                              f"{self.loss_type}", "drop --label-smoothing or use --loss sigmoid")
        if not 0.0 <= self.data.val_fraction < 1.0:
            raise TinyLMError(f"data.val_fraction must be in [0, 1), got {self.data.val_fraction}")


def load_config(yaml_path: str | Path | None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> DPOConfig:
    """The effective config: defaults < `base` (a saved run) < YAML < `--set` overrides."""
    return build_config(DPOConfig, yaml_path, overrides, base)


def pair_batch(pairs: Pairs, indices: list[int], pad_id: int,
               ref: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One batch of 2n rows: the chosen sides, then the rejected sides (+ their ref logps)."""
    batch = collate_padded([pairs[i][0] for i in indices] + [pairs[i][1] for i in indices],
                           pad_id)
    out = {"input_ids": batch.input_ids, "labels": batch.labels, "loss_mask": batch.loss_mask,
           "n_tokens": torch.tensor(sum(len(pairs[i][s].input_ids) - 1
                                        for i in indices for s in (0, 1)))}
    if ref is not None:
        idx = torch.tensor(indices)
        out["ref_logps"] = torch.cat([ref[idx, 0], ref[idx, 1]])
    return out


class PairBatches:
    """The loop's batch source: a seeded shuffle of the pairs per epoch, `micro_batch` pairs
    per micro-batch; a pure function of (seed, step, micro)."""

    def __init__(self, pairs: Pairs, micro_batch: int, micros_per_step: int, seed: int,
                 pad_id: int, ref: torch.Tensor | None = None) -> None:
        self.pairs, self.micro_batch, self.micros_per_step = pairs, micro_batch, micros_per_step
        self.seed, self.pad_id, self.ref = seed, pad_id, ref
        self.per_epoch = math.ceil(len(pairs) / micro_batch)

    def steps_for(self, epochs: float) -> int:
        """Optimizer steps that cover `epochs` passes over the pairs."""
        return max(1, math.ceil(epochs * self.per_epoch / self.micros_per_step))

    def __call__(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        from tinylm.train.loop import step_seed

        k = step * self.micros_per_step + micro
        order = list(range(len(self.pairs)))
        random.Random(step_seed(self.seed, k // self.per_epoch, 1)).shuffle(order)
        at = (k % self.per_epoch) * self.micro_batch
        return pair_batch(self.pairs, order[at : at + self.micro_batch], self.pad_id, self.ref)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP


def reference_context(model: nn.Module) -> contextlib.AbstractContextManager:
    """No-grad context in which a PEFT `model` acts as its base (adapter disabled)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    stack.enter_context(_unwrap(model).disable_adapter())
    return stack


def make_loss_fn(cfg: DPOConfig, ref_model: nn.Module | None):
    """The loop's loss: summed DPO loss over the pairs, with TRL-named metric sums.

    Reference log-probabilities come from batch["ref_logps"] when precomputed, else from
    `ref_model`, else from the policy itself with its LoRA adapter disabled."""

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        from tinylm.train.loop import LossOutput

        ids, labels, mask = batch["input_ids"], batch["labels"], batch["loss_mask"]
        logps = sequence_logps(model(ids), labels, mask)
        if "ref_logps" in batch:
            ref = batch["ref_logps"].to(logps.dtype)
        elif ref_model is not None:
            with torch.no_grad():
                ref = sequence_logps(ref_model(ids), labels, mask)
        else:
            with reference_context(model):
                ref = sequence_logps(model(ids), labels, mask)
        result = dpo_outputs(cfg, logps, ref, mask, LossOutput)
        return result._replace(tokens=batch.get("n_tokens", result.tokens))

    return loss_fn


def dpo_outputs(cfg: DPOConfig, logps: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor,
                wrap: Any) -> Any:
    """DPO loss sum and metric sums of one batch whose rows are [chosen..., rejected...]."""
    pc, pr = logps.chunk(2)
    rc, rr = ref.chunk(2)
    if cfg.loss_type == "ipo":  # as TRL: log-ratios averaged per response token
        nc, nr = mask.sum(-1).clamp(min=1).to(logps.dtype).chunk(2)
        scaled = (pc / nc, pr / nr, rc / nc, rr / nr)
    else:
        scaled = (pc, pr, rc, rr)
    losses, _, _ = dpo_loss(*scaled, cfg.beta, cfg.loss_type, cfg.label_smoothing)
    chosen_r, rejected_r = cfg.beta * (pc - rc).detach(), cfg.beta * (pr - rr).detach()
    metrics = {}
    if cfg.sft_weight:
        # RPO: the preferred answer's own likelihood, so that generations move, not only the
        # margin. Per pair, normalised by its length (TRL's "sft" loss averages over the
        # batch's tokens instead: the same when the chosen answers are equally long).
        nll = -pc / mask.sum(-1).clamp(min=1).to(logps.dtype).chunk(2)[0]
        losses = losses + cfg.sft_weight * nll
        metrics["nll_loss"] = nll.detach().sum()
    metrics |= {"rewards/chosen": chosen_r.sum(), "rewards/rejected": rejected_r.sum(),
               "rewards/accuracies": (chosen_r > rejected_r).float().sum(),
               "rewards/margins": (chosen_r - rejected_r).sum(),
               "logps/chosen": pc.detach().sum(), "logps/rejected": pr.detach().sum()}
    return wrap(losses.sum(), len(pc), int(mask.shape[0] * mask.shape[1]), metrics)


@torch.no_grad()
def reference_logps(model: nn.Module, pairs: Pairs, micro_batch: int, pad_id: int,
                    disable_adapter: bool = False) -> torch.Tensor:
    """(n_pairs, 2) float64 summed response log-probs [chosen, rejected] under `model`."""
    device = next(model.parameters()).device
    rows = []
    for at in range(0, len(pairs), micro_batch):
        idx = list(range(at, min(at + micro_batch, len(pairs))))
        b = {k: v.to(device) for k, v in pair_batch(pairs, idx, pad_id).items()}
        ctx = reference_context(model) if disable_adapter else contextlib.nullcontext()
        with ctx:
            logps = sequence_logps(model(b["input_ids"]), b["labels"], b["loss_mask"])
        rows.append(torch.stack(logps.double().cpu().chunk(2), dim=1))
    return torch.cat(rows)


def evaluate_pairs(model: nn.Module, cfg: DPOConfig, pairs: Pairs, micro_batch: int,
                   pad_id: int, ref: torch.Tensor) -> dict[str, float]:
    """Mean DPO loss and metrics over `pairs` given their reference logps (val_ prefixed)."""
    current = reference_logps(model, pairs, micro_batch, pad_id)
    sums: dict[str, float] = {}
    for at in range(0, len(pairs), micro_batch):
        idx = list(range(at, min(at + micro_batch, len(pairs))))
        mask = pair_batch(pairs, idx, pad_id)["loss_mask"]
        logps = torch.cat([current[idx, 0], current[idx, 1]])
        refs = torch.cat([ref[idx, 0], ref[idx, 1]])
        out = dpo_outputs(cfg, logps, refs, mask, lambda loss, n, t, m: {"loss": loss, **m})
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    return {f"val_{k}": v / len(pairs) for k, v in sums.items()}


def _report(what: str, encoded: Pairs, stats: Any, identical: int, out: Output) -> None:
    out.info(f"{what}: {stats.kept:,} pairs, {stats.tokens:,} tokens")
    if identical:
        out.warn(f"{what}: {identical:,} pairs have identical chosen and rejected answers "
                 f"(they teach nothing; their loss stays ln 2)")
    if stats.truncated:
        out.warn(f"{what}: {stats.truncated:,} pairs had a side truncated to the context")
    if stats.skipped:
        out.warn(f"{what}: {stats.skipped:,} pairs had no response token left within the "
                 f"context and were skipped (first: {stats.skipped_sources[0]})")


def run_dpo(cfg: DPOConfig, base: str | Path, data_files: list[Path], out_dir: str | Path, *,
            val_files: list[Path] | None = None, dist: DistInfo | None = None,
            resume: bool = False, force: bool = False, out: Output = SILENT) -> TrainResult:
    """Align the run `base` on preference pairs; write the run (or adapter run) `out_dir`."""
    from tinylm.train.loop import accumulation_steps, train

    dist, base, out_dir, val_files = start_run(base, out_dir, val_files, dist, resume=resume,
                                               force=force)
    train_pairs, val_pairs = read_splits(read_preference_pairs, data_files, val_files,
                                         cfg.data.val_fraction, cfg.train.seed)
    model, tokenizer, context = load_start(base, cfg.data.max_length)
    train_enc, train_stats = encode_pairs(tokenizer, train_pairs, context)
    identical = sum(p.identical for p in train_pairs)
    _report("train", train_enc, train_stats, identical, out)
    val_enc, val_stats = [], None
    if val_pairs:
        val_enc, val_stats = encode_pairs(tokenizer, val_pairs, context)
        _report("validation", val_enc, val_stats, sum(p.identical for p in val_pairs), out)
    if not train_enc:
        raise TinyLMError("no preference pair has response tokens within the context",
                          "raise data.max_length or shorten the prompts")
    data_meta = describe_data(data_files, val_files, train_stats, val_stats)
    data_meta["identical_pairs"] = identical
    if resume:
        check_resume_data(out_dir, data_meta["digests"])

    t, pad = cfg.train, tokenizer.eot_id
    accum = accumulation_steps(t.batch_size, t.micro_batch, dist.world_size, "train.batch_size")
    model.eval()
    train_ref = reference_logps(model, train_enc, t.micro_batch, pad) if cfg.precompute_ref \
        else None
    val_ref = reference_logps(model, val_enc, t.micro_batch, pad) if val_enc else None
    ref_model = None
    if not cfg.lora.enabled and not cfg.precompute_ref:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    source = PairBatches(train_enc, t.micro_batch, accum * dist.world_size, t.seed, pad,
                         train_ref)
    train_cfg = dataclasses.replace(t, max_steps=t.max_steps or source.steps_for(cfg.epochs),
                                    lr=t.lr or (LORA_LR if cfg.lora.enabled else FULL_LR))
    model, trainable, total = make_trainable(model, cfg.lora, t.seed)
    out.info(f"DPO ({cfg.loss_type}, beta {cfg.beta}, {'LoRA' if cfg.lora.enabled else 'full'}):"
             f" {trainable:,} of {total:,} parameters train; {train_cfg.max_steps} steps of "
             f"{t.batch_size} pairs")
    saved = {**to_dict(cfg), "train": to_dict(train_cfg)}
    meta = {"stage": "dpo", "dpo": saved, "data": data_meta,
            "parameters": {"trainable": trainable, "total": total}}
    if ref_model is not None:
        ref_model.to(dist.device)

    save_model, load_model = checkpoint_callbacks(cfg.lora.enabled, base, tokenizer, meta)

    def evaluate(m: nn.Module) -> dict[str, float]:
        assert val_ref is not None
        return evaluate_pairs(m, cfg, val_enc, t.micro_batch, pad, val_ref)

    return train(model, source, make_loss_fn(cfg, ref_model), train_cfg, run_dir=out_dir,
                 accum_steps=accum, save_model=save_model,
                 evaluate=evaluate if val_enc else None, load_model=load_model, dist=dist,
                 resume=resume, config={**saved, "data_counts": {"train": train_stats.as_dict()}},
                 title="dpo", out=out)


def dpo(base: str | Path | None, data: list[str] | None, run_dir: str | Path, *,
        config: str | Path | None = None, val_data: list[str] | None = None,
        overrides: list[str] | None = None, resume: bool = False, force: bool = False,
        out: Output = SILENT) -> TrainResult:
    """`tinylm dpo`: align run `base` on preference JSONL `data`, into `run_dir`.

    With `resume`, the run's saved config is the base (`overrides` still apply), and the base
    run and data default to the ones it was started with."""
    return launch("dpo", load_config, run_dpo, base, data, run_dir, config=config,
                  val_data=val_data, overrides=overrides, resume=resume, force=force, out=out,
                  what="a DPO run", no_data=("no preference data", "give --data PAIRS.jsonl"),
                  warn_config=False)
