"""Batches of tokenized examples, padded (with length bucketing) or packed, and masked losses.

Every batch holds next-token pairs already shifted: position t reads `input_ids[t]` and is
trained to produce `labels[t]`, counted when `loss_mask[t]` is True. An example of n tokens
gives n - 1 such positions.

Padding puts examples of similar length together (bucketing) and pads on the right; causal
attention never lets a real token see the padding after it, so no attention mask is needed.
Packing fills each window with several examples; `position_ids` restart at 0 for each example
and a block-diagonal causal `attention_mask` keeps every example blind to its neighbours.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tinylm.seeds import step_seed
from tinylm.sft.render import TokenizedExample

if TYPE_CHECKING:
    import torch


@dataclass
class Batch:
    """Shifted next-token pairs; `position_ids`/`attention_mask` are set for packed batches."""

    input_ids: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long
    loss_mask: torch.Tensor  # (B, T) bool
    position_ids: torch.Tensor | None = None  # (B, T) long
    attention_mask: torch.Tensor | None = None  # (B, T, T) bool, True = may attend

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the model's forward (only what packing needs)."""
        kwargs: dict[str, Any] = {}
        if self.position_ids is not None:
            kwargs["position_ids"] = self.position_ids
        if self.attention_mask is not None:
            kwargs["attention_mask"] = self.attention_mask
        return kwargs

    def to(self, device: Any) -> Batch:
        """The batch on `device`."""
        fields = (getattr(self, name) for name in self.__dataclass_fields__)
        return Batch(*(None if t is None else t.to(device) for t in fields))

    @property
    def n_targets(self) -> int:
        """Trained positions in the batch."""
        return int(self.loss_mask.sum())


