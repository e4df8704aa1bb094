"""The run directory every stage reads and writes: plain runs and adapter runs, loading,
clearing (--force) and merging. The one owner of the format.

    RUN/config.json        {"tinylm_version", "format_version", "model": {ModelConfig}, ...meta}
    RUN/model.safetensors  weights under Hugging Face Llama module names
    RUN/tokenizer.json     the Hugging Face `tokenizers` file

An adapter run (finetune/dpo with LoRA) holds, instead of model.safetensors, PEFT's
adapter_config.json + adapter_model.safetensors (`tinylm.lora`), and its config.json names
the base run ("base_run": {"path", "relative"}). `load_run` loads either kind.

When the input and output embeddings are tied, `lm_head.weight` is left out of the file (as
`transformers` does) and tied again on load. Loading reads safetensors and JSON only.

Integrity: config.json, written last, records the size and SHA-256 of the files written before
it (`"files": {"model.safetensors": {"size": ..., "sha256": ...}, "tokenizer.json": ...}`).
`load_run` checks them before it trusts the weights: a truncated file (a copy cut short, a full
disk) fails on its size, a damaged or swapped one (another run's weights of the same shapes,
bit rot) on its checksum, each with one line naming the file. The checksum is verified on every
load: SHA-256 reads about 0.7 GB/s on one laptop core, so a 124M-parameter model (500 MB)
costs ~0.7 s, less than building the model on the CPU costs, and tinylm's models are small.
Runs written before this record (or by hand) have no "files" entry and load unchecked. Peers
are unaffected: the extra key sits in tinylm's own config.json, never in exported files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinylm import FORMAT_VERSION, __version__
from tinylm.atomic import atomic_dir
from tinylm.config import build_config
from tinylm.console import SILENT, Output
from tinylm.errors import TinyLMError
from tinylm.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, load_adapter, write_adapter
from tinylm.model import ModelConfig, Transformer
from tinylm.textio import check_distinct, check_output_dir, read_json
from tinylm.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch
    from torch import nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
FILES_KEY = "files"  # config.json's record of the sizes and checksums of the run's files
DAMAGED_HINT = "copy the run again, or restore its files with --resume from its checkpoints"
# What a stage writes at the top of its run directory; --force clears exactly these (and the
# checkpoints), whatever stage wrote them, and leaves a user's other files alone.
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE,
             "metrics.jsonl", "report.md", "loss_curve.png")


@dataclass
class Run:
    """A loaded run: the model (in eval mode), its tokenizer and its config.json."""

    path: Path
    model: Transformer
    tokenizer: Tokenizer
    config: dict[str, Any]


def _tied(model: Transformer) -> bool:
    return bool(getattr(model.config, "tie_embeddings", False))


def weights_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The tensors saved for `model`: contiguous CPU copies, the tied head left out."""
    state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    if _tied(model):
        state.pop("lm_head.weight", None)
    return state


