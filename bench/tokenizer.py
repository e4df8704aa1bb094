"""Tokenizer benchmark: tinylm vs Hugging Face `tokenizers` and `tiktoken`, in one run.

    .venv/bin/python bench/tokenizer.py            # ~30 MB corpus, vocab 32,768
    .venv/bin/python bench/tokenizer.py --mb 10 --no-write

The corpus is real text every machine has: the .py sources and text files of Python's standard
library, plus ../shared/data/tinyshakespeare.txt when present. Every 50th document is held out.
Measured: training time (tinylm vs `tokenizers.BpeTrainer`, same regex, byte-level), encoding
speed on one thread and on all cores (vs tiktoken built from tinylm's merges and vs
`tokenizers` loading tinylm's file), identical ids, and bytes/token on the held-out text.
Results go to bench/results.md (the tokenizer section) with the command, date and machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import resource
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
RESULTS = REPO / "bench" / "results.md"
START, END = "<!-- tokenizer:start -->", "<!-- tokenizer:end -->"
TEXT_SUFFIXES = (".py", ".txt", ".rst", ".md", ".decTest")


def assemble_corpus(target_bytes: int) -> list[str]:
    """Documents (one per file) until `target_bytes`: tinyshakespeare, then the stdlib's files."""
    docs: list[str] = []
    total = 0
    paths = [SHAKESPEARE] if SHAKESPEARE.is_file() else []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths += sorted(
        p
        for p in stdlib.rglob("*")
        if p.suffix in TEXT_SUFFIXES and "site-packages" not in p.parts and p.is_file()
    )
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text or "\0" in text:
            continue
        docs.append(text)
        total += len(text.encode("utf-8"))
        if total >= target_bytes:
            break
    if total < target_bytes:
        sys.exit(f"only {total / 1e6:.1f} MB of text found; lower --mb")
    return docs


class Timing(NamedTuple):
    """Wall seconds, and CPU seconds of this process's threads and its finished children."""

    wall: float
    cpu: float

    def __str__(self) -> str:
        return f"{self.wall:.2f} s ({self.cpu:.2f} s CPU)"


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def best_of(repeats: int, fn: Callable[[], Any]) -> tuple[Timing, Any]:
    """The timing of the fastest (by wall time) of `repeats` runs, and the last result."""
    best, result = Timing(float("inf"), float("inf")), None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), _cpu_seconds()
        result = fn()
        timing = Timing(time.perf_counter() - wall, _cpu_seconds() - cpu)
        best = min(best, timing)
    return best, result