def bucket_batches(
    lengths: Sequence[int], batch_size: int, seed: int, bucket_size: int = 64
) -> list[list[int]]:
    """Example indices grouped into batches of similar length, in a seeded random order.

    The examples are shuffled, cut into buckets of `bucket_size` batches, sorted by length
    inside each bucket and split into batches; the batches are shuffled again. Every index
    appears exactly once; the last batch of a bucket may be short.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * bucket_size
    batches = []
    for start in range(0, len(order), span):
        bucket = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches.extend(bucket[j : j + batch_size] for j in range(0, len(bucket), batch_size))
    rng.shuffle(batches)
    return batches


def pack_windows(lengths: Sequence[int], window: int) -> list[list[int]]:
    """Example indices grouped into windows of at most `window` positions (best-fit decreasing).

    `lengths` are positions per example (tokens - 1); each must be at most `window`. Within a
    window the examples keep their index order. The result does not depend on any seed; shuffle
    the windows per epoch.
    """
    if any(n > window for n in lengths):
        raise ValueError("an example is longer than the window; truncate first")
    free: list[tuple[int, int]] = []  # (free positions, window index), sorted
    windows: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        need = lengths[i]
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            room, w = free.pop(at)
        else:
            room, w = window, len(windows)
            windows.append([])
        windows[w].append(i)
        bisect.insort(free, (room - need, w))
    return [sorted(w) for w in windows]


def collate_padded(examples: Sequence[TokenizedExample], pad_id: int) -> Batch:
    """Right-padded batch of the examples' shifted pairs (padding is never a target)."""
    import torch

    width = max(len(e.input_ids) - 1 for e in examples)
    shape = (len(examples), width)
    inputs = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, pad_id, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.bool)
    for row, example in enumerate(examples):
        n = len(example.input_ids) - 1
        inputs[row, :n] = torch.tensor(example.input_ids[:-1])
        labels[row, :n] = torch.tensor(example.input_ids[1:])
        mask[row, :n] = torch.tensor(example.loss_mask[1:])
    return Batch(inputs, labels, mask)


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, T) boolean mask: query t sees key s when s <= t and both are in one segment."""
    import torch

    width = segment_ids.shape[-1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return same & causal


def collate_packed(
    examples: Sequence[TokenizedExample], windows: Sequence[Sequence[int]], pad_id: int
) -> Batch:
    """One row per window, holding its examples' shifted pairs one after another.

    Positions restart at 0 for each example; the attention mask is block-diagonal causal. The
    padding at the end of a row forms its own segment and is never a target.
    """
    import torch

    width = max(sum(len(examples[i].input_ids) - 1 for i in w) for w in windows)
    shape = (len(windows), width)
    inputs = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, pad_id, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.bool)
    positions = torch.zeros(shape, dtype=torch.long)
    segments = torch.full(shape, -1, dtype=torch.long)
    for row, window in enumerate(windows):
        at = 0
        for seg, i in enumerate(window):
            ids, loss = examples[i].input_ids, examples[i].loss_mask
            n = len(ids) - 1
            inputs[row, at : at + n] = torch.tensor(ids[:-1])
            labels[row, at : at + n] = torch.tensor(ids[1:])
            mask[row, at : at + n] = torch.tensor(loss[1:])
            positions[row, at : at + n] = torch.arange(n)
            segments[row, at : at + n] = seg
            at += n
        positions[row, at:] = torch.arange(width - at)
    return Batch(inputs, labels, mask, positions, block_causal_mask(segments))


class SFTBatches:
    """The loop's batch source: `(step, micro) -> batch dict`, a pure function of the seed.

    An epoch is a seeded order of micro-batches: length-bucketed padded batches, or shuffled
    packed windows. Global micro-batch k = step * micros_per_step + micro falls in epoch
    k // per_epoch, so any step can be rebuilt on resume and on any number of processes.
    """

    def __init__(self, examples: list[TokenizedExample], micro_batch: int, micros_per_step: int,
                 seed: int, pad_id: int, window: int | None = None) -> None:
        self.examples, self.micro_batch, self.seed = examples, micro_batch, seed
        self.micros_per_step, self.pad_id = micros_per_step, pad_id
        positions = [len(e.input_ids) - 1 for e in examples]
        self.windows = pack_windows(positions, window) if window is not None else None
        self.lengths = positions
        units = len(self.windows) if self.windows is not None else len(examples)
        self.per_epoch = math.ceil(units / micro_batch)
        self._plan: tuple[int, list[list[int]]] | None = None

    def steps_for(self, epochs: float) -> int:
        """Optimizer steps that cover `epochs` passes over the data."""
        return max(1, math.ceil(epochs * self.per_epoch / self.micros_per_step))

    def plan(self, epoch: int) -> list[list[int]]:
        """The micro-batches of an epoch: lists of example indices (packing: of windows)."""
        if self._plan is None or self._plan[0] != epoch:
            seed = step_seed(self.seed, epoch, 1)
            if self.windows is None:
                batches = bucket_batches(self.lengths, self.micro_batch, seed)
            else:
                order = list(range(len(self.windows)))
                random.Random(seed).shuffle(order)
                batches = [order[i : i + self.micro_batch]
                           for i in range(0, len(order), self.micro_batch)]
            self._plan = (epoch, batches)
        return self._plan[1]

    def __call__(self, step: int, micro: int, rows: slice | None = None
                 ) -> dict[str, torch.Tensor] | None:
        """Micro-batch `micro` of `step`; with `rows`, those of its rows (None if none)."""
        import torch

        k = step * self.micros_per_step + micro
        chosen = self.plan(k // self.per_epoch)[k % self.per_epoch]
        if rows is not None:
            chosen = chosen[rows]
            if not chosen:
                return None
        if self.windows is None:
            batch = collate_padded([self.examples[i] for i in chosen], self.pad_id)
            n_tokens = sum(self.lengths[i] for i in chosen)
        else:
            windows = [self.windows[w] for w in chosen]
            batch = collate_packed(self.examples, windows, self.pad_id)
            n_tokens = sum(self.lengths[i] for w in windows for i in w)
        fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
        return {name: t for name, t in fields.items() if t is not None} | {
            "n_tokens": torch.tensor(n_tokens)}


Pairs = list[tuple[TokenizedExample, TokenizedExample]]


def pair_batch(pairs: Pairs, indices: list[int], pad_id: int,
               ref: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One batch of 2n rows: the chosen sides, then the rejected sides (+ their ref logps)."""
    import torch

    batch = collate_padded([pairs[i][0] for i in indices] + [pairs[i][1] for i in indices],
                           pad_id)
    out = {"input_ids": batch.input_ids, "labels": batch.labels, "loss_mask": batch.loss_mask,
           "n_tokens": torch.tensor(sum(len(pairs[i][s].input_ids) - 1
                                        for i in indices for s in (0, 1)))}
    if ref is not None:
        idx = torch.tensor(indices)
        out["ref_logps"] = torch.cat([ref[idx, 0], ref[idx, 1]])
    return out


class PairBatches:
    """The loop's batch source for preference pairs: a seeded shuffle of the pairs per epoch,
    `micro_batch` pairs per micro-batch; a pure function of (seed, step, micro)."""

    def __init__(self, pairs: Pairs, micro_batch: int, micros_per_step: int, seed: int,
                 pad_id: int, ref: torch.Tensor | None = None) -> None:
        self.pairs, self.micro_batch, self.micros_per_step = pairs, micro_batch, micros_per_step
        self.seed, self.pad_id, self.ref = seed, pad_id, ref
        self.per_epoch = math.ceil(len(pairs) / micro_batch)

    def steps_for(self, epochs: float) -> int:
        """Optimizer steps that cover `epochs` passes over the pairs."""
        return max(1, math.ceil(epochs * self.per_epoch / self.micros_per_step))

    def __call__(self, step: int, micro: int, rows: slice | None = None
                 ) -> dict[str, torch.Tensor] | None:
        """Micro-batch `micro` of `step`; with `rows`, those of its pairs (None if none)."""
        k = step * self.micros_per_step + micro
        order = list(range(len(self.pairs)))
        random.Random(step_seed(self.seed, k // self.per_epoch, 1)).shuffle(order)
        at = (k % self.per_epoch) * self.micro_batch
        chosen = order[at : at + self.micro_batch][rows or slice(None)]
        if not chosen:
            return None
        return pair_batch(self.pairs, chosen, self.pad_id, self.ref)
