"""Reinforcement learning with verifiable rewards: GRPO (`tinylm rl`).

    data      RL prompts: JSONL rows {"prompt", "answer", ...}
    rewards   built-in `exact` and `format`, a user's `module:function`, weighted sums
    loss      group advantages, the clipped objective, the k3 KL, TRL's loss_type reductions
    sampling  G completions per prompt with the KV-cache generator; their log-probs
"""

from tinylm.rl.data import RLPrompt, read_rl_prompts
from tinylm.rl.loss import (
    LOSS_TYPES,
    SCALE_REWARDS,
    GRPOLoss,
    group_advantages,
    grpo_loss,
    k3_kl,
    reduce_loss,
    token_logps,
)
from tinylm.rl.rewards import BUILTIN, Reward, exact_reward, format_reward, parse_rewards, score
from tinylm.rl.sampling import Rollouts, completion_logps, sample_groups, score_rollouts

__all__ = [
    "BUILTIN",
    "LOSS_TYPES",
    "SCALE_REWARDS",
    "GRPOLoss",
    "RLPrompt",
    "Reward",
    "Rollouts",
    "completion_logps",
    "exact_reward",
    "format_reward",
    "group_advantages",
    "grpo_loss",
    "k3_kl",
    "parse_rewards",
    "read_rl_prompts",
    "reduce_loss",
    "sample_groups",
    "score",
    "score_rollouts",
    "token_logps",
]
