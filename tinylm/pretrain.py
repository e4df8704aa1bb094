"""Pretraining: the config, the language-model loss, evaluation in bits per byte, and the glue
that gives the shared loop (`tinylm.train.loop.train`) a model, token windows and a loss.

A preset YAML has four sections, each a dataclass here or in tinylm.model:

    model:      ModelConfig (vocab_size is always the tokenizer's)
    train:      PretrainTrainConfig (TrainConfig + batch_tokens, the global batch in tokens)
    data:       DataConfig (window length, validation split, cache)
    tokenizer:  TokenizerConfig (vocab_size set: train one on the data when --tokenizer is absent)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from tinylm.config import build_config, to_dict
from tinylm.console import SILENT, Output
from tinylm.errors import TinyLMError
from tinylm.model import ModelConfig
from tinylm.train.config import TrainConfig

if TYPE_CHECKING:
    from torch import nn

    from tinylm.data import TokenStream
    from tinylm.tokenizer import Tokenizer
    from tinylm.train.distributed import DistInfo
    from tinylm.train.loop import TrainResult


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


@dataclass
class TokenizerConfig:
    """A tokenizer to train on the training data when no --tokenizer is given."""

    vocab_size: int | None = None
    pattern: str = "gpt4"
    max_bytes: int | None = None  # train on at most this much text

    def __post_init__(self) -> None:
        from tinylm.chat import DEFAULT_SPECIAL_TOKENS
        from tinylm.tokenizer.training import n_merges_for

        if self.vocab_size is not None:  # fail now, not after the data is read
            n_merges_for(self.vocab_size, len(DEFAULT_SPECIAL_TOKENS), "tokenizer.vocab_size")


@dataclass
class PretrainConfig:
    """Everything `tinylm pretrain` reads from --config and --set."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


