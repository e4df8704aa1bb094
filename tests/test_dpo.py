"""DPO: the loss variants, the reference policies, a few training steps, and the command."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tinylm.cli  # noqa: F401  (registers the commands)
from tinylm.cli.app import app
from tinylm.dpo import DPOConfig, loss_settings, make_loss_fn
from tinylm.errors import TinyLMError
from tinylm.evaluate import pair_logps
from tinylm.lora import LoraSettings, adapter_disabled, apply_lora
from tinylm.losses import LossOutput, dpo_batch_loss, dpo_loss
from tinylm.model import ModelConfig, Transformer
from tinylm.run import is_adapter_run, load_run, save_run
from tinylm.sft import PreferencePair, encode_pairs
from tinylm.sft.batch import pair_batch
from tinylm.tokenizer import Tokenizer
from tinylm.train.report import read_metrics

runner = CliRunner()
TOK = Tokenizer.bytes_only()


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=TOK.vocab_size, n_layers=2, n_heads=2, d_model=32,
                         max_seq_len=128)
    return Transformer(config).eval()


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_loss_variants_match_hand_computed_values():
    # d = (-1 - -2) - (-3 - -2) = 2; beta 0.5 -> beta * d = 1
    args = (t(-1.0), t(-3.0), t(-2.0), t(-2.0), 0.5)
    losses, chosen, rejected = dpo_loss(*args)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1)))
    assert chosen.item() == pytest.approx(0.5) and rejected.item() == pytest.approx(-0.5)
    smooth, _, _ = dpo_loss(*args, label_smoothing=0.1)
    assert smooth.item() == pytest.approx(0.9 * math.log1p(math.exp(-1))
                                          + 0.1 * math.log1p(math.exp(1)))
    assert dpo_loss(*args, loss_type="hinge")[0].item() == pytest.approx(0.0)
    assert dpo_loss(*args[:4], 0.25, "hinge")[0].item() == pytest.approx(0.5)
    assert dpo_loss(*args, loss_type="ipo")[0].item() == pytest.approx((2 - 1) ** 2)
    assert dpo_loss(*args[:4], 0.25, "ipo")[0].item() == pytest.approx((2 - 2) ** 2)
    with pytest.raises(TinyLMError, match="unknown DPO loss"):
        dpo_loss(*args, loss_type="kto")


def trl_loss(loss_type: str | list[str], beta: float, per_token: torch.Tensor,
             mask: torch.Tensor, ref: torch.Tensor,
             weights: list[float] | None = None) -> tuple[float, dict[str, list[float]]]:
    """TRL's own DPOTrainer._compute_loss on given per-token log-probs (a stub trainer and a
    stub model that returns them; the reference log-probs are "precomputed")."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl import DPOTrainer

    n = per_token.shape[0]
    outputs = SimpleNamespace(log_probs=per_token * mask, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token),
                              is_top1=torch.zeros_like(mask, dtype=torch.bool))
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), ref_model=None,
        accelerator=SimpleNamespace(device="cpu", gather=lambda x: x,
                                    gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type] if isinstance(loss_type, str) else loss_type,
        loss_weights=weights or [1.0], beta=beta,
        label_smoothing=0.0, use_weighting=False, _total_train_tokens=0, _tp_size=1,
        _metrics=defaultdict(lambda: defaultdict(list)))
    completion = torch.cat([torch.zeros(n, 1, dtype=torch.long), mask.long()], dim=1)
    inputs = {"input_ids": torch.zeros_like(completion), "attention_mask": torch.ones_like(
        completion), "completion_mask": completion, "ref_chosen_logps": ref[: n // 2],
        "ref_rejected_logps": ref[n // 2 :]}
    loss = DPOTrainer._compute_loss(stub, lambda **kw: outputs, inputs, False)
    return float(loss), stub._metrics["train"]


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_loss_equals_trls_own_dpo_loss(loss_type):
    pytest.importorskip("trl")
    torch.manual_seed(0)
    per_token = -torch.rand(6, 7, dtype=torch.float64) * 3  # 3 chosen rows, then 3 rejected
    mask = torch.rand(6, 7) > 0.3
    mask[:, 0] = True
    ref = -torch.rand(6, dtype=torch.float64) * 10
    expected, trl_metrics = trl_loss(loss_type, 0.2, per_token, mask, ref)
    logps = (per_token * mask).sum(-1)
    cfg = DPOConfig(beta=0.2, loss_type=loss_type)
    ours = dpo_batch_loss(logps, ref, mask, **loss_settings(cfg))
    assert ours.loss_sum.item() / ours.count == pytest.approx(expected, rel=1e-9)
    for key, value in ours.metrics.items():
        assert value.item() / ours.count == pytest.approx(trl_metrics[key][0], rel=1e-6), key


def test_sft_weight_equals_trls_sigmoid_plus_sft_loss():
    """RPO: + w * the chosen answers' NLL per token; TRL combines ["sigmoid", "sft"] with
    weights [1, w] (the same numbers when the chosen answers are equally long, as here)."""
    pytest.importorskip("trl")
    torch.manual_seed(1)
    per_token = -torch.rand(6, 7, dtype=torch.float64) * 3
    mask = torch.rand(6, 7) > 0.3
    mask[:3] = True  # every chosen answer 7 tokens long
    ref = -torch.rand(6, dtype=torch.float64) * 10
    expected, _ = trl_loss(["sigmoid", "sft"], 0.2, per_token, mask, ref, weights=[1.0, 0.5])
    logps = (per_token * mask).sum(-1)
    ours = dpo_batch_loss(logps, ref, mask, beta=0.2, sft_weight=0.5)
    plain = dpo_batch_loss(logps, ref, mask, beta=0.2)
    assert ours.loss_sum.item() / ours.count == pytest.approx(expected, rel=1e-9)
    nll = -per_token[:3].mean(-1)
    assert ours.metrics["nll_loss"].item() == pytest.approx(nll.sum().item())
    assert (ours.loss_sum - plain.loss_sum).item() == pytest.approx(0.5 * nll.sum().item())
    with pytest.raises(TinyLMError, match="sft_weight"):
        DPOConfig(sft_weight=-1.0)


def pairs() -> list[PreferencePair]:
    def msg(role: str, text: str) -> tuple[dict[str, str], ...]:
        return ({"role": role, "content": text},)

    items = [(f"q{i}", "yes" * (1 + i % 2), "no" * (1 + i % 3)) for i in range(8)]
    return [PreferencePair(msg("user", q), msg("assistant", c), msg("assistant", r))
            for q, c, r in items]


def test_step_zero_loss_is_ln2_and_rewards_zero():
    encoded, _ = encode_pairs(TOK, pairs(), 64)
    model = tiny_model()
    batch = pair_batch(encoded, list(range(4)), TOK.eot_id)
    for loss_type in ("sigmoid", "hinge"):
        cfg = DPOConfig(loss_type=loss_type)
        out = LossOutput(*make_loss_fn(cfg, copy.deepcopy(model))(model, batch))
        assert out.count == 4
        per_pair = out.loss_sum.item() / 4
        assert per_pair == pytest.approx(math.log(2) if loss_type == "sigmoid" else 1.0)
        assert out.metrics["rewards/chosen"].item() == 0.0
        assert out.metrics["rewards/margins"].item() == 0.0
        assert out.metrics["logps/chosen"].item() < 0


def test_precomputed_reference_gives_the_same_loss_and_reference_stays_frozen():
    encoded, _ = encode_pairs(TOK, pairs(), 64)
    model, ref = tiny_model(), tiny_model()
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    cfg = DPOConfig()
    loss_fn = make_loss_fn(cfg, ref)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        loss_fn(model, pair_batch(encoded, [0, 1, 2], TOK.eot_id))[0].backward()
        optimizer.step()
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in ref.parameters())
    assert not torch.equal(model.lm_head.weight, ref.lm_head.weight)
    model.eval()
    table = pair_logps(ref, encoded, 3, TOK.eot_id)
    with_ref = loss_fn(model, pair_batch(encoded, [0, 4, 5], TOK.eot_id))
    precomputed = make_loss_fn(cfg, None)(model, pair_batch(encoded, [0, 4, 5], TOK.eot_id,
                                                            table))
    assert with_ref[0].item() == pytest.approx(precomputed[0].item(), rel=1e-5)


def test_lora_reference_equals_the_base_model():
    base = tiny_model()
    ids = torch.randint(0, 256, (2, 10))
    expected = base(ids)
    peft = apply_lora(copy.deepcopy(base), LoraSettings(enabled=True, dropout=0.0))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    assert not torch.allclose(peft(ids), expected)
    with adapter_disabled(peft):
        assert torch.equal(peft(ids), expected)
    assert not torch.allclose(peft(ids), expected)  # the adapter is back on


def write_pairs(path: Path, n: int = 24, identical: int = 0) -> Path:
    lines = []
    for i in range(n):
        chosen = "good answer" if i >= identical else "same"
        lines.append({"prompt": f"question {i % 6}", "chosen": chosen,
                      "rejected": "bad" if i >= identical else "same"})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


@pytest.fixture
def base_run(tmp_path: Path) -> Path:
    path = tmp_path / "base"
    path.mkdir()
    save_run(path, tiny_model(), TOK, {"stage": "pretrain"})
    return path


FAST = ["--batch-size", "8", "--set", "train.micro_batch=4", "--set", "train.log_every=1",
        "--eval-every", "5", "--quiet"]


def test_dpo_training_raises_accuracy_and_margin(tmp_path, base_run):
    data = write_pairs(tmp_path / "pairs.jsonl", identical=2)
    out = tmp_path / "dpo"
    result = runner.invoke(app, ["dpo", "-b", str(base_run), "-d", str(data), "-o", str(out),
                                 "--max-steps", "10", "--lr", "3e-3", *FAST[:-1]])
    assert result.exit_code == 0, result.output
    assert "2 pairs have identical chosen and rejected" in result.output
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if "rewards/margins" in r]
    evals = [r for r in records if "val_rewards/margins" in r]
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert steps[-1]["rewards/margins"] > 0.1
    assert steps[-1]["rewards/accuracies"] > steps[0]["rewards/accuracies"]
    assert evals and evals[-1]["val_rewards/accuracies"] > 0.5
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert key in steps[-1]
    config = json.loads((out / "config.json").read_text())
    assert config["stage"] == "dpo" and config["data"]["identical_pairs"] >= 1
    assert not torch.equal(load_run(out).model.lm_head.weight,
                           load_run(base_run).model.lm_head.weight)


def test_lora_and_precomputed_reference_runs(tmp_path, base_run):
    data = write_pairs(tmp_path / "pairs.jsonl")
    lora = tmp_path / "lora"
    result = runner.invoke(app, ["dpo", "-b", str(base_run), "-d", str(data), "-o", str(lora),
                                 "--max-steps", "6", "--lora", "--lora-dropout", "0", *FAST])
    assert result.exit_code == 0, result.output
    assert is_adapter_run(lora)
    steps = [r for r in read_metrics(lora / "metrics.jsonl") if "rewards/margins" in r]
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert steps[-1]["rewards/margins"] > 0
    pre = tmp_path / "pre"
    result = runner.invoke(app, ["dpo", "-b", str(base_run), "-d", str(data), "-o", str(pre),
                                 "--max-steps", "3", "--precompute-ref", "--loss", "ipo", *FAST])
    assert result.exit_code == 0, result.output
    steps = [r for r in read_metrics(pre / "metrics.jsonl") if "rewards/margins" in r]
    assert steps[0]["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-5)


def test_bad_data_line_exits_2_with_one_line(tmp_path, base_run):
    data = write_pairs(tmp_path / "pairs.jsonl", n=3)
    with data.open("a", encoding="utf-8") as f:
        f.write('{"prompt": "q", "chosen": "a"}\n')
    result = runner.invoke(app, ["dpo", "-b", str(base_run), "-d", str(data), "-o",
                                 str(tmp_path / "o")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "pairs.jsonl:4" in lines[0]
    bad_loss = runner.invoke(app, ["dpo", "-b", str(base_run), "-d", str(data), "-o",
                                   str(tmp_path / "o2"), "--loss", "kto"])
    assert bad_loss.exit_code == 2 and "loss_type" in bad_loss.output


def test_resume_gives_the_same_losses(tmp_path, base_run):
    data = write_pairs(tmp_path / "pairs.jsonl")
    common = ["-b", str(base_run), "-d", str(data), "--set", "train.schedule=constant",
              "--set", "train.warmup_steps=2",
              "--label-smoothing", "0.1", *FAST]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert runner.invoke(app, ["dpo", "-o", str(straight), "--max-steps", "6",
                               *common]).exit_code == 0
    assert runner.invoke(app, ["dpo", "-o", str(resumed), "--max-steps", "3",
                               *common]).exit_code == 0
    result = runner.invoke(app, ["dpo", "-o", str(resumed), "--resume", "--max-steps", "6",
                                 "--quiet"])
    assert result.exit_code == 0, result.output

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]

    assert len(losses(straight)) == 6
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-6)
    bad = runner.invoke(app, ["dpo", "-o", str(tmp_path / "x"), "-b", str(base_run), "-d",
                              str(data), "--loss", "hinge", "--label-smoothing", "0.1"])
    assert bad.exit_code == 2 and "label_smoothing applies to the sigmoid loss" in bad.output


def test_lora_resume_without_base_continues_exactly(tmp_path, base_run):
    data = write_pairs(tmp_path / "pairs.jsonl")
    common = ["-b", str(base_run), "-d", str(data), "--lora", "--lr", "3e-3",
              "--set", "train.schedule=constant", "--set", "train.warmup_steps=2", *FAST]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert runner.invoke(app, ["dpo", "-o", str(straight), "--max-steps", "6",
                               *common]).exit_code == 0
    assert runner.invoke(app, ["dpo", "-o", str(resumed), "--max-steps", "3",
                               *common]).exit_code == 0
    # no --base, --data or --lora: the adapter run records its base run and its config
    result = runner.invoke(app, ["dpo", "-o", str(resumed), "--resume", "--max-steps", "6",
                                 "--quiet"])
    assert result.exit_code == 0, result.output

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]

    assert len(losses(straight)) == 6
    assert losses(straight)[-1] != pytest.approx(losses(straight)[0])  # the adapter trained
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-6)
    assert is_adapter_run(resumed)
    config = json.loads((resumed / "config.json").read_text())
    assert config["base_run"]["path"] == str(base_run.resolve())
    ids = torch.randint(0, 256, (1, 12))
    assert torch.allclose(load_run(resumed).model(ids), load_run(straight).model(ids),
                          atol=1e-5)
