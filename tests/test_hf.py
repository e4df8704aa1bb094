"""Export to and import from Hugging Face `transformers`, with transformers as the oracle.

Models are tiny and random (weights perturbed so that norms and biases are not 1 and 0, which
would hide a mapping mistake); nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tinylm.cli  # noqa: F401  (registers the commands)
from tinylm.chat import END_OF_TEXT, TURN_END, TURN_START
from tinylm.cli.app import app
from tinylm.generate import SamplingConfig, generate
from tinylm.model import ModelConfig, Transformer
from tinylm.run import load_run, save_run

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

runner = CliRunner()

CORPUS = [
    "def add(a, b):\n    return a + b  # sum\n\nclass Point:\n    x: int = 0\n",
    "The quick brown fox jumps over the lazy dog. It's 2024; naïve café, résumé!",
    "Hello world! hello WORLD, 12345 + 678 = 13023.\n\tTabs and  double  spaces.",
    "Grüße aus Köln. 日本語のテキスト。Ελληνικά. emoji: 🙂🚀 — dashes “quotes”.",
    "user: what is the capital of Zorbia?\nassistant: The capital of Zorbia is Quelt.",
] * 4
MIXED = [
    "def f(x):\n    return x ** 2  # square 🙂\n",
    "naïve café — 日本語 🚀🚀 Grüße\n\n  indented   spaces\t\ttabs",
    f"first doc{END_OF_TEXT}second doc {TURN_START}user\nhi{TURN_END}\n",
    "",
    " leading space and trailing space ",
]
CONVERSATIONS = [
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And in words? 🙂"},
        {"role": "assistant", "content": "Four, naïvely."},
    ],
    [{"role": "user", "content": "def f(x):\n    return x"}],
]


def _perturb(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)


@pytest.fixture(scope="module")
def tok():
    """A small tinylm tokenizer with the default special tokens."""
    from tinylm.tokenizer import Tokenizer

    return Tokenizer.train(CORPUS, vocab_size=400)


def _make_run(path: Path, tok, **model) -> Path:
    config = ModelConfig(vocab_size=tok.vocab_size, n_layers=2, n_heads=4, d_model=32,
                         max_seq_len=64, **model)
    torch.manual_seed(0)
    transformer = Transformer(config)
    _perturb(transformer, 1)
    path.mkdir()
    save_run(path, transformer, tok, {"stage": "test"})
    return path


def _load_hf(directory: Path):
    """AutoModelForCausalLM.from_pretrained, failing on any weight warning or loading issue."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                directory, output_loading_info=True
            )
    finally:
        logger.removeHandler(handler)
    assert not any(info.values()), info
    messages = [r.getMessage() for r in records] + [str(w.message) for w in caught]
    words = ("weight", "missing", "unexpected", "load report", "initialized")
    assert not [m for m in messages if any(w in m.lower() for w in words)], messages
    return model.eval()


EXPORTS = {
    "llama-tied-gqa": {"family": "llama", "n_kv_heads": 2, "tie_embeddings": True,
                       "rope_theta": 500.0, "norm_eps": 1e-6},
    "llama-untied": {"family": "llama", "tie_embeddings": False},
    "gpt2-tied": {"family": "gpt2", "tie_embeddings": True},
    "gpt2-untied": {"family": "gpt2", "tie_embeddings": False, "norm_eps": 1e-6},
}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_loads_in_transformers_with_equal_logits(tmp_path, tok, name):
    run = _make_run(tmp_path / "run", tok, **EXPORTS[name])
    result = runner.invoke(app, ["export", "--model", str(run), "-o", str(tmp_path / "hf"), "-q"])
    assert result.exit_code == 0, result.output
    hf = _load_hf(tmp_path / "hf")
    ours = load_run(run).model
    ids = torch.tensor([tok.encode(text, allowed_special="all") for text in MIXED[:1]])
    ids = torch.cat([ids, torch.randint(0, tok.vocab_size, (1, 40))], dim=1)[:, :64]
    with torch.no_grad():
        expected, actual = ours(ids), hf(ids).logits
    assert actual.shape == expected.shape
    assert torch.allclose(actual, expected, atol=1e-4, rtol=0), (actual - expected).abs().max()
    # Greedy decoding: transformers' generate (with its generation_config.json: stop at
    # <|endoftext|> or <|im_end|>) continues as `tinylm generate --temperature 0` does.
    prompt = tok.encode("def add(a, b):")
    generated = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    [ours_out] = generate(ours, tok, [prompt], SamplingConfig(max_new_tokens=12, temperature=0))
    assert generated[0].tolist() == prompt + ours_out.token_ids


