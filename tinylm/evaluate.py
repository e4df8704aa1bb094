"""`tinylm eval`: score a run on data of any kind, chosen by what the data holds.

    text           plain text files, directories, or JSONL with "text"  -> val_loss, val_bpb
    instruction    JSONL in an instruction format (tinylm.sft.data)      -> response-token loss,
                                                                            greedy exact match
    preference     JSONL {"prompt", "chosen", "rejected"}                -> preference accuracy

Preference accuracy is the share of pairs whose chosen answer has the higher summed log-prob
(`pref_accuracy_logp`), and, when the run names a base run (a tuned or DPO run, or an adapter
run), the share whose chosen answer has the higher log-prob ratio against that base
(`pref_accuracy`, DPO's implicit-reward accuracy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinylm.console import SILENT, Output
from tinylm.errors import TinyLMError

KINDS = ("text", "instruction", "preference")
_EXPECTED = ('expected text, JSONL with "text", an instruction format ("messages", '
             '"prompt"+"completion", "instruction"+"output") or preference pairs '
             '("prompt", "chosen", "rejected")')


def _jsonl_kind(path: Path) -> str:
    """The kind of a JSONL file, from its first object."""
    from tinylm.sft.data import detect_format
    from tinylm.textio import iter_jsonl

    for lineno, obj in iter_jsonl(path):
        if isinstance(obj, dict):
            if "text" in obj:
                return "text"
            if "chosen" in obj and "rejected" in obj:
                return "preference"
            if detect_format(obj) is not None:
                return "instruction"
        keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
        raise TinyLMError(f"{path}:{lineno}: fits no data kind (got {keys or 'no keys'}); "
                          f"{_EXPECTED}")
    raise TinyLMError(f"{path}: no examples (the file is empty)")


def detect_kind(data: list[str]) -> str:
    """"text", "instruction" or "preference" for the `--data` paths (all of one kind)."""
    if not data:
        raise TinyLMError("no data to evaluate on", "give --data FILE")
    kinds = {}
    for name in data:
        path = Path(name)
        if path.suffix == ".jsonl" and path.is_file():
            kinds[name] = _jsonl_kind(path)
        else:
            kinds[name] = "text"  # files and directories; encode_corpus checks them
    found = sorted(set(kinds.values()))
    if len(found) > 1:
        listing = ", ".join(f"{k} ({v})" for k, v in kinds.items())
        raise TinyLMError(f"--data mixes kinds of data: {listing}",
                          "evaluate one kind of data at a time")
    return found[0]


def _base_path(run_dir: str | Path, config: dict[str, Any]) -> Path | None:
    """The run's recorded base run (tuned, DPO or adapter runs), or None."""
    from tinylm.lora import base_run_path

    if not isinstance(config.get("base_run"), dict):
        return None
    return base_run_path(run_dir, config)


def eval_instruction(run: Any, data: list[str], batch_size: int, max_new_tokens: int = 0,
                     out: Output = SILENT) -> dict[str, Any]:
    """Mean loss per response token and greedy exact match of a loaded run on instruction
    JSONL files (`tinylm.sft.evaluate`)."""
    from tinylm.sft import encode_conversations
    from tinylm.sft.data import read_all
    from tinylm.sft.evaluate import exact_match, validation_loss

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
    and by log-prob ratio against the run's base when it names one (`tinylm.dpo`)."""
    from tinylm.dpo import DPOConfig, evaluate_pairs, reference_logps
    from tinylm.run import load_run
    from tinylm.sft import encode_pairs, read_preference_pairs

    pairs = [p for name in data for p in read_preference_pairs(name)]
    encoded, stats = encode_pairs(run.tokenizer, pairs, run.model.config.max_seq_len)
    if not encoded:
        raise TinyLMError("no preference pair has response tokens within the model's context")
    if stats.skipped:
        out.warn(f"{stats.skipped:,} pairs had no response token within the context "
                 f"(first: {stats.skipped_sources[0]})")
    pad = run.tokenizer.eot_id
    logps = reference_logps(run.model, encoded, batch_size, pad)
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
        ref = reference_logps(base.model, encoded, batch_size, pad)
        metrics = evaluate_pairs(run.model, DPOConfig(), encoded, batch_size, pad, ref)
        result["pref_accuracy"] = metrics["val_rewards/accuracies"]
        result["reward_margin"] = metrics["val_rewards/margins"]
        result["base_run"] = str(base_dir)
    return result


def evaluate_data(model_dir: str | Path, data: list[str], *, batch_size: int = 16,
                  seq_len: int | None = None, max_tokens: int = 0, max_new_tokens: int = 0,
                  device: str = "auto", out: Output = SILENT) -> dict[str, Any]:
    """`tinylm eval`: the metrics of run `model_dir` on `data`, by the data's kind (see the
    module docstring); the result's "kind" names it."""
    kind = detect_kind(data)
    if kind == "text":
        from tinylm.pretrain import eval_run

        result = eval_run(model_dir, data, batch_size=batch_size, seq_len=seq_len,
                          max_tokens=max_tokens, device=device, out=out)
        return {"kind": kind, "val_loss": result["val_loss"], "val_bpb": result["val_bpb"],
                "tokens_scored": int(result["val_tokens"]), "tokens": result["tokens"],
                "bytes": result["bytes"]}
    from tinylm.run import load_run
    from tinylm.train.distributed import resolve_device
    from tinylm.train.loop import autocast_context

    dev = resolve_device(device)
    run = load_run(model_dir, str(dev))
    with autocast_context(dev, "auto"):
        if kind == "instruction":
            metrics = eval_instruction(run, data, batch_size, max_new_tokens, out)
        else:
            metrics = eval_preference(run, data, batch_size, str(dev), out)
    return {"kind": kind, **metrics}
