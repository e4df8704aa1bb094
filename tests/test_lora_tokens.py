"""LoRA trains the rows of the chat template's tokens (lora.train_template_tokens): through
PEFT's trainable tokens, tied head included; the adapter saves, loads, merges, resumes, and
loads with PEFT onto the exported Hugging Face model with the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tinylm.cli  # noqa: F401  (registers the commands)
from tinylm.chat import TURN_END, TURN_START
from tinylm.cli.app import app
from tinylm.lora import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    LoraSettings,
    adapter_disabled,
    apply_lora,
    template_token_ids,
)
from tinylm.model import ModelConfig, Transformer
from tinylm.run import load_run, merge_run, save_adapter_run, save_run
from tinylm.tokenizer import Tokenizer
from tinylm.train.report import read_metrics

runner = CliRunner()
TOK = Tokenizer.bytes_only()
END = TOK.special_tokens[TURN_END]
ROWS = "token_adapter.trainable_tokens_delta"


def make_base_run(path: Path, family: str = "llama", tied: bool = True) -> Path:
    torch.manual_seed(0)
    config = ModelConfig(family=family, vocab_size=TOK.vocab_size, n_layers=2, n_heads=2,
                         d_model=32, max_seq_len=64, tie_embeddings=tied)
    path.mkdir(parents=True)
    save_run(path, Transformer(config), TOK, {"stage": "pretrain"})
    return path


def ids() -> torch.Tensor:
    start = TOK.special_tokens[TURN_START]
    return torch.tensor([[start, 104, 105, END, 10, start, 97, 98, END]])


def train_rows(model: torch.nn.Module, steps: int = 5) -> None:
    """A few steps that raise p(<|im_end|>) everywhere: only trained rows can do that fast."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-2)
    model.train()
    for _ in range(steps):
        loss = -model(ids()).log_softmax(-1)[..., END].mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_template_tokens_are_the_chat_turn_markers() -> None:
    assert template_token_ids(TOK) == sorted([TOK.special_tokens[TURN_START], END])
    assert TURN_START in TOK.special_tokens and END == TOK.special_tokens[TURN_END]


@pytest.mark.parametrize("family, tied", [("llama", True), ("llama", False), ("gpt2", True)])
def test_rows_train_and_load_everywhere_with_the_same_logits(
    tmp_path: Path, family: str, tied: bool
) -> None:
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel

    from tinylm.interop.export import export_hf

    base = make_base_run(tmp_path / "base", family, tied)
    base_logits = load_run(base).model(ids())
    model = apply_lora(load_run(base).model, LoraSettings(enabled=True, rank=4, dropout=0.0),
                       template_token_ids(TOK))
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad and ROWS in n)
    # A tied head shares the embedding's rows (PEFT ties them); an untied head has its own.
    assert len(trained) == (1 if tied else 2) and any("embed_tokens" in n for n in trained)
    with torch.no_grad():
        assert torch.equal(model(ids()), base_logits)  # the deltas start at 0
    train_rows(model)
    with torch.no_grad():
        expected = model(ids())
        with adapter_disabled(model):  # LoRA DPO's reference: the base, rows included
            assert torch.allclose(model(ids()), base_logits, atol=1e-6)
    gain = expected.softmax(-1)[..., END].mean() - base_logits.softmax(-1)[..., END].mean()
    assert gain > 0.1  # the head rows moved, not only the embedding's

    run = tmp_path / "lora"
    run.mkdir()
    save_adapter_run(run, model, base, {"stage": "finetune"})
    TOK.save(run / "tokenizer.json")
    saved = json.loads((run / ADAPTER_CONFIG_FILE).read_text())
    assert saved["trainable_token_indices"] == {"embed_tokens": template_token_ids(TOK),
                                                "lm_head": template_token_ids(TOK)}
    with torch.no_grad():
        assert torch.allclose(load_run(run, no_merge=True).model(ids()), expected, atol=1e-6)
        merged = load_run(run).model
        assert isinstance(merged, Transformer)
        assert torch.allclose(merged(ids()), expected, atol=1e-5)
        on_ours = PeftModel.from_pretrained(load_run(base).model, str(run)).eval()
        assert torch.allclose(on_ours(ids()), expected, atol=1e-6)
    # Only the template's rows changed in the merged weights.
    before, after = load_run(base).model, merged
    changed = (after.model.embed_tokens.weight != before.model.embed_tokens.weight).any(-1)
    assert changed.nonzero().flatten().tolist() == template_token_ids(TOK)

    export_hf(run, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert hf.config.tie_word_embeddings is tied
    hf_lora = PeftModel.from_pretrained(hf, str(tmp_path / "hf" / "adapter")).eval()
    with torch.no_grad():
        hf_logits = hf_lora(input_ids=ids()).logits
    assert torch.allclose(hf_logits, expected, atol=1e-4)

    merged_run = merge_run(run, tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(load_run(merged_run).model(ids()), expected, atol=1e-5)


ANIMALS = ["cat", "dog", "cow", "owl", "bee", "ant", "elk", "fox"]
FAST = ["--batch-size", "8", "--set", "train.micro_batch=4", "--set", "train.eval_every=0",
        "--set", "data.exact_match=0", "--lr", "3e-3", "--set", "train.warmup_steps=2",
        "--set", "train.schedule=constant", "--set", "train.log_every=1", "--lora",
        "--lora-dropout", "0", "--quiet"]


def write_data(path: Path) -> Path:
    rows = [{"prompt": f"Name: {a}", "completion": a} for a in ANIMALS * 3]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / ADAPTER_WEIGHTS_FILE))


