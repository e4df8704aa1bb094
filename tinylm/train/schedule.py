"""Learning-rate schedules as pure functions of the step, so resume needs only the step.

    cosine    linear warmup, then a half cosine from the peak down to `min_lr_ratio`
    wsd       linear warmup, constant (stable), then a linear decay over the last
              `decay_fraction` of the steps (warmup-stable-decay, as in MiniCPM)
    constant  linear warmup, then the peak
"""

from __future__ import annotations

import math

from tinylm.train.config import TrainConfig


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """The factor (0 to 1] of the peak learning rate for optimizer step `step` (0-based)."""
    total, warmup = cfg.max_steps, min(cfg.warmup_steps, cfg.max_steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(total - 1 - warmup, 1)  # the last step lands on the floor
        progress = min((step - warmup) / span, 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_steps = round(cfg.decay_fraction * total)
    decay_start = max(total - decay_steps, warmup)
    if step < decay_start or decay_steps == 0:
        return 1.0
    progress = min((step - decay_start + 1) / max(total - decay_start, 1), 1.0)
    return 1.0 - (1.0 - floor) * progress
