"""`tinylm generate` and `tinylm chat`: sample text from a run, streamed as it is produced."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tinylm.cli.app import Json, Quiet, app, output
from tinylm.errors import TinyLMError

if TYPE_CHECKING:
    from tinylm.console import Output
    from tinylm.generate import Generation

Model = Annotated[Path, typer.Option("--model", "-m", help="The run directory to load.")]
MaxNew = Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate.")]
Temperature = Annotated[
    float, typer.Option("--temperature", "-t", help="Sampling temperature; 0 is greedy.")
]
TopK = Annotated[int, typer.Option("--top-k", help="Sample from the k likeliest tokens (0: all).")]
TopP = Annotated[
    float, typer.Option("--top-p", help="Sample from the likeliest tokens holding this mass.")
]
Penalty = Annotated[
    float, typer.Option("--repetition-penalty", help="Above 1 discourages repeated tokens.")
]
Seed = Annotated[int | None, typer.Option("--seed", help="Same seed, same text.")]
Device = Annotated[str, typer.Option("--device", help="auto (cuda if present), cpu or cuda.")]
NoMerge = Annotated[
    bool, typer.Option("--no-merge", help="LoRA runs: keep the adapter apart (slower).")
]


def _sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float,
              repetition_penalty: float, stop: list[str] | None, seed: int | None):
    from tinylm.generate import SamplingConfig

    return SamplingConfig(max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                          tuple(stop or ()), seed)


def _check_args(**texts: str | list[str] | None) -> None:
    """Command-line text must be UTF-8: bytes the terminal could not decode are an error."""
    from tinylm.textio import check_text

    for name, value in texts.items():
        for text in [value] if isinstance(value, str) else value or []:
            what = "PROMPT" if name == "prompt" else f"--{name}"
            check_text(text, what, "is the terminal's encoding UTF-8?")


def _print_outputs(results: list[Generation], out: Output, n_prompts: int, samples: int) -> None:
    for i, gen in enumerate(results):
        p, s = divmod(i, samples)
        parts = [f"prompt {p + 1}"] if n_prompts > 1 else []
        parts += [f"sample {s + 1}"] if samples > 1 else []
        title = ", ".join(parts)
        if out.out.is_terminal:
            out.out.rule(title)
            out.out.print(gen.prompt, style="dim", end="", highlight=False, markup=False)
            out.out.print(gen.text, highlight=False, markup=False)
        else:
            sys.stdout.write(f"--- {title}\n{gen.text}\n")


@app.command()
def generate(
    model: Model,
    prompt: Annotated[str | None, typer.Argument(help="The text to continue.")] = None,
    max_new_tokens: MaxNew = 256,
    temperature: Temperature = 0.8,
    top_k: TopK = 50,
    top_p: TopP = 1.0,
    repetition_penalty: Penalty = 1.0,
    seed: Seed = None,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="Stop at this text (repeatable).")
    ] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", help="Outputs per prompt.")] = 1,
    prompts_file: Annotated[
        Path | None,
        typer.Option("--prompts-file", help="One prompt a line, or JSONL with \"prompt\"."),
    ] = None,
    chat: Annotated[
        bool, typer.Option("--chat", help="Wrap prompts in the chat template.")
    ] = False,
    system: Annotated[
        str | None, typer.Option("--system", help="System message for --chat.")
    ] = None,
    truncate: Annotated[
        bool, typer.Option("--truncate", help="Cut prompts longer than the context from the left.")
    ] = False,
    allow_special: Annotated[
        bool, typer.Option("--allow-special", help="Read special-token spellings in plain "
                           "prompts (<|endoftext|>, <|im_start|>) as control tokens; by default "
                           "they are text.")
    ] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts decoded together.")] = 8,
    compile: Annotated[
        bool, typer.Option("--compile", help="torch.compile the decode step (GPU).")
    ] = False,
    device: Device = "auto",
    no_merge: NoMerge = False,
    json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Continue a prompt with a trained model, streaming the text as it comes.

    End of text and <|im_end|> always stop; --stop adds stop strings. Several prompts
    (--prompts-file) and samples (--num-samples) are decoded in batches. A prompt's
    "<|endoftext|>" or "<|im_start|>" is plain text unless --allow-special is given.

    Examples:

        tinylm generate --model runs/base "ROMEO:" --max-new-tokens 200

        tinylm generate --model runs/sft --chat "What is the capital of Zorbia?" -t 0

        tinylm generate --model runs/base --prompts-file prompts.jsonl --json --seed 1

        tinylm generate --model runs/base --allow-special "<|endoftext|>Once upon a time"
    """
    from tinylm.chat import encode_chat
    from tinylm.generate import fit_prompt, load_for_generation, read_prompts
    from tinylm.generate import generate as run_generation

    out = output(quiet, json)
    _check_args(prompt=prompt, system=system, stop=stop)
    config = _sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed)
    if (prompt is None) == (prompts_file is None):
        raise TinyLMError("give either a PROMPT or --prompts-file", "see tinylm generate --help")
    if num_samples < 1 or batch_size < 1:
        raise TinyLMError("--num-samples and --batch-size must be at least 1")
    if system is not None and not chat:
        raise TinyLMError("--system applies to --chat prompts", "add --chat")
    if allow_special and chat:
        raise TinyLMError("--allow-special applies to plain prompts; chat messages are text",
                          "drop --chat and write the template yourself, or drop --allow-special")
    allowed = "all" if allow_special else frozenset()
    prompts = read_prompts(prompts_file) if prompts_file is not None else [prompt or ""]
    run = load_for_generation(model, device, no_merge)
    tok, context = run.tokenizer, run.model.config.max_seq_len
    ids = []
    for i, text in enumerate(prompts):
        what = f"{prompts_file}:{i + 1}" if prompts_file is not None else "the prompt"
        if chat:
            system_turn = [{"role": "system", "content": system}] if system is not None else []
            encoded = encode_chat(tok, [*system_turn, {"role": "user", "content": text}], True)
        else:  # an empty prompt starts a text from scratch
            encoded = tok.encode(text, allowed_special=allowed) if text else [tok.eot_id]
        ids.append(fit_prompt(encoded, context, max_new_tokens, truncate, what, out))
    rows = [i for i in ids for _ in range(num_samples)]
    texts = [t for t in prompts for _ in range(num_samples)]
    streaming = len(rows) == 1 and not json

    def show(_row: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if streaming and out.out.is_terminal and not chat:
        out.out.print(prompts[0], style="dim", end="", highlight=False, markup=False)
    results = run_generation(run.model, tok, rows, config, prompts=texts, batch_size=batch_size,
                             on_text=show if streaming else None, compile=compile)
    if json:
        for gen in results:
            out.result(gen.as_dict())
        return
    if streaming:
        sys.stdout.write("\n")
    else:
        _print_outputs(results, out, len(prompts), num_samples)
    n = sum(g.n_tokens for g in results)
    rate = sum(g.tokens_per_s for g in results) / len(results)
    out.info(f"{n} tokens, prefill {1000 * results[0].prefill_s:.0f} ms, {rate:.1f} tokens/s")


def _read_line(out: Output) -> str | None:
    """The next line of stdin without its line end, or None at its end. Read as bytes, so a
    line that is not UTF-8 is skipped ("") with a warning instead of ending the session."""
    stream = getattr(sys.stdin, "buffer", None)
    raw = stream.readline() if stream is not None else sys.stdin.readline().encode()
    if not raw:
        return None
    try:
        return raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError:
        out.warn("that line is not valid UTF-8; it was skipped")
        return ""


@app.command("chat")
def chat_command(
    model: Model,
    system: Annotated[str | None, typer.Option("--system", help="A system message.")] = None,
    max_new_tokens: MaxNew = 256,
    temperature: Temperature = 0.7,
    top_k: TopK = 50,
    top_p: TopP = 1.0,
    repetition_penalty: Penalty = 1.0,
    seed: Seed = None,
    device: Device = "auto",
    no_merge: NoMerge = False,
    quiet: Quiet = False,
) -> None:
    """Talk with a model in the chat template, one message a line.

    /reset starts over, /exit (or Ctrl-D) ends. The oldest turns are dropped when the
    conversation would not fit the context.

    Examples:

        tinylm chat --model runs/sft

        tinylm chat --model runs/dpo --system "Answer in one sentence." -t 0
    """
    from tinylm.chat import fit_history
    from tinylm.generate import generate as run_generation
    from tinylm.generate import load_for_generation

    out = output(quiet, False)
    _check_args(system=system)
    config = _sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, None, seed)
    run = load_for_generation(model, device, no_merge)
    context = run.model.config.max_seq_len
    budget = context - min(max_new_tokens, context // 2)
    start = [{"role": "system", "content": system}] if system is not None else []
    fit_history(run.tokenizer, start, budget)  # the tokenizer has the chat tokens, system fits
    messages = list(start)
    interactive = sys.stdin.isatty()
    out.info("chat: /reset starts over, /exit ends")
    turn = 0
    while True:
        if interactive:
            sys.stderr.write("> ")
        text = _read_line(out)
        if text is None or text.strip() == "/exit":
            break
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
        turn += 1  # each answer its own draw; the session still repeats with the same --seed
        turn_config = replace(config, seed=None if seed is None else seed + turn)

        def show(_row: int, piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        (answer,) = run_generation(run.model, run.tokenizer, [ids], turn_config, on_text=show)
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages = [*kept, {"role": "assistant", "content": answer.text}]
