"""Pretraining (`tinylm pretrain`): the config, and the stage that gives the shared loop a
fresh model, token windows, the language-model loss (`tinylm.losses.lm_loss`) and the
evaluation in bits per byte (`tinylm.evaluate.text_scores`).

A preset YAML has four sections, each a dataclass here or in tinylm.model:

    model:      ModelConfig (vocab_size is always the tokenizer's)
    train:      PretrainTrainConfig (TrainConfig + batch_tokens, the global batch in tokens)
    data:       DataConfig (window length, validation split, cache)
    tokenizer:  TokenizerConfig (vocab_size set: train one on the data when --tokenizer is absent)
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinylm.chat import DEFAULT_SPECIAL_TOKENS
from tinylm.config import build_config, to_dict
from tinylm.console import SILENT, Output
from tinylm.data import TokenStream, encode_corpus, eval_windows, sample_windows, split_stream
from tinylm.errors import TinyLMError
from tinylm.evaluate import text_scores, token_byte_lengths
from tinylm.losses import lm_loss
from tinylm.model import ModelConfig, Transformer
from tinylm.run import TOKENIZER_FILE
from tinylm.sources import unweighted
from tinylm.textio import expand_paths
from tinylm.tokenizer import Tokenizer
from tinylm.tokenizer.training import n_merges_for
from tinylm.train.batching import split_tokens
from tinylm.train.config import TrainConfig
from tinylm.train.distributed import DistInfo, barrier, broadcast_object
from tinylm.train.loop import TrainResult
from tinylm.train.stage import Plan, Stage, StageContext, launch


@dataclass
class PretrainTrainConfig(TrainConfig):
    """TrainConfig plus the global batch: `batch_tokens` tokens per optimizer step, reached
    with micro_batch x seq_len x accumulation steps x processes."""

    batch_tokens: int = 16384


@dataclass
class DataConfig:
    """Training windows and the validation split."""

    seq_len: int | None = None  # window length; None: the model's max_seq_len
    val_fraction: float = 0.1  # the last fraction of the token stream (unless --val-data)
    cache_dir: str | None = None  # token shards; None: $TINYLM_CACHE or ~/.cache/tinylm
    # Read special-token spellings in the text ("<|endoftext|>" between documents) as control
    # tokens; by default they are plain text, so scraped text cannot forge them.
    allow_special: bool = False
    text_field: str = "text"  # the JSONL key or parquet column that holds the text


@dataclass
class TokenizerConfig:
    """A tokenizer to train on the training data when no --tokenizer is given."""

    vocab_size: int | None = None
    pattern: str = "gpt4"
    max_bytes: int | None = None  # train on at most this much text

    def __post_init__(self) -> None:
        if self.vocab_size is not None:  # fail now, not after the data is read
            n_merges_for(self.vocab_size, len(DEFAULT_SPECIAL_TOKENS), "tokenizer.vocab_size")


@dataclass
class PretrainConfig:
    """Everything `tinylm pretrain` reads from --config and --set."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


def fit_model_config(cfg: PretrainConfig, tokenizer: Tokenizer) -> tuple[ModelConfig, int]:
    """The model config with the tokenizer's vocabulary, and the training window length."""
    model_cfg = build_config(ModelConfig, base={**to_dict(cfg.model),
                                                "vocab_size": tokenizer.vocab_size})
    seq_len = cfg.data.seq_len or model_cfg.max_seq_len
    if not 1 <= seq_len <= model_cfg.max_seq_len:
        raise TinyLMError(
            f"data.seq_len ({seq_len}) must be between 1 and model.max_seq_len "
            f"({model_cfg.max_seq_len})"
        )
    return model_cfg, seq_len


def effective_config(cfg: PretrainConfig, model_cfg: ModelConfig) -> dict[str, Any]:
    """The config as saved in config.json (the model's vocabulary is the tokenizer's)."""
    return {**to_dict(cfg), "model": to_dict(model_cfg)}


def resolve_tokenizer(
    spec: str | None, cfg: PretrainConfig, files: list[str], holdout: bool, dist: DistInfo,
    out: Output,
) -> Tokenizer:
    """--tokenizer as given (a tokenizer.json, its directory, or "bytes"), else one trained on
    the training files when the config's `tokenizer.vocab_size` is set (on rank 0, then shared).
    With `holdout` (validation is the tail of the data) it reads at most the bytes before the
    validation fraction, so it does not learn from validation text."""
    if spec == "bytes":
        return Tokenizer.bytes_only()
    if spec:
        return Tokenizer.load(spec)
    tok_cfg = cfg.tokenizer
    if tok_cfg.vocab_size is None:
        raise TinyLMError(
            "no tokenizer: give --tokenizer (a tokenizer.json, its directory, or 'bytes')",
            "or set tokenizer.vocab_size in the config to train one on the data",
        )
    max_bytes = tok_cfg.max_bytes
    if holdout:
        total = sum(p.stat().st_size for p in expand_paths(files))
        before_val = int(total * (1 - cfg.data.val_fraction))
        max_bytes = before_val if max_bytes is None else min(max_bytes, before_val)
    text = None
    with tempfile.TemporaryDirectory() as tmp:
        if dist.is_main:
            out.info(f"training a tokenizer with {tok_cfg.vocab_size:,} tokens on the data")
            trained = Tokenizer.train_files(
                unweighted(files, cfg.data.text_field), tok_cfg.vocab_size,
                pattern=tok_cfg.pattern, max_bytes=max_bytes, out=out,
            )
            trained.save(Path(tmp) / "tokenizer.json")
            text = (Path(tmp) / "tokenizer.json").read_text(encoding="utf-8")
        text = broadcast_object(text, dist)
        (Path(tmp) / "shared.json").write_text(text, encoding="utf-8")
        return Tokenizer.load(Path(tmp) / "shared.json")


