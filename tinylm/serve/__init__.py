"""`tinylm serve`: a run behind an OpenAI-compatible HTTP API, with continuous batching and a
chat page. `engine` batches the decoding, `protocol` checks requests, `api` is the Starlette
app; `serve` puts them together under uvicorn. Needs the `serve` extra (starlette, uvicorn).
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from tinylm.console import SILENT, Output
from tinylm.errors import TinyLMError

if TYPE_CHECKING:
    import uvicorn

    from tinylm.serve.engine import Engine


def _uvicorn():  # noqa: ANN202 - the module, imported late so that tinylm works without it
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise TinyLMError("tinylm serve needs starlette and uvicorn",
                          "pip install 'tinylm[serve]'") from None
    return uvicorn


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or a one-line error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TinyLMError(f"--host {host!r}: {exc.strerror}", "give an address such as "
                          "127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise TinyLMError(f"cannot listen on {host}:{port}: {exc.strerror}",
                          "choose another --port, or stop what is using it") from None
    sock.listen(128)
    return sock


def _check_options(max_batch: int, api_key: str | None) -> None:
    if max_batch < 1:
        raise TinyLMError(f"--max-batch must be at least 1, got {max_batch}")
    if api_key is not None and not api_key.strip():
        raise TinyLMError("--api-key is empty", "give the key clients must send")


def make_server(model: str | Path, device: str = "auto", api_key: str | None = None,
                max_batch: int = 16, no_merge: bool = False) -> tuple[Engine, object]:
    """Load a run (a LoRA run as base + adapter), start its engine, build the ASGI app."""
    _uvicorn()
    from tinylm.generate import load_for_generation
    from tinylm.serve.api import create_app
    from tinylm.serve.engine import Engine

    _check_options(max_batch, api_key)
    run = load_for_generation(model, device, no_merge)
    engine = Engine(run.model, run.tokenizer, max_batch).start()
    name = Path(model).resolve().name
    return engine, create_app(engine, name, api_key)


class ServerThread:
    """uvicorn serving `app` on an already bound socket, in a thread (tests, benchmarks)."""

    def __init__(self, app: object, sock: socket.socket) -> None:
        uv = _uvicorn()
        self.sock = sock
        config = uv.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
        self.server: uvicorn.Server = uv.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)

    @property
    def url(self) -> str:
        """http://host:port of the socket."""
        host, port = self.sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            self.thread.join(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.sock.close()


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, device: str = "auto", max_batch: int = 16,
          no_merge: bool = False, out: Output = SILENT) -> None:
    """Serve a run until Ctrl-C: the OpenAI API under /v1 and the chat page at /."""
    uv = _uvicorn()
    _check_options(max_batch, api_key)
    with bind(host, port) as sock:  # a port in use fails before the model is loaded
        engine, app = make_server(model, device, api_key, max_batch, no_merge)
        bound_host, bound_port = sock.getsockname()[:2]
        url = f"http://{bound_host}:{bound_port}"
        out.info(f"serving {model}, up to {max_batch} sequences at a time; Ctrl-C stops")
        out.info(f"chat page:  {url}/")
        out.info(f"OpenAI API: {url}/v1{' (key required)' if api_key else ''}")
        out.result({"url": url, "model": Path(model).resolve().name, "max_batch": max_batch})
        config = uv.Config(app, log_level="warning" if out.quiet or out.json else "info",
                           timeout_graceful_shutdown=2)
        try:
            uv.Server(config).run(sockets=[sock])
        finally:
            engine.stop()
