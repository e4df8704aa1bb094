"""Generation benchmark: tinylm's KV-cached decoding, and `transformers`' generate on the same
weights, in one run on the same machine.

    .venv/bin/python bench/generate.py                  # small + gpt2-124m, batch 1 and 8
    .venv/bin/python bench/generate.py --presets small --new-tokens 32 --no-write

Random-init weights (speed does not depend on what was learned), float32, greedy, a 64-token
prompt of real text, no stop tokens so every row decodes the same number of steps. The model is
prepared as `tinylm generate` loads it (`pack_weights`, timed once apart, like a load). Prefill
(the prompt's one forward) and decode (one token per step) are timed apart; decode tokens/s
counts every row of the batch. At batch 1 the same weights run through `transformers`
(`AutoModelForCausalLM` built from tinylm's export config, `generate(do_sample=False)` with its
default cache), the tokens are checked equal, and the ratio of the median end-to-end times is
printed (target: tinylm >= 1.5x), with the spread of the repeat-by-repeat ratios and the ratio
of median CPU times (process time, which other processes on a shared machine disturb less).
Each setting runs `--repeats` times after a warm-up, the two libraries alternating, so that the
machine's load falls on both alike; the whole runs once per `--threads` count (default: one
thread per core, torch's default, then one thread). CPU time is the process's, all threads
together. Results go to the generate section of bench/results.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
RESULTS = REPO / "bench" / "results.md"
START, END = "<!-- generate:start -->", "<!-- generate:end -->"
PROMPT_TOKENS = 64
NOTE = """At batch 1 on a CPU a decode step of either library mostly streams the weights from \
memory (gpt2-124m: 500 MB a token in float32). tinylm's step is the bare forward with a \
preallocated cache, over weights `pack_weights` stored input-major (q|k|v and gate|up fused), \
which lets `model.linear` split each product over the threads (torch runs a one-row product on \
one thread); transformers runs nn.Linear's layout on one thread and adds its cache objects, mask \
building and logits processors. With one thread only the layout and the leaner step remain. \
The machine is shared: ratios move with other processes' load (memory bandwidth is shared too); \
the spread of the repeat-by-repeat ratios shows how much."""


def prompt_texts(n: int) -> list[str]:
    """n different 64-byte prompts of real text (ASCII, so one byte is one token)."""
    text = SHAKESPEARE.read_text(encoding="utf-8") if SHAKESPEARE.is_file() else (
        "The quick brown fox jumps over the lazy dog. " * 400)
    return [text[1000 * i : 1000 * i + PROMPT_TOKENS] for i in range(n)]


class FullVocab:
    """A stand-in tokenizer over the model's whole vocabulary: ids below 256 are bytes, the rest
    print nothing. Random weights may pick any id; a trained run's tokenizer likewise covers its
    model's vocabulary, so neither library is asked to suppress ids. No end-of-text token, so
    every row runs to full length."""

    special_tokens: dict[str, int] = {}

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def token_bytes(self, token: int) -> bytes:
        return bytes([token]) if token < 256 else b""

    def decode(self, ids: list[int]) -> str:
        return b"".join(map(self.token_bytes, ids)).decode("utf-8", errors="replace")


def build(preset: str) -> Any:
    from tinylm.config import find_preset, read_yaml
    from tinylm.model import ModelConfig, Transformer

    torch.manual_seed(0)
    config = ModelConfig(**read_yaml(find_preset(preset))["model"])
    return Transformer(config).eval()


def tinylm_runner(model: Any, tok: Any, batch: int, new_tokens: int) -> Callable[[], dict]:
    """A function that generates once (greedy, `batch` prompts) and returns its timings."""
    from tinylm.generate import SamplingConfig, generate

    ids = [tok.encode(t) for t in prompt_texts(batch)]
    config = SamplingConfig(max_new_tokens=new_tokens, temperature=0)
    generate(model, tok, ids, SamplingConfig(max_new_tokens=4, temperature=0), batch_size=batch)

    def run() -> dict:
        start, cpu = time.perf_counter(), time.process_time()
        out = generate(model, tok, ids, config, batch_size=batch)
        total, cpu = time.perf_counter() - start, time.process_time() - cpu
        assert all(g.n_tokens == new_tokens for g in out)
        return {"total_s": total, "cpu_s": cpu, "prefill_s": out[0].prefill_s,
                "decode_s": out[0].decode_s, "tokens": out[0].token_ids}

    return run


def transformers_runner(model: Any, tok: Any, new_tokens: int) -> Callable[[], dict]:
    """The same weights in `transformers`; a function that runs its greedy `generate` once."""
    import transformers

    from tinylm.interop.hf_config import to_hf_config
    from tinylm.interop.hf_weights import to_hf_state

    transformers.logging.set_verbosity_error()
    cfg = to_hf_config(model.config, eot_id=None)
    hf_config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state(model.state_dict(), model.config),
                                             strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    if model.config.tie_embeddings:
        hf.tie_weights()
    ids = torch.tensor([tok.encode(prompt_texts(1)[0])])
    kwargs = {"attention_mask": torch.ones_like(ids), "do_sample": False, "pad_token_id": 0,
              "eos_token_id": None}
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=4, **kwargs)

    def run() -> dict:
        with torch.inference_mode():
            start, cpu = time.perf_counter(), time.process_time()
            out = hf.generate(ids, max_new_tokens=new_tokens, **kwargs)
            total, cpu = time.perf_counter() - start, time.process_time() - cpu
        return {"total_s": total, "cpu_s": cpu, "tokens": out[0, ids.shape[1]:].tolist()}

    return run