def special_tokens_read(tokenizer: Tokenizer, allow_special: bool) -> frozenset[str]:
    """The special tokens whose spellings the text may use (data.allow_special): all or none."""
    return frozenset(tokenizer.special_tokens) if allow_special else frozenset()


def prepare_streams(
    files: list[str], val_files: list[str] | None, tokenizer: Tokenizer, cfg: PretrainConfig,
    dist: DistInfo, out: Output,
) -> tuple[TokenStream, TokenStream]:
    """(train, validation) token streams; the first process on each machine encodes (cached),
    the others wait and open the cache."""
    allowed = special_tokens_read(tokenizer, cfg.data.allow_special)

    def streams(quiet: bool) -> tuple[TokenStream, TokenStream]:
        show = SILENT if quiet else out
        field = cfg.data.text_field
        stream = encode_corpus(files, tokenizer, cfg.data.cache_dir, show,
                               allowed_special=allowed, text_field=field)
        if val_files:
            return stream, encode_corpus(val_files, tokenizer, cfg.data.cache_dir, show,
                                         allowed_special=allowed, text_field=field)
        return split_stream(stream, cfg.data.val_fraction)

    if dist.local_rank == 0:
        result = streams(quiet=not dist.is_main)
    barrier(dist)
    if dist.local_rank != 0:
        result = streams(quiet=True)
    return result


def build(ctx: StageContext) -> Plan:
    """The pretrain stage: tokenizer, token streams, a fresh model, windows, loss, bpb."""
    cfg, dist, out = ctx.cfg, ctx.dist, ctx.out
    if ctx.resume:
        assert ctx.source is not None
        tokenizer = Tokenizer.load(ctx.source / TOKENIZER_FILE)
    else:
        tokenizer = resolve_tokenizer(ctx.options.get("tokenizer"), cfg, ctx.data,
                                      not ctx.val_data, dist, out)
    train_stream, val_stream = prepare_streams(ctx.data, ctx.val_data or None, tokenizer, cfg,
                                               dist, out)
    model_cfg, seq_len = fit_model_config(cfg, tokenizer)
    t = cfg.train
    split = split_tokens(t.batch_tokens, seq_len, t.micro_batch, dist.world_size)
    if len(train_stream) < seq_len + 1:
        raise TinyLMError(
            f"the training data ({', '.join(ctx.data)}) has {len(train_stream):,} tokens, fewer "
            f"than one window of {seq_len + 1}", "give more text or a shorter data.seq_len",
        )
    eval_windows(val_stream, seq_len)  # a clear error now rather than at the first evaluation
    torch.manual_seed(t.seed)
    model = Transformer(model_cfg)
    n_params = sum(p.numel() for p in model.parameters())
    model = ctx.place(model)
    byte_lengths = token_byte_lengths(tokenizer, model_cfg.vocab_size)
    saved = effective_config(cfg, model_cfg)

    def batches(step: int, micro: int, rows: slice | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = sample_windows(train_stream, seq_len, split.nominal, t.seed, step,
                                         micro)
        return (inputs, targets) if rows is None else (inputs[rows], targets[rows])

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
        return lm_loss(m(batch[0]), batch[1])

    def evaluate_fn(m: nn.Module) -> dict[str, float]:
        result = text_scores(m, val_stream, seq_len, t.micro_batch, byte_lengths, t.eval_tokens,
                             dist)
        return {k: result[k] for k in ("val_loss", "val_bpb")}

    out.info(f"model: {n_params:,} parameters; {len(train_stream):,} training tokens, "
             f"{len(val_stream):,} validation tokens; {split.accum} micro-batches of "
             f"{split.micro} x {seq_len} per step on {dist.world_size} process(es)")
    meta = {"stage": "pretrain", "pretrain": {k: v for k, v in saved.items() if k != "model"},
            "data": {"files": ctx.data, "val_files": ctx.val_data}}
    return Plan(model, batches, loss_fn, t, split, tokenizer, meta, report_config=saved,
                evaluate=evaluate_fn)


STAGE = Stage("pretrain", PretrainConfig, build, what="a pretraining run",
              no_data=("no training data", "give --data FILES or directories"),
              needs_base=False,
              saved_settings=lambda saved: {"model": saved["model"], **saved["pretrain"]})
load_config = STAGE.load_config


def pretrain(
    data: list[str] | None,
    run_dir: str | Path,
    *,
    config: str | Path | None = None,
    tokenizer: str | None = None,
    val_data: list[str] | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
    resume: bool = False,
    force: bool = False,
    out: Output = SILENT,
) -> TrainResult:
    """`tinylm pretrain`: train a model from scratch on `data`, into `run_dir`.

    Config: defaults < `config` YAML < `overrides` ("key=value") < `values` (flag values).
    With `resume`, the run's saved config is the base (`overrides` still apply), the run's
    tokenizer is used, and training continues from its latest checkpoint exactly.
    Works the same under torchrun (DDP; FSDP2 with train.fsdp).
    """
    return launch(STAGE, run_dir, data=data, val_data=val_data, config=config,
                  overrides=overrides, values=values, options={"tokenizer": tokenizer},
                  resume=resume, force=force, out=out)
