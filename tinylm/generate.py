"""Text generation: sampling filters, a KV-cached decode loop, batching, stop strings, streaming.

One forward pass prefills the prompts (left-padded into a batch, with an attention mask), then
each step feeds one token per row into a preallocated `KVCache`. The per-step work outside the
model is constant: a (batch, vocab) table of seen tokens for the repetition penalty, and per
row an incremental UTF-8 decoder that only ever yields whole characters, holding back text that
may still turn into a stop string.
"""

from __future__ import annotations

import codecs
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tinylm.chat import TURN_END
from tinylm.console import SILENT, Output
from tinylm.errors import TinyLMError
from tinylm.model import KVCache, pack_weights
from tinylm.run import Run, load_run
from tinylm.textio import iter_jsonl, read_text
from tinylm.train.distributed import resolve_device

if TYPE_CHECKING:
    from tinylm.run import Run
    from tinylm.tokenizer import Tokenizer


@dataclass
class SamplingConfig:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1 switch those off."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise TinyLMError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise TinyLMError(f"--temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise TinyLMError(f"--top-k must be >= 0 (0 keeps all tokens), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise TinyLMError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise TinyLMError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise TinyLMError("--stop: a stop string cannot be empty")


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty on tokens already in the text (`seen`, bool like `logits`): a positive
    logit is divided by `penalty`, a negative one multiplied, so > 1 always discourages."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Logits with all but the k largest per row set to -inf (ties with the k-th are kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability adds up to
    at least `p` (always at least one token); the rest get -inf."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the more likely tokens
    drop_sorted = before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: Tensor, config: SamplingConfig, seen: Tensor | None, generator: torch.Generator | None
) -> Tensor:
    """Next token ids (B,) from last-position logits (B, vocab): penalty, temperature, top-k,
    top-p, then a draw (or argmax when temperature is 0), in Hugging Face's order."""
    if config.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if config.temperature == 0:
        return logits.argmax(-1)
    logits = top_p_filter(top_k_filter(logits / config.temperature, config.top_k), config.top_p)
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


