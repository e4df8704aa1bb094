"""Instruction tuning (`tinylm finetune`): its config, and the glue to the shared loop.

`run_finetune` loads a base run, reads instruction JSONL (`tinylm.sft`), renders every example
with the chat template into ids and a response mask, and hands the shared training loop
(`tinylm.train.loop.train`) a batch source (`tinylm.sft.SFTBatches`) and a masked
cross-entropy (`tinylm.sft.sft_loss`): only the assistant's tokens are learned. With
`lora.enabled` the model is wrapped by PEFT and only the adapters train; the run then holds
the adapter files and names its base (`tinylm.lora`).

At each evaluation: `val_loss` (nats per response token) on the validation split and, when
`data.exact_match` > 0, `val_exact_match`: the share of validation questions whose greedy
answer equals the reference answer (the last assistant turn), whitespace at the ends ignored.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from tinylm.config import build_config, to_dict
from tinylm.console import SILENT, Output
from tinylm.errors import TinyLMError
from tinylm.lora import LoraSettings
from tinylm.sft import (
    Conversation,
    EncodeStats,
    SFTBatches,
    encode_conversations,
    read_conversations,
    sft_loss,
)
from tinylm.sft.evaluate import exact_match, validation_loss
from tinylm.train.config import TrainConfig

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import nn

    from tinylm.tokenizer import Tokenizer
    from tinylm.train.distributed import DistInfo
    from tinylm.train.loop import TrainResult

Item = TypeVar("Item")

FULL_LR = 3e-4  # below pretraining's 1e-3: tuning should not undo what was learned
LORA_LR = 3e-3  # adapters start at zero and are few; they need larger steps


@dataclass
class FinetuneTrainConfig(TrainConfig):
    """TrainConfig with tuning defaults, plus `batch_size`: examples per optimizer step (packed
    windows with packing). `max_steps` 0: from `epochs`; `lr` 0: 3e-4, or 3e-3 with LoRA."""

    max_steps: int = 0
    lr: float = 0.0
    batch_size: int = 32
    micro_batch: int = 8
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    eval_every: int = 50
    save_every: int = 0

    def __post_init__(self) -> None:
        chosen = {"max_steps": self.max_steps, "lr": self.lr}
        for key, value in chosen.items():
            if value < 0:
                raise TinyLMError(f"train.{key} must be 0 (automatic) or positive, got {value}")
            setattr(self, key, value or 1)  # the shared checks see a valid value meanwhile
        super().__post_init__()
        for key, value in chosen.items():
            setattr(self, key, value)
        if self.batch_size < 1:
            raise TinyLMError(f"train.batch_size must be positive, got {self.batch_size}")


@dataclass
class FinetuneDataConfig:
    """How examples become batches, the validation split and the exact-match evaluation."""

    max_length: int | None = None  # tokens per window; None: the model's max_seq_len
    packing: bool = False  # several examples per window (positions and attention per example)
    val_fraction: float = 0.1  # held out from --data when no --val-data is given
    exact_match: int = 64  # validation questions answered greedily at each eval (0: off)
    max_new_tokens: int = 0  # for those answers; 0: the longest reference answer + 8


@dataclass
class FinetuneConfig:
    """Everything `tinylm finetune` reads from --config, --set and its flags."""

    epochs: float = 3.0
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise TinyLMError(f"epochs must be positive, got {self.epochs}")
        if not 0.0 <= self.data.val_fraction < 1.0:
            raise TinyLMError(f"data.val_fraction must be in [0, 1), got {self.data.val_fraction}")


def load_config(
    yaml_path: str | Path | None, overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> FinetuneConfig:
    """The effective config: defaults < `base` (a saved run) < YAML < `--set` overrides."""
    return build_config(FinetuneConfig, yaml_path, overrides, base)


def split_validation(
    conversations: list[Conversation], fraction: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """(train, validation): a seeded random `fraction` held out (at least one example)."""
    if fraction <= 0 or len(conversations) < 2:
        return conversations, []
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_val = min(len(order) - 1, max(1, round(len(order) * fraction)))
    held = set(order[:n_val])
    train = [c for i, c in enumerate(conversations) if i not in held]
    return train, [c for i, c in enumerate(conversations) if i in held]


def clear_run(out_dir: Path) -> None:
    """Remove what an earlier run left in `out_dir` (with --force); other files stay."""
    from tinylm.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
    from tinylm.run import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE
    from tinylm.train.checkpoint import CHECKPOINTS
    from tinylm.train.report import CURVE_FILE, METRICS_FILE, REPORT_FILE

    shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, ADAPTER_CONFIG_FILE,
                 ADAPTER_WEIGHTS_FILE, METRICS_FILE, REPORT_FILE, CURVE_FILE):
        (out_dir / name).unlink(missing_ok=True)


def resolve_train(cfg: FinetuneConfig, steps_from_epochs: int) -> FinetuneTrainConfig:
    """The train section with the automatic values (max_steps, lr) filled in."""
    return dataclasses.replace(
        cfg.train,
        max_steps=cfg.train.max_steps or steps_from_epochs,
        lr=cfg.train.lr or (LORA_LR if cfg.lora.enabled else FULL_LR),
    )


def effective_config(cfg: FinetuneConfig, train_cfg: FinetuneTrainConfig) -> dict[str, Any]:
    """The config as saved in the run (automatic values resolved)."""
    return {**to_dict(cfg), "train": to_dict(train_cfg)}


def describe_data(files: list[Path], val_files: list[Path], train_stats: EncodeStats,
               val_stats: EncodeStats | None) -> dict[str, Any]:
    from tinylm.data import file_digest

    return {
        "files": [str(p) for p in files],
        "val_files": [str(p) for p in val_files],
        "digests": {str(p): file_digest(p) for p in [*files, *val_files]},
        "train": train_stats.as_dict(),
        "val": val_stats.as_dict() if val_stats is not None else None,
    }


def _report_counts(what: str, stats: EncodeStats, context: int, out: Output) -> None:
    out.info(f"{what}: {stats.kept:,} examples, {stats.tokens:,} tokens "
             f"({stats.target_tokens:,} trained on)")
    if stats.truncated:
        out.warn(f"{what}: {stats.truncated:,} examples longer than {context + 1} tokens "
                 f"were truncated (their start kept)")
    if stats.skipped:
        first = stats.skipped_sources[0]
        out.warn(f"{what}: {stats.skipped:,} examples had no response token left within the "
                 f"context and were skipped (first: {first})")


def check_resume_data(out_dir: Path, digests: dict[str, str]) -> None:
    """On --resume, the data must be what the run started with (the batches depend on it)."""
    from tinylm.run import read_run_config
    from tinylm.train.checkpoint import resume_source

    saved = read_run_config(resume_source(out_dir)).get("data", {}).get("digests", {})
    if sorted(saved.values()) != sorted(digests.values()):
        raise TinyLMError(f"{out_dir}: --resume with different data than the run started with",
                          "give the same --data/--val-data files, or start a new run")


def start_run(
    base: str | Path, out_dir: str | Path, val_files: list[Path] | None, dist: DistInfo | None,
    *, resume: bool, force: bool,
) -> tuple[DistInfo, Path, Path, list[Path]]:
    """(dist, base, out_dir, val_files) normalized; with --force (not --resume) what an earlier
    run left in `out_dir` is cleared (by the main process)."""
    from tinylm.train.distributed import DistInfo

    dist = dist or DistInfo()
    base, out_dir, val_files = Path(base), Path(out_dir), list(val_files or [])
    if not resume and force and out_dir.is_dir() and dist.is_main:
        clear_run(out_dir)
    return dist, base, out_dir, val_files


def read_splits(
    read: Callable[[Path], list[Item]], data_files: list[Path], val_files: list[Path],
    fraction: float, seed: int,
) -> tuple[list[Item], list[Item]]:
    """(train, validation) items: all of `data_files` and `val_files`, or a seeded split."""
    items = [x for path in data_files for x in read(path)]
    if val_files:
        return items, [x for path in val_files for x in read(path)]
    return split_validation(items, fraction, seed)


def load_start(base: Path, max_length: int | None) -> tuple[nn.Module, Tokenizer, int]:
    """The base run's (plain or adapter run) model and tokenizer, and the window length:
    `max_length`, or the model's context."""
    from tinylm.lora import is_adapter_run, load_adapter_run
    from tinylm.run import load_run

    base_run = load_adapter_run(base) if is_adapter_run(base) else load_run(base)
    model = base_run.model
    context = max_length or model.config.max_seq_len
    if not 2 <= context <= model.config.max_seq_len:
        raise TinyLMError(f"data.max_length ({context}) must be between 2 and the model's "
                          f"context ({model.config.max_seq_len})")
    return model, base_run.tokenizer, context


