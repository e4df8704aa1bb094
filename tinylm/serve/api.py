"""The HTTP side of `tinylm serve`: a Starlette app with OpenAI's routes and the chat page.

    GET  /                     the chat page (tinylm/serve/static/)
    GET  /health               {"status": "ok", ...engine counters}
    GET  /v1/models            the served model
    POST /v1/completions       text in, text out (`text_completion` objects)
    POST /v1/chat/completions  messages in the run's chat template (`chat.completion` objects)

`stream: true` answers with server-sent events (`data: {json}` chunks, then `data: [DONE]`).
Every answer has a usage record; a stream has one in a last chunk with no choices when
`stream_options.include_usage` is set, as OpenAI sends it. Errors are OpenAI's error JSON.
Requests run in the `Engine`'s batch; a client that goes away cancels its request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from tinylm.serve import engine as eng
from tinylm.serve import events as ev
from tinylm.serve.protocol import (
    APIError,
    Job,
    build_job,
    chat_prompt,
    check_model,
    completion_prompts,
    parse_json,
)

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than any prompt that fits a small model's context
POLL_S = 0.25  # how often a non-streamed request checks that its client is still there


class _Submission:
    """A job's engine requests (one per prompt) and the queue their events arrive on."""

    def __init__(self, engine: eng.Engine, job: Job) -> None:
        loop = asyncio.get_running_loop()
        self.engine, self.job = engine, job
        self.queue: asyncio.Queue[tuple[int, ev.Event]] = asyncio.Queue()
        self.requests = []
        for p, prompt in enumerate(job.prompts):

            def emit(event: ev.Event, p: int = p) -> None:
                loop.call_soon_threadsafe(self.queue.put_nowait, (p, event))

            self.requests.append(eng.Request(prompt, job.config, emit, job.n))
        self.open = len(self.requests)
        self.done: set[int] = set()  # prompts whose every choice is complete
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for request in self.requests:
            engine.submit(request)

    async def next(self, timeout: float | None = None) -> tuple[int, ev.Event] | None:
        """The next (choice index, event), None after `timeout`; an engine error raises."""
        try:
            p, event = await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None
        if isinstance(event, ev.ErrorEvent):
            raise APIError(500, event.message)
        if isinstance(event, ev.DoneEvent):
            self.open -= 1
            self.done.add(p)
            self.usage["prompt_tokens"] += event.prompt_tokens
            self.usage["completion_tokens"] += event.completion_tokens
            self.usage["total_tokens"] += event.prompt_tokens + event.completion_tokens
        index = p * self.job.n + getattr(event, "index", 0)
        return index, event

    def cancel(self) -> None:
        """Free the engine's slots (a no-op for requests that are complete)."""
        for p, request in enumerate(self.requests):
            if p not in self.done:
                self.engine.cancel(request)


