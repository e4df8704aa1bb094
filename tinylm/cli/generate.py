"""`tinylm generate` and `tinylm chat`: sample text from a run, streamed as it is produced."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tinylm.cli.app import Json, Quiet, app, output

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
    from tinylm.session import PromptOptions, generate_prompts

    out = output(quiet, json)
    _check_args(prompt=prompt, system=system, stop=stop)
    config = _sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed)
    options = PromptOptions(chat, system, allow_special, truncate)
    streaming = num_samples == 1 and prompts_file is None and not json

    def show(_row: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if streaming and out.out.is_terminal and not chat:
        out.out.print(prompt or "", style="dim", end="", highlight=False, markup=False)
    texts, results = generate_prompts(
        model, None if prompt is None else [prompt], config, options, prompts_file=prompts_file,
        num_samples=num_samples, batch_size=batch_size, device=device, no_merge=no_merge,
        compile=compile, on_text=show if streaming else None, out=out)
    if json:
        for gen in results:
            out.result(gen.as_dict())
        return
    if streaming:
        sys.stdout.write("\n")
    else:
        _print_outputs(results, out, len(texts), num_samples)
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
    from tinylm.generate import load_for_generation
    from tinylm.session import chat_loop

    out = output(quiet, False)
    _check_args(system=system)
    config = _sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, None, seed)
    run = load_for_generation(model, device, no_merge)
    out.info("chat: /reset starts over, /exit ends")

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def ask() -> None:
        sys.stderr.write("> ")

    chat_loop(run, config, lambda: _read_line(out), write, system, out,
              prompt=ask if sys.stdin.isatty() else None)
