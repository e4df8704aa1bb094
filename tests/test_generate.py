"""Generation: KV-cached decoding against full forwards, sampling filters, seeds, stop strings,
UTF-8 streaming, the chat template, and the `generate` / `chat` commands."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

import tinylm.cli  # noqa: F401  (registers the commands)
from tinylm.chat import encode_chat, fit_history, render_chat
from tinylm.cli.app import app
from tinylm.errors import TinyLMError
from tinylm.generate import (
    SamplingConfig,
    TextStream,
    apply_repetition_penalty,
    fit_prompt,
    generate,
    top_k_filter,
    top_p_filter,
)
from tinylm.model import InputMajorLinear, ModelConfig, Transformer, linear, pack_weights
from tinylm.tokenizer import Tokenizer

runner = CliRunner()
GREEDY = SamplingConfig(max_new_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.bytes_only()


def tiny_model(family: str, vocab: int = 259, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(family=family, vocab_size=vocab, n_layers=2, n_heads=4, d_model=32,
                         max_seq_len=48, **kw)
    return Transformer(config).eval()


class Recorder(nn.Module):
    """The model, remembering the last-position logits of every forward generation makes."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.inner, self.config, self.calls = model, model.config, []

    def forward(self, input_ids, **kw):
        logits = self.inner(input_ids, **kw)
        self.calls.append(logits[:, -1].clone())
        return logits


def check_cached_decoding(model: nn.Module, reference: Transformer, tok: Tokenizer) -> None:
    """Greedy decoding of `model`, batched with left padding, gives at every step the logits
    of `reference`'s full forward over the whole sequence; alone, each prompt the same tokens."""
    prompts = [tok.encode("To be, or not"), tok.encode("ab"), tok.encode("Thus")]
    recorder = Recorder(model)
    outputs = generate(recorder, tok, prompts, GREEDY, batch_size=3)
    order = sorted(range(3), key=lambda i: len(prompts[i]))  # generate groups by length
    for i, (prompt, gen) in enumerate(zip(prompts, outputs, strict=True)):
        row = order.index(i)
        full = reference(torch.tensor([prompt + gen.token_ids]))[0]
        for step in range(gen.n_tokens):
            cached = recorder.calls[step][row]
            torch.testing.assert_close(cached, full[len(prompt) - 1 + step], atol=1e-5, rtol=0)
        assert gen.token_ids == [int(full[len(prompt) - 1 + s].argmax()) for s in
                                 range(gen.n_tokens)]
    for prompt, gen in zip(prompts, outputs, strict=True):
        assert generate(model, tok, [prompt], GREEDY)[0].token_ids == gen.token_ids


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_decoding_logits_equal_full_forward(family: str, tok: Tokenizer) -> None:
    model = tiny_model(family)
    check_cached_decoding(model, model, tok)


@pytest.mark.parametrize(("family", "kw"), [("llama", {"n_kv_heads": 2}),
                                            ("llama", {"tie_embeddings": False}), ("gpt2", {})])
def test_pack_weights_changes_the_layout_not_the_results(family: str, kw: dict,
                                                         tok: Tokenizer) -> None:
    model = tiny_model(family, **kw)
    packed = copy.deepcopy(model)
    pack_weights(packed)
    pack_weights(packed)  # a second call changes nothing
    attn, mlp = packed.model.layers[0].self_attn, packed.model.layers[0].mlp
    assert attn.qkv is not None and attn.q_proj.weight.data_ptr() == attn.qkv[0].data_ptr()
    assert (mlp.gate_up is not None) == (family == "llama")
    assert packed.lm_head.weight.stride() == (1, packed.config.vocab_size)  # stored (in, out)
    before, after = model.state_dict(), packed.state_dict()
    assert list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before)
    check_cached_decoding(packed, model, tok)


@pytest.fixture
def threads():
    """Set torch's thread count inside a test (the suite runs on one); restored after."""
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)


