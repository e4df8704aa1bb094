"""Instruction tuning: the masked loss, packing isolation, the batch source, and the command."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tinylm.cli  # noqa: F401  (registers the commands)
from tinylm.cli.app import app
from tinylm.errors import TinyLMError
from tinylm.finetune import (
    FULL_LR,
    LORA_LR,
    FinetuneConfig,
    load_config,
)
from tinylm.losses import sft_loss
from tinylm.model import ModelConfig, Transformer
from tinylm.run import load_run, save_run
from tinylm.sft import (
    Conversation,
    SFTBatches,
    collate_packed,
    collate_padded,
    encode_example,
)
from tinylm.tokenizer import Tokenizer
from tinylm.train.report import read_metrics
from tinylm.tuning import split_validation

runner = CliRunner()


TOK = Tokenizer.bytes_only()


def tiny_model(family: str = "llama", seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(family=family, vocab_size=TOK.vocab_size, n_layers=2, n_heads=2,
                         d_model=32, max_seq_len=128)
    return Transformer(config).eval()


def chat(question: str, answer: str, system: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": question},
            {"role": "assistant", "content": answer}]


EXAMPLES = [
    encode_example(TOK, chat("hi", "yo")),
    encode_example(TOK, chat("2+2?", "4", system="math")),
    encode_example(TOK, [*chat("a", "b"), *chat("c", "dd")]),
]


def direct_loss(model: Transformer, example) -> tuple[float, int]:
    """Sum of -log p(token) over the targets, each example run alone, position by position."""
    ids = torch.tensor([example.input_ids])
    log_probs = torch.log_softmax(model(ids)[0].double(), -1)
    total, count = 0.0, 0
    for t in range(len(example.input_ids) - 1):
        if example.loss_mask[t + 1]:
            total -= log_probs[t, example.input_ids[t + 1]].item()
            count += 1
    return total, count


@pytest.mark.parametrize("packed", [False, True])
def test_loss_equals_direct_computation_on_assistant_positions(packed):
    model = tiny_model()
    if packed:
        batch = collate_packed(EXAMPLES, [[0, 1, 2]], pad_id=TOK.eot_id)
    else:
        batch = collate_padded(EXAMPLES, pad_id=TOK.eot_id)
    fields = {k: v for k, v in vars(batch).items() if v is not None}
    loss_sum, count, _ = sft_loss(model, fields)
    expected = [direct_loss(model, e) for e in EXAMPLES]
    assert int(count) == sum(c for _, c in expected) == 3 + 2 + 2 + 3
    assert loss_sum.item() == pytest.approx(sum(s for s, _ in expected), rel=1e-5)


def test_prompt_labels_cannot_change_the_loss_or_gradients():
    model = tiny_model()
    batch = collate_padded(EXAMPLES, pad_id=TOK.eot_id)
    fields = {"input_ids": batch.input_ids, "labels": batch.labels, "loss_mask": batch.loss_mask}
    changed = dict(fields, labels=torch.where(batch.loss_mask, batch.labels, 7))
    results = []
    for f in (fields, changed):
        model.zero_grad()
        loss, _, _ = sft_loss(model, f)
        loss.backward()
        results.append((loss.detach(), model.lm_head.weight.grad.clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packing_isolation_logits_same_packed_or_alone(family):
    model = tiny_model(family)
    batch = collate_packed(EXAMPLES, [[0, 1, 2]], pad_id=TOK.eot_id)
    packed = model(batch.input_ids, **batch.model_kwargs())[0]
    at = 0
    for example in EXAMPLES:
        n = len(example.input_ids) - 1
        alone = model(torch.tensor([example.input_ids[:-1]]))[0]
        assert torch.allclose(packed[at : at + n], alone, atol=1e-5)
        at += n


def test_batch_source_is_a_pure_function_and_covers_each_epoch():
    examples = [encode_example(TOK, chat("q" * (i % 7), "a" * (1 + i % 3))) for i in range(21)]
    a = SFTBatches(examples, micro_batch=4, micros_per_step=2, seed=3, pad_id=TOK.eot_id)
    b = SFTBatches(examples, micro_batch=4, micros_per_step=2, seed=3, pad_id=TOK.eot_id)
    assert a.per_epoch == 6 and a.steps_for(2.0) == 6
    for step, micro in [(0, 0), (2, 1), (5, 1), (0, 0)]:
        x, y = a(step, micro), b(step, micro)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    for epoch in (0, 1):
        seen = sorted(i for batch in a.plan(epoch) for i in batch)
        assert seen == list(range(21))
    assert a.plan(0) != a.plan(1)  # a new order each epoch
    packed = SFTBatches(examples, micro_batch=2, micros_per_step=1, seed=3, pad_id=TOK.eot_id,
                        window=64)
    assert sorted(i for w in packed.windows for i in w) == list(range(21))
    batch = packed(0, 0)
    assert batch["attention_mask"].shape[1:] == (batch["input_ids"].shape[1],) * 2
    chosen = [i for w in packed.plan(0)[0] for i in packed.windows[w]]
    assert int(batch["n_tokens"]) == sum(len(examples[i].input_ids) - 1 for i in chosen)
    assert int(batch["loss_mask"].sum()) == sum(examples[i].n_targets for i in chosen)


def test_validation_loss_is_the_mean_over_response_tokens():
    from tinylm.sft.evaluate import validation_loss

    model = tiny_model()
    expected = [direct_loss(model, e) for e in EXAMPLES]
    result = validation_loss(model, EXAMPLES, micro_batch=2, pad_id=TOK.eot_id)
    mean = sum(s for s, _ in expected) / sum(c for _, c in expected)
    assert result["val_loss"] == pytest.approx(mean, rel=1e-5)


def test_exact_match_compares_greedy_answers_with_the_last_assistant_turn(monkeypatch):
    import tinylm.sft.evaluate
    from tinylm.generate import Generation
    from tinylm.sft.evaluate import exact_match

    conversations = [Conversation(tuple(chat(f"q{i}", f"a{i}"))) for i in range(4)]
    seen = []

    def fake_generate(model, tokenizer, prompt_ids, config, **kwargs):
        seen.extend(prompt_ids)
        texts = [" a0\n", "a1", "wrong", "a3 and more"]
        pairs = zip(texts, prompt_ids, strict=True)
        return [Generation("", t, 1, len(p), 0.0, 0.0, "end") for t, p in pairs]

    monkeypatch.setattr(tinylm.sft.evaluate, "generate", fake_generate)
    result = exact_match(tiny_model(), TOK, conversations)
    assert result == {"val_exact_match": 0.5}
    assert seen[0] == encode_example(TOK, chat("q0", "a0")).input_ids[: len(seen[0])]
    assert TOK.decode(seen[0]).endswith("<|im_start|>assistant\n")


def test_split_validation_is_seeded_and_disjoint():
    conversations = [Conversation(tuple(chat(str(i), "x")), f"f:{i}") for i in range(20)]
    train, val = split_validation(conversations, 0.1, seed=1)
    assert len(val) == 2 and len(train) == 18
    assert {c.source for c in train}.isdisjoint({c.source for c in val})
    assert split_validation(conversations, 0.1, seed=1) == (train, val)
    assert split_validation(conversations, 0.0, seed=1) == (conversations, [])
    assert len(split_validation(conversations[:2], 0.01, seed=1)[1]) == 1


def test_config_automatic_values_and_errors():
    cfg = load_config(None, [])
    assert cfg.train.max_steps is None and cfg.train.lr is None  # automatic
    assert cfg.train.resolved(17, FULL_LR).max_steps == 17
    assert cfg.train.resolved(17, FULL_LR).lr == FULL_LR
    chosen = load_config(None, ["lora.enabled=true", "train.lr=0.01", "train.max_steps=3"])
    assert (chosen.train.resolved(5, LORA_LR).lr, chosen.train.resolved(5, LORA_LR).max_steps) \
        == (0.01, 3)
    for bad in (["train.lr=-1"], ["train.lr=0"], ["train.max_steps=0"], ["epochs=0"],
                ["train.nope=1"], ["lora.rank=0"], ["data.val_fraction=1.5"]):
        with pytest.raises(TinyLMError):
            load_config(None, bad)
    assert isinstance(cfg, FinetuneConfig)


# ---- the command, end to end on a tiny model -------------------------------------------------

ANIMALS = ["cat", "dog", "cow", "owl", "bee", "ant", "elk", "fox", "yak", "emu"]


def write_data(path: Path, n: int = 40) -> Path:
    """A learnable task: the answer is the animal named in the question."""
    rows = [{"prompt": f"Name: {ANIMALS[i % 10]}", "completion": ANIMALS[i % 10]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_base_run(path: Path) -> Path:
    path.mkdir(parents=True)
    save_run(path, tiny_model(), TOK, {"stage": "pretrain"})
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


FAST = ["--batch-size", "8", "--set", "train.micro_batch=4", "--set", "train.eval_every=10",
        "--set", "data.exact_match=8", "--lr", "3e-3", "--set", "train.warmup_steps=2"]


def test_full_finetune_end_to_end(tmp_path):
    base = make_base_run(tmp_path / "base")
    data = write_data(tmp_path / "train.jsonl")
    out = tmp_path / "sft"
    args = ["finetune", "-b", str(base), "-d", str(data), "-o", str(out), "--max-steps", "20",
            "--val-fraction", "0.2", "--quiet", *FAST]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl",
                 "report.md"):
        assert (out / name).is_file(), name
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert 0.0 <= evals[-1]["val_exact_match"] <= 1.0
    first_loss = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r][0]["loss"]
    assert evals[-1]["val_loss"] < first_loss  # it learned something
    config = json.loads((out / "config.json").read_text())
    assert config["stage"] == "finetune"
    assert config["base_run"]["path"] == str(base.resolve())
    assert config["data"]["train"]["kept"] == 32 and config["data"]["val"]["kept"] == 8
    assert config["finetune"]["train"]["max_steps"] == 20
    run = load_run(out)
    assert not torch.equal(run.model.lm_head.weight, load_run(base).model.lm_head.weight)
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output


def test_lora_finetune_end_to_end(tmp_path):
    from tinylm.run import is_adapter_run

    base = make_base_run(tmp_path / "base")
    before = digest(base / "model.safetensors")
    data = write_data(tmp_path / "train.jsonl")
    out = tmp_path / "lora"
    result = runner.invoke(app, [
        "finetune", "-b", str(base), "-d", str(data), "-o", str(out), "--max-steps", "10",
        "--lora", "--lora-rank", "4", "--lora-targets", "all-linear", "--packing", *FAST,
    ])
    assert result.exit_code == 0, result.output
    assert "LoRA tuning:" in result.output and "parameters train" in result.output
    assert is_adapter_run(out) and not (out / "model.safetensors").exists()
    assert digest(base / "model.safetensors") == before
    adapter = load_run(out)
    assert not torch.equal(adapter.model(torch.tensor([[1, 2, 3]])),
                           load_run(base).model(torch.tensor([[1, 2, 3]])))
    config = json.loads((out / "config.json").read_text())
    assert config["finetune"]["data"]["packing"] is True
    assert config["parameters"]["trainable"] < config["parameters"]["total"] / 5


def test_resume_gives_the_same_losses(tmp_path):
    base = make_base_run(tmp_path / "base")
    data = write_data(tmp_path / "train.jsonl")
    common = ["-b", str(base), "-d", str(data), "--quiet", "--set", "train.schedule=constant",
              "--set", "train.log_every=1", *FAST]
    straight = tmp_path / "straight"
    assert runner.invoke(app, ["finetune", "-o", str(straight), "--max-steps", "8",
                               *common]).exit_code == 0
    resumed = tmp_path / "resumed"
    assert runner.invoke(app, ["finetune", "-o", str(resumed), "--max-steps", "4",
                               *common]).exit_code == 0
    result = runner.invoke(app, ["finetune", "-o", str(resumed), "--resume", "--max-steps", "8",
                                 "--quiet"])
    assert result.exit_code == 0, result.output

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]

    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-6)
    other = write_data(tmp_path / "other.jsonl", n=30)
    changed = runner.invoke(app, ["finetune", "-o", str(resumed), "--resume", "-d", str(other),
                                  "--max-steps", "9"])
    assert changed.exit_code == 2 and "different data" in changed.output


def test_truncated_and_skipped_examples_are_counted(tmp_path):
    base = make_base_run(tmp_path / "base")
    rows = [{"prompt": "x" * 200, "completion": "never seen"},
            {"prompt": "short", "completion": "y" * 200},
            *({"prompt": "ok", "completion": "fine"} for _ in range(6))]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sft"
    result = runner.invoke(app, ["finetune", "-b", str(base), "-d", str(data), "-o", str(out),
                                 "--max-steps", "1", "--val-fraction", "0", *FAST])
    assert result.exit_code == 0, result.output
    assert "2 examples longer than 129 tokens were truncated" in result.output
    assert "1 examples had no response token left" in result.output
    assert f"{data}:1" in result.output
    counts = json.loads((out / "config.json").read_text())["data"]["train"]
    assert (counts["examples"], counts["kept"], counts["truncated"], counts["skipped"]) == (
        8, 7, 2, 1)


def test_user_errors_exit_2(tmp_path):
    data = write_data(tmp_path / "train.jsonl")
    missing = runner.invoke(app, ["finetune", "-b", str(tmp_path / "nope"), "-d", str(data),
                                  "-o", str(tmp_path / "o")])
    assert missing.exit_code == 2 and "no such run directory" in missing.output
    base = make_base_run(tmp_path / "base")
    too_long = runner.invoke(app, ["finetune", "-b", str(base), "-d", str(data), "-o",
                                   str(tmp_path / "o2"), "--max-length", "500"])
    assert too_long.exit_code == 2 and "max_length" in too_long.output
    bad_batch = runner.invoke(app, ["finetune", "-b", str(base), "-d", str(data), "-o",
                                    str(tmp_path / "o3"), "--batch-size", "0"])
    assert bad_batch.exit_code == 2 and "batch_size" in bad_batch.output