def hf_train(docs: list[str], vocab_size: int, pattern: str, specials: list[str]):
    """Hugging Face tokenizers' BpeTrainer with the same split regex, byte-level."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def machine() -> str:
    """CPU model, cores, Python and library versions, load when the bench started."""
    import tiktoken
    import tokenizers

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}, "
        f"tokenizers {tokenizers.__version__}, tiktoken {tiktoken.__version__}; "
        f"load average {load:.1f} at start"
    )


def write_results(section: str) -> None:
    """Replace the tokenizer section of bench/results.md (create the file if needed)."""
    block = f"{START}\n{section.rstrip()}\n{END}"
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.is_file() else "# Benchmark results\n"
    if START in text and END in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=30.0, help="corpus size in MB (default 30)")
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--encode-mb", type=float, default=10.0, help="MB of text to encode")
    parser.add_argument("--repeats", type=int, default=2, help="runs per timing (best is kept)")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/results.md")
    args = parser.parse_args()

    import tokenizers

    from tinylm.chat import DEFAULT_SPECIAL_TOKENS
    from tinylm.tokenizer import Tokenizer
    from tinylm.tokenizer.parallel import available_cpus
    from tinylm.tokenizer.pretokenize import GPT4_PATTERN, native
    from tinylm.tokenizer.training import train_from_texts

    about = machine()
    cores = available_cpus()
    docs = assemble_corpus(int(args.mb * 1e6))
    train_docs = [d for i, d in enumerate(docs) if i % 50 != 49]
    held_out = [d for i, d in enumerate(docs) if i % 50 == 49]
    nbytes = sum(len(d.encode("utf-8")) for d in train_docs)
    specials = list(DEFAULT_SPECIAL_TOKENS)
    print(
        f"corpus: {len(docs)} documents; training on {nbytes / 1e6:.1f} MB, "
        f"{len(held_out)} held out; C accelerator: {native() is not None}",
        flush=True,
    )

    t_hf, hf = best_of(
        args.repeats, lambda: hf_train(train_docs, args.vocab_size, GPT4_PATTERN, specials)
    )
    t_ours, result = best_of(
        args.repeats, lambda: train_from_texts(train_docs, args.vocab_size, "gpt4", specials)
    )
    ours = result.tokenizer
    print(f"train: tinylm {t_ours}, tokenizers {t_hf}", flush=True)

    sample, size = [], 0
    for doc in train_docs:
        sample.append(doc)
        size += len(doc.encode("utf-8"))
        if size >= args.encode_mb * 1e6:
            break
    mb = size / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        hf_ours = tokenizers.Tokenizer.from_file(str(ours.save(tmp)))
    enc = ours.to_tiktoken()

    def fresh() -> Tokenizer:
        """The same tokenizer with a cold cache, for every timed run."""
        return Tokenizer.from_merges(ours.merges, ours.pattern, specials)

    def encode_one_by_one() -> list[list[int]]:
        tok = fresh()
        return [tok.encode(d) for d in sample]

    t_enc1, ids_ours = best_of(args.repeats, encode_one_by_one)
    t_encn, ids_batch = best_of(args.repeats, lambda: fresh().encode_batch(sample))
    t_tik1, ids_tik = best_of(args.repeats, lambda: [enc.encode_ordinary(d) for d in sample])
    t_tikn, _ = best_of(args.repeats, lambda: enc.encode_ordinary_batch(sample, num_threads=cores))
    t_hf1, hf_ids = best_of(
        args.repeats, lambda: [hf_ours.encode(d, add_special_tokens=False).ids for d in sample]
    )
    t_hfn, _ = best_of(
        args.repeats,
        lambda: [e.ids for e in hf_ours.encode_batch(sample, add_special_tokens=False)],
    )
    all_special = [ours.encode(d, allowed_special="all") for d in sample]
    same_tik = ids_ours == ids_tik == ids_batch
    same_hf = all_special == hf_ids

    held_bytes = sum(len(d.encode("utf-8")) for d in held_out)
    bpt_ours = held_bytes / sum(len(ours.encode(d)) for d in held_out)
    hf_tokens = sum(len(hf.encode(d, add_special_tokens=False).ids) for d in held_out)
    bpt_hf = held_bytes / hf_tokens

    def speed(t: Timing) -> str:
        return f"{mb / t.wall:.1f} ({mb / t.cpu:.1f})"

    def faster(ours_t: Timing, peer_t: Timing) -> tuple[str, str]:
        return f"{peer_t.wall / ours_t.wall:.2f}x", f"{peer_t.cpu / ours_t.cpu:.2f}x"

    vocab = "32k" if args.vocab_size == 32768 else f"{args.vocab_size:,}"
    rows = [
        (
            f"train {vocab} vocab, s",
            f"{t_ours.wall:.2f} ({t_ours.cpu:.2f})",
            f"tokenizers {t_hf.wall:.2f} ({t_hf.cpu:.2f})",
            f"{t_ours.wall / t_hf.wall:.2f}x time",
            f"{t_ours.cpu / t_hf.cpu:.2f}x time",
            "<= 2x time",
        ),
        (
            "encode 1 thread, MB/s",
            speed(t_enc1),
            f"tiktoken {speed(t_tik1)}",
            *faster(t_enc1, t_tik1),
            ">= 0.5x",
        ),
        (
            "encode 1 thread, MB/s",
            speed(t_enc1),
            f"tokenizers {speed(t_hf1)}",
            *faster(t_enc1, t_hf1),
            "",
        ),
        (
            f"encode {cores} cores, MB/s",
            speed(t_encn),
            f"tiktoken 1 thread {speed(t_tik1)}",
            f"{t_tik1.wall / t_encn.wall:.2f}x",
            "",
            ">= 1x",
        ),
        (
            f"encode {cores} cores, MB/s",
            speed(t_encn),
            f"tiktoken {cores} threads {speed(t_tikn)}",
            *faster(t_encn, t_tikn),
            "",
        ),
        (
            f"encode {cores} cores, MB/s",
            speed(t_encn),
            f"tokenizers {speed(t_hfn)}",
            *faster(t_encn, t_hfn),
            "",
        ),
        (
            "held-out bytes/token",
            f"{bpt_ours:.3f}",
            f"tokenizers {bpt_hf:.3f}",
            f"{bpt_ours / bpt_hf:.3f}x",
            "",
            ">= 1x",
        ),
    ]
    table = [
        "| measure: wall (CPU) | tinylm | peer | ratio, wall | ratio, CPU | target |",
        "|---|---|---|---|---|---|",
    ]
    table += [f"| {' | '.join(r)} |" for r in rows]
    command = "python bench/tokenizer.py" + ("".join(f" {a}" for a in sys.argv[1:]))
    section = "\n".join(
        [
            "## Tokenizer",
            "",
            f"`{command}` on {datetime.date.today().isoformat()}; {about}.",
            f"Corpus: {len(docs)} documents (tinyshakespeare + Python {platform.python_version()} "
            f"stdlib sources and text files), {nbytes / 1e6:.1f} MB trained on, "
            f"{held_bytes / 1e6:.2f} MB held out (every 50th document). Encoding: {mb:.1f} MB, "
            f"{len(sample)} documents, cold cache. Best of {args.repeats} runs by wall time; "
            "in brackets the CPU seconds of all threads and processes (MB per CPU-second for "
            "speeds), which a shared machine disturbs less. Speed ratios > 1 favour tinylm; the "
            "training ratio is tinylm's time / tokenizers' time.",
            "",
            *table,
            "",
            f"tinylm's training: {result.count_seconds:.2f} s counting "
            f"{result.unique_chunks:,} unique chunks, "
            f"{result.merge_seconds:.2f} s for {len(ours.merges):,} merges (last run). "
            f"Identical ids: tinylm = tiktoken (from tinylm's merges) on every document: "
            f"{same_tik}; tinylm = tokenizers loading tinylm's tokenizer.json: {same_hf}.",
        ]
    )
    print(section)
    if not (same_tik and same_hf):
        sys.exit("ids differ between tinylm and a peer")
    if not args.no_write:
        write_results(section)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
