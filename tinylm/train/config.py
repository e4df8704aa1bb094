"""`TrainConfig`: the settings of the shared training loop (the `train:` section of a config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tinylm.errors import TinyLMError
from tinylm.train.trackers import check_trackers


@dataclass
class TrainConfig:
    """Optimizer, schedule, batch, evaluation and checkpoint settings; every stage uses them.

    Stages add their own batch-size field (pretraining: `batch_tokens`) and derive the number of
    gradient-accumulation steps from it; `micro_batch` is what one device runs per forward.
    """

    max_steps: int | None = 1000  # None: the stage derives it (tuning: from its epochs)
    max_time: float | None = None  # seconds; stop cleanly (eval, save) when it is up
    micro_batch: int = 16  # sequences per forward pass on one device
    optimizer: Literal["adamw", "muon"] = "adamw"
    lr: float | None = 1e-3  # peak (AdamW; Muon's embeddings, norms, head); None: stage's
    muon_lr: float = 0.02  # peak learning rate of the hidden matrices under Muon
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # WSD: the last fraction of steps that decays
    weight_decay: float = 0.1  # applied to matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    eval_every: int = 250  # steps between evaluations (0: only at the end)
    eval_tokens: int = 262144  # validation tokens per evaluation (0: all of them)
    save_every: int = 1000  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # the last K checkpoints are kept
    log_every: int = 10  # steps between metrics.jsonl lines
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA
    compile: bool = False  # torch.compile the model
    fsdp: bool = False  # shard parameters, gradients and optimizer state (FSDP2)
    # trackers that get metrics.jsonl's records live: tensorboard, wandb, mlflow (extras)
    log: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:

        # An unknown or uninstalled tracker fails here, when the config is built, before work.
        self.log = check_trackers([self.log] if isinstance(self.log, str) else self.log)

        def bad(key: str, why: str) -> TinyLMError:
            return TinyLMError(f"train.{key}: {why}", "fix the train section of the config")

        for key in ("max_steps", "micro_batch", "log_every"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise bad(key, f"must be a positive integer, got {getattr(self, key)}")
        for key in ("warmup_steps", "eval_every", "eval_tokens", "save_every"):
            if getattr(self, key) < 0:
                raise bad(key, f"must be 0 or more, got {getattr(self, key)}")
        if self.keep_checkpoints < 1:
            raise bad("keep_checkpoints", f"must be at least 1, got {self.keep_checkpoints}")
        if (self.lr is not None and self.lr <= 0) or self.muon_lr <= 0:
            raise bad("muon_lr" if self.muon_lr <= 0 else "lr", "must be positive")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise bad("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise bad("decay_fraction", f"must be in [0, 1], got {self.decay_fraction}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise bad("beta1" if not 0.0 <= self.beta1 < 1.0 else "beta2", "must be in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            raise bad("weight_decay, grad_clip and eps", "must not be negative (eps positive)")
        if self.max_time is not None and self.max_time <= 0:
            raise bad("max_time", f"must be a positive number of seconds, got {self.max_time}")
