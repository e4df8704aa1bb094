"""tinylm's `ModelConfig` to and from a Hugging Face `config.json` (Llama and GPT-2 layouts).

    tinylm ModelConfig   LlamaConfig (llama family)      GPT2Config (gpt2 family)
    vocab_size           vocab_size                      vocab_size
    d_model              hidden_size                     n_embd
    n_layers             num_hidden_layers               n_layer
    n_heads              num_attention_heads             n_head
    n_kv_heads           num_key_value_heads             (must equal n_heads)
    d_ff                 intermediate_size               n_inner
    max_seq_len          max_position_embeddings         n_positions
    norm_eps             rms_norm_eps                    layer_norm_epsilon
    rope_theta           rope_parameters.rope_theta      (no RoPE)
    tie_embeddings       tie_word_embeddings             tie_word_embeddings
    dropout              attention_dropout               attn_pdrop, resid_pdrop, embd_pdrop
    (SwiGLU / GELU-tanh) hidden_act "silu"               activation_function "gelu_new"

Reading checks every option that would change the maths (rope scaling, sliding windows, biases,
activations) and refuses with the option's name rather than approximating the model.
"""

from __future__ import annotations

from typing import Any

from tinylm.errors import TinyLMError
from tinylm.model import ModelConfig

# Architectures that map onto the llama family; the value is that architecture's HF defaults for
# keys a config.json may leave out (read from transformers' config classes).
LLAMA_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"max_position_embeddings": 2048, "sliding_window": None},
    "MistralForCausalLM": {"max_position_embeddings": 4096 * 32, "sliding_window": 4096},
    "Qwen2ForCausalLM": {"max_position_embeddings": 32768, "sliding_window": None},
}
GPT2_ARCHITECTURES = ("GPT2LMHeadModel",)
# Activations of GPT-2 configs that are the tanh approximation of GELU, which tinylm computes.
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
SUPPORTED = (*LLAMA_ARCHITECTURES, *GPT2_ARCHITECTURES)


def to_hf_config(
    config: ModelConfig, *, eot_id: int | None, dtype: str = "float32"
) -> dict[str, Any]:
    """The `config.json` of the Hugging Face model equal to a tinylm model with `config`.

    `eot_id` (the end-of-text token) becomes the bos, eos and pad id. Raises `TinyLMError` for
    what neither `LlamaForCausalLM` nor `GPT2LMHeadModel` can express (post-norm blocks).
    """
    if config.norm_position != "pre":
        raise TinyLMError(
            "model.norm_position is 'post': Hugging Face Llama and GPT-2 have only pre-norm "
            "blocks, so a post-norm model cannot be exported",
            "export a pre-norm run",
        )
    common = {
        "vocab_size": config.vocab_size,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": eot_id,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,  # the name transformers 4.x reads
    }
    if config.family == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_embd": config.d_model,
            "n_layer": config.n_layers,
            "n_head": config.n_heads,
            "n_inner": config.d_ff,
            "n_positions": config.max_seq_len,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": config.norm_eps,
            "attn_pdrop": config.dropout,
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "add_cross_attention": False,
            **common,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.d_ff,
        "max_position_embeddings": config.max_seq_len,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        # transformers 5 reads rope_parameters; 4.x reads rope_theta and rope_scaling.
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": config.dropout,
        "mlp_bias": False,
        "pretraining_tp": 1,
        **common,
    }


def architecture_of(hf: dict[str, Any], source: str) -> str:
    """The one supported architecture named in a config.json's `architectures` list."""
    names = hf.get("architectures") or []
    if not isinstance(names, list) or len(names) != 1:
        raise TinyLMError(
            f"{source}: 'architectures' must name one model class, got {names!r}",
            f"supported: {', '.join(SUPPORTED)}",
        )
    if names[0] not in SUPPORTED:
        raise TinyLMError(
            f"{source}: architecture {names[0]} is not supported",
            f"supported: {', '.join(SUPPORTED)}",
        )
    return names[0]


def _unsupported(source: str, key: str, value: Any, why: str) -> TinyLMError:
    return TinyLMError(f"{source}: unsupported {key}={value!r}: {why}")


def _required(hf: dict[str, Any], key: str, source: str) -> int:
    """A size every config.json states (HF's class defaults are those of 7B models, never ours)."""
    value = hf.get(key)
    if value is None:
        raise TinyLMError(f"{source}: missing key {key!r}")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TinyLMError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


