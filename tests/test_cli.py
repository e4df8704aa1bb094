"""The CLI shell: version, help, and how a user error becomes one line and exit code 2."""

from __future__ import annotations

import subprocess
import sys

import typer
from typer.testing import CliRunner

import tinylm
import tinylm.cli  # noqa: F401  (registers the commands)
from tinylm.cli.app import _Group, app
from tinylm.errors import TinyLMError

runner = CliRunner()


def test_version_and_help():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"tinylm {tinylm.__version__}"
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "tokenize" in result.output


def test_every_command_has_help_with_an_example():
    import click

    group = typer.main.get_command(app)

    def walk(command, path):
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from walk(sub, [*path, name])
        else:
            yield path, command

    commands = list(walk(group, []))
    assert commands
    for path, _ in commands:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, path
        assert "tinylm " + " ".join(path) in result.output, f"{path}: no example in --help"


def _failing_app() -> typer.Typer:
    demo = typer.Typer(cls=_Group)

    @demo.callback()
    def _root(ctx: typer.Context, debug: bool = typer.Option(False, "--debug")) -> None:
        ctx.obj = {"debug": debug}

    @demo.command()
    def fail() -> None:
        raise TinyLMError("data.txt:3: bad line", "fix the line")

    return demo


def test_user_error_is_one_line_and_exit_2(monkeypatch):
    monkeypatch.delenv("TINYLM_DEBUG", raising=False)
    result = CliRunner().invoke(_failing_app(), ["fail"])
    assert result.exit_code == 2
    assert result.stderr == "error: data.txt:3: bad line (fix the line)\n"


def test_debug_shows_the_exception(monkeypatch):
    monkeypatch.delenv("TINYLM_DEBUG", raising=False)
    result = CliRunner().invoke(_failing_app(), ["--debug", "fail"])
    assert isinstance(result.exception, TinyLMError)


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "tinylm", "--version"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"tinylm {tinylm.__version__}"
