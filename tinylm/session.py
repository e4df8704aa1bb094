"""What `tinylm generate` and `tinylm chat` do, as library functions: prompts encoded and
fitted into the context, and the multi-turn chat loop. The commands only parse options and
do the printing; the server and the quickstart call the same functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from tinylm.chat import encode_chat, fit_history
from tinylm.console import SILENT, Output
from tinylm.errors import TinyLMError
from tinylm.generate import (
    Generation,
    SamplingConfig,
    fit_prompt,
    generate,
    load_for_generation,
    read_prompts,
)
from tinylm.run import Run
from tinylm.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class PromptOptions:
    """How prompt texts become ids: the chat template (with an optional system message) or
    plain text (special-token spellings read as control tokens only with `allow_special`),
    and whether a prompt longer than the context is cut from the left or refused."""

    chat: bool = False
    system: str | None = None
    allow_special: bool = False
    truncate: bool = False

    def __post_init__(self) -> None:
        if self.system is not None and not self.chat:
            raise TinyLMError("--system applies to --chat prompts", "add --chat")
        if self.allow_special and self.chat:
            raise TinyLMError("--allow-special applies to plain prompts; chat messages are text",
                              "drop --chat and write the template yourself, or drop "
                              "--allow-special")


def encode_prompts(tokenizer: Tokenizer, prompts: list[str], options: PromptOptions,
                   context: int, max_new_tokens: int, source: str | None = None,
                   out: Output = SILENT) -> list[list[int]]:
    """Each prompt's ids, fitted so that `max_new_tokens` still fit in `context` (`source`
    names the prompts file in errors; an empty plain prompt starts a text from scratch)."""
    allowed = "all" if options.allow_special else frozenset()
    system = [{"role": "system", "content": options.system}] if options.system is not None \
        else []
    ids = []
    for i, text in enumerate(prompts):
        what = f"{source}:{i + 1}" if source is not None else "the prompt"
        if options.chat:
            encoded = encode_chat(tokenizer, [*system, {"role": "user", "content": text}], True)
        else:
            encoded = tokenizer.encode(text, allowed_special=allowed) if text else \
                [tokenizer.eot_id]
        ids.append(fit_prompt(encoded, context, max_new_tokens, options.truncate, what, out))
    return ids


def generate_prompts(
    model_dir: str | Path, prompts: list[str] | None, sampling: SamplingConfig,
    options: PromptOptions, *, prompts_file: str | Path | None = None, num_samples: int = 1,
    batch_size: int = 8, device: str = "auto", no_merge: bool = False, compile: bool = False,
    on_text: Callable[[int, str], None] | None = None, out: Output = SILENT,
) -> tuple[list[str], list[Generation]]:
    """`tinylm generate`: (the prompt texts, one `Generation` per prompt and sample) from the
    run `model_dir`, for `prompts` or the lines of `prompts_file` (exactly one of them)."""
    if (prompts is None) == (prompts_file is None):
        raise TinyLMError("give either a PROMPT or --prompts-file", "see tinylm generate --help")
    if num_samples < 1 or batch_size < 1:
        raise TinyLMError("--num-samples and --batch-size must be at least 1")
    texts = read_prompts(prompts_file) if prompts_file is not None else list(prompts or [])
    run = load_for_generation(model_dir, device, no_merge)
    ids = encode_prompts(run.tokenizer, texts, options, run.model.config.max_seq_len,
                         sampling.max_new_tokens,
                         str(prompts_file) if prompts_file is not None else None, out)
    rows = [i for i in ids for _ in range(num_samples)]
    shown = [t for t in texts for _ in range(num_samples)]
    results = generate(run.model, run.tokenizer, rows, sampling, prompts=shown,
                       batch_size=batch_size, on_text=on_text, compile=compile)
    return texts, results


def chat_loop(run: Run, sampling: SamplingConfig, read_line: Callable[[], str | None],
              write: Callable[[str], None], system: str | None = None,
              out: Output = SILENT, prompt: Callable[[], None] | None = None) -> int:
    """`tinylm chat`: read user messages with `read_line` (None ends; "/reset" starts over,
    "/exit" ends), answer each through the chat template, streaming the reply with `write`.
    The oldest turns are dropped when the conversation would not fit the context, leaving
    room for the reply. Each answer has its own seed (seed + turn). Returns the turns."""
    context = run.model.config.max_seq_len
    budget = context - min(sampling.max_new_tokens, context // 2)
    start = [{"role": "system", "content": system}] if system is not None else []
    fit_history(run.tokenizer, start, budget)  # the tokenizer has the chat tokens, system fits
    messages = list(start)
    turn = 0
    while True:
        if prompt is not None:
            prompt()
        text = read_line()
        if text is None or text.strip() == "/exit":
            return turn
        if text.strip() == "/reset":
            messages = list(start)
            out.info("(history cleared)")
            continue
        if not text.strip():
            continue
        try:
            kept, ids = fit_history(run.tokenizer, [*messages, {"role": "user", "content": text}],
                                    budget)
        except TinyLMError as exc:
            out.warn(str(exc))
            continue
        if len(kept) < len(messages) + 1:
            out.warn(f"dropped the {len(messages) + 1 - len(kept)} oldest messages to fit")
        turn += 1  # each answer its own draw; the session still repeats with the same seed
        seed = None if sampling.seed is None else sampling.seed + turn
        (answer,) = generate(run.model, run.tokenizer, [ids],
                             dataclasses.replace(sampling, seed=seed),
                             on_text=lambda _row, piece: write(piece))
        write("\n")
        messages = [*kept, {"role": "assistant", "content": answer.text}]
