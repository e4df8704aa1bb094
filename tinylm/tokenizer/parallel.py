"""Work spread over all cores: counting chunks for training, and encoding batches of texts.

With the C accelerator and a built-in pattern, threads do the work: the C code releases the GIL
while it scans text, and threads share memory, so nothing is copied or pickled. The pure-Python
code holds the GIL, so it (and a custom regex) uses processes instead: forked on Linux, spawned
elsewhere (the worker functions live at module level for that). Submissions are bounded, so a
corpus larger than memory streams through: `encode_stream` keeps at most two groups of text per
worker in flight while the caller reads the next ones, and hands back packed ids, never lists.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

from tinylm.tokenizer.pretokenize import builtin_id, clean_surrogates, native, split_text


def available_cpus() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def uses_threads(pattern: str) -> bool:
    """True when the C accelerator does the work for this pattern (it releases the GIL)."""
    return native() is not None and builtin_id(pattern) != 0


def executor(
    workers: int,
    threads: bool,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
) -> Executor:
    """A pool of threads, or of processes (forked on Linux, spawned elsewhere)."""
    if threads:
        return ThreadPoolExecutor(workers)
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    return ProcessPoolExecutor(
        workers, mp_context=context, initializer=initializer, initargs=initargs
    )


def bounded_map(
    pool: Executor, fn: Callable[..., Any], items: Iterable[tuple], window: int
) -> Iterator[Any]:
    """`fn(*item)` for each item in a pool, results in order, at most `window` in flight."""
    pending: list[Future] = []
    for item in items:
        pending.append(pool.submit(fn, *item))
        if len(pending) >= window:
            yield pending.pop(0).result()
    for future in pending:
        yield future.result()


# ---- counting chunks --------------------------------------------------------------------------


def count_texts(texts: list[str], pattern: str, counts: dict[bytes, int]) -> int:
    """Add the chunk counts of texts to `counts` (chunk bytes -> count); returns the bytes read.

    With the C accelerator, threads may share one `counts` dict: each call adds to it while
    holding the GIL.
    """
    try:
        sizes = [len(t.encode("utf-8")) for t in texts]
    except UnicodeEncodeError:
        texts = [clean_surrogates(t) for t in texts]
        sizes = [len(t.encode("utf-8")) for t in texts]
    fast = native()
    kind = builtin_id(pattern)
    if fast is not None and kind:
        fast.count_chunks(texts, kind, counts)
        return sum(sizes)
    local: dict[str, int] = {}
    for text in texts:
        for chunk in split_text(text, pattern):
            local[chunk] = local.get(chunk, 0) + 1
    merge_counts(counts, {chunk.encode("utf-8"): n for chunk, n in local.items()})
    return sum(sizes)


def count_task(texts: list[str], pattern: str) -> tuple[dict[bytes, int], int]:
    """Process worker: the chunk counts of a batch of texts and its size in bytes."""
    counts: dict[bytes, int] = {}
    n_bytes = count_texts(texts, pattern, counts)
    return counts, n_bytes


def merge_counts(total: dict[bytes, int], part: dict[bytes, int]) -> None:
    """total[k] += part[k] for every chunk k."""
    fast = native()
    if fast is not None:
        fast.merge_counts(total, part)
        return
    for key, n in part.items():
        total[key] = total.get(key, 0) + n


# ---- encoding batches -------------------------------------------------------------------------

_worker_tokenizer: Any = None


def init_encode_worker(tokenizer: Any) -> None:
    """Process worker initializer: keep the tokenizer this process encodes with."""
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def encode_task(texts: list[str], allowed_special: Any) -> list[bytes]:
    """Process worker: each text's ids as packed uint32 (much cheaper to send than int lists)."""
    return [_worker_tokenizer.encode_packed(t, allowed_special) for t in texts]


# Texts shorter than this are encoded together in one call (the C encoder keeps the GIL for a
# text of fewer than 2,048 bytes, so one call per short document would serialise the threads).
SHORT_CHARS = 2048


