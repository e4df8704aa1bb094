"""`tinylm serve`: per-row decoding in the model, the continuous-batching engine, and the
OpenAI-compatible HTTP API driven by the official `openai` client against a real server."""

from __future__ import annotations

import pytest
import torch

from tinylm.model import KVCache, ModelConfig, Transformer


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_per_row_start_pos_equals_each_row_alone(family: str) -> None:
    """Rows of different lengths, each prefilled into its own cache row, then decoded in one
    forward with a position per row, give the logits of each sequence's own full forward."""
    torch.manual_seed(0)
    config = ModelConfig(family=family, vocab_size=50, n_layers=2, n_heads=4, d_model=32,
                         max_seq_len=32)
    model = Transformer(config).eval()
    seqs = [torch.randint(0, 50, (n,)) for n in (3, 9, 5)]
    cache = KVCache.allocate(config, 4, 32)
    cache.k.normal_()  # stale keys of an earlier occupant must be masked out
    cache.v.normal_()
    for b, seq in enumerate(seqs):
        model(seq[None, :-2], kv_cache=KVCache(cache.k[:, b : b + 1], cache.v[:, b : b + 1]))
    for step in (2, 1):  # two decode steps, every row at its own position
        ids = torch.stack([s[-step] for s in seqs])[:, None]
        pos = torch.tensor([len(s) - step for s in seqs])
        view = KVCache(cache.k[:, :3], cache.v[:, :3])
        logits = model(ids, kv_cache=view, start_pos=pos)[:, -1]
        for b, seq in enumerate(seqs):
            full = model(seq[None, : len(seq) - step + 1])[0, -1]
            torch.testing.assert_close(logits[b], full, atol=1e-5, rtol=0)
