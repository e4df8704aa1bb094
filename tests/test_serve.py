"""`tinylm serve`: per-row decoding in the model, the continuous-batching engine, and the
OpenAI-compatible HTTP API driven by the official `openai` client against a real server."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tinylm.cli  # noqa: F401  (registers the commands)
from tinylm.chat import encode_chat
from tinylm.cli.app import app
from tinylm.generate import SamplingConfig, generate, load_for_generation
from tinylm.model import KVCache, ModelConfig, Transformer
from tinylm.serve import ServerThread, bind, make_server
from tinylm.serve.engine import EngineStats
from tinylm.tokenizer import Tokenizer

try:  # the test extra (openai, httpx) and the serve extra (starlette, uvicorn)
    import httpx
    import openai
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError:
    httpx = openai = None
needs_server = pytest.mark.skipif(openai is None, reason="needs openai and httpx (test extra) "
                                  "and starlette and uvicorn (serve extra)")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_per_row_start_pos_equals_each_row_alone(family: str) -> None:
    """Rows of different lengths, each prefilled into its own cache row, then decoded in one
    forward with a position per row, give the logits of each sequence's own full forward."""
    torch.manual_seed(0)
    config = ModelConfig(family=family, vocab_size=50, n_layers=2, n_heads=4, d_model=32,
                         max_seq_len=32)
    model = Transformer(config).eval()
    seqs = [torch.randint(0, 50, (n,)) for n in (3, 9, 5)]
    cache = KVCache.allocate(config, 4, 32)
    cache.k.normal_()  # stale keys of an earlier occupant must be masked out
    cache.v.normal_()
    for b, seq in enumerate(seqs):
        model(seq[None, :-2], kv_cache=KVCache(cache.k[:, b : b + 1], cache.v[:, b : b + 1]))
    for step in (2, 1):  # two decode steps, every row at its own position
        ids = torch.stack([s[-step] for s in seqs])[:, None]
        pos = torch.tensor([len(s) - step for s in seqs])
        view = KVCache(cache.k[:, :3], cache.v[:, :3])
        logits = model(ids, kv_cache=view, start_pos=pos)[:, -1]
        for b, seq in enumerate(seqs):
            full = model(seq[None, : len(seq) - step + 1])[0, -1]
            torch.testing.assert_close(logits[b], full, atol=1e-5, rtol=0)


# --- a real server on 127.0.0.1, driven by the official openai client ----------------------

CONTEXT = 96
KEY = "sekrit"


def tiny_run(path: Path) -> Path:
    """A random 2-layer model with a bytes tokenizer (the chat tokens included). Its weight
    matrices are scaled up 10x so that attention depends on the content and logits lie far
    apart: outputs then differ from prompt to prompt, and greedy choices do not hang on float
    rounding."""
    from tinylm.run import save_run

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=259, n_layers=2, n_heads=4, d_model=32, max_seq_len=CONTEXT,
                         tie_embeddings=False)
    model = Transformer(config).eval()
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.mul_(10)
    path.mkdir(parents=True, exist_ok=True)
    save_run(path, model, Tokenizer.bytes_only(), {"stage": "test"})
    return path


class Slowed:
    """The engine's model with a pause before each forward, so that a test can act while a
    request is still being decoded (a tiny model finishes in milliseconds otherwise)."""

    def __init__(self, model: torch.nn.Module, pause_s: float) -> None:
        self.model, self.pause_s = model, pause_s

    def __call__(self, *args, **kw):
        time.sleep(self.pause_s)
        return self.model(*args, **kw)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """One engine behind two servers: an open one and one that wants the key KEY."""
    from tinylm.serve.api import create_app

    run_dir = tiny_run(tmp_path_factory.mktemp("serve") / "tiny")
    engine, open_app = make_server(run_dir, "cpu", max_batch=8)
    keyed_app = create_app(engine, run_dir.name, api_key=KEY)
    with ServerThread(open_app, bind("127.0.0.1", 0)) as server, \
            ServerThread(keyed_app, bind("127.0.0.1", 0)) as keyed:
        yield {"run": run_dir, "engine": engine, "url": server.url, "keyed_url": keyed.url,
               "model": run_dir.name}
    engine.stop()