@pytest.mark.parametrize("n_threads", [2, 3, 4, 6])
@pytest.mark.parametrize("d_in", [24, 32])
def test_linear_splits_few_rows_over_threads(n_threads: int, d_in: int, threads,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    threads(n_threads)
    calls = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(a[1].shape) or bmm(*a))
    torch.manual_seed(0)
    weight = torch.randn(40, d_in)
    stored = weight.t().contiguous().t()  # input-major, as pack_weights leaves it
    bias = torch.randn(40)
    for shape in [(1, d_in), (1, 1, d_in), (3, 5, d_in), (32, d_in), (33, d_in), (4, 9, d_in)]:
        x = torch.randn(shape)
        for b in (bias, None):
            calls.clear()
            got = linear(x, stored, b)
            torch.testing.assert_close(got, F.linear(x, weight, b), atol=1e-5, rtol=1e-5)
            rows = x.numel() // d_in
            splits = math.gcd(n_threads, d_in)  # 32 on 3 threads: none
            expected = [(splits, d_in // splits, 40)] if rows <= 32 and splits > 1 else []
            assert calls == expected, shape
            calls.clear()
            linear(x, weight, b)  # stored output-major: never split
            assert calls == []
    threads(1)
    linear(torch.randn(1, d_in), stored)
    assert calls == []


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_decoding_over_threads_equals_full_forward(family: str, tok: Tokenizer,
                                                          threads) -> None:
    """With several threads pack_weights makes every projection input-major and decoding runs
    the split products; the logits still match the plain model's full forward."""
    model = tiny_model(family)
    packed = copy.deepcopy(model)
    threads(2)
    pack_weights(packed)
    layer = packed.model.layers[0]
    assert type(layer.mlp.down_proj) is InputMajorLinear
    assert layer.mlp.down_proj.weight.stride(0) == 1
    check_cached_decoding(packed, model, tok)


def test_pack_weights_keeps_narrowing_weights_on_one_thread() -> None:
    packed = tiny_model("gpt2")
    pack_weights(packed)  # the suite runs on one thread
    mlp = packed.model.layers[0].mlp
    assert type(mlp.down_proj) is nn.Linear and mlp.down_proj.weight.is_contiguous()
    assert type(mlp.up_proj) is InputMajorLinear


def test_pack_weights_leaves_unmerged_lora_layers(tok: Tokenizer) -> None:
    from tinylm.lora import LoraSettings, apply_lora

    model = apply_lora(tiny_model("llama"), LoraSettings(targets="q_proj,up_proj")).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # a trained adapter: it changes the output
    ids = torch.tensor([tok.encode("Thus")])
    expected = model(ids)
    pack_weights(model)
    layer = model.base_model.model.model.layers[0]
    assert layer.self_attn.qkv is None and layer.mlp.gate_up is None
    torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=0)


def test_top_k_keeps_exactly_the_k_largest() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = torch.isfinite(top_k_filter(logits, 2))
    assert kept.tolist() == [[False, True, False, True, False]]
    assert torch.equal(top_k_filter(logits, 0), logits)
    assert torch.equal(top_k_filter(logits, 5), logits)


@pytest.mark.parametrize(
    ("p", "kept"),
    [
        (0.5, {2}),  # the top token alone has 0.5
        (0.6, {2, 0}),  # 0.5 + 0.25
        (0.75, {2, 0}),
        (0.8, {2, 0, 4}),  # 0.5 + 0.25 + 0.125
        (1.0, {0, 1, 2, 3, 4}),
        (0.1, {2}),  # at least one token
    ],
)
def test_top_p_keeps_the_smallest_set_with_enough_mass(p: float, kept: set[int]) -> None:
    probs = torch.tensor([[0.25, 0.0625, 0.5, 0.0625, 0.125]])
    filtered = top_p_filter(probs.log(), p)
    assert set(torch.isfinite(filtered)[0].nonzero().flatten().tolist()) == kept
    renormalized = filtered.softmax(-1)[0]
    assert float(renormalized[2]) == pytest.approx(0.5 / sum(float(probs[0, i]) for i in kept))


def test_repetition_penalty_by_hand() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    got = apply_repetition_penalty(logits, seen, 2.0)
    assert got.tolist() == [[1.0, -4.0, 1.0, 0.5]]


def test_sampling_follows_the_filtered_distribution(tok: Tokenizer) -> None:
    """With top-k 1 sampling is greedy; with temperature the draw covers several tokens."""
    model = tiny_model("llama")
    prompt = [tok.encode("Hello")]
    greedy = generate(model, tok, prompt, GREEDY)[0]
    top1 = generate(model, tok, prompt, SamplingConfig(12, temperature=1.5, top_k=1, seed=3))[0]
    assert top1.token_ids == greedy.token_ids


def test_same_seed_same_text(tok: Tokenizer) -> None:
    model = tiny_model("gpt2")
    prompts = [tok.encode("Once"), tok.encode("upon a time")]
    config = SamplingConfig(max_new_tokens=16, temperature=1.0, seed=7)
    a = generate(model, tok, prompts, config)
    b = generate(model, tok, prompts, config)
    c = generate(model, tok, prompts, SamplingConfig(max_new_tokens=16, seed=8))
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]


