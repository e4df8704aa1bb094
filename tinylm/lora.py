"""LoRA through PEFT: adapt a tinylm model, save and load adapter runs, merge them.

An adapter run directory holds, instead of model.safetensors:

    RUN/adapter_config.json        PEFT's own LoraConfig file
    RUN/adapter_model.safetensors  the A and B matrices, under PEFT's names
                                   (base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight)
    RUN/config.json                the base model's config and "base_run": where the base lives
    RUN/tokenizer.json             the base run's tokenizer

Because tinylm's module names are Hugging Face Llama's, the same two adapter files load with
`peft.PeftModel.from_pretrained` onto our `Transformer` and onto the model `tinylm export`
writes. Loading reads JSON and safetensors only (never adapter_model.bin).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinylm import FORMAT_VERSION, __version__
from tinylm.console import SILENT, Output
from tinylm.errors import TinyLMError

if TYPE_CHECKING:
    from torch import nn

    from tinylm.run import Run

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSettings:
    """The `lora:` section: rank r, scale alpha / r, dropout on the adapter's input, targets."""

    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: str = "q_proj,v_proj"  # comma-separated module names, or "all-linear"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise TinyLMError(f"lora.rank must be at least 1, got {self.rank}")
        if self.alpha <= 0:
            raise TinyLMError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise TinyLMError(f"lora.dropout must be in [0, 1), got {self.dropout}")


def target_modules(model: nn.Module, targets: str) -> list[str]:
    """The module names LoRA adapts: `targets` checked against the model, or every linear
    layer of the blocks for "all-linear" (not the output head, as PEFT does for HF models)."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if targets.strip() == "all-linear":
        return [n for n in LINEAR_NAMES if n in present]
    wanted = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in LINEAR_NAMES or t not in present]
    if not wanted or unknown:
        valid = ", ".join(n for n in LINEAR_NAMES if n in present)
        shown = unknown[0] if unknown else "(none)"
        raise TinyLMError(f"--lora-targets: {shown!r} is not a linear layer of this model",
                          f"choose from {valid}, or all-linear")
    return wanted


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """`model` wrapped by PEFT with fresh adapters (B = 0, so its output is unchanged); only
    the adapter parameters require gradients."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target_modules(model, settings.targets),
        bias="none",
    )
    return get_peft_model(model, config)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a tied weight counts once."""
    seen: dict[int, Any] = {p.data_ptr(): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, total


def is_adapter_run(path: str | Path) -> bool:
    """True when `path` holds a LoRA adapter (and no full weights)."""
    return (Path(path) / ADAPTER_CONFIG_FILE).is_file()


def save_adapter(
    directory: str | Path, peft_model: nn.Module, base_run: str | Path, meta: dict[str, Any]
) -> None:
    """Write the adapter files and config.json ("base_run" named) into existing `directory`.

    The caller writes into a temporary directory and renames it when complete.
    """
    import dataclasses

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from tinylm.run import FILES_KEY, file_records

    directory, base_run = Path(directory), Path(base_run).resolve()
    config = peft_model.peft_config["default"]
    config.base_model_name_or_path = str(base_run)
    config.save_pretrained(str(directory))
    weights = {k: v.detach().to("cpu").contiguous()
               for k, v in get_peft_model_state_dict(
                   peft_model, save_embedding_layers=False).items()}
    save_file(weights, str(directory / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    run_config = {
        "tinylm_version": __version__,
        "format_version": FORMAT_VERSION,
        "model": dataclasses.asdict(peft_model.get_base_model().config),
        "base_run": {"path": str(base_run), "relative": os.path.relpath(base_run, directory)},
        **meta,
        FILES_KEY: file_records(directory, [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE]),
    }
    text = json.dumps(run_config, indent=2) + "\n"
    (directory / "config.json").write_text(text, encoding="utf-8")


def load_adapter(peft_or_base: nn.Module, directory: str | Path) -> nn.Module:
    """The adapter of `directory` on a model: a fresh PEFT wrapper for a plain model, or the
    weights loaded into an already wrapped one (resume). Checks every tensor's name."""
    from peft import (
        LoraConfig,
        PeftModel,
        PeftType,
        get_peft_model,
        set_peft_model_state_dict,
    )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    weights_file = directory / ADAPTER_WEIGHTS_FILE
    if not weights_file.is_file():
        raise TinyLMError(f"{directory}: no {ADAPTER_WEIGHTS_FILE}", "is the adapter run complete?")
    model = peft_or_base
    if not isinstance(model, PeftModel):
        try:
            config = LoraConfig.from_pretrained(str(directory))
        except (ValueError, TypeError, OSError) as exc:
            raise TinyLMError(f"{directory / ADAPTER_CONFIG_FILE}: unreadable ({exc})") from None
        if config.peft_type != PeftType.LORA:
            raise TinyLMError(f"{directory}: a {config.peft_type} adapter; tinylm loads LoRA only")
        config.inference_mode = False
        config.base_model_name_or_path = None  # our base is a run, not a Hub name
        model = get_peft_model(model, config)
    try:
        weights = load_file(str(weights_file))
    except (SafetensorError, OSError) as exc:
        raise TinyLMError(f"{weights_file}: not a readable safetensors file ({exc})") from None
    try:
        result = set_peft_model_state_dict(model, weights)
    except RuntimeError as exc:  # torch names the misshapen tensors; the first is enough
        detail = str(exc).strip().splitlines()[-1].strip()
        raise TinyLMError(f"{weights_file}: does not fit the base model ({detail})",
                          "is it the adapter of this base run?") from None
    expected = {k for k in model.state_dict() if "lora_" in k}
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing or not expected:
        name = (result.unexpected_keys or missing or ["(no adapter tensors)"])[0]
        raise TinyLMError(f"{weights_file}: tensor {name!r} does not fit the base model")
    return model


