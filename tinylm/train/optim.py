"""Optimizers: AdamW with weight decay on matrices only, or Muon for the hidden matrices.

Weight decay pulls weights towards zero; on biases and norm gains that only hurts (their scale
is the point), so they go in a group without decay. Muon (orthogonalised momentum) is for the
2-D weights inside the blocks; embeddings, the head, biases and norms stay with AdamW, as in
the Muon paper.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from tinylm.train.config import TrainConfig

# Coefficients of the quintic Newton-Schulz iteration (Jordan et al., "Muon", 2024).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(grad: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """An approximation of U V^T for grad = U S V^T, by Newton-Schulz iterations.

    bf16 on CUDA (fast there); float32 elsewhere, because bf16 matmuls on a CPU are an order of
    magnitude slower (the reason tinylm has its own Muon instead of torch.optim.Muon's bf16).
    """
    a, b, c = NS_COEFFICIENTS
    x = grad.to(torch.bfloat16 if grad.is_cuda else torch.float32)
    x = x / (x.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(grad.dtype)


def _orthogonal_update(grad: torch.Tensor, steps: int) -> torch.Tensor:
    """`orthogonalize(grad)`; under FSDP2 (`grad` a DTensor sharded by rows) of the whole
    matrix, gathered on every process, of which each keeps its own rows."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(grad, DTensor):
        return orthogonalize(grad, steps)
    full = orthogonalize(grad.full_tensor(), steps)
    return distribute_tensor(full, grad.device_mesh, grad.placements, src_data_rank=None)


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update is orthogonalised (all singular values ~1),
    scaled by sqrt(max(1, rows / cols)), with decoupled weight decay. For 2-D weights only."""

    def __init__(self, params: Iterable, lr: float = 0.02, momentum: float = 0.95,
                 weight_decay: float = 0.0, ns_steps: int = 5) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                    "ns_steps": ns_steps}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """One update of every parameter that has a gradient."""
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(p.grad)
                update = _orthogonal_update(p.grad.add(buf, alpha=mu), group["ns_steps"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * max(1.0, p.shape[0] / p.shape[1]) ** 0.5)



def is_hidden_matrix(name: str, param: nn.Parameter) -> bool:
    """True for a 2-D weight inside the blocks (not an embedding or the output head)."""
    return param.ndim == 2 and "embed" not in name and "lm_head" not in name


def decay_groups(named: list[tuple[str, nn.Parameter]], cfg: TrainConfig) -> list[dict]:
    """Two AdamW parameter groups: matrices (ndim >= 2) with decay, the rest without."""
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr},
    ]
    return [g for g in groups if g["params"]]


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """The optimizers for `model`'s trainable parameters (one, or Muon + AdamW)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    on_cuda = any(p.is_cuda for _, p in named)
    # torch's fused AdamW kernel, also on a CPU: there a step takes 0.15-0.3x the time of the
    # default for-loop (small: 11 against 43 ms; gpt2-124m: 132 against 870 ms). Not for FSDP's
    # sharded parameters on a CPU, which it does not take.
    fused = on_cuda or not cfg.fsdp
    adamw_args = {"betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, "fused": fused or None}
    if cfg.optimizer == "adamw":
        return [torch.optim.AdamW(decay_groups(named, cfg), lr=cfg.lr, **adamw_args)]
    hidden = [p for n, p in named if is_hidden_matrix(n, p)]
    rest = [(n, p) for n, p in named if not is_hidden_matrix(n, p)]
    optimizers: list[torch.optim.Optimizer] = []
    if hidden:
        muon_group = {"params": hidden, "base_lr": cfg.muon_lr}
        optimizers.append(
            Muon([muon_group], lr=cfg.muon_lr, weight_decay=cfg.weight_decay)
        )
    if rest:
        optimizers.append(torch.optim.AdamW(decay_groups(rest, cfg), lr=cfg.lr, **adamw_args))
    return optimizers


def set_lr(optimizers: list[torch.optim.Optimizer], multiplier: float) -> None:
    """Set every group's learning rate to its peak (`base_lr`) times `multiplier`."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * multiplier