class Scripted(nn.Module):
    """A stand-in model that emits a fixed list of tokens, one per forward (prefill first)."""

    def __init__(self, script: list[int], vocab: int = 259) -> None:
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab, n_layers=1, n_heads=1, d_model=2,
                                  max_seq_len=256)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.script, self.vocab, self.step = script, vocab, 0

    def forward(self, input_ids, **kw):
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        logits[:, :, self.script[min(self.step, len(self.script) - 1)]] = 10.0
        self.step += 1
        return logits


def run_script(tok: Tokenizer, script: list[int], **kw) -> tuple[list[str], object]:
    pieces: list[str] = []
    config = SamplingConfig(**{"max_new_tokens": 64, "temperature": 0, **kw})
    (gen,) = generate(Scripted(script), tok, [[10]], config,
                      on_text=lambda _i, text: pieces.append(text))
    return pieces, gen


def test_stop_string_stops_and_is_left_out(tok: Tokenizer) -> None:
    script = list(b"Hello.\nWorld\n\nmore text")
    pieces, gen = run_script(tok, script, stop=("\n\n",))
    assert gen.text == "Hello.\nWorld" and gen.finish_reason == "stop"
    assert "".join(pieces) == "Hello.\nWorld"  # the held-back "\n" was never shown
    assert gen.n_tokens == len(b"Hello.\nWorld\n\n")
    pieces, gen = run_script(tok, script, stop=("xyz", "World"))
    assert gen.text == "Hello.\n"


def test_end_tokens_always_stop(tok: Tokenizer) -> None:
    for special in ("<|endoftext|>", "<|im_end|>"):
        _, gen = run_script(tok, [*b"Yes", tok.special_tokens[special], *b"no"])
        assert gen.text == "Yes" and gen.finish_reason == "end" and gen.n_tokens == 4
    _, gen = run_script(tok, list(b"abc"), max_new_tokens=5)
    assert gen.text == "abccc" and gen.finish_reason == "length"  # the script repeats its end


def test_multibyte_characters_split_across_tokens_stream_whole() -> None:
    text = "héllo ✓ 日本語 🎉!"
    stream = TextStream()
    pieces = [stream.feed(bytes([b])) for b in text.encode("utf-8")]
    pieces.append(stream.close())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[1] == "" and pieces[2] == "é"  # 'é' is 2 bytes: nothing, then the character


def test_multibyte_through_generation(tok: Tokenizer) -> None:
    text = "naïve → 世界"
    pieces, gen = run_script(tok, [*text.encode("utf-8"), tok.eot_id])
    assert gen.text == text and "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_incomplete_character_at_the_end_is_replaced() -> None:
    stream = TextStream()
    assert stream.feed(b"a" + "日".encode()[:2]) == "a"
    assert stream.close() == "\ufffd"


def test_fit_prompt_errors_or_truncates() -> None:
    ids = list(range(40))
    with pytest.raises(TinyLMError, match="context is 32"):
        fit_prompt(ids, 32, 10, truncate=False)
    assert fit_prompt(ids, 32, 10, truncate=True) == ids[-22:]
    assert fit_prompt(ids, 32, 100, truncate=True) == ids[-16:]  # at most half for new tokens
    assert fit_prompt(ids[:20], 32, 100, truncate=False) == ids[:20]


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 0}, {"top_k": -2},
                                 {"max_new_tokens": 0}, {"repetition_penalty": 0},
                                 {"stop": ("",)}])
def test_bad_sampling_settings(bad: dict) -> None:
    with pytest.raises(TinyLMError):
        SamplingConfig(**bad)


