"""How one optimizer step's global batch is split over the processes of a torchrun job.

The global batch is the config's (pretraining: `train.batch_tokens`; tuning: `train.batch_size`)
whatever the number of processes. The batch source draws the step's rows in micro-batches of
the config's `train.micro_batch` rows, numbered the same on any number of processes; process r
takes the r-th contiguous share of those rows, in pieces of at most `micro_batch` rows. When the
shares are whole micro-batches (e.g. 4 micro-batches on 2 processes) each process runs whole
ones; otherwise (e.g. 1 micro-batch of 8 sequences on 2 processes) each runs part of one, here
4 rows. The same rows are trained on either way, so the losses do not depend on the number of
processes. Only a batch whose rows cannot be shared evenly is an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tinylm.errors import TinyLMError


@dataclass(frozen=True)
class BatchSplit:
    """One step's `units` rows (sequences, examples or pairs) on `world_size` processes: the
    batch source draws micro-batches of `nominal` rows; each process runs `accum` pieces of
    `micro` rows."""

    units: int
    nominal: int
    micro: int
    accum: int
    world_size: int

    @property
    def micros_per_step(self) -> int:
        """The batch source's micro-batches in one step, over all processes."""
        return self.units // self.nominal

    @property
    def whole(self) -> bool:
        """True when every piece is a whole micro-batch of the batch source."""
        return self.micro == self.nominal

    def part(self, rank: int, k: int) -> tuple[int, slice]:
        """(the source's micro-batch, its rows) that process `rank` runs as its `k`-th piece."""
        at = rank * (self.units // self.world_size) + k * self.micro
        first = at % self.nominal
        return at // self.nominal, slice(first, first + self.micro)


def _multiples_near(multiple: int, value: int) -> str:
    """'a or b': the multiples of `multiple` just below and above `value`."""
    below = value // multiple * multiple
    return f"{below:,} or {below + multiple:,}" if below else f"{multiple:,}"


def _process_counts(units: int, near: int, limit: int = 8) -> str:
    """'1, 2, 4 or 8': up to `limit` numbers of processes that share `units` rows evenly, those
    nearest `near`."""
    divisors = {d for i in range(1, math.isqrt(units) + 1) if units % i == 0
                for d in (i, units // i)}
    chosen = sorted(sorted(divisors, key=lambda d: (abs(d - near), d))[:limit])
    head = ", ".join(str(d) for d in chosen[:-1])
    return f"{head} or {chosen[-1]}" if head else str(chosen[-1])


def split_batch(units: int, micro_batch: int, world_size: int, what: str, *,
                shown: str | None = None, scale: int = 1) -> BatchSplit:
    """Split a global batch of `units` rows over `world_size` processes, at most `micro_batch`
    rows per forward. Raises `TinyLMError` naming `what` and the numbers that would work when
    the processes cannot share the rows evenly. `shown` is how the batch reads in that message
    and `scale` how many of its units make a row (pretraining: tokens per sequence)."""
    if units < 1 or micro_batch < 1:
        raise TinyLMError(f"{what} and train.micro_batch must be positive, got "
                          f"{units * scale:,} and {micro_batch:,}")
    if units % world_size:
        raise TinyLMError(
            f"{shown or f'{what} ({units * scale:,})'} cannot be split over {world_size} "
            "processes",
            f"set {what} to a multiple of {world_size * scale:,}, e.g. "
            f"{_multiples_near(world_size * scale, units * scale)}, or run "
            f"{_process_counts(units, world_size)} processes",
        )
    # The source's micro-batch: the largest that divides the batch and fits micro_batch (the
    # config's whenever it divides, so a config that ran before draws the same rows). It does
    # not depend on the number of processes; only the pieces each process runs do.
    nominal = max(d for d in range(1, min(units, micro_batch) + 1) if units % d == 0)
    micro = math.gcd(units // world_size, nominal)
    return BatchSplit(units, nominal, micro, units // world_size // micro, world_size)


def split_tokens(batch_tokens: int, seq_len: int, micro_batch: int, world_size: int
                 ) -> BatchSplit:
    """`split_batch` for pretraining: `batch_tokens` tokens per step in windows of `seq_len`."""
    if batch_tokens < 1 or batch_tokens % seq_len:
        raise TinyLMError(
            f"train.batch_tokens ({batch_tokens:,}) must be a multiple of data.seq_len "
            f"({seq_len:,})", f"use {_multiples_near(seq_len, batch_tokens)}")
    units = batch_tokens // seq_len
    return split_batch(units, micro_batch, world_size, "train.batch_tokens", scale=seq_len,
                       shown=f"train.batch_tokens ({batch_tokens:,} = {units:,} sequences "
                       f"of {seq_len:,})")
