"""`tinylm eval`: score a run on data of any kind, chosen by what the data holds.

    text           plain text files, directories, or JSONL with "text"  -> val_loss, val_bpb
    instruction    JSONL in an instruction format (tinylm.sft.data)      -> response-token loss,
                                                                            greedy exact match
    preference     JSONL {"prompt", "chosen", "rejected"}                -> preference accuracy

JSONL may be .jsonl.gz / .jsonl.zst, and each kind may be parquet (a text column named by
`text_field`, or the columns of an instruction or preference format); directories and globs
name the files (tinylm.sources). Weights on text sources are accepted and change nothing: all
of their text is scored.

Preference accuracy is the share of pairs whose chosen answer has the higher summed log-prob
(`pref_accuracy_logp`), and, when the run names a base run (a tuned or DPO run, or an adapter
run), the share whose chosen answer has the higher log-prob ratio against that base
(`pref_accuracy`, DPO's implicit-reward accuracy).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tinylm.console import SILENT, Output
from tinylm.data import TokenStream, encode_corpus, eval_window, eval_windows
from tinylm.errors import TinyLMError
from tinylm.formats import open_parquet
from tinylm.lora import adapter_disabled
from tinylm.losses import dpo_batch_loss, sequence_logps
from tinylm.run import base_run_path, load_run
from tinylm.sft import encode_conversations, encode_pairs, read_preference_pairs
from tinylm.sft.batch import Pairs, pair_batch
from tinylm.sft.data import detect_format, read_all
from tinylm.sft.evaluate import exact_match, validation_loss
from tinylm.sources import DataFile, expand
from tinylm.textio import iter_jsonl
from tinylm.tokenizer import Tokenizer
from tinylm.train.distributed import DistInfo, all_reduce_sum, resolve_device
from tinylm.train.loop import autocast_context

KINDS = ("text", "instruction", "preference")
_EXPECTED = ('expected text, JSONL with "text", an instruction format ("messages", '
             '"prompt"+"completion", "instruction"+"output") or preference pairs '
             '("prompt", "chosen", "rejected")')


def _record_kind(keys: Any, text_field: str) -> str | None:
    """The kind of data whose first object (or parquet columns) has these keys."""
    if text_field in keys:
        return "text"
    if "chosen" in keys and "rejected" in keys:
        return "preference"
    if detect_format(dict.fromkeys(keys)) is not None:
        return "instruction"
    return None


def _file_kind(file: DataFile) -> str:
    """The kind of one data file: plain text, or what its first object / its columns hold."""
    if file.kind == "text":
        return "text"
    if file.kind == "parquet":

        names = open_parquet(file.path).schema_arrow.names
        kind = _record_kind(names, file.text_field)
        if kind is None:
            raise TinyLMError(f"{file.path}: fits no data kind (columns: "
                              f"{', '.join(names) or 'none'}); {_EXPECTED}")
        return kind
    return _jsonl_kind(file.path, file.text_field)


def _jsonl_kind(path: Path, text_field: str = "text") -> str:
    """The kind of a JSONL file, from its first object."""

    for lineno, obj in iter_jsonl(path):
        if isinstance(obj, dict):
            kind = _record_kind(obj, text_field)
            if kind is not None:
                return kind
        keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
        raise TinyLMError(f"{path}:{lineno}: fits no data kind (got {keys or 'no keys'}); "
                          f"{_EXPECTED}")
    raise TinyLMError(f"{path}: no examples (the file is empty)")


def detect_kind(data: list[str], text_field: str = "text") -> str:
    """"text", "instruction" or "preference" for the `--data` values (all of one kind)."""
    if not data:
        raise TinyLMError("no data to evaluate on", "give --data FILE")
    kinds = {str(f.path): _file_kind(f) for f in expand(data, text_field)}
    found = sorted(set(kinds.values()))
    if len(found) > 1:
        listing = ", ".join(f"{k} ({v})" for k, v in kinds.items())
        raise TinyLMError(f"--data mixes kinds of data: {listing}",
                          "evaluate one kind of data at a time")
    return found[0]


def _base_path(run_dir: str | Path, config: dict[str, Any]) -> Path | None:
    """The run's recorded base run (tuned, DPO or adapter runs), or None."""
    if not isinstance(config.get("base_run"), dict):
        return None
    return base_run_path(run_dir, config)


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
def text_scores(
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


@torch.no_grad()
def pair_logps(model: nn.Module, pairs: Pairs, micro_batch: int, pad_id: int,
               dist: DistInfo | None = None, disable_adapter: bool = False) -> torch.Tensor:
    """(n_pairs, 2) float64 summed response log-probs [chosen, rejected] under `model`, on
    the model's device. Under several processes each computes its share (every world-th pair;
    all run equally many batches) and all receive the whole table."""
    dist = dist or DistInfo()
    device = next(model.parameters()).device
    mine = list(range(dist.rank, len(pairs), dist.world_size))
    n_batches = math.ceil(math.ceil(len(pairs) / dist.world_size) / micro_batch)
    table = torch.zeros(len(pairs), 2, dtype=torch.float64, device=device)
    for b in range(n_batches):
        idx = mine[b * micro_batch:(b + 1) * micro_batch]
        real = len(idx)
        idx = idx or [0]  # an idle rank runs a batch too (FSDP gathers), and drops it
        batch = {k: v.to(device) for k, v in pair_batch(pairs, idx, pad_id).items()}
        ctx = adapter_disabled(model) if disable_adapter else contextlib.nullcontext()
        with ctx:
            logps = sequence_logps(model(batch["input_ids"]), batch["labels"],
                                   batch["loss_mask"])
        if real:
            table[idx] = torch.stack(logps.double().chunk(2), dim=1)
    return all_reduce_sum(table, dist).cpu()


def evaluate_pairs(model: nn.Module, pairs: Pairs, ref: torch.Tensor, micro_batch: int,
                   pad_id: int, dist: DistInfo | None = None, **dpo: Any) -> dict[str, float]:
    """Mean DPO loss and metrics over `pairs` given their reference logps (val_ prefixed);
    `dpo`: the loss settings of `tinylm.losses.dpo_batch_loss` (beta, loss_type, ...)."""
    current = pair_logps(model, pairs, micro_batch, pad_id, dist)
    sums: dict[str, float] = {}
    for at in range(0, len(pairs), micro_batch):
        idx = list(range(at, min(at + micro_batch, len(pairs))))
        mask = pair_batch(pairs, idx, pad_id)["loss_mask"]
        logps = torch.cat([current[idx, 0], current[idx, 1]])
        refs = torch.cat([ref[idx, 0], ref[idx, 1]])
        result = dpo_batch_loss(logps, refs, mask, **{"beta": 0.1, **dpo})
        for key, value in {"loss": result.loss_sum, **(result.metrics or {})}.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    return {f"val_{k}": v / len(pairs) for k, v in sums.items()}


def eval_text(
    model_dir: str | Path,
    data: list[str],
    *,
    batch_size: int = 16,
    seq_len: int | None = None,
    max_tokens: int = 0,
    device: str = "auto",
    cache_dir: str | None = None,
    text_field: str = "text",
    out: Output = SILENT,
) -> dict[str, float]:
    """`tinylm eval`: val_loss and val_bpb of a run on text files (all of it, or `max_tokens`);
    `text_field`: the JSONL key or parquet column of the text."""
    dev = resolve_device(device)
    run = load_run(model_dir, str(dev))
    saved_data = run.config.get("pretrain", {}).get("data", {})
    length = seq_len or saved_data.get("seq_len") or run.model.config.max_seq_len
    if not 1 <= length <= run.model.config.max_seq_len:
        raise TinyLMError(f"--seq-len {length} must be between 1 and the model's context "
                          f"({run.model.config.max_seq_len})")
    allowed = frozenset(run.tokenizer.special_tokens) if saved_data.get("allow_special") \
        else frozenset()
    stream = encode_corpus(data, run.tokenizer, cache_dir, out, allowed_special=allowed,
                           text_field=text_field)
    eval_windows(stream, 2, what=f"the data ({', '.join(map(str, data))})", hint="give more text")
    byte_lengths = token_byte_lengths(run.tokenizer, run.model.config.vocab_size)
    with autocast_context(dev, "auto"):
        result = text_scores(run.model, stream, length, batch_size, byte_lengths, max_tokens)
    return {**result, "tokens": len(stream), "bytes": stream.index["n_bytes"]}


def eval_instruction(run: Any, data: list[str], batch_size: int, max_new_tokens: int = 0,
                     out: Output = SILENT) -> dict[str, Any]:
    """Mean loss per response token and greedy exact match of a loaded run on instruction
    JSONL files (`tinylm.sft.evaluate`)."""
    conversations = read_all(data)
    examples, stats = encode_conversations(run.tokenizer, conversations,
                                           run.model.config.max_seq_len)
    if not examples:
        raise TinyLMError("no example has a response token within the model's context")
    if stats.skipped:
        out.warn(f"{stats.skipped:,} examples had no response token within the context "
                 f"(first: {stats.skipped_sources[0]})")
    result: dict[str, Any] = {"examples": len(examples),
                              "response_tokens": stats.target_tokens}
    result.update(validation_loss(run.model, examples, batch_size, run.tokenizer.eot_id))
    result.update(exact_match(run.model, run.tokenizer, conversations, max_new_tokens,
                              batch_size))
    return result


def eval_preference(run: Any, data: list[str], batch_size: int, device: str = "cpu",
                    out: Output = SILENT) -> dict[str, Any]:
    """Preference accuracy of a loaded run on preference JSONL files: by summed log-prob,
    and by log-prob ratio against the run's base when it names one (DPO's implicit reward)."""
    pairs = [p for name in data for p in read_preference_pairs(name)]
    encoded, stats = encode_pairs(run.tokenizer, pairs, run.model.config.max_seq_len)
    if not encoded:
        raise TinyLMError("no preference pair has response tokens within the model's context")
    if stats.skipped:
        out.warn(f"{stats.skipped:,} pairs had no response token within the context "
                 f"(first: {stats.skipped_sources[0]})")
    pad = run.tokenizer.eot_id
    logps = pair_logps(run.model, encoded, batch_size, pad)
    result: dict[str, Any] = {
        "pairs": len(encoded),
        "pref_accuracy_logp": float((logps[:, 0] > logps[:, 1]).double().mean()),
        "logps_chosen": float(logps[:, 0].mean()),
        "logps_rejected": float(logps[:, 1].mean()),
    }
    base_dir = _base_path(run.path, run.config)
    if base_dir is not None:
        base = load_run(base_dir, device)
        if base.tokenizer.fingerprint != run.tokenizer.fingerprint:
            raise TinyLMError(f"{run.path}: its base run {base_dir} has another tokenizer")
        ref = pair_logps(base.model, encoded, batch_size, pad)
        metrics = evaluate_pairs(run.model, encoded, ref, batch_size, pad)
        result["pref_accuracy"] = metrics["val_rewards/accuracies"]
        result["reward_margin"] = metrics["val_rewards/margins"]
        result["base_run"] = str(base_dir)
    return result


def evaluate_data(model_dir: str | Path, data: list[str], *, batch_size: int = 16,
                  seq_len: int | None = None, max_tokens: int = 0, max_new_tokens: int = 0,
                  device: str = "auto", text_field: str = "text",
                  out: Output = SILENT) -> dict[str, Any]:
    """`tinylm eval`: the metrics of run `model_dir` on `data`, by the data's kind (see the
    module docstring); the result's "kind" names it."""
    kind = detect_kind(data, text_field)
    if kind == "text":
        result = eval_text(model_dir, data, batch_size=batch_size, seq_len=seq_len,
                          max_tokens=max_tokens, device=device, text_field=text_field, out=out)
        return {"kind": kind, "val_loss": result["val_loss"], "val_bpb": result["val_bpb"],
                "tokens_scored": int(result["val_tokens"]), "tokens": result["tokens"],
                "bytes": result["bytes"]}
    data = [str(f.path) for f in expand(data)]  # the files of directories and globs
    dev = resolve_device(device)
    run = load_run(model_dir, str(dev))
    with autocast_context(dev, "auto"):
        if kind == "instruction":
            metrics = eval_instruction(run, data, batch_size, max_new_tokens, out)
        else:
            metrics = eval_preference(run, data, batch_size, str(dev), out)
    return {"kind": kind, **metrics}
