"""The run directory every stage reads and writes: config.json, weights and tokenizer.

    RUN/config.json        {"tinylm_version", "format_version", "model": {ModelConfig}, ...meta}
    RUN/model.safetensors  weights under Hugging Face Llama module names
    RUN/tokenizer.json     the Hugging Face `tokenizers` file

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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinylm import FORMAT_VERSION, __version__
from tinylm.errors import TinyLMError

if TYPE_CHECKING:
    import torch

    from tinylm.model import Transformer
    from tinylm.tokenizer import Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
FILES_KEY = "files"  # config.json's record of the sizes and checksums of the run's files
DAMAGED_HINT = "copy the run again, or restore its files with --resume from its checkpoints"


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


def save_run(
    path: str | Path, model: Transformer, tokenizer: Tokenizer, meta: dict[str, Any] | None = None
) -> None:
    """Write config.json, model.safetensors and tokenizer.json into the existing directory `path`.

    The caller makes `path` a temporary directory and renames it when complete (see
    `tinylm.train.checkpoint`), so a reader never sees half a run.
    """
    from safetensors.torch import save_file

    path = Path(path)
    save_file(weights_state_dict(model), str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    tokenizer.save(path / TOKENIZER_FILE)
    config = {
        "tinylm_version": __version__,
        "format_version": FORMAT_VERSION,
        "model": dataclasses.asdict(model.config),
        **(meta or {}),
        FILES_KEY: file_records(path, [WEIGHTS_FILE, TOKENIZER_FILE]),
    }
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


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
    from tinylm.textio import read_json

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
    from tinylm.config import build_config
    from tinylm.model import ModelConfig

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


def load_run(path: str | Path, device: str = "cpu", no_merge: bool = False) -> Run:
    """Load a run directory: its model (eval mode, on `device`), tokenizer and config.

    A LoRA run (a PEFT adapter naming its base run) loads the base and applies the adapter,
    merged into the weights unless `no_merge` (then `Run.model` is the `PeftModel`).
    """
    from tinylm.lora import is_adapter_run, load_adapter_run
    from tinylm.model import Transformer
    from tinylm.tokenizer import Tokenizer

    path = Path(path)
    if is_adapter_run(path):
        return load_adapter_run(path, device, no_merge)
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
    model.to(device).eval()
    return Run(path=path, model=model, tokenizer=tokenizer, config=config)
