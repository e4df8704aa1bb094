"""Serving benchmark: `tinylm serve` under 1, 4 and 16 concurrent streaming clients, side by side
with a batch-1 loop of tinylm's `generate` over the same prompts (serving them one at a time).

    .venv/bin/python bench/serve.py                         # small preset, 16 requests each
    .venv/bin/python bench/serve.py --max-tokens 32 --no-write

The model is the `small` preset with random-init weights (speed does not depend on what was
learned) and a BPE tokenizer of 8,192 tokens trained on tinyshakespeare, saved as a run. Each
request is a 64-token prompt of real text (sent as token ids, so both sides see the same ids),
greedy, `max_tokens` new tokens. Both sides count the tokens they really generated (the server's
usage records; a row may end early at an end token, the same row on both sides since greedy
decoding gives the same text, which is checked). The server runs as its own process
(`tinylm serve --device cpu`), the clients are asyncio tasks of httpx streams in this one: with
C clients, C requests are in flight at any time until all are answered. Throughput is generated
tokens over the wall time of all requests; time to first token (TTFT) is from a request's send
to its first streamed text. For the generate loop the TTFT of request k is what a queue served
one at a time gives it: the whole time of the k requests before it, plus its own prefill and
first token. The loop and the server's levels alternate, `--repeats` times; the table shows
medians, the ratios are repeat by repeat (their median and range), in wall time and in CPU
time (the server process's, against the loop's). Results go to the serve section of
bench/results.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
RESULTS = REPO / "bench" / "results.md"
START, END = "<!-- serve:start -->", "<!-- serve:end -->"
PROMPT_TOKENS = 64
NOTE = """Continuous batching turns the per-step cost of streaming the weights from memory, \
which a batch-1 loop pays for every token, into a cost shared by every active sequence: a \
step of 16 rows costs a few times a step of one row on a CPU. The server also pays for HTTP, \
JSON chunks and per-row sampling, which the in-process loop does not. The machine is shared \
with other processes (see the load averages): absolute numbers move with their load, the \
ratios less so."""


def build_run(directory: Path, preset: str) -> Path:
    """A run of `preset` with random weights and a BPE tokenizer trained on tinyshakespeare."""
    from tinylm.config import find_preset, read_yaml
    from tinylm.model import ModelConfig, Transformer
    from tinylm.run import save_run
    from tinylm.tokenizer import Tokenizer

    tok = Tokenizer.train_files([SHAKESPEARE], 8192)
    model_keys = read_yaml(find_preset(preset))["model"]
    config = ModelConfig(**{**model_keys, "vocab_size": tok.vocab_size})
    torch.manual_seed(0)
    run = directory / preset
    run.mkdir(parents=True)
    save_run(run, Transformer(config).eval(), tok, {"stage": "bench"})
    return run


def prompt_ids(run: Path, n: int) -> list[list[int]]:
    """n different prompts of PROMPT_TOKENS token ids each, from tinyshakespeare."""
    from tinylm.tokenizer import Tokenizer

    tok = Tokenizer.load(run / "tokenizer.json")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    return [tok.encode(text[2000 * i : 2000 * i + 1000])[:PROMPT_TOKENS] for i in range(n)]


def generate_loop(loaded: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """The batch-1 baseline: `generate` on each prompt in turn, on the run as `tinylm generate`
    loads it (`load_for_generation`)."""
    from tinylm.generate import SamplingConfig, generate

    config = SamplingConfig(max_tokens, temperature=0)
    generate(loaded.model, loaded.tokenizer, prompts[:1], config)  # warm-up
    texts, tokens, ttft, clock = [], 0, [], 0.0
    cpu = time.process_time()
    start = time.perf_counter()
    for ids in prompts:
        began = time.perf_counter()
        (gen,) = generate(loaded.model, loaded.tokenizer, [ids], config)
        first_token = gen.prefill_s + (gen.decode_s / max(gen.n_tokens, 1))
        ttft.append(clock + first_token)  # it waited for every request before it
        clock += time.perf_counter() - began
        texts.append(gen.text)
        tokens += gen.n_tokens
    wall = time.perf_counter() - start
    return {"texts": texts, "tokens": tokens, "wall_s": wall, "ttft": ttft,
            "cpu_s": time.process_time() - cpu}


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(run: Path, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    """`tinylm serve` on a free port, as its own process; returns it and its URL."""
    command = [sys.executable, "-m", "tinylm", "serve", "--model", str(run), "--port", "0",
               "--device", "cpu", "--max-batch", str(max_batch), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # torch's intra-op thread count
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    line = server.stdout.readline() if server.stdout else ""
    if not line:
        raise SystemExit(f"tinylm serve did not start (exit {server.wait()})")
    return server, json.loads(line)["url"]


async def one_request(client: Any, url: str, ids: list[int], max_tokens: int) -> dict[str, Any]:
    body = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first, text, usage = None, "", None
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                if choice["text"] and first is None:
                    first = time.perf_counter() - sent
                text += choice["text"]
    return {"text": text, "tokens": usage["completion_tokens"], "ttft": first or 0.0}


async def load_test(url: str, pid: int, prompts: list[list[int]], max_tokens: int,
                    clients: int) -> dict[str, Any]:
    """All prompts through the server (process `pid`), `clients` requests in flight at a
    time; `cpu_s` is the server process's CPU time over them."""
    import httpx

    gate = asyncio.Semaphore(clients)
    limits = httpx.Limits(max_connections=clients)

    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def limited(ids: list[int]) -> dict[str, Any]:
            async with gate:
                return await one_request(client, url, ids, max_tokens)

        await one_request(client, url, prompts[0], 4)  # warm-up
        cpu = process_cpu_s(pid)
        start = time.perf_counter()
        results = await asyncio.gather(*(limited(ids) for ids in prompts))
        wall = time.perf_counter() - start
    return {"texts": [r["text"] for r in results], "tokens": sum(r["tokens"] for r in results),
            "wall_s": wall, "ttft": [r["ttft"] for r in results],
            "cpu_s": process_cpu_s(pid) - cpu}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def rate(result: dict[str, Any], per: str = "wall_s") -> float:
    """Generated tokens per second of wall time (or of CPU time: per="cpu_s")."""
    return result["tokens"] / max(result[per], 1e-9)