def make_trainable(model: nn.Module, lora: LoraSettings, seed: int) -> tuple[nn.Module, int, int]:
    """(model, trainable, total): seeded, wrapped with fresh LoRA adapters when enabled."""
    from tinylm.lora import apply_lora, count_parameters

    torch.manual_seed(seed)
    if lora.enabled:
        model = apply_lora(model, lora)
    trainable, total = count_parameters(model)
    return model, trainable, total


def checkpoint_callbacks(
    lora_enabled: bool, base: Path, tokenizer: Tokenizer, meta: dict[str, Any]
) -> tuple[Callable[[Path, nn.Module, dict[str, Any]], None], Callable[[Path, nn.Module], None]]:
    """The loop's (save_model, load_model): the adapter files (+ tokenizer) with LoRA, else a
    full run naming its base."""
    from tinylm.lora import load_adapter, save_adapter
    from tinylm.run import TOKENIZER_FILE, WEIGHTS_FILE, load_weights, save_run

    def save_model(directory: Path, m: nn.Module, info: dict[str, Any]) -> None:
        if lora_enabled:
            save_adapter(directory, m, base, {**meta, "progress": info})
            tokenizer.save(directory / TOKENIZER_FILE)
        else:
            run_meta = {**meta, "base_run": {"path": str(base.resolve())}, "progress": info}
            save_run(directory, m, tokenizer, run_meta)  # type: ignore[arg-type]

    def load_model(checkpoint: Path, m: nn.Module) -> None:
        if lora_enabled:
            load_adapter(m, checkpoint)
        else:
            load_weights(m, checkpoint / WEIGHTS_FILE)  # type: ignore[arg-type]

    return save_model, load_model


