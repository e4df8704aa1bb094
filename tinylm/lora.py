"""LoRA through PEFT: the module work. Wrap a tinylm model with adapters, count what trains,
write the two adapter files, and put an adapter's weights back onto a model.

The adapter files are PEFT's own:

    adapter_config.json        PEFT's LoraConfig file
    adapter_model.safetensors  the A and B matrices, under PEFT's names
                               (base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight),
                               and the rows of the chat template's tokens (PEFT's trainable
                               tokens: ...embed_tokens.token_adapter.trainable_tokens_delta, and
                               lm_head's own when the head is not tied)

Because tinylm's module names are Hugging Face Llama's, the same two files load with
`peft.PeftModel.from_pretrained` onto our `Transformer` and onto the model `tinylm export`
writes. Loading reads JSON and safetensors only (never adapter_model.bin). The run directory
around them (config.json naming the base run, loading, merging) is `tinylm.run`'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tinylm.chat import TURN_END, TURN_START
from tinylm.errors import TinyLMError

if TYPE_CHECKING:
    from torch import nn

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
    # Train the embedding and head rows of the chat template's tokens (<|im_start|>,
    # <|im_end|>): a base pretrained on plain text never saw them, and LoRA alone cannot
    # move their rows, so tuned replies would not end their turn.
    train_template_tokens: bool = True

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


def template_token_ids(tokenizer: Any) -> list[int]:
    """The ids of the chat template's own tokens (<|im_start|>, <|im_end|>) in `tokenizer`."""

    specials = dict(tokenizer.special_tokens)
    return sorted(specials[t] for t in (TURN_START, TURN_END) if t in specials)


def apply_lora(model: nn.Module, settings: LoraSettings,
               token_ids: Sequence[int] = ()) -> nn.Module:
    """`model` wrapped by PEFT with fresh adapters (B = 0, so its output is unchanged); only
    the adapter parameters require gradients. With `settings.train_template_tokens`, the
    embedding and head rows of `token_ids` train too, through PEFT's trainable tokens (rows
    of deltas starting at 0; a tied head shares the embedding's deltas, as PEFT ties them
    on Hugging Face models, so the adapter loads the same onto the exported model)."""
    from peft import LoraConfig, get_peft_model

    ids = sorted(set(token_ids)) if settings.train_template_tokens else []
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target_modules(model, settings.targets),
        bias="none",
        trainable_token_indices={"embed_tokens": ids, "lm_head": ids} if ids else None,
    )
    return get_peft_model(model, config)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a tied weight counts once."""
    seen: dict[int, Any] = {p.data_ptr(): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, total


def adapter_disabled(model: nn.Module) -> contextlib.AbstractContextManager:
    """No-grad context in which a PEFT `model` (also inside DDP) acts as its base model: the
    reference policy of LoRA DPO and GRPO, with no second copy of the weights."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    stack.enter_context(getattr(model, "module", model).disable_adapter())
    return stack


def write_adapter(directory: str | Path, peft_model: nn.Module, base_name: str) -> None:
    """Write adapter_config.json (naming `base_name` as the base model) and
    adapter_model.safetensors of `peft_model` into the existing `directory`."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory = Path(directory)
    config = peft_model.peft_config["default"]
    config.base_model_name_or_path = base_name
    config.save_pretrained(str(directory))
    weights = {k: v.detach().to("cpu").contiguous()
               for k, v in get_peft_model_state_dict(
                   peft_model, save_embedding_layers=False).items()}
    save_file(weights, str(directory / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})


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
    state = model.state_dict(keep_vars=True)
    expected = {k for k in state if _is_adapter_key(k)}
    # A tied head's token rows are the embedding's own tensor: loaded through that name.
    loaded = {id(state[k]) for k in expected - set(result.missing_keys)}
    missing = [k for k in result.missing_keys if _is_adapter_key(k) and id(state[k]) not in loaded]
    if result.unexpected_keys or missing or not expected:
        name = (result.unexpected_keys or missing or ["(no adapter tensors)"])[0]
        raise TinyLMError(f"{weights_file}: tensor {name!r} does not fit the base model")
    return model


def _is_adapter_key(name: str) -> bool:
    """An adapter tensor: LoRA's A or B, or the rows of trainable tokens."""
    return "lora_" in name or "trainable_tokens_delta" in name