def test_export_writes_configs_and_dtype(tmp_path, tok):
    run = _make_run(tmp_path / "run", tok, family="llama", n_kv_heads=2, tie_embeddings=False)
    out = tmp_path / "hf"
    result = runner.invoke(
        app, ["export", "--model", str(run), "-o", str(out), "--dtype", "bfloat16", "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["architecture"] == "LlamaForCausalLM" and summary["dtype"] == "bfloat16"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["num_attention_heads"] == 4
    assert config["intermediate_size"] == ModelConfig(d_model=32, n_heads=4).d_ff
    assert config["bos_token_id"] == config["eos_token_id"] == tok.eot_id
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tok.eot_id, tok.special_tokens[TURN_END]]
    hf = _load_hf(out)
    assert hf.dtype == torch.bfloat16
    assert not list(tmp_path.glob(".hf*")), "temporary directory left behind"


def test_export_tokenizer_and_chat_template_match(tmp_path, tok):
    from tinylm.chat import encode_chat, render_chat

    run = _make_run(tmp_path / "run", tok, family="llama")
    result = runner.invoke(app, ["export", "--model", str(run), "-o", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in MIXED:
        ids = tok.encode(text, allowed_special="all")
        assert hf_tok.encode(text, add_special_tokens=True) == ids, text
        assert hf_tok.decode(ids) == text
    assert hf_tok.eos_token == END_OF_TEXT and hf_tok.pad_token_id == tok.eot_id
    for messages in CONVERSATIONS:
        for add_generation_prompt in (False, True):
            text = hf_tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert text == render_chat(messages, add_generation_prompt=add_generation_prompt)
            theirs = hf_tok.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                return_dict=False)
            assert list(theirs) == encode_chat(tok, messages, add_generation_prompt)


def test_export_refuses_post_norm_existing_output_and_lora(tmp_path, tok):
    run = _make_run(tmp_path / "post", tok, family="llama", norm_position="post")
    result = runner.invoke(app, ["export", "--model", str(run), "-o", str(tmp_path / "hf")])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "post-norm" in result.stderr
    assert not (tmp_path / "hf").exists()

    good = _make_run(tmp_path / "good", tok, family="gpt2")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "old.txt").write_text("keep me")
    result = runner.invoke(app, ["export", "--model", str(good), "-o", str(tmp_path / "hf")])
    assert result.exit_code == 2 and "--force" in result.stderr
    assert (tmp_path / "hf" / "old.txt").exists()
    result = runner.invoke(app, ["export", "--model", str(good), "-o", str(tmp_path / "hf"),
                                 "--force", "-q"])
    assert result.exit_code == 0
    assert not (tmp_path / "hf" / "old.txt").exists()
    assert (tmp_path / "hf" / "model.safetensors").is_file()

    (good / "adapter_config.json").write_text("{}")
    result = runner.invoke(app, ["export", "--model", str(good), "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "LoRA" in result.stderr


@pytest.fixture(scope="module")
def hf_tokenizer_json(tmp_path_factory) -> Path:
    """A byte-level BPE trained by `tokenizers` itself (specials first, as SmolLM has them)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf_tok = tokenizers.Tokenizer(models.BPE())
    hf_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[END_OF_TEXT, TURN_START, TURN_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    hf_tok.train_from_iterator(CORPUS, trainer)
    path = tmp_path_factory.mktemp("hf-tokenizer") / "tokenizer.json"
    hf_tok.save(str(path))
    return path


def _hf_configs() -> dict[str, object]:
    small = {"vocab_size": 400, "hidden_size": 32, "intermediate_size": 80, "num_hidden_layers": 2,
             "num_attention_heads": 4, "max_position_embeddings": 64, "bos_token_id": 0,
             "eos_token_id": 0}
    return {
        "llama-gqa-untied": transformers.LlamaConfig(
            **small, num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000.0}),
        "llama-tied": transformers.LlamaConfig(**small, tie_word_embeddings=True),
        "mistral": transformers.MistralConfig(**small, num_key_value_heads=1, sliding_window=None),
        "gpt2": transformers.GPT2Config(vocab_size=400, n_embd=32, n_layer=2, n_head=4,
                                        n_positions=64, bos_token_id=0, eos_token_id=0),
    }


def _save_hf(path: Path, config, tokenizer_json: Path, **save) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    _perturb(model, 2)
    model.save_pretrained(path, **save)
    (path / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    return path


def _assert_same_logits(run_dir: Path, hf_dir: Path) -> None:
    ours = load_run(run_dir).model
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.randint(0, 400, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, actual = theirs(ids).logits, ours(ids)
    assert torch.allclose(actual, expected, atol=1e-4, rtol=0), (actual - expected).abs().max()


@pytest.mark.parametrize("name", ["llama-gqa-untied", "llama-tied", "mistral", "gpt2"])
def test_import_matches_transformers(tmp_path, hf_tokenizer_json, name):
    hf_dir = _save_hf(tmp_path / "hf", _hf_configs()[name], hf_tokenizer_json)
    result = runner.invoke(app, ["import", str(hf_dir), "-o", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    architecture = json.loads((hf_dir / "config.json").read_text())["architectures"][0]
    assert summary["architecture"] == architecture
    _assert_same_logits(tmp_path / "run", hf_dir)
    run = load_run(tmp_path / "run")
    assert run.config["stage"] == "import" and run.config["source"] == str(hf_dir)
    reference = tokenizers.Tokenizer.from_file(str(hf_tokenizer_json))
    for text in MIXED:
        assert run.tokenizer.encode(text, allowed_special="all") == reference.encode(text).ids
    assert run.tokenizer.eot_id == reference.token_to_id(END_OF_TEXT)


def test_import_sharded_then_export_round_trips(tmp_path, hf_tokenizer_json):
    hf_dir = _save_hf(tmp_path / "hf", _hf_configs()["llama-gqa-untied"], hf_tokenizer_json,
                      max_shard_size="20KB")
    assert (hf_dir / "model.safetensors.index.json").is_file()
    assert runner.invoke(app, ["import", str(hf_dir), "-o", str(tmp_path / "run")]).exit_code == 0
    _assert_same_logits(tmp_path / "run", hf_dir)
    result = runner.invoke(app, ["import", str(hf_dir), "-o", str(hf_dir), "--force"])
    assert result.exit_code == 2 and "input directory" in result.stderr
    result = runner.invoke(app, ["export", "--model", str(tmp_path / "run"), "-o",
                                 str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    _assert_same_logits(tmp_path / "run", tmp_path / "back")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, hf_tokenizer_json) -> Path:
    path = tmp_path_factory.mktemp("llama") / "hf"
    return _save_hf(path, _hf_configs()["llama-tied"], hf_tokenizer_json)


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


REFUSED = {
    "rope scaling": ("config.json", {"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                         "rope_theta": 1e4}}, "rope_type"),
    "legacy rope scaling": ("config.json", {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
                            "rope_scaling"),
    "attention bias": ("config.json", {"attention_bias": True}, "attention_bias"),
    "mlp bias": ("config.json", {"mlp_bias": True}, "mlp_bias"),
    "activation": ("config.json", {"hidden_act": "gelu"}, "hidden_act"),
    "sliding window": ("config.json", {"architectures": ["MistralForCausalLM"],
                                       "sliding_window": 16}, "sliding_window"),
    "architecture": ("config.json", {"architectures": ["BertForMaskedLM"]}, "BertForMaskedLM"),
    "metaspace": ("tokenizer.json", {"pre_tokenizer": {"type": "Metaspace", "replacement": "▁",
                                                       "prepend_scheme": "always"}}, "Metaspace"),
    "normalizer": ("tokenizer.json", {"normalizer": {"type": "NFC"}}, "normalizer"),
    "unigram": ("tokenizer.json", {"model": {"type": "Unigram", "vocab": []}}, "Unigram"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_import_refuses_what_it_cannot_reproduce(tmp_path, llama_dir, case):
    file, changes, named = REFUSED[case]
    source = tmp_path / "hf"
    source.mkdir()
    for f in llama_dir.iterdir():
        (source / f.name).write_bytes(f.read_bytes())
    _edit_json(source / file, **changes)
    result = runner.invoke(app, ["import", str(source), "-o", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert named in result.stderr
    assert not (tmp_path / "run").exists()


def test_import_refuses_pickle_weights(tmp_path, llama_dir):
    source = tmp_path / "hf"
    source.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (source / name).write_bytes((llama_dir / name).read_bytes())
    (source / "pytorch_model.bin").write_bytes(b"not loaded")
    result = runner.invoke(app, ["import", str(source), "-o", str(tmp_path / "run")])
    assert result.exit_code == 2 and "pickle" in result.stderr and "safetensors" in result.stderr


def test_import_qwen2_only_without_biases(tmp_path, hf_tokenizer_json):
    config = transformers.Qwen2Config(
        vocab_size=400, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    hf_dir = _save_hf(tmp_path / "hf", config, hf_tokenizer_json)
    result = runner.invoke(app, ["import", str(hf_dir), "-o", str(tmp_path / "run")])
    assert result.exit_code == 2 and "bias" in result.stderr

    from safetensors.torch import load_file, save_file

    state = load_file(hf_dir / "model.safetensors")
    for name in [n for n in state if n.endswith("_proj.bias")]:
        state[name] = torch.zeros_like(state[name])
    save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    result = runner.invoke(app, ["import", str(hf_dir), "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    _assert_same_logits(tmp_path / "run", hf_dir)


def test_import_gpt2_original_tensor_names(tmp_path, hf_tokenizer_json):
    """OpenAI's GPT-2 checkpoints name tensors without `transformer.` and carry attn.bias."""
    from safetensors.torch import load_file, save_file

    hf_dir = _save_hf(tmp_path / "hf", _hf_configs()["gpt2"], hf_tokenizer_json)
    state = load_file(hf_dir / "model.safetensors")
    renamed = {name.removeprefix("transformer."): t for name, t in state.items()}
    renamed["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    save_file(renamed, hf_dir / "model.safetensors", metadata={"format": "pt"})
    result = runner.invoke(app, ["import", str(hf_dir), "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    ours = load_run(tmp_path / "run").model.state_dict()
    c_attn = state["transformer.h.1.attn.c_attn.weight"]  # (in, 3 * out), Conv1D layout
    assert torch.equal(ours["model.layers.1.self_attn.k_proj.weight"], c_attn[:, 32:64].t())


def _make_adapter_run(path: Path, base: Path, seed: int, targets: str = "q_proj,v_proj") -> Path:
    """A LoRA adapter run on `base` (a run or an adapter run) with nonzero random B matrices."""
    from tinylm.lora import LoraSettings, apply_lora
    from tinylm.run import save_adapter_run

    base_model = load_run(base).model
    model = apply_lora(base_model, LoraSettings(enabled=True, rank=4, alpha=8.0, dropout=0.0,
                                                targets=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    path.mkdir()
    save_adapter_run(path, model, base, {"stage": "finetune"})
    (path / "tokenizer.json").write_bytes((base / "tokenizer.json").read_bytes())
    return path


def _lora_ids(tok) -> torch.Tensor:
    return torch.randint(0, tok.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))


def test_export_lora_run_loads_with_peft_on_the_exported_model(tmp_path, tok):
    """An adapter on an adapter run: DIR is the merged base, DIR/adapter the last adapter."""
    from peft import PeftModel


    base = _make_run(tmp_path / "base", tok, family="llama", n_kv_heads=2, tie_embeddings=False)
    first = _make_adapter_run(tmp_path / "first", base, seed=1)
    second = _make_adapter_run(tmp_path / "second", first, seed=2, targets="all-linear")
    out = tmp_path / "hf"
    result = runner.invoke(app, ["export", "--model", str(second), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["adapter"] == str(out / "adapter") and summary["lora_rank"] == 4
    assert summary["merged"] is False
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(out.resolve())
    ids = _lora_ids(tok)
    with torch.no_grad():
        expected = load_run(second, no_merge=True).model(ids)
        base_only = load_run(first).model(ids)
        hf = _load_hf(out)
        assert torch.allclose(hf(ids).logits, base_only, atol=1e-4, rtol=0)
        peft_model = PeftModel.from_pretrained(hf, str(out / "adapter")).eval()
        actual = peft_model(input_ids=ids).logits
    assert not torch.allclose(expected, base_only, atol=1e-3)  # the adapter matters
    assert torch.allclose(actual, expected, atol=1e-4, rtol=0), (actual - expected).abs().max()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_export_lora_run_merged(tmp_path, tok, family):

    base = _make_run(tmp_path / "base", tok, family=family)
    adapter = _make_adapter_run(tmp_path / "lora", base, seed=4)
    out = tmp_path / "hf"
    result = runner.invoke(app, ["export", "--model", str(adapter), "-o", str(out), "--merge",
                                 "-q"])
    assert result.exit_code == 0, result.output
    assert not (out / "adapter").exists()
    ids = _lora_ids(tok)
    with torch.no_grad():
        expected = load_run(adapter).model(ids)
        actual = _load_hf(out)(ids).logits
        assert not torch.allclose(expected, load_run(base).model(ids), atol=1e-3)
    assert torch.allclose(actual, expected, atol=1e-4, rtol=0), (actual - expected).abs().max()


@pytest.mark.parametrize("targets", ["q_proj,v_proj", "all-linear"])
def test_export_gpt2_lora_run_fuses_qkv_adapters_for_peft(tmp_path, tok, targets):
    """GPT-2's fused c_attn gets one block-diagonal adapter that computes ours exactly."""
    from peft import PeftModel


    base = _make_run(tmp_path / "base", tok, family="gpt2", tie_embeddings=False)
    adapter = _make_adapter_run(tmp_path / "lora", base, seed=6, targets=targets)
    out = tmp_path / "hf"
    result = runner.invoke(app, ["export", "--model", str(adapter), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    n = 2 if targets == "q_proj,v_proj" else 3
    assert config["rank_pattern"] == {"c_attn": 4 * n}
    assert config["alpha_pattern"] == {"c_attn": 8.0 * n}
    ids = _lora_ids(tok)
    with torch.no_grad():
        expected = load_run(adapter, no_merge=True).model(ids)
        peft_model = PeftModel.from_pretrained(_load_hf(out), str(out / "adapter")).eval()
        actual = peft_model(input_ids=ids).logits
        assert not torch.allclose(expected, load_run(base).model(ids), atol=1e-3)
    assert torch.allclose(actual, expected, atol=1e-4, rtol=0), (actual - expected).abs().max()


def _forget_file_records(run: Path) -> None:
    """Drop config.json's sizes and checksums, as for a run whose files were edited by hand."""
    config = json.loads((run / "config.json").read_text())
    config.pop("files", None)
    (run / "config.json").write_text(json.dumps(config))


def test_export_lora_refusals(tmp_path, tok):
    base = _make_run(tmp_path / "base", tok, family="gpt2")
    adapter = _make_adapter_run(tmp_path / "lora", base, seed=5)
    config_file = adapter / "adapter_config.json"
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), use_rslora=True)))
    _forget_file_records(adapter)  # edited by hand: no integrity record to check
    result = runner.invoke(app, ["export", "--model", str(adapter), "-o", str(tmp_path / "hf")])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "--merge" in result.stderr
    assert "use_rslora" in result.stderr and not (tmp_path / "hf").exists()
    assert not list(tmp_path.glob(".hf*")), "temporary directory left behind"
    result = runner.invoke(app, ["export", "--model", str(base), "-o", str(tmp_path / "hf"),
                                 "--merge"])
    assert result.exit_code == 2 and "not a LoRA adapter run" in result.stderr