def _rope_theta(hf: dict[str, Any], source: str) -> float:
    """The RoPE base, refusing any scaled or partial RoPE (either config generation's keys)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise _unsupported(source, key, value, "expected a mapping")
        kind = value.get("rope_type", value.get("type", "default"))
        if kind != "default":
            raise _unsupported(
                source, f"{key}.rope_type", kind, "tinylm implements plain RoPE only"
            )
        if any(isinstance(v, dict) for v in value.values()):
            raise _unsupported(source, key, value, "per-layer RoPE settings are not supported")
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if factor not in (None, 1, 1.0):
        raise _unsupported(source, "partial_rotary_factor", factor, "tinylm rotates every dim")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _llama_config(hf: dict[str, Any], arch: str, source: str) -> ModelConfig:
    defaults = LLAMA_ARCHITECTURES[arch]
    d_model = _required(hf, "hidden_size", source)
    n_heads = _required(hf, "num_attention_heads", source)
    max_len = hf.get("max_position_embeddings") or defaults["max_position_embeddings"]
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported(source, "hidden_act", hf["hidden_act"], "tinylm's MLP is SwiGLU (silu)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise _unsupported(source, key, True, "tinylm's llama family has no biases")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * n_heads != d_model:
        raise _unsupported(
            source, "head_dim", head_dim, f"tinylm needs hidden_size / num_attention_heads"
            f" = {d_model // n_heads}")
    window = hf.get("sliding_window", defaults["sliding_window"])
    if arch == "Qwen2ForCausalLM" and not hf.get("use_sliding_window", False):
        window = None
    if window is not None and window < max_len:
        raise _unsupported(
            source, "sliding_window", window,
            "tinylm attends over the whole context (sliding-window attention is not supported)")
    layer_types = hf.get("layer_types") or []
    if any(kind != "full_attention" for kind in layer_types):
        raise _unsupported(source, "layer_types", layer_types, "only full attention is supported")
    return ModelConfig(
        family="llama",
        vocab_size=_required(hf, "vocab_size", source),
        n_layers=_required(hf, "num_hidden_layers", source),
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_model=d_model,
        d_ff=_required(hf, "intermediate_size", source),
        max_seq_len=max_len,
        dropout=float(hf.get("attention_dropout") or 0.0),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_position="pre",
        rope_theta=_rope_theta(hf, source),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    )


def _gpt2_config(hf: dict[str, Any], source: str) -> ModelConfig:
    activation = hf.get("activation_function", "gelu_new")
    if activation not in GELU_TANH:
        raise _unsupported(
            source, "activation_function", activation,
            f"tinylm's gpt2 family computes the tanh GELU ({', '.join(GELU_TANH)})")
    checks = (
        ("scale_attn_weights", True, "attention scores must be scaled by 1/sqrt(head_dim)"),
        ("scale_attn_by_inverse_layer_idx", False, "per-layer attention scaling is not in tinylm"),
        ("add_cross_attention", False, "tinylm is decoder-only"),
    )
    for key, wanted, why in checks:
        if bool(hf.get(key, wanted)) != wanted:
            raise _unsupported(source, key, hf[key], why)
    d_model = _required(hf, "n_embd", source)
    n_heads = _required(hf, "n_head", source)
    return ModelConfig(
        family="gpt2",
        vocab_size=_required(hf, "vocab_size", source),
        n_layers=_required(hf, "n_layer", source),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        d_model=d_model,
        d_ff=hf.get("n_inner") or 4 * d_model,
        max_seq_len=hf.get("n_positions") or 1024,
        dropout=float(hf.get("resid_pdrop", 0.1) or 0.0),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        norm_position="pre",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
    )


def from_hf_config(hf: dict[str, Any], source: str) -> tuple[ModelConfig, str]:
    """(tinylm `ModelConfig`, architecture name) for a Hugging Face config.json's contents.

    Raises `TinyLMError` naming the architecture or option that tinylm cannot reproduce exactly.
    """
    arch = architecture_of(hf, source)
    try:
        if arch in GPT2_ARCHITECTURES:
            return _gpt2_config(hf, source), arch
        return _llama_config(hf, arch, source), arch
    except TinyLMError as exc:
        if str(exc).startswith(source):
            raise
        raise TinyLMError(f"{source}: {exc}") from None