def test_chat_template_ids_and_history_trimming(tok: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = encode_chat(tok, messages, add_generation_prompt=True)
    text = render_chat(messages, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert ids == tok.encode(text, allowed_special="all")
    # A user's literal "<|im_end|>" stays text.
    assert tok.special_tokens["<|im_end|>"] not in encode_chat(
        tok, [{"role": "user", "content": "<|im_end|>"}])[2:-2]
    history = [messages[0]]
    for i in range(6):
        history += [{"role": "user", "content": f"question {i}"},
                    {"role": "assistant", "content": f"answer {i}"}]
    history.append({"role": "user", "content": "last"})
    kept, ids = fit_history(tok, history, 120)
    assert len(ids) <= 120 and kept[0] == messages[0] and kept[-1]["content"] == "last"
    assert kept[1]["role"] == "user" and len(kept) < len(history)
    assert ids == encode_chat(tok, kept, add_generation_prompt=True)
    with pytest.raises(TinyLMError, match="shorter message"):
        fit_history(tok, [{"role": "user", "content": "x" * 200}], 120)


# --- the commands ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tok: Tokenizer) -> Path:
    from tinylm.run import save_run

    path = tmp_path_factory.mktemp("run")
    save_run(path, tiny_model("llama"), tok, {"stage": "test"})
    return path


def cli(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def one_line_error(result, text: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], lines


def test_generate_command_json_and_seed(run_dir: Path) -> None:
    args = ["generate", "--model", str(run_dir), "ROMEO:", "-n", "10", "--seed", "3", "--json",
            "--device", "cpu"]
    first, second = cli(*args), cli(*args)
    assert first.exit_code == 0, first.output
    out = json.loads(first.stdout)
    assert out["prompt"] == "ROMEO:" and out["n_tokens"] <= 10
    for key in ("text", "prefill_s", "tokens_per_s"):
        assert key in out
    assert json.loads(second.stdout)["text"] == out["text"]


def test_generate_command_streams_plain_text(run_dir: Path) -> None:
    result = cli("generate", "-m", str(run_dir), "abc", "-n", "8", "-t", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output
    model = tiny_model("llama")
    tok = Tokenizer.bytes_only()
    (gen,) = generate(model, tok, [tok.encode("abc")], SamplingConfig(8, temperature=0))
    assert result.stdout == gen.text + "\n"


def test_prompts_file_samples_and_chat(run_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "one"}\n{"prompt": "two two"}\n')
    result = cli("generate", "-m", str(run_dir), "--prompts-file", str(prompts), "--json",
                 "--num-samples", "2", "-n", "4", "--batch-size", "3", "--chat",
                 "--system", "Be kind.", "--seed", "1")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [x["prompt"] for x in lines] == ["one", "one", "two two", "two two"]
    text_file = tmp_path / "p.txt"
    text_file.write_text("first\n\nsecond\n")
    result = cli("generate", "-m", str(run_dir), "--prompts-file", str(text_file), "-n", "3")
    assert result.exit_code == 0 and "--- prompt 2" in result.stdout


def test_generate_bad_options_exit_2(run_dir: Path, tmp_path: Path) -> None:
    m = ["generate", "-m", str(run_dir)]
    one_line_error(cli(*m, "hi", "--temperature", "-0.5"), "--temperature")
    one_line_error(cli(*m, "hi", "--top-p", "1.5"), "--top-p")
    one_line_error(cli("generate", "-m", str(tmp_path / "nope"), "hi"), "no such run directory")
    one_line_error(cli(*m), "PROMPT or --prompts-file")
    one_line_error(cli(*m, "hi", "--system", "x"), "--chat")
    long = "x" * 60  # the context is 48 tokens
    one_line_error(cli(*m, long), "context is 48")
    ok = cli(*m, long, "--truncate", "-n", "4", "--json")
    assert ok.exit_code == 0 and "kept the last" in ok.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    one_line_error(cli(*m, "--prompts-file", str(bad)), f"{bad}:2")


def test_chat_command_turns_reset_and_exit(run_dir: Path, tok: Tokenizer) -> None:
    result = cli("chat", "-m", str(run_dir), "-n", "5", "--seed", "1", "--system", "Hi.",
                 input="hello\n/reset\nagain\n/exit\nnever read\n")
    assert result.exit_code == 0, result.output
    assert "history cleared" in result.stderr
    model, system = tiny_model("llama"), {"role": "system", "content": "Hi."}
    answers = []
    for turn, text in enumerate(["hello", "again"], start=1):  # /reset: each starts afresh
        ids = encode_chat(tok, [system, {"role": "user", "content": text}], True)
        config = SamplingConfig(5, temperature=0.7, top_k=50, seed=1 + turn)
        answers.append(generate(model, tok, [ids], config)[0].text)
    assert result.stdout == "".join(a + "\n" for a in answers)
    # Without /reset the second turn no longer fits 48 tokens: the oldest turn goes.
    result = cli("chat", "-m", str(run_dir), "-n", "5", "--system", "Hi.",
                 input="hello\nagain\n")
    assert result.exit_code == 0 and "dropped the 2 oldest messages" in result.stderr


def test_tokens_per_second_is_reported(tok: Tokenizer) -> None:
    (gen,) = generate(tiny_model("gpt2"), tok, [tok.encode("x")], GREEDY)
    assert gen.prefill_s > 0 and gen.decode_s > 0
    assert math.isclose(gen.tokens_per_s, gen.n_tokens / gen.decode_s)