def run_finetune(
    cfg: FinetuneConfig,
    base: str | Path,
    data_files: list[Path],
    out_dir: str | Path,
    *,
    val_files: list[Path] | None = None,
    dist: DistInfo | None = None,
    resume: bool = False,
    force: bool = False,
    out: Output = SILENT,
) -> TrainResult:
    """Tune the run `base` on instruction data and write the run (or adapter run) `out_dir`
    (checked by the caller, `finetune`)."""
    from tinylm.train.loop import accumulation_steps, train

    dist, base, out_dir, val_files = start_run(base, out_dir, val_files, dist, resume=resume,
                                               force=force)
    train_convs, val_convs = read_splits(read_conversations, data_files, val_files,
                                         cfg.data.val_fraction, cfg.train.seed)
    model, tokenizer, context = load_start(base, cfg.data.max_length)

    train_examples, train_stats = encode_conversations(tokenizer, train_convs, context)
    _report_counts("train", train_stats, context, out)
    val_examples, val_stats = [], None
    if val_convs:
        val_examples, val_stats = encode_conversations(tokenizer, val_convs, context)
        _report_counts("validation", val_stats, context, out)
    if not train_examples:
        raise TinyLMError("no training example has a response token within the context",
                          "raise data.max_length or shorten the prompts")
    data_meta = describe_data(data_files, val_files, train_stats, val_stats)
    if resume:
        check_resume_data(out_dir, data_meta["digests"])

    t = cfg.train
    accum = accumulation_steps(t.batch_size, t.micro_batch, dist.world_size, "train.batch_size")
    source = SFTBatches(train_examples, t.micro_batch, accum * dist.world_size, t.seed,
                        tokenizer.eot_id, context if cfg.data.packing else None)
    train_cfg = resolve_train(cfg, source.steps_for(cfg.epochs))
    model, trainable, total = make_trainable(model, cfg.lora, t.seed)
    out.info(f"{'LoRA' if cfg.lora.enabled else 'full'} tuning: {trainable:,} of {total:,} "
             f"parameters train ({100 * trainable / total:.2f}%); {train_cfg.max_steps} steps "
             f"of {t.batch_size} {'windows' if cfg.data.packing else 'examples'}")
    saved = effective_config(cfg, train_cfg)
    meta = {"stage": "finetune", "finetune": saved, "data": data_meta,
            "parameters": {"trainable": trainable, "total": total}}

    save_model, load_model = checkpoint_callbacks(cfg.lora.enabled, base, tokenizer, meta)

    def evaluate(m: nn.Module) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if val_examples:
            metrics.update(validation_loss(m, val_examples, t.micro_batch, tokenizer.eot_id, dist))
        if cfg.data.exact_match and val_convs:
            metrics.update(exact_match(model, tokenizer, val_convs[: cfg.data.exact_match],
                                       cfg.data.max_new_tokens, t.micro_batch))
        return metrics

    return train(model, source, sft_loss, train_cfg, run_dir=out_dir, accum_steps=accum,
                 save_model=save_model, evaluate=evaluate if val_convs else None,
                 load_model=load_model, dist=dist, resume=resume,
                 config={**saved, "data_counts": {"train": train_stats.as_dict()}},
                 title="finetune", out=out)


