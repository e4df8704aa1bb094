"""Does a chat model end its turn? Two numbers on conversations with a known right answer.

    p_turn_end       the mean probability of <|im_end|> right after the right answer (the
                     assistant turn exactly as training renders it), teacher-forced
    ends_turn_share  the share of sampled replies (temperature 0.7 by default) that close with
                     <|im_end|> within `max_new_tokens`, rather than running on

A base pretrained on plain text has never seen the template's tokens, and LoRA without
`lora.train_template_tokens` cannot move their rows: its replies run on (issue 15).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from tinylm.chat import TURN_END, encode_chat
from tinylm.generate import SamplingConfig, generate
from tinylm.tokenizer import Tokenizer

Conversation = Sequence[Mapping[str, str]]


def p_turn_end(model: nn.Module, tokenizer: Tokenizer, conversations: Sequence[Conversation],
               batch_size: int = 32) -> float:
    """Mean p(<|im_end|>) at the end of each conversation's last assistant turn."""
    end = tokenizer.special_tokens[TURN_END]
    context = model.config.max_seq_len
    prefixes = []
    for messages in conversations:
        ids = encode_chat(tokenizer, messages)
        last = len(ids) - 1 - ids[::-1].index(end)  # the closing <|im_end|> of the answer
        if 0 < last <= context:
            prefixes.append(ids[:last])
    device = next(model.parameters()).device
    total = 0.0
    model.eval()
    for first in range(0, len(prefixes), batch_size):
        rows = prefixes[first:first + batch_size]
        width = max(len(r) for r in rows)
        # Right padding: causal attention keeps each row's real positions unaffected.
        batch = torch.tensor([r + [tokenizer.eot_id] * (width - len(r)) for r in rows],
                             device=device)
        with torch.no_grad():
            logits = model(batch)
        last = torch.tensor([len(r) - 1 for r in rows], device=device)
        probs = logits[torch.arange(len(rows), device=device), last].float().softmax(-1)
        total += float(probs[:, end].sum())
    return total / len(prefixes) if prefixes else 0.0


def ends_turn_share(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[Conversation],
                    *, max_new_tokens: int = 48, temperature: float = 0.7, seed: int = 0,
                    batch_size: int = 32) -> float:
    """The share of sampled replies to `prompts` (conversations before the assistant's turn)
    whose last generated token is <|im_end|> within `max_new_tokens`."""

    end = tokenizer.special_tokens[TURN_END]
    context = model.config.max_seq_len
    ids = [encode_chat(tokenizer, p, add_generation_prompt=True) for p in prompts]
    ids = [i for i in ids if len(i) + max_new_tokens <= context]
    if not ids:
        return 0.0
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    outputs = generate(model, tokenizer, ids, config, batch_size=batch_size)
    return sum(bool(o.token_ids) and o.token_ids[-1] == end for o in outputs) / len(outputs)
