"""The `tinylm` command line: option parsing only; every command calls library functions.

Each stage's commands live in their own module here and register themselves on `app`. Heavy
libraries (torch, peft) are imported inside the commands so that `tinylm --help` is instant.
"""

# Each import registers its module's commands on `app`.
from tinylm.cli import (  # noqa: F401
    data,
    dpo,
    export,
    finetune,
    generate,
    info,
    plot,
    pretrain,
    quickstart,
    rl,
    serve,
    tokenize,
)
from tinylm.cli.app import app


def main() -> None:
    """Entry point of the `tinylm` console script and `python -m tinylm`."""
    app()
