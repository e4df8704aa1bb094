"""Continuous batching: one thread runs the decode loop over every sequence being generated.

The engine owns one `KVCache` of `max_batch` rows, a row per sequence (a "slot"). Each step it
admits the requests that arrived (their prompts prefilled in one forward, each into its own
slot, a request's further choices copies of that slot), then runs one forward over all active
sequences, each at its own position
(`Transformer.forward` with a per-row `start_pos`), and samples each row with its request's own
settings and `torch.Generator`, so a seeded request gets the same tokens whatever else is in the
batch. A finished or cancelled sequence leaves at once: the last slot's cache moves into its
place, so the active sequences are always slots [0, n) and a step is a plain view of the cache.

Results go back through each request's `emit` callback, called on the engine thread with
`TextEvent`, `FinishEvent`, `DoneEvent` or `ErrorEvent`.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from tinylm.generate import SamplingConfig, TextStream, sample_next, stop_token_ids
from tinylm.model import KVCache
from tinylm.serve.events import DoneEvent, ErrorEvent, Event, FinishEvent, TextEvent

PREFILL_TOKENS = 4096  # most prompt tokens (padding included) in one prefill forward

if TYPE_CHECKING:
    from tinylm.model import Transformer
    from tinylm.tokenizer import Tokenizer


@dataclass
class Request:
    """One prompt (token ids that fit the context) to continue `n` times.

    `max_new_tokens` must leave the prompt room in the context (the API checks it); `emit` is
    called on the engine thread. Set `cancelled` (any thread) to free the request's slots."""

    prompt_ids: list[int]
    config: SamplingConfig
    emit: Callable[[Event], None]
    n: int = 1
    cancelled: bool = False
    completion_tokens: int = 0
    open_choices: int = 0


@dataclass
class _Sequence:
    """One choice being decoded: its slot is its index in `Engine.active`."""

    request: Request
    index: int
    generator: torch.Generator
    stream: TextStream
    position: int  # tokens in the cache so far
    last: int  # the sampled token not yet in the cache: the next step's input
    max_new: int
    ids: list[int] = field(default_factory=list)
    done: bool = False


@dataclass
class EngineStats:
    """Counters for /health and the tests: `max_batch_seen` > 1 means requests were batched."""

    steps: int = 0
    generated_tokens: int = 0
    requests_done: int = 0
    requests_cancelled: int = 0
    requests_failed: int = 0
    max_batch_seen: int = 0


