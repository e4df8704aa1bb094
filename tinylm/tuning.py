"""What the tuning stages (finetune, dpo, rl) share: the train section with tuning defaults,
loading the base run, the validation split, wrapping with LoRA, and what the run records
about its data.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from tinylm.config import to_dict
from tinylm.console import Output
from tinylm.data import file_digest
from tinylm.errors import TinyLMError
from tinylm.lora import LoraSettings, apply_lora, count_parameters, template_token_ids
from tinylm.run import load_run, read_run_config
from tinylm.tokenizer import Tokenizer
from tinylm.train.checkpoint import resume_source
from tinylm.train.config import TrainConfig
from tinylm.train.stage import StageContext

Item = TypeVar("Item")


@dataclass
class TuningTrainConfig(TrainConfig):
    """TrainConfig with tuning defaults, plus `batch_size`: examples (or pairs, or prompts)
    per optimizer step. `max_steps` None: from the stage's epochs; `lr` None: the stage's
    default for full or LoRA tuning."""

    max_steps: int | None = None
    lr: float | None = None
    batch_size: int = 32
    micro_batch: int = 8
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    eval_every: int = 50
    save_every: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1:
            raise TinyLMError(f"train.batch_size must be positive, got {self.batch_size}")

    def resolved(self, steps: int, lr: float) -> TuningTrainConfig:
        """This section with the automatic values filled in: `steps` and `lr` where None."""
        return dataclasses.replace(self, max_steps=self.max_steps or steps, lr=self.lr or lr)


def check_tuning(epochs: float, val_fraction: float) -> None:
    """The checks every tuning stage's config makes of its epochs and validation split."""
    if epochs <= 0:
        raise TinyLMError(f"epochs must be positive, got {epochs}")
    if not 0.0 <= val_fraction < 1.0:
        raise TinyLMError(f"data.val_fraction must be in [0, 1), got {val_fraction}")


def split_validation(items: list[Item], fraction: float, seed: int) -> tuple[list[Item],
                                                                            list[Item]]:
    """(train, validation): a seeded random `fraction` held out (at least one item)."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = min(len(order) - 1, max(1, round(len(order) * fraction)))
    held = set(order[:n_val])
    train = [c for i, c in enumerate(items) if i not in held]
    return train, [c for i, c in enumerate(items) if i in held]


def read_splits(
    read: Callable[[Path], list[Item]], data_files: list[str], val_files: list[str],
    fraction: float, seed: int,
) -> tuple[list[Item], list[Item]]:
    """(train, validation) items: all of `data_files` and `val_files`, or a seeded split."""
    items = [x for path in data_files for x in read(Path(path))]
    if val_files:
        return items, [x for path in val_files for x in read(Path(path))]
    return split_validation(items, fraction, seed)


def start(ctx: StageContext, read: Callable[[Path], list[Item]]) -> tuple[
        list[Item], list[Item], nn.Module, Tokenizer, int]:
    """What a tuning stage starts from: (train items, validation items, the base model, its
    tokenizer, the window length), read with `read` from the stage's data files."""
    assert ctx.base is not None
    cfg = ctx.cfg
    train, val = read_splits(read, ctx.data, ctx.val_data, cfg.data.val_fraction, cfg.train.seed)
    model, tokenizer, context = load_base(ctx.base, cfg.data.max_length)
    return train, val, model, tokenizer, context


def load_base(base: Path, max_length: int | None) -> tuple[nn.Module, Tokenizer, int]:
    """The base run's model (plain, or an adapter run merged) and tokenizer, and the window
    length: `max_length`, or the model's context."""
    run = load_run(base)
    context = max_length or run.model.config.max_seq_len
    if not 2 <= context <= run.model.config.max_seq_len:
        raise TinyLMError(f"data.max_length ({context}) must be between 2 and the model's "
                          f"context ({run.model.config.max_seq_len})")
    return run.model, run.tokenizer, context


def make_trainable(model: nn.Module, lora: LoraSettings, seed: int,
                   tokenizer: Tokenizer | None = None) -> tuple[nn.Module, int, int]:
    """(model, trainable, total): seeded, wrapped with fresh LoRA adapters when enabled (and
    the rows of `tokenizer`'s chat-template tokens, unless lora.train_template_tokens is off)."""
    torch.manual_seed(seed)
    if lora.enabled:
        model = apply_lora(model, lora, template_token_ids(tokenizer) if tokenizer else ())
    trainable, total = count_parameters(model)
    return model, trainable, total


def describe_data(files: list[str], val_files: list[str], train_stats: Any,
                  val_stats: Any | None) -> dict[str, Any]:
    """config.json's record of the data: the files, their digests and the counts."""
    return {
        "files": [str(p) for p in files],
        "val_files": [str(p) for p in val_files],
        "digests": {str(p): file_digest(Path(p)) for p in [*files, *val_files]},
        "train": train_stats.as_dict(),
        "val": val_stats.as_dict() if val_stats is not None else None,
    }


def check_resume_data(out_dir: Path, digests: dict[str, str]) -> None:
    """On --resume, the data must be what the run started with (the batches depend on it)."""
    saved = read_run_config(resume_source(out_dir)).get("data", {}).get("digests", {})
    if sorted(saved.values()) != sorted(digests.values()):
        raise TinyLMError(f"{out_dir}: --resume with different data than the run started with",
                          "give the same --data/--val-data files, or start a new run")


def report_counts(what: str, unit: str, stats: Any, context: int, out: Output) -> None:
    """The counts of an encoded split, and warnings for truncated or skipped items."""
    out.info(f"{what}: {stats.kept:,} {unit}, {stats.tokens:,} tokens"
             + (f" ({stats.target_tokens:,} trained on)" if unit == "examples" else ""))
    if stats.truncated:
        out.warn(f"{what}: {stats.truncated:,} {unit} longer than {context + 1} tokens "
                 f"were truncated (their start kept)")
    if stats.skipped:
        out.warn(f"{what}: {stats.skipped:,} {unit} had no response token left within the "
                 f"context and were skipped (first: {stats.skipped_sources[0]})")


def run_record(ctx: StageContext, stage: str, train_cfg: TrainConfig, data_meta: dict[str, Any],
               trainable: int, total: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the effective settings, config.json's record) of a tuning run: its stage, settings
    (automatic values resolved), data and parameter counts, and for full tuning its base run
    (an adapter run names its base itself)."""
    saved = {**to_dict(ctx.cfg), "train": to_dict(train_cfg)}
    meta: dict[str, Any] = {"stage": stage, stage: saved, "data": data_meta,
                            "parameters": {"trainable": trainable, "total": total}}
    if not ctx.cfg.lora.enabled and ctx.base is not None:
        meta["base_run"] = {"path": str(ctx.base.resolve())}
    return saved, meta
