"""Instruction tuning (`tinylm finetune`): its config, and its stage for the launcher.

The stage loads a base run, reads instruction JSONL (`tinylm.sft`), renders every example
with the chat template into ids and a response mask, and hands the shared loop a batch source
(`tinylm.sft.SFTBatches`) and the masked cross-entropy `tinylm.losses.sft_loss`: only the
assistant's tokens are learned. With `lora.enabled` the model is wrapped by PEFT and only the
adapters train; the run then holds the adapter files and names its base (`tinylm.run`).

At each evaluation: `val_loss` (nats per response token) on the validation split and, when
`data.exact_match` > 0, `val_exact_match`: the share of validation questions whose greedy
answer equals the reference answer (the last assistant turn), whitespace at the ends ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from tinylm.errors import TinyLMError
from tinylm.lora import LoraSettings
from tinylm.losses import sft_loss
from tinylm.sft import SFTBatches, encode_conversations, read_conversations
from tinylm.sft.evaluate import exact_match, validation_loss
from tinylm.train.batching import split_batch
from tinylm.train.loop import TrainResult
from tinylm.train.stage import Plan, Stage, StageContext, launch
from tinylm.tuning import (
    TuningTrainConfig,
    check_resume_data,
    check_tuning,
    describe_data,
    make_trainable,
    report_counts,
    run_record,
    start,
)

FULL_LR = 3e-4  # below pretraining's 1e-3: tuning should not undo what was learned
LORA_LR = 3e-3  # adapters start at zero and are few; they need larger steps


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
    train: TuningTrainConfig = field(default_factory=TuningTrainConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        check_tuning(self.epochs, self.data.val_fraction)


def build(ctx: StageContext) -> Plan:
    """The finetune stage: data, base model, batches, loss and evaluation for the loop."""
    cfg, dist, out = ctx.cfg, ctx.dist, ctx.out
    train_convs, val_convs, model, tokenizer, context = start(ctx, read_conversations)

    train_examples, train_stats = encode_conversations(tokenizer, train_convs, context)
    report_counts("train", "examples", train_stats, context, out)
    val_examples, val_stats = [], None
    if val_convs:
        val_examples, val_stats = encode_conversations(tokenizer, val_convs, context)
        report_counts("validation", "examples", val_stats, context, out)
    if not train_examples:
        raise TinyLMError("no training example has a response token within the context",
                          "raise data.max_length or shorten the prompts")
    data_meta = describe_data(ctx.data, ctx.val_data, train_stats, val_stats)
    if ctx.resume:
        check_resume_data(ctx.run_dir, data_meta["digests"])

    t = cfg.train
    split = split_batch(t.batch_size, t.micro_batch, dist.world_size, "train.batch_size")
    source = SFTBatches(train_examples, split.nominal, split.micros_per_step, t.seed,
                        tokenizer.eot_id, context if cfg.data.packing else None)
    train_cfg = t.resolved(source.steps_for(cfg.epochs),
                           LORA_LR if cfg.lora.enabled else FULL_LR)
    model, trainable, total = make_trainable(model, cfg.lora, t.seed, tokenizer)
    out.info(f"{'LoRA' if cfg.lora.enabled else 'full'} tuning: {trainable:,} of {total:,} "
             f"parameters train ({100 * trainable / total:.2f}%); {train_cfg.max_steps} steps "
             f"of {t.batch_size} {'windows' if cfg.data.packing else 'examples'}")
    model = ctx.place(model)
    saved, meta = run_record(ctx, "finetune", train_cfg, data_meta, trainable, total)

    def evaluate(m: nn.Module) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if val_examples:
            metrics.update(validation_loss(m, val_examples, t.micro_batch, tokenizer.eot_id, dist))
        if cfg.data.exact_match and val_convs:
            metrics.update(exact_match(model, tokenizer, val_convs[: cfg.data.exact_match],
                                       cfg.data.max_new_tokens, t.micro_batch))
        return metrics

    return Plan(model, source, sft_loss, train_cfg, split, tokenizer, meta,
                report_config={**saved, "data_counts": {"train": train_stats.as_dict()}},
                evaluate=evaluate if val_convs else None,
                adapter_base=ctx.base if cfg.lora.enabled else None)


STAGE = Stage("finetune", FinetuneConfig, build, what="a finetuning run",
              no_data=("no training data", "give --data FILE.jsonl"))
load_config = STAGE.load_config


def finetune(base: str | Path | None, data: list[str] | None, run_dir: str | Path,
             **options: Any) -> TrainResult:
    """`tinylm finetune`: tune run `base` on instruction JSONL `data`, into `run_dir`.

    `options` are `tinylm.train.stage.launch`'s: config (YAML), overrides ("key=value"),
    values (flag values), val_data, resume, force, out. With `resume`, the run's saved config
    is the base, and the base run and data default to the ones it was started with. Works the
    same under torchrun.
    """
    return launch(STAGE, run_dir, base=base, data=data, **options)
