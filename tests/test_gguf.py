"""GGUF export (`tinylm export --format gguf`), with llama.cpp itself as the oracle.

The file is read back with `gguf.GGUFReader` (keys, tensors, types, values). llama.cpp, through
`llama-cpp-python`, loads it and must give tinylm's ids for text, and for f32 tinylm's greedy
tokens; f16 and q8_0 must agree on most next-token choices. Models are tiny but trained for a
few dozen steps on real text, so that greedy choices are not near-ties of random logits.
"""

from __future__ import annotations

import os
from contextlib import closing
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tinylm.cli  # noqa: F401  (registers the commands)
from tinylm.chat import END_OF_TEXT, TURN_END, TURN_START, chat_template_jinja, encode_chat
from tinylm.cli.app import app
from tinylm.generate import SamplingConfig, generate
from tinylm.interop.gguf import rope_rows_interleaved
from tinylm.model import ModelConfig, Transformer, apply_rope, rope_cos_sin
from tinylm.run import load_run, save_run
from tinylm.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package (tinylm[gguf])")

runner = CliRunner()

MODELS = {
    "llama-tied-gqa": {"family": "llama", "n_kv_heads": 2, "rope_theta": 500.0},
    "llama-untied": {"family": "llama", "tie_embeddings": False, "extra_vocab": 8},
    "gpt2": {"family": "gpt2", "norm_eps": 1e-6},
}
TEXTS = [
    "ROMEO:\nBut, soft! what light through yonder window breaks?",
    "I'll be there; we'Ve 'RE sure, 'M not. It's 12345 or 3.14159!",
    "naïve café — 日本語のテキスト 🙂🚀 Grüße",
    "def f(x):\n\treturn x ** 2\n\n\n    indented   spaces",
    "  leading spaces and trailing ones  ",
    f"{TURN_START}user\n plain text, not control tokens {TURN_END}",
]
PROMPTS = [
    "First Citizen:\nBefore we proceed",
    "KING HENRY:\nWhat say you, my lord",
    "JULIET:\nO Romeo, Romeo!",
    "The king is dead; long live",
]
NEW_TOKENS = 32
CONTEXT = 256  # llama.cpp's smallest context; a shorter trained one draws a warning


def _train(config: ModelConfig, ids: torch.Tensor, steps: int = 60) -> Transformer:
    """A few dozen AdamW steps on random windows: enough for peaked, non-tied logits."""
    torch.manual_seed(0)
    model = Transformer(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=generator)
        batch = torch.stack([ids[i : i + 65] for i in starts])
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, shakespeare_text: str) -> dict[str, Path]:
    """One trained run per entry of MODELS; the gpt2 one uses a gpt2-pattern tokenizer."""
    root = tmp_path_factory.mktemp("gguf-runs")
    train_text, corpus = shakespeare_text[:60_000], shakespeare_text[:120_000]
    tokenizers = {p: Tokenizer.train([train_text], vocab_size=480, pattern=p)
                  for p in ("gpt4", "gpt2")}
    made = {}
    for name, spec in MODELS.items():
        spec = dict(spec)
        tok = tokenizers["gpt2" if spec["family"] == "gpt2" else "gpt4"]
        vocab = tok.vocab_size + spec.pop("extra_vocab", 0)
        config = ModelConfig(vocab_size=vocab, n_layers=2, n_heads=4, d_model=64,
                             max_seq_len=CONTEXT, **spec)
        model = _train(config, torch.tensor(tok.encode(corpus)))
        made[name] = root / name
        made[name].mkdir()
        save_run(made[name], model, tok, {"stage": "test"})
    return made


def _export(run: Path, path: Path, *args: str) -> Path:
    result = runner.invoke(app, ["export", "--model", str(run), "--format", "gguf",
                                 "-o", str(path), "-q", *args])
    assert result.exit_code == 0, result.output
    return path


