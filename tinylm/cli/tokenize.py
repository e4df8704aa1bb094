"""`tinylm tokenize`: train a byte-level BPE tokenizer."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from tinylm.cli.app import Force, Json, Quiet, app, output
from tinylm.errors import TinyLMError

_SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "KI": 2**10, "MI": 2**20, "GI": 2**30}


def parse_size(text: str) -> int:
    """A byte count such as 5000000, 30M, 30MB, 1.5G or 64MiB (K/M/G are powers of 1000)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG][iI]?)?[bB]?\s*", text)
    if not match:
        raise TinyLMError(f"--max-bytes {text!r}: expected a size such as 5000000, 30M or 1G")
    value = float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").upper()]
    if value < 1:
        raise TinyLMError(f"--max-bytes {text!r}: must be at least 1 byte")
    return int(value)


@app.command()
def tokenize(
    files: Annotated[
        list[str],
        typer.Argument(
            help='Text files (.txt, .md), JSONL with a "text" field, parquet with a "text" '
            "column, .gz / .zst of text or JSONL, directories (searched recursively) or quoted "
            "globs. PATH:WEIGHT on every file shares --max-bytes by weight.",
            show_default=False,
        ),
    ],
    vocab_size: Annotated[
        int, typer.Option("--vocab-size", "-v", help="Vocabulary size, special tokens included.")
    ],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Directory for tokenizer.json.")],
    pattern: Annotated[
        str, typer.Option(help="Split regex: gpt4 (cl100k), gpt2, or a custom regex.")
    ] = "gpt4",
    special_token: Annotated[
        list[str] | None,
        typer.Option(
            "--special-token",
            help="Another special token (repeatable), added after "
            "<|endoftext|>, <|im_start|> and <|im_end|>.",
        ),
    ] = None,
    max_bytes: Annotated[
        str | None,
        typer.Option(help="Train on at most this much text (e.g. 100M), spread over the files."),
    ] = None,
    allow_special: Annotated[
        bool,
        typer.Option(
            "--allow-special",
            help="Read special-token spellings in the corpus (such as <|endoftext|> between "
            "documents) as those tokens: no merge is learned from or across them.",
        ),
    ] = False,
    text_field: Annotated[
        str, typer.Option("--text-field", help="The JSONL key or parquet column holding the text.")
    ] = "text",
    force: Force = False,
    quiet: Quiet = False,
    json: Json = False,
) -> None:
    """Train a byte-level BPE tokenizer and write DIR/tokenizer.json (Hugging Face format).

    Prints the training time, the vocabulary size and bytes per token
    on held-out text (the last 2% of every file or document).
    Special-token strings in the corpus stay plain text, unless --allow-special.

    Examples:

        tinylm tokenize corpus.txt --vocab-size 4096 -o tok

        tinylm tokenize data/ --vocab-size 32768 --max-bytes 200M -o tok --force

        tinylm tokenize docs.jsonl -v 8192 --pattern gpt2 --special-token "<|pad|>" -o tok --json

        tinylm tokenize "fineweb/*.parquet" code.jsonl.zst -v 32768 --max-bytes 1G -o tok
    """
    from tinylm.chat import DEFAULT_SPECIAL_TOKENS
    from tinylm.sources import resolve_sources
    from tinylm.textio import check_output_dir
    from tinylm.tokenizer import Tokenizer
    from tinylm.tokenizer.training import summary, train_from_files

    out = output(quiet, json)
    out_dir = check_output_dir(out_dir, force)
    limit = parse_size(max_bytes) if max_bytes is not None else None
    specials = [*DEFAULT_SPECIAL_TOKENS, *(special_token or [])]
    result = train_from_files(resolve_sources(files, text_field), vocab_size, pattern, specials,
                              out, max_bytes=limit, allow_special=allow_special,
                              build=Tokenizer.from_merges)
    path = result.tokenizer.save(out_dir)
    out.table(f"tokenizer written to {path}", summary(result, path))
