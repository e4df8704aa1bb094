"""The Typer application, its global options, and how user errors become one line + exit 2."""

from __future__ import annotations

import os
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from tinylm import __version__
from tinylm.console import Output
from tinylm.errors import TinyLMError


class _Group(TyperGroup):
    """Turns a `TinyLMError` from any command into `error: ...` on stderr and exit code 2.

    Under torchrun the line is printed by one process only (`claim_error_report`); a process
    whose collective broke because a peer exited on such an error exits 2 without a traceback.
    """

    def invoke(self, ctx: click.Context) -> Any:
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        try:
            return super().invoke(ctx)
        except TinyLMError as exc:
            if _debug(ctx):
                raise
            if not distributed or _claim_error_report():
                typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except RuntimeError:  # torch.distributed's errors (a peer gone) are RuntimeErrors
            if distributed and not _debug(ctx) and _peer_reported_error():
                raise typer.Exit(2) from None
            raise


def _debug(ctx: click.Context) -> bool:
    """--debug (set on `ctx.obj` by the callback, so read after the command ran) or
    TINYLM_DEBUG: show tracebacks."""
    return bool((ctx.obj or {}).get("debug") or os.environ.get("TINYLM_DEBUG"))


def _claim_error_report() -> bool:
    from tinylm.train.distributed import claim_error_report

    return claim_error_report()


def _peer_reported_error() -> bool:
    from tinylm.train.distributed import peer_reported_error

    return peer_reported_error()


app = typer.Typer(
    cls=_Group,
    name="tinylm",
    help="Train a small language model through its whole life: tokenizer, pretraining, "
    "instruction tuning, LoRA, DPO and generation, on a CPU or a GPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tinylm {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full traceback of errors.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    ctx.obj = {"debug": debug}


# Options shared by many commands, declared once so they read the same everywhere.
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or messages.")]
Json = Annotated[bool, typer.Option("--json", help="Print results as JSON lines on stdout.")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")]
Log = Annotated[
    str | None,
    typer.Option("--log", help="Also send the metrics to trackers: tensorboard, wandb, mlflow "
                 "(comma-separated; each an extra: pip install 'tinylm[tensorboard]')."),
]
Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key: KEY=VALUE, e.g. train.lr=1e-3 "
                 "(repeatable)."),
]


# Every command names what it writes --out / -o; --output is kept as a hidden alias.
OutputAlias = Annotated[str | None, typer.Option("--output", hidden=True)]


def out_path(out: str | None, alias: str | None) -> str:
    """The output given as --out/-o or its alias --output; a clear error when neither is."""
    if out is not None and alias is not None and out != alias:
        raise TinyLMError("give the output once, as --out (or -o)")
    chosen = out if out is not None else alias
    if chosen is None:
        raise TinyLMError("no output given", "name it with --out (or -o)")
    return chosen


def output(quiet: bool, json: bool) -> Output:
    """The `Output` for a command's --quiet/--json flags."""
    return Output(quiet=quiet, json=json)


def exit_if_interrupted(out: Output, result: Any, command: str, out_dir: str) -> None:
    """After a training command: if Ctrl-C or SIGTERM stopped it (a checkpoint was saved), say
    how to continue and exit as the shell expects, 128 + the signal (130, 143)."""
    if result.stopped != "interrupted":
        return
    import signal

    by = "" if result.signal == signal.SIGINT else f"{signal.Signals(result.signal).name}: "
    out.warn(f"{by}interrupted at step {result.step}; continue with: tinylm {command} -o "
             f"{out_dir} --resume")
    raise typer.Exit(128 + result.signal)