def row(name: str, clients: int, repeats: list[dict[str, Any]], reference: list[str]) -> str:
    """A table row: medians over the repeats."""
    def median(f: Any) -> float:
        return statistics.median(f(r) for r in repeats)

    same = sum(a == b for r in repeats for a, b in zip(r["texts"], reference, strict=True))
    n = sum(len(r["texts"]) for r in repeats)
    return (f"| {name} | {clients} | {len(repeats[0]['ttft'])} | {repeats[0]['tokens']} | "
            f"{median(lambda r: r['wall_s']):.2f} | {median(rate):.1f} | "
            f"{median(lambda r: rate(r, 'cpu_s')):.1f} | "
            f"{1000 * median(lambda r: statistics.median(r['ttft'])):.0f} | "
            f"{1000 * median(lambda r: percentile(r['ttft'], 0.95)):.0f} | {same}/{n} |")


def paired(top: list[dict[str, Any]], base: list[dict[str, Any]], per: str) -> str:
    """Median, and range, of the repeat-by-repeat ratios of two rates."""
    ratios = sorted(rate(a, per) / rate(b, per) for a, b in zip(top, base, strict=True))
    return (f"**{statistics.median(ratios):.2f}x** (repeats {ratios[0]:.2f}x to "
            f"{ratios[-1]:.2f}x)")


def load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def write_results(section: str) -> None:
    """Replace (or add) the serve section of bench/results.md."""
    block = f"## serve\n\n{START}\n{section.rstrip()}\n{END}\n"
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.is_file() else "# Benchmarks\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        text = head.rsplit("## serve", 1)[0] + block + tail.lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    RESULTS.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on both sides (0: torch's default, one per core)")
    parser.add_argument("--no-write", action="store_true", help="do not update results.md")
    args = parser.parse_args()
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    levels = [int(c) for c in args.clients.split(",")]
    load_before = load_average()
    base: list[dict[str, Any]] = []
    served: dict[int, list[dict[str, Any]]] = {c: [] for c in levels}
    with tempfile.TemporaryDirectory() as tmp:
        from tinylm.generate import load_for_generation

        run = build_run(Path(tmp), args.preset)
        prompts = prompt_ids(run, args.requests)
        loaded = load_for_generation(run, "cpu")
        server, url = start_server(run, max(levels), threads)
        try:  # the two sides alternate, so that the machine's load falls on both alike
            for repeat in range(args.repeats):
                base.append(generate_loop(loaded, prompts, args.max_tokens))
                print(f"repeat {repeat + 1}: generate loop {rate(base[-1]):.1f} tok/s",
                      flush=True)
                for clients in levels:
                    served[clients].append(asyncio.run(load_test(
                        url, server.pid, prompts, args.max_tokens, clients)))
                    print(f"repeat {repeat + 1}: {clients} clients "
                          f"{rate(served[clients][-1]):.1f} tok/s", flush=True)
        finally:
            server.terminate()
            server.wait()
    reference = base[0]["texts"]
    rows = [row("generate, one at a time", 1, base, reference)]
    rows += [row("tinylm serve", c, served[c], reference) for c in levels]
    top, one = max(levels), min(levels)
    command = "`.venv/bin/python bench/serve.py" + "".join(
        f" {a}" for a in sys.argv[1:]) + "`"
    section = "\n".join([
        f"{command} on {datetime.date.today()}, CPU only, float32, `{args.preset}` preset "
        f"(random weights, BPE vocab 8192), {PROMPT_TOKENS}-token prompts, greedy, "
        f"max_tokens {args.max_tokens}, {args.requests} requests per row, {threads} torch "
        f"thread{'s' if threads > 1 else ''} on each side, median of {args.repeats} repeats "
        "(the generate loop and the server levels alternate).",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"load average (1, 5, 15 min) {load_before} before, {load_average()} after.",
        "",
        "| mode | clients | requests | tokens | wall s | tokens/s | tokens per CPU-s "
        "| TTFT p50 ms | TTFT p95 ms | same text as generate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"- {top} clients: {paired(served[top], base, 'wall_s')} the tokens/s of the generate "
        f"loop serving them one at a time (target 4x); {paired(served[top], served[one], 'wall_s')}"
        f" the server's own rate with {one} client.",
        f"- per CPU-second (the server process's CPU time against the loop's; other processes' "
        f"load disturbs it less): {paired(served[top], base, 'cpu_s')} at {top} clients.",
        "",
        NOTE,
    ])
    print(section)
    if not args.no_write:
        write_results(section)
        print(f"wrote the serve section of {RESULTS}")


if __name__ == "__main__":
    main()
