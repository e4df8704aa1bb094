"""The losses of every stage, as pure functions of tensors (no model, no config object).

    lm_loss          next-token cross-entropy summed over counted positions (pretraining)
    sequence_logps   per-row summed log-probabilities of the labels under a mask
    masked_lm_loss   mean cross-entropy over masked positions
    sft_loss         the loop's loss for instruction batches: response tokens only
    dpo_loss         per-pair DPO losses (sigmoid / hinge / ipo) and implicit rewards
    dpo_batch_loss   a DPO batch's summed loss and TRL-named metric sums

The training loop (`tinylm.train.loop`) takes a loss that returns a `LossOutput`: the loss
SUMMED over `count` units, so that the loop can weight uneven micro-batches correctly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from tinylm.errors import TinyLMError

if TYPE_CHECKING:
    from torch import nn

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


class LossOutput(NamedTuple):
    """What a loss function returns: a sum over `count` units, and optional extras."""

    loss_sum: torch.Tensor
    count: torch.Tensor | int
    tokens: torch.Tensor | int | None = None
    metrics: dict[str, torch.Tensor] | None = None


def lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropies in nats, number of tokens counted).

    `logits` (B, T, V), `targets` (B, T); targets equal to -100 are skipped, and so are
    positions where `loss_mask` (B, T) is 0. Computed in float32.
    """
    losses = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    counted = targets.reshape(-1) != -100
    if loss_mask is not None:
        counted = counted & loss_mask.reshape(-1).bool()
    weights = counted.to(losses.dtype)
    return (losses * weights).sum(), weights.sum()


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Per-row sum of log p(labels[t]) over the positions where `mask` is True. Shape (B,).

    `logits` (B, T, V) and `labels` (B, T) are already aligned (next-token pairs).
    """
    token_logps = -F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), reduction="none"
    ).view(labels.shape)
    return (token_logps * mask).sum(-1)


def masked_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy over the positions where `mask` is True (the response tokens)."""
    flat_mask = mask.flatten()
    if not bool(flat_mask.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.flatten(0, 1)[flat_mask].float(), labels.flatten()[flat_mask])


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple:
    """(summed cross-entropy over response tokens, their count, tokens processed)."""
    extra = {k: batch[k] for k in ("position_ids", "attention_mask") if k in batch}
    logits = model(batch["input_ids"], **extra)
    mask = batch["loss_mask"]
    loss_sum = -sequence_logps(logits, batch["labels"], mask).sum()
    return loss_sum, mask.sum(), batch.get("n_tokens")


def dpo_loss(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
    beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
    lengths: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the implicit rewards beta * (logp_policy - logp_ref).

    With d = (pc - rc) - (pr - rr): sigmoid: -(1-e) log s(beta d) - e log s(-beta d)
    (e = label_smoothing, conservative DPO); hinge: relu(1 - beta d); ipo: (d - 1/(2 beta))^2.
    `lengths` (response tokens of the chosen and rejected sides): IPO then compares
    log-ratios averaged per token, as TRL does; the rewards stay the summed ones.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise TinyLMError(f"unknown DPO loss {loss_type!r}",
                          f"use one of {', '.join(DPO_LOSS_TYPES)}")
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss_type == "ipo" and lengths is not None:
        delta = chosen_ratio / lengths[0] - rejected_ratio / lengths[1]
    else:
        delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                  - label_smoothing * F.logsigmoid(-beta * delta))
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:
        losses = (delta - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def dpo_batch_loss(
    logps: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, *, beta: float,
    loss_type: str = "sigmoid", label_smoothing: float = 0.0, sft_weight: float = 0.0,
) -> LossOutput:
    """DPO loss sum and metric sums of one batch whose rows are [chosen..., rejected...].

    `logps`, `ref` (2n,) summed response log-probs under the policy and the reference; `mask`
    (2n, T) the response positions. Metrics are named as in TRL (rewards/chosen, ...).
    """
    pc, pr = logps.chunk(2)
    rc, rr = ref.chunk(2)
    n_chosen, n_rejected = mask.sum(-1).clamp(min=1).to(logps.dtype).chunk(2)
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta, loss_type, label_smoothing,
                                            lengths=(n_chosen, n_rejected))
    metrics = {}
    if sft_weight:
        # RPO: the preferred answer's own likelihood, so that generations move, not only the
        # margin. Per pair, normalised by its length (TRL's "sft" loss averages over the
        # batch's tokens instead: the same when the chosen answers are equally long).
        nll = -pc / n_chosen
        losses = losses + sft_weight * nll
        metrics["nll_loss"] = nll.detach().sum()
    metrics |= {"rewards/chosen": chosen_r.sum(), "rewards/rejected": rejected_r.sum(),
                "rewards/accuracies": (chosen_r > rejected_r).float().sum(),
                "rewards/margins": (chosen_r - rejected_r).sum(),
                "logps/chosen": pc.detach().sum(), "logps/rejected": pr.detach().sum()}
    return LossOutput(losses.sum(), len(pc), int(mask.shape[0] * mask.shape[1]), metrics)