class Engine:
    """The decode loop on its own thread; `submit` and `cancel` may be called from any thread."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch: int = 16) -> None:
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        param = next(model.parameters())
        self.device = param.device
        self.context = model.config.max_seq_len
        self.cache = KVCache.allocate(model.config, max_batch, self.context, self.device,
                                      param.dtype)
        self.stops = stop_token_ids(tokenizer)
        self.banned = None  # rows of a padded embedding that no token maps to
        if tokenizer.vocab_size < model.config.vocab_size:
            self.banned = torch.zeros(model.config.vocab_size, dtype=torch.bool,
                                      device=self.device)
            self.banned[tokenizer.vocab_size :] = True
        self.active: list[_Sequence] = []
        self.stats = EngineStats()
        self._waiting: deque[Request] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="tinylm-engine", daemon=True)

    def start(self) -> Engine:
        """Start the decode loop's thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop after its current step and wait for the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    def submit(self, request: Request) -> None:
        """Queue a request; it joins the batch at the next step that has `n` free slots."""
        if not 1 <= request.n <= self.max_batch:
            raise ValueError(f"n={request.n}: the engine has {self.max_batch} slots")
        with self._wake:
            self._waiting.append(request)
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        """Drop a request (its client went away); its slots are free at the next step."""
        request.cancelled = True
        with self._wake:
            self._wake.notify()

    @property
    def alive(self) -> bool:
        """False if the decode loop's thread has stopped."""
        return self._thread.is_alive()

    @property
    def waiting(self) -> int:
        """Requests queued, not yet admitted."""
        return len(self._waiting)

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._stopping or self._waiting or self.active):
                        self._wake.wait()
                    if self._stopping:
                        return
                try:
                    self._drop_cancelled()
                    self._admit()
                    if self.active:
                        self._step()
                except Exception as exc:  # a bug must not stop the loop: fail what is in it
                    self._fail(list({id(s.request): s.request for s in self.active}.values()),
                               exc)

    def _drop_cancelled(self) -> None:
        gone = [s for s in self.active if s.request.cancelled]
        self.stats.requests_cancelled += len({id(s.request) for s in gone})
        self._leave(gone)

    def _admit(self) -> None:
        """Prefill the waiting requests, first come first served, while their choices fit:
        together, in forwards of at most PREFILL_TOKENS (padded) prompt tokens."""
        while True:
            batch: list[Request] = []
            with self._wake:
                free, longest = self.max_batch - len(self.active), 0
                while self._waiting:
                    request = self._waiting[0]
                    if request.cancelled:
                        self._waiting.popleft()
                        self.stats.requests_cancelled += 1
                        continue
                    longest = max(longest, len(request.prompt_ids))
                    if request.n > free or (batch and longest * (len(batch) + 1) >
                                            PREFILL_TOKENS):
                        break
                    batch.append(self._waiting.popleft())
                    free -= request.n
            if not batch:
                return
            try:
                self._prefill(batch)
            except Exception as exc:  # a failed request must not stop the others
                self._fail(batch, exc)

    def _prefill(self, requests: list[Request]) -> None:
        """One forward over the prompts, right-padded, each into its own cache row (causal
        attention keeps the padding out of the real tokens; the next step overwrites it);
        then a copy of that row for each further choice, and every choice's first token."""
        first, m = len(self.active), len(requests)
        lengths = [len(r.prompt_ids) for r in requests]
        width = max(lengths)
        ids = torch.zeros(m, width, dtype=torch.long)
        for i, request in enumerate(requests):
            ids[i, : lengths[i]] = torch.tensor(request.prompt_ids)
        k, v = self.cache.k, self.cache.v
        rows = KVCache(k[:, first : first + m], v[:, first : first + m])
        keep = width - min(lengths) + 1  # logits for every row's last prompt position
        logits = self.model(ids.to(self.device), kv_cache=rows, logits_to_keep=keep)
        last = logits[torch.arange(m), torch.tensor(lengths) - 1 - (width - keep)]  # (m, V)
        firsts, extras, row_of = [], [], []
        for i, request in enumerate(requests):
            seed = request.config.seed
            if seed is None:
                seed = int.from_bytes(os.urandom(7), "little")
            request.open_choices = request.n
            for j in range(request.n):
                generator = torch.Generator(device=self.device).manual_seed(seed + j)
                s = _Sequence(request, j, generator, TextStream(request.config.stop),
                              lengths[i], -1, request.config.max_new_tokens)
                (extras if j else firsts).append((s, i))
        for s, i in [*firsts, *extras]:
            slot = len(self.active)
            if slot >= first + m:  # a further choice shares its prompt's keys and values
                k[:, slot, :, : lengths[i]] = k[:, first + i, :, : lengths[i]]
                v[:, slot, :, : lengths[i]] = v[:, first + i, :, : lengths[i]]
            self.active.append(s)
            row_of.append(i)
        new = self.active[first:]
        self._accept(new, self._sample(last[row_of], new))

    def _step(self) -> None:
        """One token for every active sequence."""
        batch = self.active
        n = len(batch)
        ids = torch.tensor([[s.last] for s in batch], device=self.device)
        pos = torch.tensor([s.position for s in batch], device=self.device)
        view = KVCache(self.cache.k[:, :n], self.cache.v[:, :n])
        # one row: a plain int position takes the model's unmasked path (~10% faster)
        start = batch[0].position if n == 1 else pos
        logits = self.model(ids, kv_cache=view, start_pos=start)[:, -1]
        for s in batch:
            s.position += 1
        tokens = self._sample(logits, batch)
        self.stats.steps += 1
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, n)
        self._accept(batch, tokens)

    def _sample(self, logits: torch.Tensor, batch: list[_Sequence]) -> list[int]:
        """Each row's next token: greedy rows in one argmax, the others one draw each from
        their own generator (so a seeded request's draws ignore the rest of the batch)."""
        if self.banned is not None:
            logits = logits.masked_fill(self.banned, float("-inf"))
        tokens = [0] * len(batch)
        greedy = [i for i, s in enumerate(batch) if s.request.config.temperature == 0]
        if greedy:
            for i, t in zip(greedy, logits[greedy].argmax(-1).tolist(), strict=True):
                tokens[i] = t
        for i, s in enumerate(batch):
            if s.request.config.temperature != 0:
                drawn = sample_next(logits[i : i + 1], s.request.config, None, s.generator)
                tokens[i] = int(drawn)
        return tokens

    def _accept(self, batch: list[_Sequence], tokens: list[int]) -> None:
        """Record each sequence's new token, stream its text, and retire the finished ones."""
        self.stats.generated_tokens += len(tokens)
        for s, token in zip(batch, tokens, strict=True):
            s.ids.append(token)
            s.last = token
            if token in self.stops:
                self._finish(s, "stop")
                continue
            self._emit(s.request, TextEvent(s.index, s.stream.feed(
                self.tokenizer.token_bytes(token))))
            if s.stream.stopped:
                self._finish(s, "stop")
            elif len(s.ids) >= s.max_new:
                self._finish(s, "length")
        self._leave([s for s in batch if s.done])

    def _finish(self, s: _Sequence, reason: str) -> None:
        s.done = True
        request = s.request
        self._emit(request, TextEvent(s.index, s.stream.close()))
        self._emit(request, FinishEvent(s.index, reason, len(s.ids)))
        request.completion_tokens += len(s.ids)
        request.open_choices -= 1
        if request.open_choices == 0:
            self.stats.requests_done += 1
            self._emit(request, DoneEvent(len(request.prompt_ids), request.completion_tokens))

    def _emit(self, request: Request, event: Event) -> None:
        if request.cancelled or (isinstance(event, TextEvent) and not event.text):
            return
        try:
            request.emit(event)
        except Exception:  # nobody is listening any more (the server is shutting down)
            request.cancelled = True

    def _leave(self, gone: list[_Sequence]) -> None:
        """Free the slots of `gone`: the last active sequence moves into each freed slot."""
        slots = sorted((self.active.index(s) for s in gone), reverse=True)
        k, v = self.cache.k, self.cache.v
        for slot in slots:
            last = len(self.active) - 1
            s = self.active[slot]
            if not s.done:  # cancelled by its client, or failed
                s.done = True
                s.request.open_choices -= 1
            if slot != last:
                n = self.active[last].position
                k[:, slot, :, :n] = k[:, last, :, :n]
                v[:, slot, :, :n] = v[:, last, :, :n]
                self.active[slot] = self.active[last]
            self.active.pop()

    def _fail(self, requests: list[Request], exc: Exception) -> None:
        traceback.print_exception(exc, file=sys.stderr)
        for request in requests:
            self._emit(request, ErrorEvent(f"generation failed: {exc}"))
            request.cancelled = True
        self.stats.requests_failed += len(requests)
        self._leave([s for s in self.active if s.request.cancelled and not s.done])