def test_rope_row_order_turns_tinylm_pairs_into_neighbour_pairs():
    """Rotating neighbours (2i, 2i+1) of the reordered projection, as llama.cpp's llama
    architecture does, gives tinylm's rotated vector in that order: the same q.k scores."""
    torch.manual_seed(0)
    n_heads, head_dim, d = 2, 8, 5
    weight, x = torch.randn(n_heads * head_dim, d), torch.randn(3, d)
    cos, sin = rope_cos_sin(torch.arange(3), head_dim, 10000.0)
    ours = apply_rope((x @ weight.T).view(3, n_heads, head_dim).transpose(0, 1), cos, sin)
    theirs = (x @ rope_rows_interleaved(weight, n_heads).T).view(3, n_heads, head_dim // 2, 2)
    angle = torch.arange(3)[:, None].float() / 10000.0 ** (torch.arange(0, head_dim, 2) / head_dim)
    c, s = angle.cos()[:, None], angle.sin()[:, None]
    turned = torch.stack((theirs[..., 0] * c - theirs[..., 1] * s,
                          theirs[..., 0] * s + theirs[..., 1] * c), dim=-1)
    turned = turned.reshape(3, n_heads, head_dim).transpose(0, 1)
    order = [i + o for i in range(head_dim // 2) for o in (0, head_dim // 2)]
    assert torch.allclose(turned, ours[..., order], atol=1e-5)
    assert not torch.allclose(turned, ours, atol=1e-3)  # the reordering is not a no-op


@pytest.mark.parametrize("name", list(MODELS))
def test_file_reads_back_with_keys_tensors_and_values(tmp_path, runs, name):
    path = _export(runs[name], tmp_path / "model.gguf")
    run = load_run(runs[name])
    config, tok = run.model.config, run.tokenizer
    reader = gguf.GGUFReader(path)

    def value(key: str):
        return reader.fields[key].contents()

    arch = config.family
    assert value("general.architecture") == arch
    assert value(f"{arch}.block_count") == 2 and value(f"{arch}.embedding_length") == 64
    assert value(f"{arch}.context_length") == CONTEXT
    assert value(f"{arch}.feed_forward_length") == config.d_ff
    assert value(f"{arch}.attention.head_count_kv") == config.n_kv_heads
    assert value("tokenizer.ggml.model") == "gpt2"
    assert value("tokenizer.ggml.pre") == ("gpt-2" if arch == "gpt2" else "dbrx")
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == config.vocab_size
    assert len(value("tokenizer.ggml.merges")) == len(tok.merges)
    specials = tok.special_tokens
    assert tokens[specials[TURN_END]] == TURN_END
    assert value("tokenizer.ggml.token_type")[specials[TURN_END]] == gguf.TokenType.CONTROL
    assert value("tokenizer.ggml.eos_token_id") == specials[END_OF_TEXT]
    assert value("tokenizer.ggml.eot_token_id") == specials[TURN_END]
    assert value("tokenizer.ggml.add_bos_token") is False
    assert value("tokenizer.chat_template") == chat_template_jinja()

    tensors = {t.name: t for t in reader.tensors}
    assert ("output.weight" in tensors) == (not config.tie_embeddings)
    assert ("blk.1.attn_qkv.weight" in tensors) == (arch == "gpt2")
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())
    state = run.model.state_dict()
    embed = torch.from_numpy(tensors["token_embd.weight"].data.copy())
    assert torch.equal(embed, state["model.embed_tokens.weight"])
    if arch == "llama":
        k = torch.from_numpy(tensors["blk.1.attn_k.weight"].data.copy())
        original = state["model.layers.1.self_attn.k_proj.weight"]
        assert torch.equal(k, rope_rows_interleaved(original, config.n_kv_heads))
    else:
        qkv = torch.from_numpy(tensors["blk.0.attn_qkv.bias"].data.copy())
        assert torch.equal(qkv[64:128], state["model.layers.0.self_attn.k_proj.bias"])


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_smaller_dtypes_store_matrices_so_and_keep_vectors_f32(tmp_path, runs, dtype):
    path = _export(runs["llama-untied"], tmp_path / "model.gguf", "--dtype", dtype)
    reader = gguf.GGUFReader(path)
    want = gguf.GGMLQuantizationType.F16 if dtype == "f16" else gguf.GGMLQuantizationType.Q8_0
    for t in reader.tensors:
        expected = gguf.GGMLQuantizationType.F32 if len(t.shape) == 1 else want
        assert t.tensor_type == expected, t.name
    head = next(t for t in reader.tensors if t.name == "output.weight")
    weights = load_run(runs["llama-untied"]).model.state_dict()["lm_head.weight"].numpy()
    restored = gguf.quants.dequantize(head.data, head.tensor_type).reshape(weights.shape)
    error = abs(restored - weights).max() / abs(weights).max()
    assert 0 < error < (1e-3 if dtype == "f16" else 1e-2)


def test_lora_run_is_written_merged(tmp_path, runs):
    from tinylm.lora import LoraSettings, apply_lora
    from tinylm.run import save_adapter_run

    base = runs["llama-tied-gqa"]
    model = apply_lora(load_run(base).model, LoraSettings(enabled=True, rank=4, alpha=8.0,
                                                          dropout=0.0, targets="q_proj,v_proj"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    adapter = tmp_path / "lora"
    adapter.mkdir()
    save_adapter_run(adapter, model, base, {"stage": "finetune"})
    (adapter / "tokenizer.json").write_bytes((base / "tokenizer.json").read_bytes())
    reader = gguf.GGUFReader(_export(adapter, tmp_path / "lora.gguf"))
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    q = torch.from_numpy(tensor.data.copy())
    merged = load_run(adapter).model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    plain = load_run(base).model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(q, rope_rows_interleaved(merged, 4))
    assert not torch.allclose(merged, plain, atol=1e-3)


def _written(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_bad_requests_are_one_line_exit_2_and_write_nothing(tmp_path, runs):
    tok = Tokenizer.train(["some text to split, some more text"] * 4, vocab_size=270,
                          pattern=r"\w+|\s+|[^\w\s]+")
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layers=1, n_heads=2,
                                    d_model=32, max_seq_len=32))
    custom = tmp_path / "custom"
    custom.mkdir()
    save_run(custom, model, tok, {"stage": "test"})
    post = tmp_path / "post"
    post.mkdir()
    save_run(post, Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layers=1, n_heads=2,
                                           d_model=32, norm_position="post")), tok, {})
    out = tmp_path / "out"
    out.mkdir()
    (out / "taken.gguf").write_bytes(b"keep me")
    cases = [
        ([str(custom), str(out / "a.gguf")], "no llama.cpp pre-tokenizer"),
        ([str(post), str(out / "a.gguf")], "pre-norm only"),
        ([str(runs["gpt2"]), str(out / "taken.gguf")], "--force"),
        ([str(runs["gpt2"]), str(out / "a.gguf"), "--dtype", "q4_0"], "f32, f16, q8_0"),
        ([str(runs["gpt2"]), str(out)], "is a directory"),
    ]
    for (run, target, *extra), message in cases:
        result = runner.invoke(app, ["export", "--model", run, "--format", "gguf", "-o", target,
                                     *extra])
        assert result.exit_code == 2, result.output
        assert message in result.output and result.output.count("\n") == 1, result.output
        assert _written(out) == ["taken.gguf"]
    assert (out / "taken.gguf").read_bytes() == b"keep me"
    _export(runs["gpt2"], out / "taken.gguf", "--force")
    assert _written(out) == ["taken.gguf"]
    assert gguf.GGUFReader(out / "taken.gguf").fields["general.architecture"].contents() == "gpt2"


# ---- llama.cpp as the oracle ------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_cpp():
    """The llama-cpp-python bindings (built from PyPI's sdist; see the Makefile's test target)."""
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")


def _load(llama_cpp, path: Path, f32_cache: bool = False):
    """The model in llama.cpp, keeping every position's logits; use it in `with`. llama.cpp
    keeps keys and values in f16 by default; `f32_cache` compares the file's f32 weights alone."""
    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    return closing(llama_cpp.Llama(model_path=str(path), n_ctx=CONTEXT, n_batch=CONTEXT,
                                   n_threads=1, n_threads_batch=1, logits_all=True,
                                   verbose=False, **(cache if f32_cache else {})))


def _greedy_llama(llm, prompt: list[int], n: int, stops: set[int]) -> list[int]:
    """Greedy decoding by hand on llama.cpp's logits (its samplers add nothing to compare)."""
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    while len(out) < n:
        out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        if out[-1] in stops:
            break
        llm.eval(out[-1:])
    return out


def _agreement(llm, model: Transformer, prompt: list[int], continuation: list[int]):
    """Teacher-forced over prompt + continuation: the share of positions of the continuation
    where llama.cpp's and tinylm's next-token argmax agree, and the largest logit difference."""
    sequence = prompt + continuation
    llm.reset()
    llm.eval(sequence)
    theirs = torch.from_numpy(llm.scores[: len(sequence)].copy())
    with torch.no_grad():
        ours = model(torch.tensor([sequence]))[0]
    span = slice(len(prompt) - 1, len(sequence) - 1)
    same = (theirs[span].argmax(-1) == ours[span].argmax(-1)).float().mean().item()
    return same, (theirs - ours).abs().max().item()


@pytest.mark.llama_cpp
@pytest.mark.parametrize("name", list(MODELS))
def test_llama_cpp_tokenizes_like_tinylm(tmp_path, runs, llama_cpp, name):
    tok = load_run(runs[name]).tokenizer
    messages = [{"role": "user", "content": "Who art thou?"}]
    chat = "".join(f"{TURN_START}{m['role']}\n{m['content']}{TURN_END}\n" for m in messages)
    chat += f"{TURN_START}assistant\n"
    with _load(llama_cpp, _export(runs[name], tmp_path / "model.gguf")) as llm:
        for text in TEXTS:
            ids = llm.tokenize(text.encode(), add_bos=False, special=False)
            assert ids == tok.encode(text), text
        assert llm.tokenize(chat.encode(), add_bos=False, special=True) == encode_chat(
            tok, messages, add_generation_prompt=True)
        template = llm.metadata["tokenizer.chat_template"]
        assert template == chat_template_jinja()
        assert llm.token_eos() == tok.special_tokens[END_OF_TEXT]
    # llama-cpp-python renders the file's template (its chat completions use it) as tinylm does
    formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(template, END_OF_TEXT, END_OF_TEXT)
    assert formatter(messages=messages).prompt == chat


def _greedy(run, prompt: list[int]) -> list[int]:
    config = SamplingConfig(NEW_TOKENS, temperature=0)
    return generate(run.model, run.tokenizer, [prompt], config)[0].token_ids


@pytest.mark.llama_cpp
@pytest.mark.parametrize("name", list(MODELS))
def test_llama_cpp_greedy_tokens_equal_tinylm_for_f32(tmp_path, runs, llama_cpp, name):
    run = load_run(runs[name])
    tok = run.tokenizer
    stops = {tok.special_tokens[END_OF_TEXT], tok.special_tokens[TURN_END]}
    # ggml's GELU rounds its input to f16 for a table lookup (gpt2 only): a larger gap there
    tolerance = 1e-2 if run.model.config.family == "gpt2" else 1e-3
    gaps = []
    with _load(llama_cpp, _export(runs[name], tmp_path / "model.gguf"), f32_cache=True) as llm:
        for prompt in PROMPTS:
            ids = tok.encode(prompt)
            ours = _greedy(run, ids)
            assert len(ours) == NEW_TOKENS
            assert _greedy_llama(llm, ids, NEW_TOKENS, stops) == ours, prompt
            same, gap = _agreement(llm, run.model, ids, ours)
            assert same == 1.0 and gap < tolerance, (prompt, same, gap)
            gaps.append(gap)
    print(f"{name} f32: {len(PROMPTS) * NEW_TOKENS} greedy tokens equal, largest logit "
          f"difference {max(gaps):.1e}")


@pytest.mark.llama_cpp
@pytest.mark.parametrize(("dtype", "floor"), [("f16", 0.9), ("q8_0", 0.8)])
def test_llama_cpp_agrees_on_most_tokens_for_f16_and_q8_0(tmp_path, runs, llama_cpp, dtype,
                                                          floor):
    """Teacher-forced on tinylm's greedy continuation: the share of next-token choices that
    llama.cpp's f16 / q8_0 model makes as tinylm's float32 model does (printed, -s shows it)."""
    for name in ("llama-tied-gqa", "gpt2"):
        run = load_run(runs[name])
        path = _export(runs[name], tmp_path / f"{name}.gguf", "--dtype", dtype)
        with _load(llama_cpp, path) as llm:
            shares = [_agreement(llm, run.model, ids, _greedy(run, ids))[0]
                      for ids in map(run.tokenizer.encode, PROMPTS)]
        share = sum(shares) / len(shares)
        print(f"{name} {dtype}: {share:.3f} of {len(shares) * NEW_TOKENS} greedy choices agree")
        assert share >= floor, (name, dtype, shares)
