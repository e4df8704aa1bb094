"""The transformer: shapes, causality, RoPE, parameter counts, init, KV cache, padding, configs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tinylm.errors import TinyLMError
from tinylm.model import (
    KVCache,
    ModelConfig,
    Transformer,
    apply_rope,
    flops_per_token,
    param_breakdown,
    rope_cos_sin,
)

FAMILIES = ("llama", "gpt2")


def small(family: str, **kw) -> ModelConfig:
    base = dict(family=family, vocab_size=64, n_layers=2, n_heads=4, d_model=32, max_seq_len=32)
    if family == "llama":
        base["n_kv_heads"] = 2
    return ModelConfig(**{**base, **kw})


def model_for(config: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(config).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_shape_and_dtype(family: str) -> None:
    model = model_for(small(family))
    logits = model(torch.randint(0, 64, (3, 7)))
    assert logits.shape == (3, 7, 64)
    assert logits.dtype == torch.float32
    assert model(torch.randint(0, 64, (3, 7)), logits_to_keep=1).shape == (3, 1, 64)


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_later_tokens_do_not_change_earlier_logits(family: str) -> None:
    model = model_for(small(family))
    ids = torch.randint(0, 64, (2, 12))
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 64
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_rope_matches_complex_rotation() -> None:
    head_dim, theta = 8, 10000.0
    positions = torch.tensor([0, 1, 5, 17])
    x = torch.randn(2, 3, 4, head_dim)  # (B, heads, T, head_dim)
    cos, sin = rope_cos_sin(positions, head_dim, theta)
    got = apply_rope(x, cos, sin)
    # Pair i is (x[i], x[i + d/2]) as a complex number, turned by angle pos * theta^(-2i/d).
    half = head_dim // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    freqs = torch.tensor([theta ** (-2 * i / head_dim) for i in range(half)], dtype=torch.float64)
    angle = positions[:, None].double() * freqs
    rotated = z * torch.polar(torch.ones_like(angle), angle)
    want = torch.cat((rotated.real, rotated.imag), dim=-1).float()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # A rotation keeps each pair's length; position 0 is the identity.
    torch.testing.assert_close(got[..., 0, :], x[..., 0, :])


def test_rope_relative_positions() -> None:
    """q at m and k at n score the same as q at m + s and k at n + s."""
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> float:
        cq, sq = rope_cos_sin(torch.tensor([m]), 16, 10000.0)
        ck, sk = rope_cos_sin(torch.tensor([n]), 16, 10000.0)
        return float((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())

    assert score(7, 3) == pytest.approx(score(107, 103), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-4)


def test_param_counts_by_hand() -> None:
    llama = ModelConfig(family="llama", vocab_size=10, n_layers=2, n_heads=2, n_kv_heads=1,
                        d_model=8, d_ff=16, max_seq_len=16, tie_embeddings=False)
    # embedding 10*8; attention 2*(q 64 + k 32 + v 32 + o 64); mlp 2*(3*8*16); norms 5*8; head 80
    assert param_breakdown(llama) == {"embedding": 80, "attention": 384, "mlp": 768,
                                      "norms": 40, "head": 80, "total": 1352}
    gpt2 = ModelConfig(family="gpt2", vocab_size=10, n_layers=2, n_heads=2, d_model=8, d_ff=16,
                       max_seq_len=16, tie_embeddings=True)
    # embedding 80 + 16*8 positions; attention 2*(4*64 + 32 biases); mlp 2*(2*128 + 16 + 8);
    # norms 5 LayerNorms of weight + bias; head tied
    assert param_breakdown(gpt2) == {"embedding": 208, "attention": 576, "mlp": 560,
                                     "norms": 80, "head": 0, "total": 1424}
    for config in (llama, gpt2):
        assert sum(p.numel() for p in Transformer(config).parameters()) == param_breakdown(
            config)["total"]
    # 6 * (attention + mlp + norms + head matmul) + 12 * layers * d_model * seq_len
    assert flops_per_token(llama, 16) == 6 * (384 + 768 + 40 + 80) + 12 * 2 * 8 * 16


@pytest.mark.parametrize("name", ["tiny", "small", "classic", "gpt2-124m", "llama-124m"])
def test_presets_build_and_count(name: str) -> None:
    from tinylm.info import describe

    info = describe(name)
    config = ModelConfig(**info["model"])
    with torch.device("meta"):
        model = Transformer(config)
    assert sum(p.numel() for p in model.parameters()) == info["params"]["total"]
    if name == "gpt2-124m":
        assert info["params"]["total"] == 124_439_808  # GPT-2 small, tied head
    if name == "tiny":
        assert 0.8e6 < info["params"]["total"] < 1.5e6


def test_d_ff_and_kv_heads_defaults() -> None:
    assert ModelConfig(family="gpt2", d_model=128, n_heads=4).d_ff == 512
    llama = ModelConfig(family="llama", d_model=768, n_heads=12)
    assert llama.d_ff == 2048 and llama.n_kv_heads == 12
    assert ModelConfig(d_model=100, n_heads=5, d_ff=0).d_ff % 64 == 0


def test_grouped_query_attention_equals_repeated_heads() -> None:
    """n_kv_heads=2 of 4 gives the same logits as full attention whose key/value heads repeat."""
    gqa = model_for(small("llama", n_kv_heads=2))
    mha = Transformer(small("llama", n_kv_heads=4)).eval()
    state = gqa.state_dict()
    hd = gqa.config.head_dim
    for name in list(state):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            heads = state[name].view(2, hd, -1)
            state[name] = heads.repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(state)
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(gqa(ids), mha(ids), atol=1e-5, rtol=1e-5)
    assert gqa.model.layers[0].self_attn.k_proj.weight.shape == (2 * hd, 32)


def test_init_std_and_scaled_residual_projections() -> None:
    config = ModelConfig(vocab_size=512, n_layers=8, n_heads=4, d_model=256)
    model = model_for(config)
    layer = model.model.layers[3]
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)
    scaled = 0.02 / math.sqrt(2 * 8)
    assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = Transformer(ModelConfig(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


@pytest.mark.parametrize("family", FAMILIES)
def test_overfits_one_batch(family: str) -> None:
    config = small(family, vocab_size=32, n_layers=2, d_model=64, max_seq_len=16)
    torch.manual_seed(0)
    model = Transformer(config)
    ids = torch.randint(0, 32, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 32), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05  # from ln(32) = 3.47


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_incremental_equals_full_forward(family: str) -> None:
    model = model_for(small(family))
    ids = torch.randint(0, 64, (3, 14))
    full = model(ids)
    cache = KVCache.allocate(model.config, 3, 20)
    steps = [model(ids[:, :5], kv_cache=cache)]  # prefill, then one token at a time
    for t in range(5, 14):
        steps.append(model(ids[:, t:t + 1], kv_cache=cache, start_pos=t))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    # Several tokens at once after a prefill (speculative-style chunk) work too.
    cache = KVCache.allocate(model.config, 3, 20)
    model(ids[:, :4], kv_cache=cache)
    chunk = model(ids[:, 4:9], kv_cache=cache, start_pos=4)
    torch.testing.assert_close(chunk, full[:, 4:9], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_with_mask_matches_each_row_alone(family: str) -> None:
    model = model_for(small(family))
    rows = [[5, 9, 2, 7, 1, 3, 8], [4, 4, 6], [10, 11, 12, 13, 14]]
    ids, mask = left_padded(rows)
    padded = model(ids, attention_mask=mask)
    assert torch.isfinite(padded).all()
    alone = [model(torch.tensor([row]))[0] for row in rows]
    for i, row in enumerate(rows):
        torch.testing.assert_close(padded[i, -len(row):], alone[i], atol=1e-5, rtol=0)
    # Incremental decoding of the padded batch, the mask growing by one column a step.
    extra = torch.randint(0, 64, (3, 4))
    full_mask = torch.cat([mask, torch.ones(3, 4, dtype=torch.long)], 1)
    full = model(torch.cat([ids, extra], 1), attention_mask=full_mask)
    cache = KVCache.allocate(model.config, 3, 16)
    steps = [model(ids, kv_cache=cache, attention_mask=mask)]
    width = ids.shape[1]
    for t in range(4):
        pos = width + t
        steps.append(model(extra[:, t:t + 1], kv_cache=cache, start_pos=pos,
                           attention_mask=full_mask[:, :pos + 1]))
    got = torch.cat(steps, 1)
    real = full_mask.bool()
    torch.testing.assert_close(got[real], full[real], atol=1e-5, rtol=0)
    for i, row in enumerate(rows):  # and the continuation matches the unpadded sequence
        seq = torch.tensor([row + extra[i].tolist()])
        torch.testing.assert_close(got[i, -len(row) - 4:], model(seq)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_start_pos_equals_int(family: str) -> None:
    """A 0-dim tensor start_pos (one shape for a compiled decode step) gives the same logits."""
    model = model_for(small(family))
    ids, mask = left_padded([[1, 2, 3, 4, 5], [6, 7]])
    nxt = torch.tensor([[9], [10]])
    full_mask = torch.ones(2, 12, dtype=torch.long)
    full_mask[:, :5] = mask
    want = model(torch.cat([ids, nxt], 1), attention_mask=full_mask[:, :6])[:, -1]
    cache = KVCache.allocate(model.config, 2, 12)
    model(ids, kv_cache=cache, start_pos=torch.tensor(0), attention_mask=full_mask)
    got = model(nxt, kv_cache=cache, start_pos=torch.tensor(5), attention_mask=full_mask)[:, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_post_norm_runs_and_has_no_final_norm(family: str) -> None:
    config = small(family, norm_position="post")
    model = model_for(config)
    ids = torch.randint(0, 64, (2, 6))
    logits = model(ids)
    assert torch.isfinite(logits).all()
    assert not any(name.startswith("model.norm") for name, _ in model.named_parameters())
    assert sum(p.numel() for p in model.parameters()) == param_breakdown(config)["total"]
    cache = KVCache.allocate(config, 2, 8)
    inc = torch.cat([model(ids[:, :3], kv_cache=cache),
                     model(ids[:, 3:], kv_cache=cache, start_pos=3)], 1)
    torch.testing.assert_close(inc, logits, atol=1e-5, rtol=0)


def test_dropout_only_in_training() -> None:
    model = model_for(small("llama", dropout=0.5))
    ids = torch.randint(0, 64, (2, 6))
    torch.testing.assert_close(model(ids), model(ids))
    model.train()
    assert not torch.allclose(model(ids), model(ids))


def test_sequence_longer_than_context_is_an_error() -> None:
    model = model_for(small("gpt2"))
    with pytest.raises(TinyLMError, match="context"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"d_model": 30, "n_heads": 4}, "d_model"),
        ({"n_heads": 4, "n_kv_heads": 3, "d_model": 32}, "n_kv_heads"),
        ({"family": "gpt2", "n_heads": 4, "n_kv_heads": 2, "d_model": 32}, "n_kv_heads"),
        ({"family": "mamba"}, "family"),
        ({"norm_position": "middle"}, "norm_position"),
        ({"n_layers": 0}, "n_layers"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"dropout": 1.0}, "dropout"),
        ({"d_ff": -4}, "d_ff"),
        ({"d_model": 12, "n_heads": 4}, "n_heads"),  # head size 3: RoPE needs it even
        ({"norm_eps": 0.0}, "norm_eps"),
    ],
)
def test_bad_config_names_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(TinyLMError, match=rf"model\.{key}"):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_sequences_with_full_mask_and_position_ids(family: str) -> None:
    """Two examples in one row, each seeing only itself from position 0, give their own logits."""
    model = model_for(small(family))
    a, b = torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 4))
    packed = torch.cat([a, b], 1)
    doc = torch.tensor([0] * 5 + [1] * 4)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    mask = (causal & (doc[:, None] == doc[None, :]))[None]  # (1, T, T)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    got = model(packed, attention_mask=mask, position_ids=positions)
    torch.testing.assert_close(got[:, :5], model(a), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[:, 5:], model(b), atol=1e-5, rtol=0)
    got4 = model(packed, attention_mask=mask[:, None], position_ids=positions)
    torch.testing.assert_close(got4, got)
