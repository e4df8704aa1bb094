"""Tensor names between tinylm and Hugging Face checkpoints, and reading a checkpoint safely.

The llama family already uses Hugging Face Llama names, so its mapping is the identity (the tied
`lm_head.weight` left out, as `transformers` saves it). The gpt2 family maps one name to one
tensor of `GPT2LMHeadModel`, whose `Conv1D` layers store weights as (in, out), the transpose of
`nn.Linear`, and whose `c_attn` holds q, k and v concatenated on the output axis.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tinylm.errors import TinyLMError
from tinylm.model import ModelConfig
from tinylm.textio import read_json

# tinylm name inside a layer -> (GPT-2 name inside a block, transposed?)
_GPT2_LAYER = {
    "input_layernorm.weight": ("ln_1.weight", False),
    "input_layernorm.bias": ("ln_1.bias", False),
    "post_attention_layernorm.weight": ("ln_2.weight", False),
    "post_attention_layernorm.bias": ("ln_2.bias", False),
    "self_attn.o_proj.weight": ("attn.c_proj.weight", True),
    "self_attn.o_proj.bias": ("attn.c_proj.bias", False),
    "mlp.up_proj.weight": ("mlp.c_fc.weight", True),
    "mlp.up_proj.bias": ("mlp.c_fc.bias", False),
    "mlp.down_proj.weight": ("mlp.c_proj.weight", True),
    "mlp.down_proj.bias": ("mlp.c_proj.bias", False),
}
_GPT2_TOP = {
    "model.embed_tokens.weight": "transformer.wte.weight",
    "model.embed_positions.weight": "transformer.wpe.weight",
    "model.norm.weight": "transformer.ln_f.weight",
    "model.norm.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight",
}
# Buffers some GPT-2 and Llama checkpoints carry that hold no learned values.
_IGNORED = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|\.rotary_emb\.inv_freq)$")
_QKV = ("q_proj", "k_proj", "v_proj")


def to_hf_state(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """A tinylm state dict under the tensor names (and layouts) of the Hugging Face model."""
    state = dict(state)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    if config.family == "llama":
        return {name: t.contiguous() for name, t in state.items()}
    hf: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name in _GPT2_TOP:
            hf[_GPT2_TOP[name]] = tensor
    for i in range(config.n_layers):
        ours, theirs = f"model.layers.{i}.", f"transformer.h.{i}."
        for name, (hf_name, transposed) in _GPT2_LAYER.items():
            tensor = state[ours + name]
            hf[theirs + hf_name] = tensor.t() if transposed else tensor
        for kind in ("weight", "bias"):
            fused = torch.cat([state[f"{ours}self_attn.{p}.{kind}"] for p in _QKV], dim=0)
            hf[f"{theirs}attn.c_attn.{kind}"] = fused.t() if kind == "weight" else fused
    return {name: t.contiguous() for name, t in hf.items()}


def _gpt2_prefixed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Names with the `transformer.` prefix (original GPT-2 checkpoints have `h.0...`, `wte`)."""
    fixed = {}
    for name, tensor in state.items():
        plain = name == "lm_head.weight" or name.startswith("transformer.")
        fixed[name if plain else f"transformer.{name}"] = tensor
    return fixed


def from_hf_state(
    state: dict[str, torch.Tensor], config: ModelConfig, source: str
) -> dict[str, torch.Tensor]:
    """A Hugging Face checkpoint's tensors under tinylm names (the inverse of `to_hf_state`).

    Refuses tensors tinylm has no place for, naming the first one; q/k/v biases (Qwen2) are
    accepted only when they are all zero, since dropping them then changes nothing.
    """
    state = {name: t for name, t in state.items() if not _IGNORED.search(name)}
    if config.family == "llama":
        ours = dict(state)
        for name in [n for n in ours if re.search(r"self_attn\.[qkv]_proj\.bias$", n)]:
            if torch.count_nonzero(ours[name]):
                raise TinyLMError(
                    f"{source}: tensor {name!r} is a non-zero attention bias; tinylm's llama "
                    "family has no biases, so this model (e.g. Qwen2) cannot be imported exactly"
                )
            del ours[name]
    else:
        state = _gpt2_prefixed(state)
        ours = {}
        for name, hf_name in _GPT2_TOP.items():
            if hf_name in state:
                ours[name] = state.pop(hf_name)
        for i in range(config.n_layers):
            prefix, theirs = f"model.layers.{i}.", f"transformer.h.{i}."
            for name, (hf_name, transposed) in _GPT2_LAYER.items():
                tensor = state.pop(theirs + hf_name, None)
                if tensor is not None:
                    ours[prefix + name] = tensor.t() if transposed else tensor
            for kind in ("weight", "bias"):
                fused = state.pop(f"{theirs}attn.c_attn.{kind}", None)
                if fused is None:
                    continue
                parts = (fused.t() if kind == "weight" else fused).chunk(3, dim=0)
                for proj, part in zip(_QKV, parts, strict=True):
                    ours[f"{prefix}self_attn.{proj}.{kind}"] = part
        if state:
            raise TinyLMError(f"{source}: unexpected tensor {sorted(state)[0]!r} for GPT-2")
    if config.tie_embeddings:
        ours.pop("lm_head.weight", None)
    return {name: t.to(torch.float32).contiguous() for name, t in ours.items()}


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face model directory: model.safetensors, or the shards listed in
    model.safetensors.index.json. Pickle-based files are refused, never loaded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(name, str) for name in weight_map.values()
        ):
            raise TinyLMError(f"{index}: not a safetensors index (no 'weight_map' of file names)")
        files = [directory / name for name in sorted(set(weight_map.values()))]
    elif any(directory.glob("pytorch_model*.bin")) or any(directory.glob("*.pt")):
        raise TinyLMError(
            f"{directory}: weights are in a pickle-based PyTorch file, which can run arbitrary "
            "code when loaded; tinylm reads safetensors only",
            "convert it first, e.g. load it in transformers and save_pretrained(DIR) "
            "(safetensors is the default)",
        )
    else:
        raise TinyLMError(f"{directory}: no model.safetensors (or index) found")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise TinyLMError(f"{file}: weights shard missing")
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError) as exc:
            raise TinyLMError(f"{file}: not a readable safetensors file ({exc})") from None
    return state