def base_run_path(path: str | Path, config: dict[str, Any]) -> Path:
    """Where an adapter run's base lives: relative to the adapter first (a moved pair of
    runs), then the absolute path recorded at training time."""
    base = config.get("base_run")
    if not isinstance(base, dict) or "path" not in base:
        raise TinyLMError(f"{path}/config.json: adapter run without a 'base_run' entry")
    candidates = [Path(path) / base["relative"]] if base.get("relative") else []
    for candidate in [*candidates, Path(base["path"])]:
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    raise TinyLMError(f"{path}: its base run {base['path']} is missing",
                      "put the base run back, or use a run made with tinylm merge")


def run_inputs(path: str | Path) -> list[Path]:
    """A run directory and, for an adapter run, its base runs down the chain: what loading it
    reads, and so what no output may write over."""
    from tinylm.run import read_run_config

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
    import dataclasses

    from tinylm.run import TOKENIZER_FILE
    from tinylm.tokenizer import Tokenizer

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


def load_adapter_run(path: str | Path, device: str = "cpu", no_merge: bool = False) -> Run:
    """Load an adapter run: its base run (itself possibly an adapter run), then the adapter,
    merged into the weights (a plain `Transformer`) unless `no_merge` (a PEFT model)."""
    from tinylm.run import FILES_KEY, Run, load_run, read_run_config, verify_files

    path = Path(path)
    config = read_run_config(path)
    if FILES_KEY in config:  # sizes and checksums of the adapter files (tinylm.run)
        verify_files(path, config[FILES_KEY], str(Path(path) / "config.json"))
    inputs = run_inputs(path)  # a loop of base runs is an error, not endless recursion
    base_path = inputs[1] if len(inputs) > 1 else base_run_path(path, config)
    base = load_adapter_run(base_path) if is_adapter_run(base_path) else load_run(base_path)
    check_base(path, config, base)
    model = load_adapter(base.model, path)
    model = model.merge_and_unload() if not no_merge else model
    model.to(device).eval()
    return Run(path=path, model=model, tokenizer=base.tokenizer, config=config)


def merge_run(path: str | Path, out_dir: str | Path, force: bool = False,
              out: Output = SILENT) -> Path:
    """Write a plain run (full weights) with the adapter of run `path` merged in."""
    import shutil
    import tempfile

    from tinylm.run import save_run
    from tinylm.textio import check_distinct, check_output_dir

    if not is_adapter_run(path):
        raise TinyLMError(f"{path}: not a LoRA adapter run (no {ADAPTER_CONFIG_FILE})",
                          "tinylm merge takes the -o directory of tinylm finetune --lora")
    for source in run_inputs(path):
        check_distinct(source, out_dir)
    out_dir = check_output_dir(out_dir, force)
    run = load_adapter_run(path)
    meta = {k: v for k, v in run.config.items()
            if k not in ("tinylm_version", "format_version", "model", "base_run")}
    meta["merged_from"] = {"adapter_run": str(Path(path).resolve()),
                           "base_run": run.config["base_run"]["path"]}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_run(tmp, run.model, run.tokenizer, meta)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    out.info(f"merged {path} into {out_dir}")
    return out_dir
