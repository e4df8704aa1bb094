"""Group sampling for GRPO: G completions per prompt with the batched KV-cache generator.

`sample_groups` repeats each prompt G times (a group's rows are consecutive) and draws every
completion with `tinylm.generate.generate` from one seed, so the same seed and weights give
the same completions: a stage passes a seed made from (run seed, generation index) only, which
is what makes a resumed run sample what an unstopped one would. The result is a `Rollouts`:
left-padded prompts, right-padded completions and their masks, as TRL lays them out, and the
texts the rewards read. `completion_logps` scores those tokens under a model (the policy that
sampled them, "old", or the reference) in one teacher-forced pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from tinylm.generate import SamplingConfig, generate
from tinylm.rl.loss import token_logps

if TYPE_CHECKING:
    from tinylm.tokenizer import Tokenizer


@dataclass
class Rollouts:
    """N = prompts x G sampled completions, padded into tensors (all on the CPU)."""

    prompt_ids: Tensor  # (N, P) left-padded
    prompt_mask: Tensor  # (N, P) 1 = prompt token, 0 = padding
    completion_ids: Tensor  # (N, C) right-padded
    completion_mask: Tensor  # (N, C) 1 = generated token (a final end token included)
    texts: list[str]  # what the rewards read: the text, + "<|im_end|>" if the turn ended
    ended: Tensor  # (N,) bool: stopped on an end token (not cut at max_new_tokens)

    @property
    def input_ids(self) -> Tensor:
        """(N, P + C) prompt then completion."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """(N, P + C) 1 on real tokens; the model counts positions from each row's first one."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def lengths(self) -> Tensor:
        """(N,) tokens generated per completion."""
        return self.completion_mask.sum(-1)

    def tensors(self) -> dict[str, Tensor]:
        """The tensor fields by name (what a checkpoint stores)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "texts"}


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[Tensor, Tensor]:
    """Token rows as (ids, mask) tensors of the longest row's width, padded on one side."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        at = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, at] = torch.tensor(list(row), dtype=torch.long)
        mask[i, at] = 1
    return ids, mask


def sample_groups(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[list[int]],
                  group_size: int, *, max_new_tokens: int, temperature: float = 1.0,
                  top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                  batch_size: int = 64) -> Rollouts:
    """`group_size` completions of each prompt (token ids of a chat prompt), drawn from
    `model` in eval mode; a pure function of (weights, prompts, settings, seed)."""

    rows = [list(p) for p in prompts for _ in range(group_size)]
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=seed)
    was_training = model.training
    model.eval()
    try:
        outputs = generate(model, tokenizer, rows, config, batch_size=batch_size)
    finally:
        model.train(was_training)
    names = {i: t for t, i in tokenizer.special_tokens.items()}
    texts, ended = [], []
    for g in outputs:
        stopped = g.finish_reason == "end"
        # The end token is kept in the text, so a reward can tell an ended turn from a cut one.
        texts.append(g.text + (names.get(g.token_ids[-1], "") if stopped else ""))
        ended.append(stopped)
    pad = tokenizer.eot_id
    prompt_ids, prompt_mask = pad_rows(rows, pad, left=True)
    completion_ids, completion_mask = pad_rows([g.token_ids for g in outputs], pad, left=False)
    return Rollouts(prompt_ids, prompt_mask, completion_ids, completion_mask, texts,
                    torch.tensor(ended, dtype=torch.bool))


def completion_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                     n_completion: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-token log-probs and entropies (B, C) of the last `n_completion` tokens of
    `input_ids` (B, P + C), each predicted from the tokens before it, at `temperature`."""
    logits = model(input_ids, attention_mask=attention_mask, logits_to_keep=n_completion + 1)
    return token_logps(logits[:, :-1], input_ids[:, -n_completion:], temperature)


@torch.no_grad()
def score_rollouts(model: nn.Module, rollouts: Rollouts, temperature: float,
                   micro_batch: int) -> Tensor:
    """(N, C) float32 log-probs of every completion token under `model`, `micro_batch` rows at
    a time (for the old policy's or the reference's log-probs)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n_completion = rollouts.completion_ids.shape[1]
    ids, mask = rollouts.input_ids, rollouts.attention_mask
    parts = []
    for at in range(0, ids.shape[0], micro_batch):
        rows = slice(at, at + micro_batch)
        logps, _ = completion_logps(model, ids[rows].to(device), mask[rows].to(device),
                                    n_completion, temperature)
        parts.append(logps.float().cpu())
    model.train(was_training)
    return torch.cat(parts) * rollouts.completion_mask