class TextStream:
    """Token bytes in, whole characters out, cut at the first stop string.

    Bytes of a character split across tokens wait in an incremental UTF-8 decoder; text that
    could be the beginning of a stop string waits until it is known not to be one.
    """

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(stops)
        self._longest = max((len(s) for s in self._stops), default=0)
        self.text = ""
        self._shown = 0
        self.stopped = False

    def feed(self, data: bytes) -> str:
        """Add a token's bytes; returns the text that is now safe to show."""
        return self._advance(self._decoder.decode(data), final=False)

    def close(self) -> str:
        """No more tokens: flush what was held back (an incomplete character becomes U+FFFD)."""
        return self._advance(self._decoder.decode(b"", final=True), final=True)

    def _advance(self, new: str, final: bool) -> str:
        if self.stopped:
            return ""
        search_from = max(0, len(self.text) - self._longest + 1)
        self.text += new
        hits = [i for i in (self.text.find(s, search_from) for s in self._stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = final = True
        end = len(self.text) if final else len(self.text) - self._held_back()
        shown, self._shown = self.text[self._shown : end], max(self._shown, end)
        return shown

    def _held_back(self) -> int:
        """Length of the longest end of the text that begins some stop string."""
        for n in range(min(self._longest - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0


@dataclass
class Generation:
    """One output: the continuation `text` (prompt and stop string/token left out) and stats."""

    prompt: str
    text: str
    n_tokens: int  # tokens generated, a final end-of-text / end-of-turn token included
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    finish_reason: str  # "end" (end token), "stop" (stop string) or "length"
    token_ids: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """Decode rate of this output."""
        return self.n_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The JSON line `tinylm generate --json` prints."""
        return {"prompt": self.prompt, "text": self.text, "n_tokens": self.n_tokens,
                "prompt_tokens": self.prompt_tokens, "prefill_s": round(self.prefill_s, 6),
                "decode_s": round(self.decode_s, 6), "tokens_per_s": round(self.tokens_per_s, 2),
                "finish_reason": self.finish_reason}


def stop_token_ids(tokenizer: Tokenizer) -> set[int]:
    """End of text and end of turn: generation always stops at these."""
    return {tokenizer.special_tokens[t] for t in ("<|endoftext|>", TURN_END)
            if t in tokenizer.special_tokens}


def fit_prompt(ids: list[int], context: int, max_new_tokens: int, truncate: bool,
               what: str = "prompt", out: Output = SILENT) -> list[int]:
    """The prompt ids that fit the context. Without `truncate` a prompt that leaves no room is
    an error; with it, the oldest tokens go so that min(max_new_tokens, context/2) fit."""
    room = min(max_new_tokens, context // 2)
    if truncate and len(ids) > context - room:
        out.warn(f"{what}: {len(ids)} tokens; kept the last {context - room} to leave room for "
                 f"{room} new tokens in the context of {context}")
        return ids[len(ids) - (context - room):]
    if len(ids) >= context:
        raise TinyLMError(f"{what} is {len(ids)} tokens; the model's context is {context}",
                          "shorten it, or pass --truncate to keep its last tokens")
    return ids


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _generate_batch(model: torch.nn.Module, tokenizer: Tokenizer, rows: list[list[int]],
                    config: SamplingConfig, generator: torch.Generator,
                    on_text: Callable[[int, str], None] | None, compiled: Any) -> list[dict]:
    mc = model.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    B, P = len(rows), max(len(r) for r in rows)
    n_new = min(config.max_new_tokens, mc.max_seq_len - P)
    total = P + n_new
    ids = torch.zeros(B, P, dtype=torch.long)
    mask = torch.zeros(B, total, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, P - len(row):] = torch.tensor(row)
        mask[i, P - len(row):] = 1
    ids, mask = ids.to(device), mask.to(device)
    padded = not bool(mask[:, :P].all())
    cache = KVCache.allocate(mc, B, total, device, dtype)
    seen = None  # (B, vocab): tokens in the text so far, for the repetition penalty
    if config.repetition_penalty != 1.0:
        counts = torch.zeros(B, mc.vocab_size, dtype=torch.long, device=device)
        seen = counts.scatter_add_(1, ids, mask[:, :P]) > 0
    banned = None  # rows of a padded embedding no token maps to
    if tokenizer.vocab_size < mc.vocab_size:
        banned = torch.zeros(mc.vocab_size, dtype=torch.bool, device=device)
        banned[tokenizer.vocab_size:] = True

    start = time.perf_counter()
    logits = model(ids, kv_cache=cache, attention_mask=mask[:, :P] if padded else None,
                   logits_to_keep=1)[:, -1]
    _sync(device)
    prefill_s = time.perf_counter() - start

    stops = stop_token_ids(tokenizer)
    streams = [TextStream(config.stop) for _ in rows]
    results = [{"ids": [], "reason": "length", "end": None} for _ in rows]
    done = [False] * B
    start = time.perf_counter()
    for step in range(n_new):
        if banned is not None:
            logits = logits.masked_fill(banned, float("-inf"))
        nxt = sample_next(logits, config, seen, generator)
        if seen is not None:
            seen[torch.arange(B, device=device), nxt] = True
        for i, token in enumerate(nxt.tolist()):
            if done[i]:
                continue
            results[i]["ids"].append(token)
            if token in stops:
                done[i], results[i]["reason"] = True, "end"
            else:
                text = streams[i].feed(tokenizer.token_bytes(token))
                if text and on_text:
                    on_text(i, text)
                if streams[i].stopped:
                    done[i], results[i]["reason"] = True, "stop"
            if done[i]:
                results[i]["end"] = time.perf_counter() - start
        if all(done) or step == n_new - 1:
            break
        pos = P + step
        mask[:, pos] = 1
        if compiled is not None:
            logits = compiled(nxt[:, None], kv_cache=cache, attention_mask=mask,
                              start_pos=torch.tensor(pos, device=device))[:, -1]
        else:
            logits = model(nxt[:, None], kv_cache=cache, start_pos=pos,
                           attention_mask=mask[:, :pos + 1] if padded else None)[:, -1]
    _sync(device)
    decode_s = time.perf_counter() - start
    for i, stream in enumerate(streams):
        rest = stream.close()
        if rest and on_text:
            on_text(i, rest)
        results[i].update(text=stream.text, prefill_s=prefill_s,
                          decode_s=results[i]["end"] or decode_s)
    return results


def generate(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[list[int]],
    config: SamplingConfig,
    *,
    prompts: Sequence[str] | None = None,
    batch_size: int = 8,
    on_text: Callable[[int, str], None] | None = None,
    compile: bool = False,
) -> list[Generation]:
    """Continue each prompt (token ids that fit the context, see `fit_prompt`).

    Prompts go through in batches of `batch_size`, similar lengths together; results come back
    in the order given. `on_text(index, text)` receives each output's text as it is produced.
    `compile` runs the decode step through `torch.compile` (one shape for every step).
    The same `config.seed` gives the same outputs.
    """
    if not prompt_ids:
        return []
    if any(not ids for ids in prompt_ids):
        raise TinyLMError("empty prompt", "give at least one character of text")
    seed = config.seed if config.seed is not None else int.from_bytes(os.urandom(7), "little")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    compiled = torch.compile(model, dynamic=False) if compile else None
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    outputs: list[Generation | None] = [None] * len(prompt_ids)
    for first in range(0, len(order), max(1, batch_size)):
        chunk = order[first : first + max(1, batch_size)]

        def relay(row: int, text: str, chunk: list[int] = chunk) -> None:
            if on_text is not None:
                on_text(chunk[row], text)

        rows = [list(prompt_ids[i]) for i in chunk]
        for i, res in zip(chunk, _generate_batch(model, tokenizer, rows, config, generator,
                                                 relay, compiled), strict=True):
            prompt = prompts[i] if prompts is not None else tokenizer.decode(prompt_ids[i])
            outputs[i] = Generation(prompt, res["text"], len(res["ids"]), len(prompt_ids[i]),
                                    res["prefill_s"], res["decode_s"], res["reason"], res["ids"])
    return [g for g in outputs if g is not None]


def load_for_generation(path: str | Path, device: str = "auto", no_merge: bool = False) -> Run:
    """Any run, ready to generate: pretrained, finetuned, DPO, or a LoRA adapter run (its
    adapter applied to the base, merged unless `no_merge`); on `device` (auto: cuda if any),
    in bfloat16 on a GPU that supports it, its weights laid out by `pack_weights`."""
    dev = resolve_device(device)
    run = load_run(path, str(dev), no_merge)
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        run.model.to(torch.bfloat16)
    pack_weights(run.model)
    return run


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: JSONL objects with a "prompt" string (a .jsonl file), or one prompt
    a line (blank lines skipped; lines end at "\n" or "\r\n" only, so a prompt may hold any
    other character)."""
    path = Path(path)
    hint = "check the path given to --prompts-file"
    if path.suffix.lower() == ".jsonl":
        prompts = []
        for lineno, obj in iter_jsonl(path, hint):
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise TinyLMError(f"{path}:{lineno}: expected an object with a \"prompt\" string")
            prompts.append(obj["prompt"])
    else:
        lines = read_text(path, hint).split("\n")
        prompts = [line.removesuffix("\r") for line in lines if line.strip()]
    if not prompts:
        raise TinyLMError(f"{path}: no prompts in the file")
    return prompts
