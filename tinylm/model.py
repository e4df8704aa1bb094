"""The decoder-only transformer: one config dataclass, two families, one file.

`llama` (the default): RMSNorm, rotary position embeddings (RoPE), SwiGLU MLP, no biases,
grouped-query attention (`n_kv_heads` < `n_heads`), optionally tied embeddings.
`gpt2`: LayerNorm with bias, learned position embeddings, GELU MLP, biases everywhere.
Both are pre-norm by default; `norm_position="post"` gives the original post-norm block (then
there is no final norm, as in the 2017 transformer).

Parameter names follow Hugging Face Llama, so export to `LlamaForCausalLM` is a plain save and
PEFT's usual target names (`q_proj`, `v_proj`, ...) apply:

    model.embed_tokens, model.layers.N.{input_layernorm, post_attention_layernorm},
    model.layers.N.self_attn.{q,k,v,o}_proj, model.layers.N.mlp.{gate,up,down}_proj,
    model.norm, lm_head

Generation lays the weights out for decoding with `pack_weights` (at the end of this file):
q|k|v and gate|up fused, stored input-major; names, values and saved files unchanged.

The gpt2 family uses the same names plus `model.embed_positions`; each maps to one tensor of
Hugging Face `GPT2LMHeadModel` (its `Conv1D` stores weights transposed, `c_attn` is q|k|v
concatenated on the output axis):

    model.embed_tokens -> transformer.wte       model.embed_positions -> transformer.wpe
    input_layernorm -> transformer.h.N.ln_1     post_attention_layernorm -> transformer.h.N.ln_2
    self_attn.{q,k,v}_proj -> attn.c_attn (.T)  self_attn.o_proj -> attn.c_proj (.T)
    mlp.up_proj -> mlp.c_fc (.T)                mlp.down_proj -> mlp.c_proj (.T)
    model.norm -> transformer.ln_f              lm_head -> lm_head (tied to wte)
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinylm.errors import TinyLMError


@dataclass
class ModelConfig:
    """The shape of a model. `d_ff` and `n_kv_heads` left as None are filled in on creation:
    `d_ff` = 4 * d_model for gpt2, about 8/3 * d_model rounded up to a multiple of 64 for llama
    (SwiGLU's three matrices then cost what GPT's two of 4 * d_model do)."""

    family: Literal["llama", "gpt2"] = "llama"
    vocab_size: int = 8192
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int | None = None  # None: as many as n_heads (no grouped-query attention)
    d_model: int = 384
    d_ff: int | None = None  # None or 0: derived from d_model, see above
    max_seq_len: int = 512
    dropout: float = 0.0
    tie_embeddings: bool = True
    norm_position: Literal["pre", "post"] = "pre"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def to_dict(self) -> dict[str, Any]:
        """The fields, plus Hugging Face's name for the tie (`tie_word_embeddings`): PEFT reads
        it to tie the head's trainable token rows to the embedding's (`tinylm.lora`)."""
        return {**asdict(self), "tie_word_embeddings": self.tie_embeddings}

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> TinyLMError:
            return TinyLMError(f"model.{key}: {why}", "fix the model section of the config")

        if self.family not in ("llama", "gpt2"):
            raise bad("family", f"must be 'llama' or 'gpt2', got {self.family!r}")
        if self.norm_position not in ("pre", "post"):
            raise bad("norm_position", f"must be 'pre' or 'post', got {self.norm_position!r}")
        for key in ("vocab_size", "n_layers", "n_heads", "d_model", "max_seq_len"):
            if getattr(self, key) < 1:
                raise bad(key, f"must be a positive integer, got {getattr(self, key)}")
        if self.n_kv_heads is None or self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        if self.d_ff is None or self.d_ff == 0:
            self.d_ff = 4 * self.d_model if self.family == "gpt2" else _swiglu_width(self.d_model)
        if self.d_model % self.n_heads:
            raise bad("d_model", f"{self.d_model} is not divisible by n_heads ({self.n_heads})")
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise bad("n_kv_heads", f"{self.n_kv_heads} must divide n_heads ({self.n_heads})")
        if self.family == "gpt2" and self.n_kv_heads != self.n_heads:
            raise bad("n_kv_heads", "gpt2 has no grouped-query attention; leave it unset")
        if self.family == "llama" and self.head_dim % 2:
            raise bad("n_heads", f"RoPE needs an even head size, d_model/n_heads = {self.head_dim}")
        if self.d_ff < 1:
            raise bad("d_ff", f"must be positive (or 0 for automatic), got {self.d_ff}")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", f"must be in [0, 1), got {self.dropout}")
        for key in ("norm_eps", "rope_theta"):
            if not 0 < getattr(self, key) < math.inf:  # also refuses NaN
                raise bad(key, f"must be a positive number, got {getattr(self, key)}")

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.d_model // self.n_heads


def _swiglu_width(d_model: int) -> int:
    return 64 * math.ceil(8 * d_model / 3 / 64)


@dataclass
class KVCache:
    """Preallocated keys and values, (n_layers, batch, n_kv_heads, max_len, head_dim) each.

    The forward pass writes the new tokens' keys and values at `start_pos` and attends over
    everything before them, so generation never concatenates or reallocates.
    """

    k: Tensor
    v: Tensor

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        """An empty cache for `batch_size` sequences of up to `max_len` tokens."""
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        k = torch.zeros(shape, device=device, dtype=dtype)
        return cls(k, torch.zeros_like(k))

    @property
    def max_len(self) -> int:
        """Number of positions the cache holds."""
        return self.k.shape[3]


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of RoPE's angles, (..., head_dim) in float32 for integer `positions` (...).

    Pair i (dimensions i and i + head_dim/2, Hugging Face's layout) turns at frequency
    theta^(-2i/head_dim).
    """
    exponents = torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = positions[..., None].float() * inv_freq  # (..., head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x[i], x[i + d/2]) of the last axis by its angle (rotate_half layout);
    `cos` and `sin` (from `rope_cos_sin`) in the dtype of `x`."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (as Hugging Face Llama does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused kernel
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


