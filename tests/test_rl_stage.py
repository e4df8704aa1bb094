"""The rl stage: GRPO raises a learnable reward, resumes exactly, its references and metrics,
its errors, and the synthetic world's RL prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tinylm.cli  # noqa: F401  (registers the commands)
from tinylm.cli.app import app
from tinylm.model import ModelConfig, Transformer
from tinylm.rl.evaluate import encode_prompts, evaluate_rewards
from tinylm.rl.rewards import parse_rewards
from tinylm.run import is_adapter_run, load_run, save_run
from tinylm.tokenizer import Tokenizer
from tinylm.train.report import read_metrics

runner = CliRunner()
TOK = Tokenizer.bytes_only()
REWARDS = '''
def lower(prompt, completion, example):
    text = completion.replace("<|im_end|>", "")
    return sum("a" <= c <= "z" for c in text) / max(len(text), 1)

def fails_on_third(prompt, completion, example):
    if example["n"] == 2:
        raise ValueError("no")
    return 0.0
'''
# Small and quick: 4 prompts x 4 completions of 8 tokens a step.
FAST = ["-G", "4", "--batch-size", "4", "--max-completion-length", "8", "--set",
        "train.micro_batch=8", "--set", "train.log_every=1", "--set",
        "train.schedule=constant", "--quiet"]


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A random tiny base run, 8 prompts, and a reward module in the working directory."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=TOK.vocab_size, n_layers=2, n_heads=2, d_model=32,
                         max_seq_len=64)
    base = tmp_path / "base"
    base.mkdir()
    save_run(base, Transformer(config).eval(), TOK, {"stage": "pretrain"})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}", "answer": "a", "n": i}) + "\n"
                               for i in range(8)))
    (tmp_path / "rl_test_rewards.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)
    return {"base": base, "prompts": prompts, "dir": tmp_path}


def rl(setup: dict[str, Path], out: str, *args: str) -> list[dict]:
    result = runner.invoke(app, ["rl", "-b", str(setup["base"]), "-d", str(setup["prompts"]),
                                 "-o", str(setup["dir"] / out), *FAST, *args])
    assert result.exit_code == 0, result.output
    return read_metrics(setup["dir"] / out / "metrics.jsonl")


def val_reward(run: Path, prompts: Path) -> float:
    loaded = load_run(run)
    rewards = parse_rewards("rl_test_rewards:lower")
    rows, ids, _ = encode_prompts(loaded.tokenizer, [str(prompts)], (), 40)
    return evaluate_rewards(loaded.model, loaded.tokenizer, rows, ids, rewards,
                            max_new_tokens=8, temperature=1.0, generations=8,
                            seed=0)["val_reward"]


def test_grpo_raises_the_reward_and_logs_trls_metrics(setup):
    records = rl(setup, "rl", "--reward", "rl_test_rewards:lower", "--max-steps", "20",
                 "--lr", "1e-2", "--val-data", str(setup["prompts"]), "--eval-every", "20")
    before = val_reward(setup["base"], setup["prompts"])
    after = val_reward(setup["dir"] / "rl", setup["prompts"])
    assert after > before + 0.15, (before, after)  # lower-case share: ~0.1 at random
    step = next(r for r in records if r["step"] == 1 and "reward" in r)
    for name in ("reward", "reward_std", "rewards/rl_test_rewards:lower/mean",
                 "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
                 "entropy", "clip_ratio/region_mean", "loss", "grad_norm"):
        assert name in step, name
    assert "kl" not in step  # beta 0: no reference at all
    final = next(r for r in records if "val_reward" in r)
    assert {"val_reward_greedy", "val_rewards/rl_test_rewards:lower/mean"} <= set(final)


@pytest.mark.parametrize("lora", [False, True])
def test_kl_to_the_reference_starts_at_zero(setup, lora):
    extra = ["--lora", "--lora-targets", "all-linear"] if lora else []
    records = rl(setup, "kl", "--reward", "rl_test_rewards:lower", "--max-steps", "3",
                 "--lr", "1e-2", "--beta", "0.1", *extra)
    kls = [r["kl"] for r in records if "kl" in r]
    assert kls[0] == pytest.approx(0.0, abs=1e-6)  # the policy starts as its reference
    assert kls[-1] > 1e-6  # and moves away from it
    assert is_adapter_run(setup["dir"] / "kl") == lora


def test_resume_mid_generation_batch_is_exact(setup):
    # mu = 2: steps 2 and 3 train on generation batch 1; a resume at step 3 must read it back.
    common = ["--reward", "rl_test_rewards:lower", "--lr", "3e-3", "--mu", "2", "--beta",
              "0.05", "--set", "steps_per_generation=1"]
    straight = rl(setup, "straight", "--max-steps", "6", *common)
    rl(setup, "resumed", "--max-steps", "3", *common)
    saved = sorted(p.name for p in (setup["dir"] / "resumed" / "rollouts").iterdir())
    assert saved == ["generation-000000-rank0.safetensors", "generation-000001-rank0.safetensors"]
    result = runner.invoke(app, ["rl", "-o", str(setup["dir"] / "resumed"), "--resume",
                                 "--max-steps", "6", "--quiet"])
    assert result.exit_code == 0, result.output
    resumed = read_metrics(setup["dir"] / "resumed" / "metrics.jsonl")

    def curve(records: list[dict], key: str) -> list[float]:
        return [r[key] for r in records if key in r]

    for key in ("loss", "reward", "kl", "clip_ratio/region_mean"):
        assert len(curve(straight, key)) == 6
        assert curve(resumed, key) == pytest.approx(curve(straight, key), rel=1e-6), key


def test_a_failing_reward_names_the_example_and_exits_2(setup):
    result = runner.invoke(app, ["rl", "-b", str(setup["base"]), "-d", str(setup["prompts"]),
                                 "-o", str(setup["dir"] / "bad"), *FAST, "--max-steps", "2",
                                 "--reward", "rl_test_rewards:fails_on_third"])
    assert result.exit_code == 2
    assert "prompts.jsonl:3: reward 'rl_test_rewards:fails_on_third' raised ValueError" in (
        result.output)
    assert "Traceback" not in result.output
    for bad, message in ((["--reward", "nosuch"], "unknown reward"),
                         (["-G", "1"], "num_generations"), (["--loss", "bnpo"], "loss_type")):
        result = runner.invoke(app, ["rl", "-b", str(setup["base"]), "-d",
                                     str(setup["prompts"]), "-o", str(setup["dir"] / "x"),
                                     *bad])
        assert result.exit_code == 2 and message in result.output, result.output


def test_help_has_examples():
    result = runner.invoke(app, ["rl", "--help"])
    assert result.exit_code == 0
    assert "tinylm rl -b runs/sft -d data/rl.jsonl" in result.output
    assert "--reward" in result.output and "--num-generations" in result.output


def test_synth_writes_rl_prompts_on_training_facts_and_the_held_out_questions(tmp_path):
    from tinylm.synth import synthesize

    stats = synthesize(tmp_path, seed=3)

    def rows(name: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]

    facts = rows("facts.jsonl")
    train = {(f["relation"], f["subject"]) for f in facts if f["split"] == "train"}
    rl_rows, rl_eval = rows("rl.jsonl"), rows("rl_eval.jsonl")
    assert stats["rl_prompts"] == len(rl_rows) == len(train)
    assert {(r["relation"], r["subject"]) for r in rl_rows} == train
    sft_eval = rows("sft_eval.jsonl")
    assert [r["prompt"] for r in rl_eval] == [r["messages"][0]["content"] for r in sft_eval]
    assert [r["answer"] for r in rl_eval] == [r["answer"] for r in sft_eval]
