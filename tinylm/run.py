"""The run directory every stage reads and writes: config.json, weights and tokenizer.

    RUN/config.json        {"tinylm_version", "format_version", "model": {ModelConfig}, ...meta}
    RUN/model.safetensors  weights under Hugging Face Llama module names
    RUN/tokenizer.json     the Hugging Face `tokenizers` file

When the input and output embeddings are tied, `lm_head.weight` is left out of the file (as
`transformers` does) and tied again on load. Loading reads safetensors and JSON only.
"""

from __future__ import annotations

import dataclasses
import json
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
    config = {
        "tinylm_version": __version__,
        "format_version": FORMAT_VERSION,
        "model": dataclasses.asdict(model.config),
        **(meta or {}),
    }
    save_file(weights_state_dict(model), str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    tokenizer.save(path / TOKENIZER_FILE)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def read_run_config(path: str | Path) -> dict[str, Any]:
    """A run's config.json; a clear error when `path` is not a run directory."""
    path = Path(path)
    file = path / CONFIG_FILE
    if not path.is_dir():
        raise TinyLMError(f"{path}: no such run directory", "give the -o directory of a tinylm run")
    if not file.is_file():
        raise TinyLMError(f"{path}: not a tinylm run (no {CONFIG_FILE})", "is the run complete?")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TinyLMError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise TinyLMError(f"{file}: no 'model' section; not a tinylm run config")
    version = config.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise TinyLMError(
            f"{file}: run format {version} is newer than this tinylm understands",
            "upgrade tinylm",
        )
    return config


def model_config_from(config: dict[str, Any], source: str = CONFIG_FILE) -> Any:
    """The `ModelConfig` stored in a run's config.json (unknown keys are an error)."""
    from tinylm.config import build_config
    from tinylm.model import ModelConfig

    model_section = dict(config["model"])
    try:
        return build_config(ModelConfig, base=model_section)
    except TinyLMError as exc:
        raise TinyLMError(f"{source}: {exc}") from None


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
    model = Transformer(model_config)
    load_weights(model, path / WEIGHTS_FILE)
    model.to(device).eval()
    return Run(path=path, model=model, tokenizer=tokenizer, config=config)
