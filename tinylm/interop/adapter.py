"""Exporting a LoRA adapter run for PEFT on the exported Hugging Face model.

`tinylm export --model LORA_RUN -o DIR` writes the adapter run's base model (merged all the way
down when the base is itself an adapter run) as the Hugging Face directory DIR, and the adapter
beside it:

    DIR/adapter/adapter_config.json        PEFT's LoraConfig, base_model_name_or_path = DIR
    DIR/adapter/adapter_model.safetensors  the A and B matrices under the HF model's names,
                                           and the trained rows of the template's tokens

so that `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR), DIR/adapter)`
computes the tinylm LoRA model. The llama family has Hugging Face Llama's module names, so the
tensors keep their names. GPT-2 fuses q, k and v into one `c_attn` layer: their adapters become
one adapter of rank (number of them) * r there, A stacked and B block-diagonal, with its alpha
scaled alike (`rank_pattern` / `alpha_pattern`), which computes the same sum exactly. Adapter
options this cannot carry exactly (rsLoRA, DoRA, per-module patterns) are refused (use --merge).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinylm.errors import TinyLMError
from tinylm.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from tinylm.textio import read_json

if TYPE_CHECKING:
    import torch

    from tinylm.model import ModelConfig

ADAPTER_SUBDIR = "adapter"
_WEIGHT_PREFIX = "base_model.model."


_GPT2_MODULES = {  # tinylm module (inside a layer) -> GPT2LMHeadModel module (inside a block)
    "self_attn.o_proj": "attn.c_proj",
    "mlp.up_proj": "mlp.c_fc",
    "mlp.down_proj": "mlp.c_proj",
}
_QKV = ("q_proj", "k_proj", "v_proj")
# Trainable token rows (lora.train_template_tokens): PEFT's deltas on the embedding and head.
_TOKEN_ROWS = "token_adapter.trainable_tokens_delta"
_GPT2_TOKEN_ROWS = {  # tinylm name -> GPT2LMHeadModel name
    f"{_WEIGHT_PREFIX}model.embed_tokens.{_TOKEN_ROWS}":
        f"{_WEIGHT_PREFIX}transformer.wte.{_TOKEN_ROWS}",
    f"{_WEIGHT_PREFIX}lm_head.{_TOKEN_ROWS}": f"{_WEIGHT_PREFIX}lm_head.{_TOKEN_ROWS}",
}
_LORA_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(.+)\.(lora_[AB])\.weight")


def _refuse(file: Path, what: str) -> TinyLMError:
    return TinyLMError(f"{file}: {what} cannot be mapped exactly onto Hugging Face GPT-2",
                       "pass --merge to export the merged weights as a plain model")


def _to_gpt2(
    config: dict[str, Any], weights: dict[str, torch.Tensor], model: ModelConfig, file: Path
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A gpt2-family adapter (config, tensors) under GPT2LMHeadModel's module names."""
    import torch

    odd = [k for k in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
                       "modules_to_save", "layers_to_transform") if config.get(k)]
    if not isinstance(config.get("target_modules"), list):
        odd.append("target_modules")
    if odd or config.get("bias", "none") != "none":
        raise _refuse(file, f"the adapter option {(odd or ['bias'])[0]!r}")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    head_dim = model.d_model // model.n_heads
    widths = {"q_proj": model.d_model, "k_proj": model.n_kv_heads * head_dim,
              "v_proj": model.n_kv_heads * head_dim}
    out: dict[str, torch.Tensor] = {}
    fused: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for name, tensor in weights.items():
        match = _LORA_KEY.fullmatch(name)
        module = match.group(2) if match else ""
        if match and module.startswith("self_attn.") and module[10:] in _QKV:
            fused.setdefault(int(match.group(1)), {}).setdefault(module[10:], {})[
                match.group(3)] = tensor
        elif name in _GPT2_TOKEN_ROWS:
            out[_GPT2_TOKEN_ROWS[name]] = tensor
        elif match and module in _GPT2_MODULES:
            hf = f"base_model.model.transformer.h.{match.group(1)}.{_GPT2_MODULES[module]}"
            out[f"{hf}.{match.group(3)}.weight"] = tensor
        else:
            raise _refuse(file, f"tensor {name!r}")
    sizes = set()
    for layer, parts in fused.items():
        present = [p for p in _QKV if p in parts]
        sizes.add(len(present))
        dtype = parts[present[0]]["lora_B"].dtype
        b = torch.zeros(sum(widths.values()), rank * len(present), dtype=dtype)
        for j, part in enumerate(present):
            row = sum(widths[p] for p in _QKV[: _QKV.index(part)])
            b[row: row + widths[part], j * rank: (j + 1) * rank] = parts[part]["lora_B"]
        hf = f"base_model.model.transformer.h.{layer}.attn.c_attn"
        out[f"{hf}.lora_A.weight"] = torch.cat([parts[p]["lora_A"] for p in present], dim=0)
        out[f"{hf}.lora_B.weight"] = b
    if len(sizes) > 1:
        raise _refuse(file, "q/k/v adapters that differ between layers")
    targets = {_GPT2_MODULES[t] for t in _GPT2_MODULES if t.rsplit(".", 1)[1]
               in config["target_modules"]} | ({"attn.c_attn"} if fused else set())
    config = dict(config, target_modules=sorted(targets), fan_in_fan_out=True)
    rows = config.get("trainable_token_indices")
    if isinstance(rows, dict):  # the embedding is `wte` in GPT2LMHeadModel
        config["trainable_token_indices"] = {
            "wte" if key == "embed_tokens" else key: ids for key, ids in rows.items()}
    if fused:
        n = sizes.pop()
        config["rank_pattern"] = {"c_attn": rank * n}
        config["alpha_pattern"] = {"c_attn": alpha * n}
    return config, out