def median_run(runs: list[dict], key: str = "total_s") -> dict:
    """The run of median `key` (the upper middle one for an even count)."""
    return sorted(runs, key=lambda r: r[key])[len(runs) // 2]


def compare(preset: str, new_tokens: int, ours: list[dict], theirs: list[dict]) -> str:
    """One line: median wall-clock times and their ratio, the spread of the per-repeat ratios,
    the ratio of median CPU times (less disturbed by other processes), same tokens or not."""
    mine, hf = median_run(ours), median_run(theirs)
    paired = sorted(h["total_s"] / o["total_s"] for o, h in zip(ours, theirs, strict=True))
    cpu = median_run(theirs, "cpu_s")["cpu_s"] / median_run(ours, "cpu_s")["cpu_s"]
    same = all(h["tokens"] == mine["tokens"] for h in theirs)
    return (f"- {preset}, batch 1, {new_tokens} new tokens: transformers generate "
            f"{hf['total_s']:.2f} s, tinylm {mine['total_s']:.2f} s: tinylm "
            f"**{hf['total_s'] / mine['total_s']:.2f}x** as fast (repeat by repeat "
            f"{paired[0]:.2f}x to {paired[-1]:.2f}x; CPU time {cpu:.2f}x; "
            f"{'same tokens' if same else 'DIFFERENT tokens'}; target 1.5x)")


def load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def write_results(section: str) -> None:
    """Replace (or add) the generate section of bench/results.md."""
    block = f"## generate\n\n{START}\n{section.rstrip()}\n{END}\n"
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.is_file() else "# Benchmarks\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        text = head.rsplit("## generate", 1)[0] + block + tail.lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    RESULTS.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="small,gpt2-124m")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", default="0,1",
                        help="torch CPU thread counts to run, 0 = one per core (torch's default)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    parser.add_argument("--no-write", action="store_true", help="do not update results.md")
    args = parser.parse_args()

    from tinylm.model import pack_weights, param_breakdown

    load_before = load_average()
    rows = ["| preset | params | threads | batch | prefill (64 tok) ms | decode tok/s (all rows) | "
            "end-to-end s |", "|---|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for threads in (int(t) or os.cpu_count() or 1 for t in args.threads.split(",")):
        torch.set_num_threads(threads)  # before packing: the layout depends on it
        for preset in args.presets.split(","):
            model = build(preset)
            tok = FullVocab(model.config.vocab_size)
            params = param_breakdown(model.config)["total"]
            theirs = None if args.no_hf else transformers_runner(model, tok, args.new_tokens)
            start = time.perf_counter()
            pack_weights(model)
            notes.append(f"- {preset}, {threads} threads: `pack_weights` (once, at load) "
                         f"{1000 * (time.perf_counter() - start):.0f} ms")
            for batch in (int(b) for b in args.batches.split(",")):
                ours = tinylm_runner(model, tok, batch, args.new_tokens)
                our_runs, their_runs = [], []
                for _ in range(args.repeats):  # alternate, so both see the same machine load
                    our_runs.append(ours())
                    if theirs is not None and batch == 1:
                        their_runs.append(theirs())
                r = median_run(our_runs)
                decode_tok_s = batch * args.new_tokens / r["decode_s"]
                line = (f"| {preset} | {params / 1e6:.1f}M | {threads} | {batch} | "
                        f"{1000 * r['prefill_s']:.1f} | {decode_tok_s:.1f} | {r['total_s']:.2f} |")
                rows.append(line)
                print(line, flush=True)
                if their_runs:
                    notes.append(compare(f"{preset}, {threads} threads", args.new_tokens,
                                         our_runs, their_runs))
                    print(notes[-1], flush=True)
            del model, theirs
    import transformers

    section = "\n".join([
        f"`.venv/bin/python bench/generate.py --presets {args.presets} --batches {args.batches} "
        f"--new-tokens {args.new_tokens} --threads {args.threads} --repeats {args.repeats}` on "
        f"{datetime.date.today()}, CPU only (no GPU lent), float32, greedy, random-init weights, "
        f"median of {args.repeats} (tinylm and transformers runs alternate).",
        f"Machine: {machine()}; load average (1, 5, 15 min) {load_before} before, "
        f"{load_average()} after; transformers {transformers.__version__}, "
        f"Python {sys.version.split()[0]}.",
        "",
        *rows,
        "",
        *notes,
        "",
        NOTE,
    ])
    if not args.no_write:
        write_results(section)
        print(f"wrote the generate section of {RESULTS}")


if __name__ == "__main__":
    main()