def test_finetune_lora_trains_the_rows_by_default_and_resumes_exactly(tmp_path: Path) -> None:
    base = make_base_run(tmp_path / "base")
    common = ["-b", str(base), "-d", str(write_data(tmp_path / "train.jsonl")), *FAST]
    straight, resumed, off = tmp_path / "straight", tmp_path / "resumed", tmp_path / "off"
    result = runner.invoke(app, ["finetune", "-o", str(straight), "--max-steps", "6", *common])
    assert result.exit_code == 0, result.output
    rows = [k for k in adapter_tensors(straight) if ROWS in k]
    assert rows == [f"base_model.model.model.embed_tokens.{ROWS}"]  # tied: one set of rows
    saved = json.loads((straight / "config.json").read_text())
    assert saved["finetune"]["lora"]["train_template_tokens"] is True
    assert runner.invoke(app, ["finetune", "-o", str(resumed), "--max-steps", "3",
                               *common]).exit_code == 0
    result = runner.invoke(app, ["finetune", "-o", str(resumed), "--resume", "--max-steps", "6",
                                 "--quiet"])
    assert result.exit_code == 0, result.output

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]

    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-6)
    ours, theirs = adapter_tensors(resumed), adapter_tensors(straight)
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)
    result = runner.invoke(app, ["finetune", "-o", str(off), "--max-steps", "2",
                                 "--no-train-template-tokens", *common])
    assert result.exit_code == 0, result.output
    assert not [k for k in adapter_tensors(off) if ROWS in k]
    assert "trainable_token_indices" not in {
        k for k, v in json.loads((off / ADAPTER_CONFIG_FILE).read_text()).items() if v}


def test_dpo_lora_trains_the_rows_and_the_flag_turns_it_off(tmp_path: Path) -> None:
    base = make_base_run(tmp_path / "base")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i % 4}", "chosen": "yes",
                                         "rejected": "no"}) + "\n" for i in range(16)))
    common = ["-b", str(base), "-d", str(pairs), "--max-steps", "2", "--batch-size", "4",
              "--set", "train.micro_batch=4", "--set", "train.log_every=1", "--lora",
              "--lora-dropout", "0", "--quiet"]
    on, off = tmp_path / "on", tmp_path / "off"
    assert runner.invoke(app, ["dpo", "-o", str(on), *common]).exit_code == 0
    assert [k for k in adapter_tensors(on) if ROWS in k]
    steps = [r for r in read_metrics(on / "metrics.jsonl") if "rewards/margins" in r]
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # reference = start
    result = runner.invoke(app, ["dpo", "-o", str(off), "--no-train-template-tokens", *common])
    assert result.exit_code == 0, result.output
    assert not [k for k in adapter_tensors(off) if ROWS in k]