@dataclass
class _AttnStep:
    """What every layer's attention needs for one forward: rotary angles, mask, cache slots."""

    cos: Tensor | None
    sin: Tensor | None
    mask: Tensor | None  # bool (B or 1, 1, T, kv_len), True = may attend
    is_causal: bool
    cache: KVCache | None
    write_idx: Tensor  # (T,) cache slots of the new tokens, or (B, T): each row its own
    kv_len: int | None  # keys to attend over in the cache (None: all of it)


class Attention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention with an optional KV cache."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        bias = config.family == "gpt2"
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.n_heads, config.n_kv_heads, config.head_dim)
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.d_model, config.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.n_heads * self.head_dim, config.d_model, bias=bias)
        # q|k|v as one (weight, bias) for decoding, the three weights its views: set by
        # `pack_weights` (the end of this file); None while training
        self.qkv: tuple[Tensor, Tensor | None] | None = None

    def forward(self, x: Tensor, step: _AttnStep) -> Tensor:
        B, T, _ = x.shape
        H, H_kv, D = self.n_heads, self.n_kv_heads, self.head_dim
        if self.qkv is not None:  # one product, and q and k rotated together: fewer ops a step
            qkv = linear(x, *self.qkv).view(B, T, H + 2 * H_kv, D).transpose(1, 2)
            if step.cos is not None:
                qk, v = qkv.split((H + H_kv, H_kv), dim=1)
                q, k = apply_rope(qk, step.cos, step.sin).split((H, H_kv), dim=1)
            else:
                q, k, v = qkv.split((H, H_kv, H_kv), dim=1)
        else:
            q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)
            k = self.k_proj(x).view(B, T, H_kv, D).transpose(1, 2)
            v = self.v_proj(x).view(B, T, H_kv, D).transpose(1, 2)
            if step.cos is not None:  # (B, heads, T, head_dim)
                q, k = apply_rope(q, step.cos, step.sin), apply_rope(k, step.cos, step.sin)
        if step.cache is not None:
            k_all, v_all = step.cache.k[self.layer_idx], step.cache.v[self.layer_idx]
            if step.write_idx.dim() == 2:  # per-row positions: row b writes its own slots
                rows = torch.arange(B, device=x.device)[:, None]
                k_all[rows, :, step.write_idx] = k.transpose(1, 2)  # (B, T, H_kv, D) slots
                v_all[rows, :, step.write_idx] = v.transpose(1, 2)
            else:
                k_all.index_copy_(2, step.write_idx, k)
                v_all.index_copy_(2, step.write_idx, v)
            k, v = k_all[:, :, : step.kv_len], v_all[:, :, : step.kv_len]
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=step.mask,
            is_causal=step.is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return _dropout(self.o_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    """SwiGLU (llama: down(silu(gate(x)) * up(x))) or GELU (gpt2: down(gelu(up(x))))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gated = config.family == "llama"
        bias = not self.gated
        if self.gated:
            self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=bias)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=bias)
        self.dropout = config.dropout
        self.gate_up: Tensor | None = None  # gate|up as one weight (`pack_weights`)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated and self.gate_up is not None:
            gate, up = linear(x, self.gate_up).chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.gated:
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh")  # GPT-2's "gelu_new"
        return _dropout(self.down_proj(h), self.dropout, self.training)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`, with a faster way for decoding on a CPU.

    A decode step multiplies a few rows by every weight, so its time is the time to stream the
    weights from memory, and torch computes such a product on one thread. When `weight` is stored
    input-major (`weight.t()` contiguous, as `generate.pack_weights` lays it out) and torch has
    several threads, the input dimension is cut into slices (as many as the greatest common
    divisor of the thread count and the input size), whose products run as one batched product,
    its batch spread over the threads, each streaming its own rows of the weight, and are summed.
    Same result up to float rounding. Measured on 2 cores: gpt2-124m decodes 1.2x faster (small
    1.15x); no gain beyond 32 rows, and none on one thread (where this is plain `F.linear`).
    """
    d_in = x.shape[-1]
    splits = math.gcd(torch.get_num_threads(), d_in)  # one slice per thread, if d_in allows
    rows = x.numel() // d_in if d_in else 0
    if splits == 1 or not 0 < rows <= 32 or weight.stride(0) != 1 or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    slices = x.reshape(rows, splits, d_in // splits).transpose(0, 1)  # (splits, rows, slice)
    y = torch.bmm(slices, weight.t().view(splits, d_in // splits, -1)).sum(0)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], y.shape[-1])


def _dropout(x: Tensor, p: float, training: bool) -> Tensor:
    return F.dropout(x, p, training=True) if training and p > 0 else x


def _norm(config: ModelConfig) -> nn.Module:
    if config.family == "llama":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)


class DecoderLayer(nn.Module):
    """Attention then MLP, each with a residual connection and a norm before (or after) it."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.input_layernorm = _norm(config)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = _norm(config)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, step: _AttnStep) -> Tensor:
        if self.pre_norm:
            x = x + self.self_attn(self.input_layernorm(x), step)
            return x + self.mlp(self.post_attention_layernorm(x))
        x = self.input_layernorm(x + self.self_attn(x, step))
        return self.post_attention_layernorm(x + self.mlp(x))


class Backbone(nn.Module):
    """Embeddings, the stack of layers and the final norm (Hugging Face's `model.` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        if config.family == "gpt2":
            self.embed_positions = nn.Embedding(config.max_seq_len, config.d_model)
        self.dropout = config.dropout
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layers))
        # Post-norm blocks end in a norm already; a final one would only repeat it.
        self.norm = _norm(config) if config.norm_position == "pre" else nn.Identity()


class Transformer(nn.Module):
    """The decoder-only language model: token ids (B, T) in, next-token logits (B, T, vocab) out."""

    # Hugging Face's hooks for the tied head, which PEFT looks for (trainable token rows)
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (Hugging Face's name for it)."""
        return self.model.embed_tokens

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        _check_fits_in_memory(config)
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2's init: N(0, 0.02) everywhere, biases 0, norms 1; the projections that write
        into the residual stream get std 0.02/sqrt(2 * n_layers), so the stream's variance does
        not grow with depth (each layer adds two of them)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for layer in self.model.layers:
            nn.init.normal_(layer.self_attn.o_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(layer.mlp.down_proj.weight, mean=0.0, std=residual_std)

    def forward(
        self,
        input_ids: Tensor,
        *,
        kv_cache: KVCache | None = None,
        start_pos: int | Tensor = 0,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> Tensor:
        """Logits (B, T, vocab) in float32 for `input_ids` (B, T).

        `start_pos`: index in the sequence (and slot in `kv_cache`) of `input_ids[:, 0]`; an int,
        or a 0-dim tensor (then attention spans the whole cache, masked, so a compiled decode
        step keeps one shape). With a cache, the new keys/values are written there and attention
        covers slots [0, start_pos + T). With a cache and no `attention_mask`, `start_pos` may
        also be a (B,) tensor, a position per row (rows of different lengths decoded together,
        as a server's continuous batching does): row b writes slots [start_pos[b], + T) of
        its own cache row and attends over its slots up to there.
        `attention_mask`: either (B, >= start_pos + T) of 1 (token) / 0 (left padding) over the
        whole sequence so far, and positions are then counted from each row's first real token
        (a padded row gives the same logits as the row alone); or a full boolean mask
        (B, T, K) / (B, 1, T, K), True = may attend, used as is (packed sequences; every row
        must allow at least one key).
        `position_ids`: (B, T) positions, overriding the ones above (packed sequences).
        `logits_to_keep`: if > 0, only the last that many positions get logits (prefill).
        """
        config = self.config
        T = input_ids.shape[1]
        device = input_ids.device
        per_row = isinstance(start_pos, Tensor) and start_pos.dim() == 1
        dynamic = isinstance(start_pos, Tensor) and not per_row
        # (T,) index of each new token, or (B, T) with per-row positions
        query_idx = torch.arange(T, device=device) + (start_pos[:, None] if per_row else start_pos)
        end = None if dynamic else (int(start_pos.max()) + T if per_row else start_pos + T)
        if end is not None and end > config.max_seq_len:
            raise TinyLMError(
                f"sequence of {end} tokens is longer than the model's context "
                f"({config.max_seq_len})", "shorten the input")
        if kv_cache is not None and end is not None and end > kv_cache.max_len:
            raise ValueError(f"KV cache holds {kv_cache.max_len} positions, {end} needed")

        full_mask = attention_mask is not None and attention_mask.dim() > 2
        padding = None if full_mask else attention_mask  # (B, L) of 1 / 0, or None
        if position_ids is not None:
            positions = position_ids
        elif padding is not None:
            counted = padding.long().cumsum(-1) - 1  # (B, L) position of each real token
            positions = counted.clamp(min=0)[:, query_idx]  # (B, T)
        else:
            positions = query_idx if per_row else query_idx[None]  # (B or 1, T)
        if full_mask:
            mask = attention_mask if attention_mask.dim() == 4 else attention_mask[:, None]
            is_causal = False
        elif padding is None and kv_cache is None:
            mask, is_causal = None, True
        elif padding is None and T == 1 and not dynamic and not per_row:
            mask, is_causal = None, False  # one new token that may see every cached one
        else:
            key_idx = query_idx if kv_cache is None else torch.arange(
                kv_cache.max_len if dynamic else end, device=device)
            mask, is_causal = _attention_mask(query_idx, key_idx, padding), False

        x = self.model.embed_tokens(input_ids)
        cos = sin = None
        if config.family == "gpt2":
            x = x + self.model.embed_positions(positions)
        else:
            cos, sin = rope_cos_sin(positions[:, None], config.head_dim, config.rope_theta)
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        step = _AttnStep(cos, sin, mask, is_causal, kv_cache, query_idx, end)
        x = _dropout(x, config.dropout, self.training)
        for layer in self.model.layers:
            x = layer(x, step)
        x = self.model.norm(x)
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        return self.lm_head(x).float()


def _attention_mask(query_idx: Tensor, key_idx: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Bool mask (B or 1, 1, T, K) for scaled_dot_product_attention; True = may attend.

    A query sees the keys at or before its own index that are not padding. A padding query also
    sees itself, so that no row is empty (an empty row gives NaN, and NaN times a zero attention
    weight is still NaN in the next layer).
    """
    allowed = key_idx[None, :] <= query_idx[..., None]  # (T, K), or (B, T, K) per row
    if attention_mask is None:
        return allowed.view(-1, 1, *allowed.shape[-2:])
    real = attention_mask[:, key_idx].bool()  # (B, K)
    itself = key_idx[None, :] == query_idx[:, None]
    return ((allowed[None] & real[:, None]) | itself[None])[:, None]


def _check_fits_in_memory(config: ModelConfig) -> None:
    """A clear error, before any allocation, for sizes whose float32 weights alone exceed this
    machine's memory (the model is built on the CPU first, also for a GPU)."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): allocation will tell
        return
    params = param_breakdown(config)["total"]
    if memory > 0 and 4 * params > memory:
        raise TinyLMError(
            f"a model of {params:,} parameters needs {4 * params / 2**30:,.1f} GiB for its "
            f"float32 weights alone; this machine has {memory / 2**30:,.1f} GiB of memory",
            "choose smaller sizes: model.d_model, n_layers, vocab_size, max_seq_len for gpt2")


def param_breakdown(config: ModelConfig) -> dict[str, int]:
    """Parameter counts by component: embedding (tokens + learned positions), attention, mlp,
    norms, head (0 when tied to the embedding) and total; equal to the model's numel."""
    d, L, ff, hd = config.d_model, config.n_layers, config.d_ff, config.head_dim
    q_out, kv_out = config.n_heads * hd, config.n_kv_heads * hd
    gpt2 = config.family == "gpt2"
    embedding = config.vocab_size * d + (config.max_seq_len * d if gpt2 else 0)
    attention = d * q_out + 2 * d * kv_out + q_out * d
    mlp = 2 * d * ff if gpt2 else 3 * d * ff
    if gpt2:  # biases
        attention += q_out + 2 * kv_out + d
        mlp += ff + d
    n_norms = 2 * L + (1 if config.norm_position == "pre" else 0)
    norms = n_norms * (2 * d if gpt2 else d)
    head = 0 if config.tie_embeddings else config.vocab_size * d
    parts = {"embedding": embedding, "attention": L * attention, "mlp": L * mlp,
             "norms": norms, "head": head}
    return {**parts, "total": sum(parts.values())}


def flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward): 6 * N + 12 * n_layers * d_model * seq_len.

    N counts the parameters that take part in matrix multiplies: everything but the embedding
    lookups, plus the output head even when tied (PaLM, appendix B; nanoGPT's estimate_mfu).
    6N is 2 FLOPs per multiply-add, times 3 for forward and backward. The second term is
    attention's QK^T and AV products over `seq_len` keys, counted in full (causal masking is not
    subtracted), as PaLM does.
    """
    parts = param_breakdown(config)
    n = parts["total"] - parts["embedding"] - parts["head"] + config.vocab_size * config.d_model
    return 6 * n + 12 * config.n_layers * config.d_model * seq_len


# ---- the decoding layout ------------------------------------------------------------------
# `pack_weights` switches on the second path of Attention.forward (`qkv`) and MLP.forward
# (`gate_up`): generation calls it once on a loaded model (`tinylm.generate.load_for_generation`).


class InputMajorLinear(nn.Linear):
    """An nn.Linear whose weight `pack_weights` stored input-major; its product is
    `model.linear`'s (split over the threads for a few rows)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def pack_weights(model: nn.Module) -> None:
    """Lay out the weights of every `Transformer` in `model` for generation, in place.

    At batch 1 a decode step streams every weight from memory once. On a CPU a product of one
    row with a weight stored (in, out) row-major streams faster than with nn.Linear's (out, in)
    when out >= in (1.3-1.6x for gpt2-124m's head), only such a weight lets `model.linear` split
    the product over several threads, and one product for q|k|v (and llama's gate|up) saves
    launches. So those weights, the others too when torch has several threads, and the head
    (with its tied embedding) move into (in, out) storage, the layers become `InputMajorLinear`
    and the parameters views of that storage: names, values and saved files stay the same and no
    memory is added. Meant for inference (training would run on this layout). Projections wrapped
    by an unmerged LoRA adapter are left as they are.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Attention) and m.qkv is None:
                m.qkv = _relayout(m.q_proj, m.k_proj, m.v_proj)
                _relayout(m.o_proj)
            elif isinstance(m, MLP) and m.gated and m.gate_up is None:
                fused = _relayout(m.gate_proj, m.up_proj)
                m.gate_up = fused[0] if fused is not None else None
                _relayout(m.down_proj)
            elif isinstance(m, MLP):
                _relayout(m.up_proj)
                _relayout(m.down_proj)
            elif isinstance(m, Transformer):
                _relayout(m.lm_head)


def _relayout(*linears: nn.Linear) -> tuple[Tensor, Tensor | None] | None:
    """The layers' weights stacked into one (out, in) weight stored (in, out) row-major, with
    their biases; each layer's weight and bias become views of those. None, changing nothing,
    if a layer is not a plain nn.Linear, or if out < in on one thread (there (out, in) is
    faster: 0.63 against 0.73 ms for gpt2-124m's down_proj)."""
    if any(type(m) is not nn.Linear for m in linears):
        return None
    if sum(m.out_features for m in linears) < linears[0].in_features and (
            torch.get_num_threads() == 1):
        return None
    weight = torch.cat([m.weight for m in linears]).t().contiguous().t()
    bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
    start = 0
    for m in linears:
        end = start + m.out_features
        m.weight.data = weight[start:end]
        if bias is not None:
            m.bias.data = bias[start:end]
        m.__class__ = InputMajorLinear
        start = end
    return weight, bias
