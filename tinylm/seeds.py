"""Seeds that depend only on (seed, step, stream): what makes every stage's batches, dropout
and sampling repeat exactly on resume and on any number of processes."""

from __future__ import annotations

import hashlib


def step_seed(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed that depends only on (seed, step, stream), for exact resume."""
    digest = hashlib.blake2b(f"{seed}/{step}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
