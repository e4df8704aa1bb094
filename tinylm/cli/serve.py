"""`tinylm serve`: a run behind an OpenAI-compatible API and a chat page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tinylm.cli.app import Json, Quiet, app, output


@app.command()
def serve(
    model: Annotated[Path, typer.Option("--model", "-m", help="The run directory to serve.")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on; 0.0.0.0 opens it "
                                      "to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: a free one).")] = 8000,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="TINYLM_API_KEY",
                                 help="Require 'Authorization: Bearer KEY' on every /v1 request.")
    ] = None,
    max_batch: Annotated[
        int, typer.Option("--max-batch", help="Sequences decoded together (KV-cache rows).")
    ] = 16,
    device: Annotated[str, typer.Option("--device", help="auto (cuda if present), cpu or cuda.")
                      ] = "auto",
    no_merge: Annotated[
        bool, typer.Option("--no-merge", help="LoRA runs: keep the adapter apart (slower).")
    ] = False,
    json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Serve a run over HTTP: OpenAI's /v1/completions and /v1/chat/completions (streamed or
    not) and a chat page at /. Concurrent requests share the decode loop (continuous batching).

    A LoRA run serves as its base with the adapter. Ctrl-C stops the server.

    Examples:

        tinylm serve --model runs/sft

        tinylm serve --model runs/sft --port 8080 --api-key secret

        curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json'
            -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'
    """
    from tinylm.serve import serve as run_server

    run_server(model, host, port, api_key, device, max_batch, no_merge, output(quiet, json))