def pack_group(
    tokenizer: Any, texts: list[str], ends: list[bool], allowed_special: Any, dtype: str
) -> Any:
    """The ids of `texts` in order, the end-of-text id after each text whose `ends` is True,
    as one numpy array of `dtype` ("uint16" or "uint32")."""
    import numpy as np

    short = [i for i, text in enumerate(texts) if len(text) < SHORT_CHARS]
    short_ids = dict(zip(short, tokenizer.encode_many([texts[i] for i in short],
                                                      allowed_special), strict=True))
    eot = np.array([tokenizer.eot_id], dtype=np.uint32)
    parts = []
    for i, (text, end) in enumerate(zip(texts, ends, strict=True)):
        if i in short_ids:
            parts.append(np.array(short_ids[i], dtype=np.uint32))
        else:
            parts.append(np.frombuffer(tokenizer.encode_packed(text, allowed_special),
                                       dtype=np.uint32))
        if end:
            parts.append(eot)
    # One allocation for the group's ids, cast on the way (few large short-lived buffers).
    return np.concatenate(parts, dtype=dtype, casting="unsafe") if parts else np.zeros(0, dtype)


def pack_task(texts: list[str], ends: list[bool], allowed_special: Any, dtype: str) -> Any:
    """Process worker: `pack_group` with the worker's tokenizer."""
    return pack_group(_worker_tokenizer, texts, ends, allowed_special, dtype)


def encode_stream(
    tokenizer: Any, groups: Iterable[tuple[list[str], list[bool]]], allowed_special: Any,
    dtype: str, workers: int | None = None,
) -> Iterator[Any]:
    """`pack_group` of each (texts, ends) group, in order, on `workers` threads or processes
    (default: all cores); `groups` is read lazily, at most 2 x workers groups at a time."""
    workers = workers or available_cpus()
    if workers <= 1:
        for texts, ends in groups:
            yield pack_group(tokenizer, texts, ends, allowed_special, dtype)
        return
    if uses_threads(tokenizer.pattern):
        local = threading.local()

        def pack_in_thread(texts: list[str], ends: list[bool]) -> bytes:
            if not hasattr(local, "tokenizer"):  # each thread has its own encoder and cache
                local.tokenizer = type(tokenizer)(tokenizer._state)
            return pack_group(local.tokenizer, texts, ends, allowed_special, dtype)

        with ThreadPoolExecutor(workers) as pool:
            yield from bounded_map(pool, pack_in_thread, groups, 2 * workers)
        return
    tasks = ((texts, ends, allowed_special, dtype) for texts, ends in groups)
    with executor(workers, False, init_encode_worker, (tokenizer,)) as pool:
        yield from bounded_map(pool, pack_task, tasks, 2 * workers)


def unpack_ids(data: bytes) -> list[int]:
    """Ids packed by `encode_task` back to a list."""
    ids = array("I")
    ids.frombytes(data)
    return ids.tolist()


def encode_groups(
    tokenizer: Any, groups: list[list[str]], allowed_special: Any, workers: int
) -> list[list[int]]:
    """The ids of every text of every group, encoded by `workers` threads or processes."""
    results: list[list[int]] = []
    if uses_threads(tokenizer.pattern):
        local = threading.local()

        def encode_in_thread(texts: list[str]) -> list[list[int]]:
            if not hasattr(local, "tokenizer"):  # each thread has its own encoder and cache
                local.tokenizer = type(tokenizer)(tokenizer._state)
            return local.tokenizer.encode_many(texts, allowed_special)

        with ThreadPoolExecutor(workers) as pool:
            for ids in pool.map(encode_in_thread, groups):
                results.extend(ids)
        return results
    encoder = tokenizer._native_encoder()
    unpack = encoder.unpack if encoder is not None else unpack_ids
    tasks = [(group, allowed_special) for group in groups]
    with executor(workers, False, init_encode_worker, (tokenizer,)) as pool:
        for packed in bounded_map(pool, encode_task, tasks, 4 * workers):
            results.extend(map(unpack, packed))
    return results
