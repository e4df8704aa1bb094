"""GRPO's pure pieces: advantages, the loss against TRL's own, rewards, prompts, group sampling."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tinylm.chat import TURN_END, encode_chat
from tinylm.errors import TinyLMError
from tinylm.model import ModelConfig, Transformer
from tinylm.rl import (
    group_advantages,
    grpo_loss,
    k3_kl,
    parse_rewards,
    read_rl_prompts,
    reduce_loss,
    sample_groups,
    score,
    score_rollouts,
    token_logps,
)
from tinylm.rl.rewards import exact_reward, format_reward, is_one_sentence
from tinylm.tokenizer import Tokenizer

TOK = Tokenizer.bytes_only()


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=TOK.vocab_size, n_layers=2, n_heads=2, d_model=32,
                         max_seq_len=96)
    return Transformer(config).eval()


# ---------------------------------------------------------------------------- advantages, KL


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # Group 1: mean 0.5, std (Bessel) sqrt(1/3); group 2: all equal, so 0 whatever the scale.
    std = math.sqrt(1 / 3)
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4),
                0.5 / (std + 1e-4), 0, 0, 0, 0]
    assert group_advantages(rewards, 4).tolist() == pytest.approx(expected)
    assert group_advantages(rewards, 4, "none").tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    batch_std = rewards.std().item()
    assert group_advantages(rewards, 4, "batch")[0].item() == pytest.approx(
        0.5 / (batch_std + 1e-4))
    with pytest.raises(ValueError):
        group_advantages(rewards, 3)
    with pytest.raises(TinyLMError, match="scale_rewards"):
        group_advantages(rewards, 4, "mean")


def test_k3_kl_is_zero_at_equality_and_matches_the_formula():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -1.5])
    kl = k3_kl(logp, ref)
    assert kl[0].item() == 0.0
    assert kl[1].item() == pytest.approx(math.exp(0.5) - 0.5 - 1)


def test_reductions_by_loss_type():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    s, n = reduce_loss(per_token, mask, "grpo", 5)
    assert (s.item(), n.item()) == (2.0 + 4.0, 2.0)  # means 2 and 4, over 2 sequences
    s, n = reduce_loss(per_token, mask, "dapo", 5)
    assert (s.item(), n.item()) == (10.0, 4.0)  # 4 tokens
    s, n = reduce_loss(per_token, mask, "dr_grpo", 5)
    assert (s.item(), n.item()) == (10.0, 10.0)  # 2 sequences x 5
    with pytest.raises(TinyLMError, match="bnpo"):
        reduce_loss(per_token, mask, "bnpo", 5)


def test_first_pass_gradient_is_advantage_times_score_function():
    # With old_logps = logps the ratio is 1 and d loss / d logp_t = -A / n_tokens (dapo).
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    out = grpo_loss(logps, None, torch.tensor([2.0, -1.0]), torch.ones(2, 2))
    (out.loss_sum / out.count).backward()
    assert logps.grad.tolist() == [[-0.5, -0.5], [0.25, 0.25]]


# ---------------------------------------------------------------------------- against TRL


def trl_grpo_loss(logits, completion_ids, mask, advantages, old_logps, ref_logps, *,
                  loss_type, beta, eps_low, eps_high, temperature):
    """TRL's GRPOTrainer._compute_loss on these logits: the trainer's own method on an object
    holding only the attributes that method reads, its model forward replaced by `logits`."""
    from trl import GRPOTrainer
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    class Probe(GRPOTrainer):
        def __init__(self) -> None:  # none of Trainer's set-up: no model, data or accelerator
            self.loss_type, self.beta = loss_type, beta
            self.epsilon_low, self.epsilon_high = eps_low, eps_high
            self.max_completion_length = completion_ids.shape[1]
            self.importance_sampling_level = "token"
            self.top_entropy_quantile = 1.0
            self.off_policy_mask_threshold = None
            self.aux_loss_enabled = self._entropy_bonus_enabled = False
            self.use_vllm = self.vllm_importance_sampling_correction = False
            self.current_gradient_accumulation_steps = 1
            self.args = SimpleNamespace(use_bias_correction_kl=False, delta=None,
                                        steps_per_generation=1)
            self.accelerator = SimpleNamespace(num_processes=1, gather=lambda x: x,
                                               reduce=lambda x, reduction: x)
            self.model = torch.nn.Module().train()
            self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask,
                                               logits_to_keep, **kwargs):
            scaled = logits / temperature  # what TRL's fused head does with args.temperature
            ids = input_ids[:, -logits_to_keep:]
            return selective_log_softmax(scaled, ids), entropy_from_logits(scaled), None

    probe = Probe()
    batch = completion_ids.shape[0]
    inputs = {"prompt_ids": torch.zeros(batch, 2, dtype=torch.long),
              "prompt_mask": torch.ones(batch, 2, dtype=torch.long),
              "completion_ids": completion_ids, "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old_logps,
              "num_items_in_batch": mask.sum()}
    if beta:
        inputs["ref_per_token_logps"] = ref_logps
    loss = probe._compute_loss(probe.model, inputs)
    return loss, {k: v[0] for k, v in probe._metrics["train"].items()}


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_loss_equals_trls_grpo_loss(loss_type, beta):
    pytest.importorskip("trl")
    torch.manual_seed(0)
    B, T, V, temperature = 6, 7, 13, 0.7
    logits = torch.randn(B, T, V, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 4:], mask[3, 1:], mask[5, 6:] = 0, 0, 0  # uneven completion lengths
    advantages = torch.randn(B, dtype=torch.float64)
    logps, entropy = token_logps(logits, ids, temperature)
    old = logps + 0.3 * torch.randn(B, T, dtype=torch.float64)  # ratios beyond the clip
    ref = logps + 0.5 * torch.randn(B, T, dtype=torch.float64)

    expected, metrics = trl_grpo_loss(logits.clone().requires_grad_(), ids, mask, advantages,
                                      old, ref, loss_type=loss_type, beta=beta, eps_low=0.2,
                                      eps_high=0.28, temperature=temperature)
    ours = grpo_loss(logps, old, advantages, mask, loss_type=loss_type, epsilon_low=0.2,
                     epsilon_high=0.28, beta=beta, ref_logps=ref, max_completion_length=T,
                     entropy=entropy)
    assert (ours.loss_sum / ours.count).item() == pytest.approx(expected.item(), rel=1e-9)
    assert 0 < metrics["clip_ratio/region_mean"] < 1  # the test does exercise clipping
    names = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy"]
    for name in names + (["kl"] if beta else []):
        assert (ours.sums[name] / ours.tokens).item() == pytest.approx(metrics[name], rel=1e-6)
    assert ("kl" in ours.sums) == bool(beta)


def test_gradients_equal_trls():
    pytest.importorskip("trl")
    torch.manual_seed(1)
    B, T, V = 4, 5, 9
    logits = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 2:] = 0
    advantages = torch.randn(B, dtype=torch.float64)
    with torch.no_grad():
        base, _ = token_logps(logits, ids)
    old, ref = base + 0.2 * torch.randn(B, T), base + 0.2 * torch.randn(B, T)
    trl_loss, _ = trl_grpo_loss(logits, ids, mask, advantages, old, ref, loss_type="dapo",
                                beta=0.1, eps_low=0.2, eps_high=0.2, temperature=1.0)
    (expected,) = torch.autograd.grad(trl_loss, logits)
    logps, _ = token_logps(logits, ids)
    ours = grpo_loss(logps, old, advantages, mask, beta=0.1, ref_logps=ref)
    (got,) = torch.autograd.grad(ours.loss_sum / ours.count, logits)
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------- rewards


def test_builtin_rewards():
    row = {"answer": "Marrowby"}
    assert exact_reward("q", "The capital of Veltoria is Marrowby.<|im_end|>", row) == 1.0
    assert exact_reward("q", "The capital is Dunmere. Or Marrowby.", row) == 0.0
    assert exact_reward("q", "12 minus 5 is 7.", {"answer": 7}) == 1.0
    assert format_reward("q", f"It is red.{TURN_END}", {}) == 1.0
    assert format_reward("q", "It is red.", {}) == 0.0  # cut off: did not end its turn
    assert format_reward("q", f"It is red. It is.{TURN_END}", {}) == 0.0
    assert format_reward("q", f"It is red{TURN_END}", {}) == 0.0
    assert is_one_sentence("It costs 3.5 coins.") and not is_one_sentence("A.\nB.")


def test_rewards_combine_with_weights_and_user_functions(tmp_path, monkeypatch):
    (tmp_path / "myrewards.py").write_text(
        "def short(prompt, completion, example):\n    return -len(completion) / 10\n"
        "def bad(prompt, completion, example):\n    return example.get('x')\n")
    monkeypatch.chdir(tmp_path)
    rewards = parse_rewards("exact,format=0.5,myrewards:short=2")
    assert [(r.name, r.weight) for r in rewards] == [
        ("exact", 1.0), ("format", 0.5), ("myrewards:short", 2.0)]
    table = score(rewards, "q", [f"It is 7.{TURN_END}", "no"], {"answer": "7"}, "d.jsonl:1")
    assert table == [[1.0, 1.0, -1.8], [0.0, 0.0, -0.2]]
    from_file = parse_rewards(f"{tmp_path / 'myrewards.py'}:short")
    assert from_file[0].fn("", "abcde", {}) == -0.5


@pytest.mark.parametrize("module,returned,shown", [
    ("r_none", "None", "None"), ("r_nan", "float('nan')", "nan"), ("r_str", "'1.0'", "'1.0'")])
def test_a_reward_returning_a_non_number_names_the_example(tmp_path, monkeypatch, module,
                                                           returned, shown):
    (tmp_path / f"{module}.py").write_text(f"def f(p, c, e):\n    return {returned}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TinyLMError, match=rf"^data.jsonl:3: reward '{module}:f' returned {shown}"):
        score(parse_rewards(f"{module}:f"), "q", ["x"], {}, "data.jsonl:3")


def test_a_reward_that_raises_names_the_example(tmp_path, monkeypatch):
    (tmp_path / "r_raises.py").write_text("def f(p, c, e):\n    return e['missing']\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TinyLMError, match=r"^d.jsonl:2: reward 'r_raises:f' raised KeyError"):
        score(parse_rewards("r_raises:f"), "q", ["x"], {}, "d.jsonl:2")


@pytest.mark.parametrize("spec,message", [
    ("nosuch", "unknown reward"), ("exact=x", "not a number"), ("exact,,format", "empty"),
    ("exact,exact", "named twice"), ("nosuchmodule_xyz:f", "cannot import"),
    ("json:nosuchfunction", "no function"), ("missing.py:f", "no file"),
])
def test_bad_reward_specs_are_one_clear_error(spec, message):
    with pytest.raises(TinyLMError, match=message):
        parse_rewards(spec)


# ---------------------------------------------------------------------------- prompts


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompts_read_strings_and_messages(tmp_path):
    path = write_rows(tmp_path / "p.jsonl", [
        {"prompt": "What is 2 plus 2?", "answer": "4"},
        {"prompt": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Capital of Veltoria?"}], "answer": "Marrowby",
         "extra": [1, 2]},
    ])
    prompts = read_rl_prompts([path], required=("answer",))
    assert [p.text for p in prompts] == ["What is 2 plus 2?", "Capital of Veltoria?"]
    assert prompts[0].messages == ({"role": "user", "content": "What is 2 plus 2?"},)
    assert prompts[1].row["extra"] == [1, 2] and prompts[1].source == f"{path}:2"


@pytest.mark.parametrize("row,message", [
    ({"question": "x"}, r'p.jsonl:2: expected an object with a "prompt"'),
    ({"prompt": "x"}, r'p.jsonl:2: no "answer" field'),
    ({"prompt": 3, "answer": "a"}, r"p.jsonl:2: \"prompt\" must be a string or a list"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "answer": "a"}, "ends with an assistant turn"),
])
def test_bad_prompt_rows_name_the_line(tmp_path, row, message):
    path = write_rows(tmp_path / "p.jsonl", [{"prompt": "ok", "answer": "a"}, row])
    with pytest.raises(TinyLMError, match=message):
        read_rl_prompts([path], required=("answer",))


# ---------------------------------------------------------------------------- sampling


def chat_prompts() -> list[list[int]]:
    return [encode_chat(TOK, [{"role": "user", "content": q}], add_generation_prompt=True)
            for q in ("Hi?", "Where is the lelomock found?")]


def test_groups_are_seeded_padded_and_scored_consistently():
    model = tiny_model()
    prompts = chat_prompts()
    kw = {"max_new_tokens": 6, "temperature": 1.0, "seed": 5}
    a = sample_groups(model, TOK, prompts, 3, **kw)
    b = sample_groups(model, TOK, prompts, 3, **kw)
    c = sample_groups(model, TOK, prompts, 3, **{**kw, "seed": 6})
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert not torch.equal(a.completion_ids, c.completion_ids)
    assert a.prompt_ids.shape == (6, len(prompts[1])) and a.completion_ids.shape[1] <= 6
    for i in range(6):  # left-padded prompts in groups of 3, right-padded completions
        prompt = prompts[i // 3]
        assert a.prompt_ids[i, a.prompt_mask[i].bool()].tolist() == prompt
        n = int(a.lengths[i])
        assert a.completion_mask[i, :n].all() and not a.completion_mask[i, n:].any()
    # Old log-probs from a teacher-forced pass equal the generator's own per-step logits.
    logps = score_rollouts(model, a, temperature=1.0, micro_batch=4)
    for i in range(6):
        n = int(a.lengths[i])
        row = prompts[i // 3] + a.completion_ids[i, :n].tolist()
        with torch.no_grad():
            logits = model(torch.tensor([row]))[0, len(prompts[i // 3]) - 1 : -1]
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(row[-n:])[:, None])
        torch.testing.assert_close(logps[i, :n], expected[:, 0], rtol=1e-4, atol=1e-4)
        assert (logps[i, n:] == 0).all()


class EndsTurn(torch.nn.Module):
    """A model whose most likely next token is always <|im_end|>."""

    def __init__(self, inner: Transformer) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, **kw):
        logits = self.inner(input_ids, **kw)
        logits[..., TOK.special_tokens[TURN_END]] += 1e4
        return logits


def test_ended_turns_keep_their_end_token_in_the_text():
    rollouts = sample_groups(EndsTurn(tiny_model()), TOK, chat_prompts(), 2, max_new_tokens=5,
                             seed=0)
    assert rollouts.ended.all()
    assert rollouts.texts == [TURN_END] * 4
    assert (rollouts.completion_ids[:, 0] == TOK.special_tokens[TURN_END]).all()
    assert (rollouts.lengths == 1).all()