def client(served: dict, key: str = "none", url: str = "url") -> openai.OpenAI:
    return openai.OpenAI(base_url=served[url] + "/v1", api_key=key, max_retries=0, timeout=60)


def cli_generate(run_dir: Path, *args: str) -> str:
    result = CliRunner().invoke(app, ["generate", "-m", str(run_dir), "--device", "cpu",
                                      "-t", "0", *args])
    assert result.exit_code == 0, result.output
    return result.stdout.removesuffix("\n")


@needs_server
def test_models_and_health(served: dict) -> None:
    models = client(served).models.list().data
    assert [m.id for m in models] == [served["model"]]
    health = httpx.get(served["url"] + "/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 8


@needs_server
def test_greedy_chat_and_completion_equal_tinylm_generate(served: dict) -> None:
    c, tok = client(served), Tokenizer.bytes_only()
    chat = c.chat.completions.create(model=served["model"], temperature=0, max_tokens=20,
                                     messages=[{"role": "user", "content": "Hello there"}])
    text = chat.choices[0].message.content
    assert text == cli_generate(served["run"], "--chat", "Hello there", "-n", "20")
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    prompt_ids = encode_chat(tok, [{"role": "user", "content": "Hello there"}], True)
    assert chat.usage.prompt_tokens == len(prompt_ids)
    assert chat.usage.total_tokens == len(prompt_ids) + chat.usage.completion_tokens
    assert chat.choices[0].finish_reason in ("stop", "length")
    done = c.completions.create(model=served["model"], prompt="ROMEO:", temperature=0,
                                max_tokens=15)
    assert done.choices[0].text == cli_generate(served["run"], "ROMEO:", "-n", "15")
    assert done.object == "text_completion" and done.usage.prompt_tokens == 6


def sse_lines(response: httpx.Response) -> list[str]:
    return [line for line in response.iter_lines() if line]


@needs_server
def test_streamed_chat_equals_non_streamed_and_ends_with_done(served: dict) -> None:
    c = client(served)
    ask = {"model": served["model"], "temperature": 0, "max_tokens": 25,
           "messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Who are you?"}]}
    whole = c.chat.completions.create(**ask)
    chunks = list(c.chat.completions.create(**ask, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert reasons[-1] == whole.choices[0].finish_reason and not any(reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    with httpx.stream("POST", served["url"] + "/v1/chat/completions",
                      json={**ask, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = sse_lines(response)
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert "usage" not in json.loads(lines[-2][6:])  # no usage chunk unless asked for


@needs_server
def test_completions_stream_n_seed_and_stop(served: dict) -> None:
    c, tok = client(served), Tokenizer.bytes_only()
    ask = {"model": served["model"], "prompt": "To be", "max_tokens": 12, "n": 3,
           "temperature": 0.9, "top_p": 0.95, "seed": 7}
    first = c.completions.create(**ask)
    assert [ch.index for ch in first.choices] == [0, 1, 2]
    for i, choice in enumerate(first.choices):  # choice i draws from a generator seeded 7 + i
        (gen,) = generate(load_for_generation(served["run"], "cpu").model, tok,
                          [tok.encode("To be")], SamplingConfig(12, 0.9, 0, 0.95, seed=7 + i))
        assert choice.text == gen.text
    texts = [""] * 3
    for chunk in c.completions.create(**ask, stream=True):
        assert chunk.object == "text_completion"
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [ch.text for ch in first.choices]
    greedy = c.completions.create(model=served["model"], prompt="To be", max_tokens=12,
                                  temperature=0).choices[0].text
    stop = greedy[3:5]
    cut = c.completions.create(model=served["model"], prompt="To be", max_tokens=12,
                               temperature=0, stop=[stop, "\x00never"]).choices[0]
    assert cut.text == greedy[: greedy.index(stop)] and cut.finish_reason == "stop"


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@needs_server
def test_bad_requests_get_openai_errors_and_the_server_carries_on(served: dict) -> None:
    url, model, c = served["url"], served["model"], client(served)
    chat = url + "/v1/chat/completions"
    hi = [{"role": "user", "content": "hi"}]
    assert error_of(httpx.post(chat, content=b"{not json"), 400)["type"] == (
        "invalid_request_error")
    error_of(httpx.post(chat, json=[1, 2]), 400)
    with pytest.raises(openai.BadRequestError) as unknown:
        c.chat.completions.create(model="gpt-4", messages=hi)
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        c.completions.create(model=model, prompt="x" * CONTEXT, max_tokens=1)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as no_room:
        c.completions.create(model=model, prompt="x" * 50, max_tokens=50)
    assert no_room.value.code == "context_length_exceeded"
    for bad in ({"max_tokens": -1}, {"max_tokens": 0}, {"temperature": 5}, {"top_p": -0.5},
                {"n": 0}, {"n": 9}, {"stop": ""}, {"stop": ["a"] * 5}, {"seed": "x"},
                {"stream": "yes"}):
        param = error_of(httpx.post(chat, json={"messages": hi, **bad}), 400)["param"]
        assert param == next(iter(bad)), bad
    error_of(httpx.post(chat, json={"messages": []}), 400)
    error_of(httpx.post(chat, json={"messages": [{"role": "tool", "content": "x"}]}), 400)
    error_of(httpx.post(url + "/v1/completions", json={"prompt": [1, 999]}), 400)
    assert error_of(httpx.post(chat, content=b" " * (2 << 20)), 413)["code"] == (
        "request_too_large")
    error_of(httpx.get(url + "/v1/nowhere"), 404)
    error_of(httpx.get(chat), 405)
    # the key server: 401 without the key or with a wrong one, answers with it
    for key in ("none", "wrong"):
        with pytest.raises(openai.AuthenticationError):
            client(served, key, "keyed_url").models.list()
    keyed = served["keyed_url"] + "/v1/completions"
    assert error_of(httpx.post(keyed, json={"prompt": "a"}), 401)["code"] == "invalid_api_key"
    answer = client(served, KEY, "keyed_url").completions.create(model=model, prompt="a",
                                                                  max_tokens=3)
    assert answer.usage.prompt_tokens == 1
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["active"] == 0


class Failing:
    """The engine's model, raising on its next `calls` forwards (a bug, out of memory)."""

    def __init__(self, model: torch.nn.Module, calls: int) -> None:
        self.model, self.calls = model, calls

    def __call__(self, *args, **kw):
        if self.calls > 0:
            self.calls -= 1
            raise RuntimeError("simulated failure")
        return self.model(*args, **kw)


@needs_server
def test_a_failing_forward_fails_its_requests_not_the_server(served: dict) -> None:
    engine, url, c = served["engine"], served["url"], client(served)
    ask = {"model": served["model"], "prompt": "hi", "max_tokens": 5, "temperature": 0}
    engine.model = Failing(engine.model, 2)
    try:
        with pytest.raises(openai.InternalServerError, match="simulated failure"):
            c.completions.create(**ask)
        with httpx.stream("POST", url + "/v1/completions", json={**ask, "stream": True}) as r:
            lines = sse_lines(r)
        assert r.status_code == 200 and "simulated failure" in lines[-1]  # sent in the stream
    finally:
        engine.model = engine.model.model
    assert c.completions.create(**ask).usage.completion_tokens >= 1
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["active"] == 0 and health["requests_failed"] >= 2


def long_prompt(served: dict, max_tokens: int) -> str:
    """A prompt whose greedy continuation runs to max_tokens (no end token on the way)."""
    c = client(served)
    for word in ("Once", "Then", "alpha", "zeta", "Tomorrow", "Moreover", "q", "kk"):
        choice = c.completions.create(model=served["model"], prompt=word, temperature=0,
                                      max_tokens=max_tokens).choices[0]
        if choice.finish_reason == "length":
            return word
    pytest.fail("no prompt runs to max_tokens")


def wait_for(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@needs_server
def test_client_that_goes_away_frees_its_slot(served: dict) -> None:
    engine, url = served["engine"], served["url"]
    prompt = long_prompt(served, 60)
    engine.model = Slowed(engine.model, 0.05)  # 60 steps now take 3 s
    try:
        before = engine.stats.generated_tokens
        cancelled = engine.stats.requests_cancelled
        ask = {"prompt": prompt, "max_tokens": 60, "temperature": 0}
        with httpx.stream("POST", url + "/v1/completions", json={**ask, "stream": True}) as r:
            next(r.iter_lines())  # the first chunk came: it is being decoded; now hang up
        wait_for(lambda: engine.stats.requests_cancelled == cancelled + 1, "stream cancelled")
        wait_for(lambda: not engine.active, "slot freed")
        with pytest.raises(httpx.ReadTimeout):  # a non-streamed client that gives up
            httpx.post(url + "/v1/completions", json=ask, timeout=0.5)
        wait_for(lambda: engine.stats.requests_cancelled == cancelled + 2, "request cancelled")
        wait_for(lambda: not engine.active, "slot freed")
        assert engine.stats.generated_tokens - before < 2 * 60 - 20  # both stopped early
    finally:
        engine.model = engine.model.model
    assert httpx.get(url + "/health").json()["active"] == 0


@needs_server
def test_eight_concurrent_streamed_clients_are_batched_and_independent(served: dict) -> None:
    engine, tok = served["engine"], Tokenizer.bytes_only()
    model = load_for_generation(served["run"], "cpu").model
    questions = [f"Question {i}: {'why ' * i}?" for i in range(8)]
    settings = [SamplingConfig(16, temperature=0)] * 7 + [SamplingConfig(16, 0.8, 0, seed=3)]
    expected = []
    for q, config in zip(questions, settings, strict=True):  # each alone, batch 1
        ids = encode_chat(tok, [{"role": "user", "content": q}], True)
        expected.append(generate(model, tok, [ids], config)[0].text)
    assert len(set(expected)) == 8
    got: list[str | None] = [None] * 8
    barrier = threading.Barrier(8)

    def talk(i: int) -> None:
        extra = {"seed": 3, "temperature": 0.8} if i == 7 else {"temperature": 0}
        barrier.wait()
        stream = client(served).chat.completions.create(
            model=served["model"], messages=[{"role": "user", "content": questions[i]}],
            max_tokens=16, stream=True, **extra)
        got[i] = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)

    engine.stats = EngineStats()
    engine.model = Slowed(engine.model, 0.01)  # steps long enough for all eight to overlap
    try:
        threads = [threading.Thread(target=talk, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        engine.model = engine.model.model
    assert got == expected
    assert engine.stats.max_batch_seen > 1, engine.stats


@needs_server
def test_lora_run_serves_base_plus_adapter(tmp_path: Path) -> None:
    from tinylm.lora import LoraSettings, apply_lora
    from tinylm.run import load_run, save_adapter_run

    base = tiny_run(tmp_path / "base")
    peft_model = apply_lora(load_run(base).model, LoraSettings(enabled=True, rank=4,
                                                               dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():  # a trained adapter's B is not zero
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.5)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_adapter_run(adapter, peft_model, base, {"stage": "finetune"}, Tokenizer.bytes_only())
    engine, app = make_server(adapter, "cpu", max_batch=2)
    try:
        with ServerThread(app, bind("127.0.0.1", 0)) as server:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
            assert c.models.list().data[0].id == "adapter"
            text = c.completions.create(model="adapter", prompt="ROMEO:", temperature=0,
                                        max_tokens=15).choices[0].text
    finally:
        engine.stop()
    assert text == cli_generate(adapter, "ROMEO:", "-n", "15")
    assert text != cli_generate(base, "ROMEO:", "-n", "15")  # the adapter changes the answer


@needs_server
def test_serve_command_errors_are_one_line(served: dict, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["serve", "--help"])
    assert result.exit_code == 0 and "--api-key" in result.stdout and "Examples" in result.stdout
    taken = bind("127.0.0.1", 0)  # a port in use: refused before the model is loaded
    try:
        port = str(taken.getsockname()[1])
        result = runner.invoke(app, ["serve", "-m", str(served["run"]), "--port", port])
    finally:
        taken.close()
    assert result.exit_code == 2 and "cannot listen on 127.0.0.1" in result.stderr
    result = runner.invoke(app, ["serve", "-m", str(tmp_path / "nope"), "--port", "0"])
    assert result.exit_code == 2 and "nope" in result.stderr
    result = runner.invoke(app, ["serve", "-m", str(served["run"]), "--max-batch", "0",
                                 "--port", "0"])
    assert result.exit_code == 2 and "--max-batch" in result.stderr