def load_config(
    yaml_path: str | Path | None, overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> PretrainConfig:
    """The effective config: defaults < `base` (a saved run) < YAML < `--set` overrides."""
    return build_config(PretrainConfig, yaml_path, overrides, base)


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


def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int | None = None) -> torch.Tensor:
    """UTF-8 bytes each token id stands for; 0 for special tokens (they are not text)."""
    size = vocab_size or tokenizer.vocab_size
    special = set(tokenizer.special_tokens.values())
    lengths = [
        0 if i in special or i >= tokenizer.vocab_size else len(tokenizer.token_bytes(i))
        for i in range(size)
    ]
    return torch.tensor(lengths, dtype=torch.float64)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    stream: TokenStream,
    seq_len: int,
    batch_size: int,
    byte_lengths: torch.Tensor,
    max_tokens: int = 0,
    dist: DistInfo | None = None,
) -> dict[str, float]:
    """val_loss (nats per token) and val_bpb (bits per byte of text) over `stream`.

    Consecutive windows cover the stream once (at most `max_tokens` targets). bpb counts the
    loss of text tokens over their bytes, leaving out special tokens (end of text), so runs
    with different tokenizers compare. Under several processes each takes every world-th
    window and all run the same number of equally shaped batches (padded with zero weight).
    """
    from tinylm.data import eval_window, eval_windows
    from tinylm.train.distributed import DistInfo, all_reduce_sum

    dist = dist or DistInfo()
    device = next(model.parameters()).device
    n, length = eval_windows(stream, seq_len, max_tokens)
    mine = list(range(dist.rank, n, dist.world_size))
    per_rank = math.ceil(math.ceil(n / dist.world_size) / batch_size) * batch_size
    mine += [-1] * (per_rank - len(mine))
    byte_lengths = byte_lengths.to(device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats, tokens, text nats, bytes
    for first in range(0, per_rank, batch_size):
        chunk = mine[first:first + batch_size]
        rows = [eval_window(stream, max(i, 0), length) for i in chunk]
        x = torch.from_numpy(np.stack([r[0] for r in rows])).to(device)
        y = torch.from_numpy(np.stack([r[1] for r in rows])).to(device)
        weight = torch.tensor([float(i >= 0) for i in chunk], dtype=torch.float64, device=device)
        logits = model(x)
        nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        nats = nats.view(y.shape).double() * weight[:, None]
        n_bytes = byte_lengths[y] * weight[:, None]
        sums += torch.stack([nats.sum(), weight.sum() * length,
                             (nats * (n_bytes > 0)).sum(), n_bytes.sum()])
    nats_sum, tokens, text_nats, n_bytes = all_reduce_sum(sums, dist).tolist()
    return {
        "val_loss": nats_sum / tokens,
        "val_bpb": text_nats / (math.log(2) * n_bytes) if n_bytes else float("nan"),
        "val_tokens": tokens,
    }


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


def run_pretraining(
    cfg: PretrainConfig,
    tokenizer: Tokenizer,
    train_stream: TokenStream,
    val_stream: TokenStream,
    run_dir: Path,
    *,
    dist: DistInfo,
    resume: bool = False,
    data_files: dict[str, list[str]] | None = None,
    out: Output = SILENT,
) -> TrainResult:
    """Build the model and hand it to the shared loop with token windows and `lm_loss`."""
    from tinylm.data import eval_windows, sample_windows
    from tinylm.model import Transformer
    from tinylm.run import save_run
    from tinylm.train.loop import accumulation_steps, train

    model_cfg, seq_len = fit_model_config(cfg, tokenizer)
    t = cfg.train
    accum = accumulation_steps(t.batch_tokens, t.micro_batch * seq_len, dist.world_size,
                               "train.batch_tokens")
    if len(train_stream) < seq_len + 1:
        files = ", ".join((data_files or {}).get("train", [])) or "given"
        raise TinyLMError(
            f"the training data ({files}) has {len(train_stream):,} tokens, fewer than one "
            f"window of {seq_len + 1}", "give more text or a shorter data.seq_len",
        )
    eval_windows(val_stream, seq_len)  # a clear error now rather than at the first evaluation
    torch.manual_seed(t.seed)
    model = Transformer(model_cfg)
    byte_lengths = token_byte_lengths(tokenizer, model_cfg.vocab_size)
    saved = effective_config(cfg, model_cfg)

    def batches(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_windows(train_stream, seq_len, t.micro_batch, t.seed, step, micro)

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
        return lm_loss(m(batch[0]), batch[1])

    def evaluate_fn(m: nn.Module) -> dict[str, float]:
        result = evaluate(m, val_stream, seq_len, t.micro_batch, byte_lengths, t.eval_tokens, dist)
        return {k: result[k] for k in ("val_loss", "val_bpb")}

    def save_model(directory: Path, m: nn.Module, info: dict[str, Any]) -> None:
        meta = {"stage": "pretrain", "pretrain": {k: v for k, v in saved.items() if k != "model"},
                "data_files": data_files or {}, "progress": info}
        save_run(directory, m, tokenizer, meta)  # type: ignore[arg-type]

    n_params = sum(p.numel() for p in model.parameters())
    out.info(f"model: {n_params:,} parameters; {len(train_stream):,} training tokens, "
             f"{len(val_stream):,} validation tokens; {accum} micro-batches of "
             f"{t.micro_batch} x {seq_len} per step on {dist.world_size} process(es)")
    return train(model, batches, loss_fn, t, run_dir=run_dir, accum_steps=accum,
                 save_model=save_model, evaluate=evaluate_fn, dist=dist, resume=resume,
                 config=saved, title="pretrain", out=out)


def resolve_tokenizer(
    spec: str | None, cfg: PretrainConfig, files: list[str], holdout: bool, dist: DistInfo,
    out: Output,
) -> Tokenizer:
    """--tokenizer as given (a tokenizer.json, its directory, or "bytes"), else one trained on
    the training files when the config's `tokenizer.vocab_size` is set (on rank 0, then shared).
    With `holdout` (validation is the tail of the data) it reads at most the bytes before the
    validation fraction, so it does not learn from validation text."""
    import tempfile

    from tinylm.tokenizer import Tokenizer
    from tinylm.train.distributed import broadcast_object

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
        from tinylm.textio import expand_paths

        total = sum(p.stat().st_size for p in expand_paths(files))
        before_val = int(total * (1 - cfg.data.val_fraction))
        max_bytes = before_val if max_bytes is None else min(max_bytes, before_val)
    text = None
    with tempfile.TemporaryDirectory() as tmp:
        if dist.is_main:
            out.info(f"training a tokenizer with {tok_cfg.vocab_size:,} tokens on the data")
            trained = Tokenizer.train_files(
                files, tok_cfg.vocab_size, pattern=tok_cfg.pattern, max_bytes=max_bytes,
                out=out,
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
    from tinylm.data import encode_corpus, split_stream
    from tinylm.train.distributed import barrier

    allowed = special_tokens_read(tokenizer, cfg.data.allow_special)

    def streams(quiet: bool) -> tuple[TokenStream, TokenStream]:
        show = SILENT if quiet else out
        stream = encode_corpus(files, tokenizer, cfg.data.cache_dir, show, allowed_special=allowed)
        if val_files:
            return stream, encode_corpus(val_files, tokenizer, cfg.data.cache_dir, show,
                                         allowed_special=allowed)
        return split_stream(stream, cfg.data.val_fraction)

    if dist.local_rank == 0:
        result = streams(quiet=not dist.is_main)
    barrier(dist)
    if dist.local_rank != 0:
        result = streams(quiet=True)
    return result


def pretrain(
    data: list[str] | None,
    run_dir: str | Path,
    *,
    config: str | Path | None = None,
    tokenizer: str | None = None,
    val_data: list[str] | None = None,
    overrides: list[str] | None = None,
    resume: bool = False,
    force: bool = False,
    out: Output = SILENT,
) -> TrainResult:
    """`tinylm pretrain`: train a model from scratch on `data`, into `run_dir`.

    With `resume`, the run's saved config is the base (`overrides` still apply), the run's
    tokenizer is used, and training continues from its latest checkpoint exactly.
    Works the same under torchrun (DDP; FSDP2 with train.fsdp).
    """
    import shutil

    from tinylm.run import TOKENIZER_FILE, read_run_config
    from tinylm.textio import check_output_dir
    from tinylm.tokenizer import Tokenizer
    from tinylm.train.checkpoint import resume_source
    from tinylm.train.distributed import setup_distributed, shutdown_distributed

    run_dir = Path(run_dir)
    source = run_dir
    if resume:
        source = resume_source(run_dir)  # the newest checkpoint whose settings are intact
        saved = read_run_config(source)
        if saved.get("stage") != "pretrain":
            raise TinyLMError(f"{run_dir}: not a pretraining run; cannot --resume it")
        if config is not None:
            out.warn("--resume uses the run's saved config; --config is ignored (use --set)")
        cfg = load_config(None, overrides, {"model": saved["model"], **saved["pretrain"]})
        files = data or saved.get("data_files", {}).get("train")
        val_data = val_data or saved.get("data_files", {}).get("val") or None
    else:
        check_output_dir(run_dir, force)
        cfg = load_config(config, overrides)
        files = data
    if not files:
        raise TinyLMError("no training data", "give --data FILES or directories")
    dist = setup_distributed(cfg.train.device)
    if not dist.is_main:
        out = SILENT  # rank 0 alone reports
    try:
        if not resume and dist.is_main and force:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        if resume:
            tok = Tokenizer.load(source / TOKENIZER_FILE)
        else:
            tok = resolve_tokenizer(tokenizer, cfg, files, not val_data, dist, out)
        train_stream, val_stream = prepare_streams(files, val_data, tok, cfg, dist, out)
        data_files = {"train": [str(f) for f in files], "val": [str(f) for f in val_data or []]}
        return run_pretraining(cfg, tok, train_stream, val_stream, run_dir, dist=dist,
                               resume=resume, data_files=data_files, out=out)
    finally:
        shutdown_distributed()


def eval_run(
    model_dir: str | Path,
    data: list[str],
    *,
    batch_size: int = 16,
    seq_len: int | None = None,
    max_tokens: int = 0,
    device: str = "auto",
    cache_dir: str | None = None,
    out: Output = SILENT,
) -> dict[str, float]:
    """`tinylm eval`: val_loss and val_bpb of a run on text files (all of it, or `max_tokens`)."""
    from tinylm.data import encode_corpus, eval_windows
    from tinylm.run import load_run
    from tinylm.train.distributed import resolve_device
    from tinylm.train.loop import autocast_context

    dev = resolve_device(device)
    run = load_run(model_dir, str(dev))
    saved_data = run.config.get("pretrain", {}).get("data", {})
    length = seq_len or saved_data.get("seq_len") or run.model.config.max_seq_len
    if not 1 <= length <= run.model.config.max_seq_len:
        raise TinyLMError(f"--seq-len {length} must be between 1 and the model's context "
                          f"({run.model.config.max_seq_len})")
    allowed = special_tokens_read(run.tokenizer, bool(saved_data.get("allow_special")))
    stream = encode_corpus(data, run.tokenizer, cache_dir, out, allowed_special=allowed)
    eval_windows(stream, 2, what=f"the data ({', '.join(map(str, data))})", hint="give more text")
    byte_lengths = token_byte_lengths(run.tokenizer, run.model.config.vocab_size)
    with autocast_context(dev, "auto"):
        result = evaluate(run.model, stream, length, batch_size, byte_lengths, max_tokens)
    return {**result, "tokens": len(stream), "bytes": stream.index["n_bytes"]}
