"""GRPO's maths as pure functions: group advantages, the clipped objective, the KL penalty.

For a prompt, G completions o_1..o_G are sampled and scored r_1..r_G. Each completion's
advantage is its reward against its group's:

    A_i = (r_i - mean(r)) / (std(r) + eps)      scale_rewards="group" (GRPO, DeepSeekMath)
    A_i =  r_i - mean(r)                         scale_rewards="none"  (Dr. GRPO: no std)
    A_i = (r_i - mean(r)) / (std(all r) + eps)   scale_rewards="batch" (std over the batch)

(std with Bessel's correction and eps = 1e-4, as TRL). Every token t of o_i then gets

    ratio = exp(logp - old_logp)                 (1 on the first pass over a batch)
    loss_t = -min(ratio * A_i, clip(ratio, 1 - eps_low, 1 + eps_high) * A_i) + beta * kl_t
    kl_t = exp(ref_logp - logp) - (ref_logp - logp) - 1      (Schulman's k3 estimator, >= 0)

and the per-token losses are reduced as TRL's `GRPOConfig.loss_type` names them:

    "grpo"     mean over each completion's tokens, then mean over completions (the paper's;
               long completions count less per token)
    "dapo"     sum over all completion tokens / their number in the batch (DAPO's token-level
               loss: every token weighs the same; TRL's default)
    "dr_grpo"  sum over all completion tokens / (completions x max_completion_length)
               (Dr. GRPO: a constant normaliser, no length bias)

Each reduction is returned as (loss_sum, count): the shared training loop divides the summed
gradient by the count over the whole step, so micro-batches combine exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from tinylm.errors import TinyLMError

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
ADVANTAGE_EPS = 1e-4  # TRL's


def group_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "group",
                     eps: float = ADVANTAGE_EPS) -> Tensor:
    """Advantages (N,) of rewards (N,) laid out as consecutive groups of `group_size`."""
    if scale_rewards not in SCALE_REWARDS:
        raise TinyLMError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, "
                          f"got {scale_rewards!r}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size} (>= 2)")
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale_rewards == "batch":
        advantages = advantages / (rewards.std() + eps)
    return advantages.reshape(-1)


def token_logps(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Log-probabilities (B, T) of `ids` (B, T) under `logits` (B, T, vocab) divided by the
    sampling temperature (the distribution the tokens were drawn from, as TRL scores them),
    and the entropy (B, T) of that distribution."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # a softmax over the vocabulary in half precision loses bits
    logp_all = F.log_softmax(logits / temperature, dim=-1)
    logps = logp_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logps, entropy


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token KL(policy || reference) estimate exp(r - p) - (r - p) - 1 (never negative)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


class GRPOLoss(NamedTuple):
    """A batch's loss as a sum over `count` units, and the sums its metrics are made of."""

    loss_sum: Tensor
    count: Tensor
    tokens: Tensor  # completion tokens in the batch (what kl and clip ratios are means over)
    sums: dict[str, Tensor]  # per-token metric sums: kl, clip_ratio/..., entropy


def reduce_loss(per_token: Tensor, mask: Tensor, loss_type: str,
                max_completion_length: int) -> tuple[Tensor, Tensor]:
    """(loss_sum, count) of per-token losses (B, T) under `mask` (B, T), by `loss_type`."""
    mask = mask.to(per_token.dtype)
    if loss_type == "grpo":
        per_sequence = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_sequence.sum(), torch.tensor(float(per_token.shape[0]))
    if loss_type == "dapo":
        return (per_token * mask).sum(), mask.sum().detach()
    if loss_type == "dr_grpo":
        return (per_token * mask).sum(), torch.tensor(float(per_token.shape[0]
                                                            * max_completion_length))
    raise TinyLMError(f"unknown loss_type {loss_type!r}", f"use one of {', '.join(LOSS_TYPES)}")


def grpo_loss(
    logps: Tensor, old_logps: Tensor | None, advantages: Tensor, mask: Tensor, *,
    loss_type: str = "dapo", epsilon_low: float = 0.2, epsilon_high: float = 0.2,
    beta: float = 0.0, ref_logps: Tensor | None = None, max_completion_length: int = 0,
    entropy: Tensor | None = None,
) -> GRPOLoss:
    """The clipped GRPO objective of completions (B, T): `logps` from the policy being trained,
    `old_logps` from the policy that sampled them (None: the same, ratio 1), `advantages` (B,),
    `mask` (B, T) of completion tokens; with `beta` > 0 the k3 KL to `ref_logps` is added."""
    if old_logps is None:
        old_logps = logps.detach()
    if beta and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps")
    advantages = advantages.to(logps.dtype).unsqueeze(1)  # (B, 1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    weight = mask.to(logps.dtype)
    sums = {}
    if beta:
        assert ref_logps is not None
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
        sums["kl"] = (kl.detach() * weight).sum()
    loss_sum, count = reduce_loss(per_token, mask, loss_type, max_completion_length)
    low = ((ratio < 1 - epsilon_low) & (advantages < 0)).to(weight.dtype)
    high = ((ratio > 1 + epsilon_high) & (advantages > 0)).to(weight.dtype)
    sums["clip_ratio/low_mean"] = (low * weight).sum()
    sums["clip_ratio/high_mean"] = (high * weight).sum()
    sums["clip_ratio/region_mean"] = (torch.maximum(low, high) * weight).sum()
    if entropy is not None:
        sums["entropy"] = (entropy.detach() * weight).sum()
    return GRPOLoss(loss_sum, count, weight.sum(), {k: v.detach() for k, v in sums.items()})