def read_peft_adapter(
    run_dir: Path, model: ModelConfig, dtype: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The adapter of run `run_dir` as (adapter_config, tensors) for PEFT on the Hugging Face
    model exported from a base with config `model`, tensors in `dtype`."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_file, weights_file = run_dir / ADAPTER_CONFIG_FILE, run_dir / ADAPTER_WEIGHTS_FILE
    config = read_json(config_file)
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise TinyLMError(f"{config_file}: not a LoRA adapter config (peft_type must be LORA)")
    try:
        weights = load_file(str(weights_file))
    except (SafetensorError, OSError) as exc:
        raise TinyLMError(f"{weights_file}: not a readable safetensors file ({exc})") from None
    odd = [name for name in weights if not name.startswith(_WEIGHT_PREFIX)
           or ("lora_" not in name and not name.endswith(_TOKEN_ROWS))]
    if odd or not weights:
        shown = odd[0] if odd else "(no tensors)"
        raise TinyLMError(f"{weights_file}: tensor {shown!r} is not a LoRA weight tinylm exports")
    # Our module names are HF Llama's, so a name is already the one PEFT expects on
    # LlamaForCausalLM (base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight), and
    # so are the trainable token rows (model.embed_tokens, lm_head: tied there as here).
    if model.family == "gpt2":
        config, weights = _to_gpt2(config, weights, model, weights_file)
    weights = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in weights.items()}
    return config, weights


def write_peft_adapter(
    dest: Path, hf_dir: Path, config: dict[str, Any], weights: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Write an adapter from `read_peft_adapter` into new directory `dest`, naming `hf_dir`
    (the exported model's final place) as its base; a summary (path, rank, targets)."""
    from safetensors.torch import save_file

    config = dict(config)
    config["base_model_name_or_path"] = str(hf_dir.resolve())
    config["inference_mode"] = True
    dest.mkdir()
    save_file(weights, str(dest / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (dest / ADAPTER_CONFIG_FILE).write_text(text, encoding="utf-8")
    targets = config.get("target_modules")
    return {
        "adapter": str(hf_dir / dest.name),
        "lora_rank": config.get("r"),
        "lora_targets": targets if isinstance(targets, str) else sorted(targets or []),
    }