def _write_config(path: Path, model_config: Any, meta: dict[str, Any] | None,
                  files: list[str]) -> None:
    """config.json, written last: the header, `meta`, and the records of `files`."""
    config = {
        "tinylm_version": __version__,
        "format_version": FORMAT_VERSION,
        "model": dataclasses.asdict(model_config),
        **(meta or {}),
        FILES_KEY: file_records(path, files),
    }
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def save_run(
    path: str | Path, model: Transformer, tokenizer: Tokenizer, meta: dict[str, Any] | None = None
) -> None:
    """Write config.json, model.safetensors and tokenizer.json into the existing directory `path`.

    The caller makes `path` a temporary directory and renames it when complete
    (`tinylm.atomic.atomic_dir`), so a reader never sees half a run.
    """
    from safetensors.torch import save_file

    path = Path(path)
    save_file(weights_state_dict(model), str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    tokenizer.save(path / TOKENIZER_FILE)
    _write_config(path, model.config, meta, [WEIGHTS_FILE, TOKENIZER_FILE])


def save_adapter_run(
    path: str | Path, peft_model: nn.Module, base_run: str | Path, meta: dict[str, Any],
    tokenizer: Tokenizer | None = None,
) -> None:
    """Write an adapter run into the existing directory `path`: the adapter files, the base
    run's `tokenizer` (when given: loading then checks it is the base's), and config.json
    naming `base_run` (absolute, and relative to `path`)."""
    path, base_run = Path(path), Path(base_run).resolve()
    write_adapter(path, peft_model, str(base_run))
    if tokenizer is not None:
        tokenizer.save(path / TOKENIZER_FILE)
    meta = {"base_run": {"path": str(base_run), "relative": os.path.relpath(base_run, path)},
            **meta}
    _write_config(path, peft_model.get_base_model().config, meta,
                  [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE])


def clear_run(out_dir: str | Path) -> None:
    """Remove what an earlier run of any stage left in `out_dir` (--force): its checkpoints
    and `RUN_FILES`; other files stay."""
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as hex (read 1 MiB at a time)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def file_records(directory: str | Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{name: {"size", "sha256"}} of the files `names` (paths relative to `directory`)."""
    directory = Path(directory)
    return {
        name: {"size": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)}
        for name in names
    }


def verify_files(
    directory: str | Path,
    records: Any,
    source: str,
    hint: str | None = DAMAGED_HINT,
) -> None:
    """Check the files of `directory` against `records` (from `file_records`, as read back
    from the JSON file `source`): each present, of its size and of its SHA-256. Raises
    `TinyLMError` naming the first file that differs."""
    directory = Path(directory)
    if not isinstance(records, dict) or not all(
        isinstance(r, dict) and isinstance(r.get("size"), int) and isinstance(r.get("sha256"), str)
        for r in records.values()
    ):
        raise TinyLMError(f"{source}: its '{FILES_KEY}' entry is malformed", hint)
    for name, record in records.items():
        file = directory / name
        if not file.is_file():
            raise TinyLMError(f"{file}: missing (listed in {source})", hint)
        size = file.stat().st_size
        if size != record["size"]:
            raise TinyLMError(
                f"{file}: {size:,} bytes but {source} records {record['size']:,}; "
                "the file is truncated, damaged or from another run",
                hint,
            )
        if sha256_file(file) != record["sha256"]:
            raise TinyLMError(
                f"{file}: does not match the SHA-256 recorded in {source}; the "
                "file is damaged or comes from another run",
                hint,
            )


def read_run_config(path: str | Path) -> dict[str, Any]:
    """A run's config.json; a clear error when `path` is not a run directory."""
    path = Path(path)
    file = path / CONFIG_FILE
    if not path.is_dir():
        raise TinyLMError(f"{path}: no such run directory", "give the -o directory of a tinylm run")
    if not file.is_file():
        raise TinyLMError(f"{path}: not a tinylm run (no {CONFIG_FILE})", "is the run complete?")
    config = read_json(file)
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise TinyLMError(f"{file}: no 'model' section; not a tinylm run config")
    version = config.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise TinyLMError(f"{file}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise TinyLMError(
            f"{file}: run format {version} is newer than this tinylm understands "
            f"(format {FORMAT_VERSION})",
            "upgrade tinylm",
        )
    return config


def model_config_from(config: dict[str, Any], source: str = CONFIG_FILE) -> Any:
    """The `ModelConfig` stored in a run's config.json (unknown keys are an error)."""
    return build_config(ModelConfig, base=dict(config["model"]), source=source, prefix="model.")


def load_weights(model: Transformer, file: str | Path) -> None:
    """Load a safetensors file into `model`, checking names and shapes; ties the head if needed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(file)
    if not file.is_file():
        raise TinyLMError(f"{file}: weights file missing", "is the run complete?")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise TinyLMError(f"{file}: not a readable safetensors file ({exc})") from None
    load_checked(model, state, str(file), "; the weights do not match config.json")


def load_checked(
    model: Transformer, state: dict[str, torch.Tensor], source: str, mismatch: str
) -> None:
    """Load `state` into `model` after checking every name and shape; a clear error names the
    first missing, unexpected or misshapen tensor (`mismatch` ends the missing/unexpected
    message). A tied head may be absent from `state`; it is tied again after loading."""
    expected = model.state_dict()
    state = dict(state)
    if _tied(model):
        state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what, name = ("missing", missing[0]) if missing else ("unexpected", unexpected[0])
        raise TinyLMError(f"{source}: {what} tensor {name!r}{mismatch}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise TinyLMError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"config.json implies {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=True)
    if _tied(model):
        model.lm_head.weight = model.model.embed_tokens.weight


def is_adapter_run(path: str | Path) -> bool:
    """True when `path` holds a LoRA adapter (and no full weights)."""
    return (Path(path) / ADAPTER_CONFIG_FILE).is_file()


def load_run(path: str | Path, device: str = "cpu", no_merge: bool = False) -> Run:
    """Load a run directory: its model (eval mode, on `device`), tokenizer and config.

    A LoRA run (a PEFT adapter naming its base run) loads the base and applies the adapter,
    merged into the weights unless `no_merge` (then `Run.model` is the `PeftModel`).
    """
    path = Path(path)
    run = _load_adapter_run(path, no_merge) if is_adapter_run(path) else _load_plain_run(path)
    run.model.to(device).eval()
    return run


def _load_plain_run(path: Path) -> Run:
    config = read_run_config(path)
    model_config = model_config_from(config, str(path / CONFIG_FILE))
    tokenizer_file = path / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise TinyLMError(f"{path}: no {TOKENIZER_FILE} in the run", "is the run complete?")
    tokenizer = Tokenizer.load(tokenizer_file)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise TinyLMError(
            f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{model_config.vocab_size}"
        )
    if FILES_KEY in config:  # after the checks that name a mismatch more precisely
        verify_files(path, config[FILES_KEY], str(path / CONFIG_FILE))
    model = Transformer(model_config)
    load_weights(model, path / WEIGHTS_FILE)
    return Run(path=path, model=model, tokenizer=tokenizer, config=config)


def base_run_path(path: str | Path, config: dict[str, Any]) -> Path:
    """Where an adapter run's base lives: relative to the adapter first (a moved pair of
    runs), then the absolute path recorded at training time."""
    base = config.get("base_run")
    if not isinstance(base, dict) or "path" not in base:
        raise TinyLMError(f"{path}/config.json: a LoRA adapter run without a 'base_run' entry",
                          "is the adapter run complete? tinylm finetune --lora writes it")
    candidates = [Path(path) / base["relative"]] if base.get("relative") else []
    for candidate in [*candidates, Path(base["path"])]:
        if (candidate / CONFIG_FILE).is_file():
            return candidate.resolve()
    raise TinyLMError(f"{path}: its base run {base['path']} is missing",
                      "put the base run back, or use a run made with tinylm merge")


def run_inputs(path: str | Path) -> list[Path]:
    """A run directory and, for an adapter run, its base runs down the chain: what loading it
    reads, and so what no output may write over."""
    chain = [Path(path)]
    while is_adapter_run(chain[-1]):
        base = base_run_path(chain[-1], read_run_config(chain[-1]))
        if base.resolve() in {p.resolve() for p in chain}:
            raise TinyLMError(f"{path}: its base runs loop back to {base}",
                              "an adapter run's base_run must lead to a plain run")
        chain.append(base)
    return chain


def check_base(path: str | Path, config: dict[str, Any], base: Run) -> None:
    """An adapter run's base must be the model it was trained on: the model config recorded in
    its config.json, and the tokenizer saved beside the adapter (when there is one)."""
    hint = "put the adapter's own base run back, or train the adapter again on this base"
    found = dataclasses.asdict(base.model.config)
    for key, expected in config["model"].items():
        if found.get(key) != expected:
            raise TinyLMError(f"{path}: the adapter was trained on a base with {key}={expected!r}"
                              f", but its base run {base.path} has {key}={found.get(key)!r}", hint)
    tokenizer_file = Path(path) / TOKENIZER_FILE
    if tokenizer_file.is_file():
        fingerprint = Tokenizer.load(tokenizer_file).fingerprint
        if fingerprint != base.tokenizer.fingerprint:
            raise TinyLMError(f"{path}: the adapter's tokenizer ({fingerprint}) is not its base "
                              f"run's ({base.path}: {base.tokenizer.fingerprint})", hint)


def load_adapter_base(path: str | Path) -> tuple[Path, Run]:
    """An adapter run's base run (itself merged down when it is an adapter run), checked to
    be the base the adapter was trained on; and where it lives."""
    path = Path(path)
    config = read_run_config(path)
    if FILES_KEY in config:  # sizes and checksums of the adapter files
        verify_files(path, config[FILES_KEY], str(path / CONFIG_FILE))
    inputs = run_inputs(path)  # a loop of base runs is an error, not endless recursion
    base_path = inputs[1] if len(inputs) > 1 else base_run_path(path, config)
    base = load_run(base_path)
    check_base(path, config, base)
    return base_path, base


def _load_adapter_run(path: Path, no_merge: bool) -> Run:
    _, base = load_adapter_base(path)
    model = load_adapter(base.model, path)
    model = model.merge_and_unload() if not no_merge else model
    return Run(path=path, model=model, tokenizer=base.tokenizer, config=read_run_config(path))


def merge_run(path: str | Path, out_dir: str | Path, force: bool = False,
              out: Output = SILENT) -> Path:
    """Write a plain run (full weights) with the adapter of run `path` merged in. An existing
    `out_dir` (with `force`) is replaced only once the merged run is complete."""
    if not is_adapter_run(path):
        raise TinyLMError(f"{path}: not a LoRA adapter run (no {ADAPTER_CONFIG_FILE})",
                          "tinylm merge takes the -o directory of tinylm finetune --lora")
    for source in run_inputs(path):
        check_distinct(source, out_dir)
    out_dir = check_output_dir(out_dir, force)
    run = load_run(path)
    meta = {k: v for k, v in run.config.items()
            if k not in ("tinylm_version", "format_version", "model", "base_run", FILES_KEY)}
    meta["merged_from"] = {"adapter_run": str(Path(path).resolve()),
                           "base_run": run.config["base_run"]["path"]}
    with atomic_dir(out_dir) as tmp:
        save_run(tmp, run.model, run.tokenizer, meta)
    out.info(f"merged {path} into {out_dir}")
    return out_dir