class _Server:
    """The routes' shared state: the engine, the model's name, the key, the body limit."""

    def __init__(self, engine: eng.Engine, model_name: str, api_key: str | None,
                 max_body_bytes: int) -> None:
        self.engine, self.model_name = engine, model_name
        self.api_key, self.max_body_bytes = api_key, max_body_bytes
        self.created = int(time.time())

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {self.api_key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: "
                           "Bearer KEY' with the key given to tinylm serve --api-key",
                           code="invalid_api_key")

    async def body(self, request: Request) -> dict[str, Any]:
        self.authorize(request)
        limit = self.max_body_bytes
        too_large = APIError(413, f"the request body is larger than {limit} bytes",
                             code="request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        body = parse_json(b"".join(chunks))
        check_model(body, self.model_name)
        return body

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "tinylm", "max_model_len": self.engine.context}

    async def health(self, request: Request) -> Response:
        stats, alive = asdict(self.engine.stats), self.engine.alive
        return JSONResponse({"status": "ok" if alive else "engine stopped",
                             "model": self.model_name, "active": len(self.engine.active),
                             "waiting": self.engine.waiting, "max_batch": self.engine.max_batch,
                             **stats}, status_code=200 if alive else 503)

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: Request) -> Response:
        self.authorize(request)
        check_model({"model": request.path_params["model"]}, self.model_name)
        return JSONResponse(self.model_card())

    async def completions(self, request: Request) -> Response:
        body = await self.body(request)
        prompts = completion_prompts(body, self.engine.tokenizer)
        job = build_job(body, prompts, self.engine.context, self.engine.max_batch, chat=False)
        return await self.answer(request, job, chat=False)

    async def chat(self, request: Request) -> Response:
        body = await self.body(request)
        prompt = chat_prompt(body, self.engine.tokenizer)
        job = build_job(body, [prompt], self.engine.context, self.engine.max_batch, chat=True)
        return await self.answer(request, job, chat=True)

    async def answer(self, request: Request, job: Job, chat: bool) -> Response:
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name}
        if job.stream:
            events = _stream(self.engine, job, head, chat)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        submission = _Submission(self.engine, job)
        count = len(job.prompts) * job.n
        texts, reasons = [""] * count, [None] * count
        checked = time.monotonic()
        try:
            while submission.open:
                got = await submission.next(POLL_S)
                if time.monotonic() - checked >= POLL_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return Response(status_code=499)  # nobody reads it; slots freed below
                if got is None:
                    continue
                index, event = got
                if isinstance(event, ev.TextEvent):
                    texts[index] += event.text
                elif isinstance(event, ev.FinishEvent):
                    reasons[index] = event.reason
        finally:
            submission.cancel()
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": text},
                        "finish_reason": reasons[i], "logprobs": None}
                       for i, text in enumerate(texts)]
        else:
            choices = [{"index": i, "text": text, "finish_reason": reasons[i],
                        "logprobs": None} for i, text in enumerate(texts)]
        return JSONResponse({**head, "choices": choices, "usage": submission.usage})


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(engine: eng.Engine, job: Job, head: dict[str, Any],
                  chat: bool) -> AsyncIterator[str]:
    """The server-sent events of a streamed answer. The job goes to the engine when the
    response starts (not before: a client gone by then costs nothing), and a client that goes
    away cancels it."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    extra = {"usage": None} if job.include_usage else {}
    submission = _Submission(engine, job)

    def chunk(index: int, piece: dict[str, Any], reason: str | None = None) -> str:
        content = {"delta": piece} if chat else piece
        choice = {"index": index, **content, "logprobs": None, "finish_reason": reason}
        return _sse({**head, "choices": [choice], **extra})

    try:
        if chat:
            for index in range(len(job.prompts) * job.n):
                yield chunk(index, {"role": "assistant", "content": ""})
        while submission.open:
            got = await submission.next()
            assert got is not None  # no timeout: waits for the next event
            index, event = got
            if isinstance(event, ev.TextEvent):
                yield chunk(index, {"content": event.text} if chat else {"text": event.text})
            elif isinstance(event, ev.FinishEvent):
                yield chunk(index, {} if chat else {"text": ""}, event.reason)
        if job.include_usage:
            yield _sse({**head, "choices": [], "usage": submission.usage})
        yield "data: [DONE]\n\n"
    except APIError as exc:  # the status is sent already: the error goes in the stream
        yield _sse(exc.body())
    finally:
        submission.cancel()


def _error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, APIError):
        return JSONResponse(exc.body(), status_code=exc.status)
    if isinstance(exc, HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        error = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                         code=code)
        return JSONResponse(error.body(), status_code=exc.status_code)
    error = APIError(500, f"internal error: {type(exc).__name__}: {exc}")
    return JSONResponse(error.body(), status_code=500)


def create_app(engine: eng.Engine, model_name: str, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    """The ASGI app over a started `Engine`; `api_key` guards every /v1 route."""
    server = _Server(engine, model_name, api_key, max_body_bytes)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    routes = [
        Route("/", index),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        Route("/health", server.health),
        Route("/v1/models", server.models),
        Route("/v1/models/{model:path}", server.model),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
    ]
    handlers = {APIError: _error, HTTPException: _error, Exception: _error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.server = server
    return app
