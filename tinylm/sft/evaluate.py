"""Evaluation of instruction tuning: loss on response tokens, and exact match of greedy answers.

Used at each evaluation of `tinylm finetune` and by `tinylm eval` on instruction data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from tinylm.chat import encode_chat
from tinylm.generate import SamplingConfig, generate
from tinylm.losses import sequence_logps
from tinylm.sft.batch import collate_padded
from tinylm.sft.data import Conversation
from tinylm.sft.render import TokenizedExample
from tinylm.train.distributed import DistInfo, all_reduce_sum

if TYPE_CHECKING:
    from torch import nn

    from tinylm.tokenizer import Tokenizer
    from tinylm.train.distributed import DistInfo


@torch.no_grad()
def validation_loss(model: nn.Module, examples: list[TokenizedExample], micro_batch: int,
                    pad_id: int, dist: DistInfo | None = None) -> dict[str, float]:
    """Mean cross-entropy per response token over all `examples` (length-sorted batches;
    under several processes each takes every world-th batch, all run equally many)."""
    dist = dist or DistInfo()
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    chunks = [order[i : i + micro_batch] for i in range(0, len(order), micro_batch)]
    per_rank = math.ceil(len(chunks) / dist.world_size)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for j in range(per_rank):
        index = j * dist.world_size + dist.rank
        weight = 1.0 if index < len(chunks) else 0.0  # an idle rank repeats a batch, unweighted
        batch = collate_padded([examples[i] for i in chunks[min(index, len(chunks) - 1)]], pad_id)
        batch = batch.to(device)
        logps = sequence_logps(model(batch.input_ids), batch.labels, batch.loss_mask)
        sums += weight * torch.stack([-logps.sum().double(), batch.loss_mask.sum().double()])
    nats, count = all_reduce_sum(sums, dist).tolist()
    return {"val_loss": nats / max(count, 1.0)}


def greedy_replies(model: nn.Module, tokenizer: Tokenizer,
                   conversations: Sequence[Sequence[Mapping[str, str]]], max_new_tokens: int,
                   batch_size: int = 16) -> list[str | None]:
    """The model's greedy next assistant turn after each conversation (chat template applied),
    or None where the prompt leaves no room for `max_new_tokens` in the context."""
    context = model.config.max_seq_len
    prompts = [encode_chat(tokenizer, c, add_generation_prompt=True) for c in conversations]
    keep = [i for i, p in enumerate(prompts) if len(p) + max_new_tokens <= context]
    replies: list[str | None] = [None] * len(prompts)
    if not keep:
        return replies
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, seed=0)
    outputs = generate(model, tokenizer, [prompts[i] for i in keep], sampling,
                       batch_size=batch_size)
    for i, output in zip(keep, outputs, strict=True):
        replies[i] = output.text
    return replies


def exact_match(model: nn.Module, tokenizer: Tokenizer, conversations: list[Conversation],
                max_new_tokens: int = 0, batch_size: int = 16) -> dict[str, float]:
    """Share of conversations whose greedy answer to the conversation before the last
    assistant turn equals that turn's text (ends stripped). Prompts that leave no room in
    the context are left out."""
    pairs = [c.reference for c in conversations if c.reference is not None]
    answers = [answer.strip() for _, answer in pairs]
    if not max_new_tokens:
        max_new_tokens = 8 + max((len(tokenizer.encode(a)) for a in answers), default=0)
    replies = greedy_replies(model, tokenizer, [prompt for prompt, _ in pairs], max_new_tokens,
                             batch_size)
    scored = [(r.strip(), a) for r, a in zip(replies, answers, strict=True) if r is not None]
    if not scored:
        return {}
    return {"val_exact_match": sum(r == a for r, a in scored) / len(scored)}