def finetune(
    base: str | Path | None,
    data: list[str] | None,
    run_dir: str | Path,
    *,
    config: str | Path | None = None,
    val_data: list[str] | None = None,
    overrides: list[str] | None = None,
    resume: bool = False,
    force: bool = False,
    out: Output = SILENT,
) -> TrainResult:
    """`tinylm finetune`: tune run `base` on instruction JSONL `data`, into `run_dir`.

    With `resume`, the run's saved config is the base (`overrides` still apply), and the base
    run and data default to the ones it was started with. Works the same under torchrun.
    """
    return launch("finetune", load_config, run_finetune, base, data, run_dir, config=config,
                  val_data=val_data, overrides=overrides, resume=resume, force=force, out=out,
                  what="a finetuning run", no_data=("no training data", "give --data FILE.jsonl"),
                  warn_config=True)


def launch(
    stage: str,
    load: Callable[..., Any],
    run: Callable[..., TrainResult],
    base: str | Path | None,
    data: list[str] | None,
    run_dir: str | Path,
    *,
    config: str | Path | None,
    val_data: list[str] | None,
    overrides: list[str] | None,
    resume: bool,
    force: bool,
    out: Output,
    what: str,
    no_data: tuple[str, str],
    warn_config: bool,
) -> TrainResult:
    """The shared body of `finetune` and `tinylm.dpo.dpo`: the config (`load(yaml, overrides,
    base)`; on --resume from the run's saved `stage` section, the base run and data defaulting
    to its own), the checks, then `run(cfg, base, files, run_dir, ...)` under torchrun or not.
    `what` names the run kind in the --resume error; `no_data` is (message, hint) when no data
    is given; `warn_config`: warn that --config is ignored on --resume."""
    from tinylm.lora import run_inputs
    from tinylm.run import read_run_config
    from tinylm.textio import check_distinct, check_output_dir
    from tinylm.train.checkpoint import resume_source
    from tinylm.train.distributed import setup_distributed, shutdown_distributed

    run_dir = Path(run_dir)
    if resume:
        saved = read_run_config(resume_source(run_dir))  # the newest intact checkpoint's
        if saved.get("stage") != stage:
            raise TinyLMError(f"{run_dir}: not {what}; cannot --resume it")
        if warn_config and config is not None:
            out.warn("--resume uses the run's saved config; --config is ignored (use --set)")
        cfg = load(None, overrides, saved[stage])
        base = base or saved.get("base_run", {}).get("path")
        data = data or saved["data"]["files"]
        val_data = val_data or saved["data"]["val_files"] or None
    else:
        check_output_dir(run_dir, force)
        cfg = load(config, overrides)
    if base is None:
        raise TinyLMError("no base run", "give --base RUN (a pretrained or finetuned run)")
    for source in run_inputs(base):  # --force would clear the base run before reading it
        check_distinct(source, run_dir)
    if not data:
        raise TinyLMError(*no_data)
    dist = setup_distributed(cfg.train.device)
    try:
        return run(cfg, base, [Path(p) for p in data], run_dir,
                   val_files=[Path(p) for p in val_data or []], dist=dist, resume=resume,
                   force=force, out=out)
    finally:
        shutdown_distributed()
