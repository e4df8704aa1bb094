"""RL prompts to chat-template ids, and the rewards a model earns on held-out prompts.

`evaluate_rewards` is what `tinylm rl` logs at each evaluation and what the quickstart reports:
the mean reward of greedy answers, and of `generations` samples per prompt at the sampling
temperature (with the `exact` reward: greedy and sampled exact match, the latter the share of
the samples that are right).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tinylm.chat import encode_chat
from tinylm.console import SILENT, Output
from tinylm.errors import TinyLMError
from tinylm.rl.data import RLPrompt, read_rl_prompts
from tinylm.rl.rewards import Reward, score
from tinylm.rl.sampling import sample_groups
from tinylm.train.distributed import DistInfo, all_reduce_sum

if TYPE_CHECKING:
    from torch import nn

    from tinylm.tokenizer import Tokenizer
    from tinylm.train.distributed import DistInfo


@dataclass
class PromptStats:
    """What happened to the prompts: read, kept, skipped (no room to answer in the context)."""

    examples: int = 0
    kept: int = 0
    skipped: int = 0
    tokens: int = 0
    first_skipped: str = ""

    def as_dict(self) -> dict[str, int]:
        """The counts, for config.json and the report."""
        return {"examples": self.examples, "kept": self.kept, "skipped": self.skipped,
                "tokens": self.tokens}


def encode_prompts(tokenizer: Tokenizer, files: Sequence[str], needs: tuple[str, ...],
                   max_prompt_tokens: int, what: str = "train", out: Output = SILENT,
                   ) -> tuple[list[RLPrompt], list[list[int]], PromptStats]:
    """The rows of `files`, their prompt ids (chat template + generation prompt), and counts.
    Prompts longer than `max_prompt_tokens` are skipped with a warning; none left is an error."""
    rows = read_rl_prompts([Path(f) for f in files], needs)
    stats = PromptStats(examples=len(rows))
    kept, ids = [], []
    for row in rows:
        encoded = encode_chat(tokenizer, row.messages, add_generation_prompt=True)
        if len(encoded) > max_prompt_tokens:
            stats.skipped += 1
            stats.first_skipped = stats.first_skipped or row.source
            continue
        kept.append(row)
        ids.append(encoded)
        stats.tokens += len(encoded)
    stats.kept = len(kept)
    out.info(f"{what}: {stats.kept:,} prompts, {stats.tokens:,} tokens")
    if stats.skipped:
        out.warn(f"{what}: {stats.skipped:,} prompts are longer than {max_prompt_tokens} tokens "
                 f"(the context less max_completion_length) and were skipped (first: "
                 f"{stats.first_skipped})")
    if not kept:
        raise TinyLMError(f"{what}: no prompt leaves room for the completion in the context",
                          "lower max_completion_length or shorten the prompts")
    return kept, ids, stats


@torch.no_grad()
def evaluate_rewards(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[RLPrompt],
                     prompt_ids: Sequence[list[int]], rewards: Sequence[Reward], *,
                     max_new_tokens: int, temperature: float, generations: int, seed: int,
                     dist: DistInfo | None = None, batch_size: int = 64,
                     prefix: str = "val_") -> dict[str, float]:
    """Mean rewards of greedy answers (`{prefix}reward_greedy`, `{prefix}rewards/NAME/greedy`)
    and of `generations` samples per prompt at `temperature` (`{prefix}reward`,
    `{prefix}rewards/NAME/mean`). Under several processes each scores every world-th prompt."""

    dist = dist or DistInfo()
    mine = list(range(dist.rank, len(prompts), dist.world_size))
    weights = torch.tensor([r.weight for r in rewards], dtype=torch.float64)
    sums = torch.zeros(2, 1 + len(rewards), dtype=torch.float64)  # rows: greedy, sampled
    counts = torch.zeros(2, dtype=torch.float64)
    for row, (group, temp) in enumerate(((1, 0.0), (generations, temperature))):
        if not mine:
            break
        rollouts = sample_groups(model, tokenizer, [prompt_ids[i] for i in mine], group,
                                 max_new_tokens=max_new_tokens, temperature=temp, seed=seed,
                                 batch_size=batch_size)
        table: list[list[float]] = []
        for j, i in enumerate(mine):
            texts = rollouts.texts[j * group:(j + 1) * group]
            table += score(rewards, prompts[i].text, texts, prompts[i].row, prompts[i].source)
        values = torch.tensor(table, dtype=torch.float64)
        sums[row, 0] = (values @ weights).sum()
        sums[row, 1:] = values.sum(0)
        counts[row] = len(table)
    device = dist.device
    totals = all_reduce_sum(torch.cat([sums.flatten(), counts]).to(device), dist).cpu()
    sums, counts = totals[:-2].view(2, -1), totals[-2:].clamp(min=1.0)
    means = sums / counts[:, None]
    result: dict[str, Any] = {f"{prefix}reward": means[1, 0].item(),
                              f"{prefix}reward_greedy": means[0, 0].item()}
    for k, reward in enumerate(rewards, start=1):
        result[f"{prefix}rewards/{reward.name}/mean"] = means[1, k].item()
        result[f"{prefix}rewards/{reward.name}/greedy"] = means[0, k].item()
    return result
