"""Tokenizer benchmark: tinylm vs Hugging Face `tokenizers` and `tiktoken`, in one run.

    .venv/bin/python bench/tokenizer.py            # ~30 MB corpus, vocab 32,768
    .venv/bin/python bench/tokenizer.py --mb 10 --no-write

The corpus is real text every machine has: the .py sources and text files of Python's standard
library, plus ../shared/data/tinyshakespeare.txt when present. Every 50th document is held out.
Measured: training time (tinylm vs `tokenizers.BpeTrainer`, same regex, byte-level), encoding
speed on one thread and on all cores (vs tiktoken built from tinylm's merges and vs
`tokenizers` loading tinylm's file), identical ids, and bytes/token (vs `tokenizers`' own
trained tokenizer), on three texts: part of the training text, held-out prose of another
kind (English man pages, roff requests stripped) and a multilingual sample (the translated
messages of the machine's gettext catalogs, /usr/share/locale); both read from the machine.
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


ROFF_ESCAPES = (  # roff escapes as what they print: a dash, nothing for font and size changes
    (re.compile(r"\\-"), "-"),
    (re.compile(r"\\f(\[[^]]*\]|\(..|.)|\\s[-+]?\d|\\\(..|\\[&|^%]"), ""),
    (re.compile(r"\\e"), "\\\\"),
)


def man_prose(target_bytes: int) -> list[str]:
    """English man pages (/usr/share/man/man*), one document each, with the roff requests
    (lines from '.' or "'") and font escapes taken out: prose of another kind than the
    training corpus (which has no man page), until `target_bytes`."""
    import gzip

    docs, total = [], 0
    for path in sorted(Path("/usr/share/man").glob("man[1-8]/*.gz")):
        try:
            raw = gzip.decompress(path.read_bytes()).decode("utf-8")
        except (OSError, EOFError, UnicodeDecodeError):
            continue
        lines = [ln for ln in raw.splitlines() if ln and ln[0] not in ".'"]
        text = "\n".join(lines)
        for pattern, replacement in ROFF_ESCAPES:
            text = pattern.sub(replacement, text)
        text = text.strip()
        if len(text) < 200:
            continue
        docs.append(text + "\n")
        total += len(docs[-1].encode("utf-8"))
        if total >= target_bytes:
            break
    return docs


def translations(target_bytes: int) -> list[str]:
    """A multilingual sample: the translated messages of the gettext catalogs under
    /usr/share/locale (one document per language, its catalogs' msgstr values joined), taken
    round-robin over the languages so that each adds about as much, until `target_bytes`."""
    import gettext

    by_language: dict[str, list[str]] = {}
    for path in sorted(Path("/usr/share/locale").glob("*/LC_MESSAGES/*.mo")):
        try:
            with path.open("rb") as f:
                catalog = gettext.GNUTranslations(f)._catalog  # type: ignore[attr-defined]
        except (OSError, UnicodeDecodeError, ValueError, IndexError):  # a malformed catalog
            continue
        messages = [v for k, v in catalog.items() if k and isinstance(v, str) and v != k]
        by_language.setdefault(path.parts[4], []).extend(messages)
    by_language = {k: list(dict.fromkeys(v)) for k, v in by_language.items()}  # no repeats
    docs = {lang: [] for lang in by_language}
    total, at = 0, dict.fromkeys(by_language, 0)
    while total < target_bytes and any(at[k] < len(v) for k, v in by_language.items()):
        for lang, messages in by_language.items():
            for message in messages[at[lang] : at[lang] + 20]:
                docs[lang].append(message)
                total += len(message.encode("utf-8")) + 1
            at[lang] += 20
    return ["\n".join(lines) + "\n" for lines in docs.values() if lines]


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


class Measured(NamedTuple):
    """One text's table rows, its size and whether every peer gave tinylm's ids."""

    rows: list[tuple[str, ...]]
    mb: float
    same_tiktoken: bool
    same_tokenizers: bool


class Peers(NamedTuple):
    """tinylm's trained tokenizer and its peers: tokenizers loading tinylm's file
    (`hf_ours`), tokenizers' own trained tokenizer (`hf_own`, for bytes/token), tiktoken
    built from tinylm's merges."""

    ours: Any
    hf_ours: Any
    hf_own: Any
    tiktoken: Any
    specials: list[str]
    cores: int
    repeats: int

    def measure(self, kind: str, docs: list[str]) -> Measured:
        """Encoding speed on one thread and on all cores, and bytes/token, on `docs`."""
        from tinylm.tokenizer import Tokenizer

        ours, enc, hf = self.ours, self.tiktoken, self.hf_ours
        mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6

        def fresh() -> Tokenizer:
            """The same tokenizer with a cold cache, for every timed run."""
            return Tokenizer.from_merges(ours.merges, ours.pattern, self.specials)

        def one_by_one() -> list[list[int]]:
            tok = fresh()
            return [tok.encode(d) for d in docs]

        n = self.repeats
        t1, ids_ours = best_of(n, one_by_one)
        tn, ids_batch = best_of(n, lambda: fresh().encode_batch(docs))
        tik1, ids_tik = best_of(n, lambda: [enc.encode_ordinary(d) for d in docs])
        tikn, _ = best_of(n, lambda: enc.encode_ordinary_batch(docs, num_threads=self.cores))
        hf1, hf_ids = best_of(n, lambda: [hf.encode(d, add_special_tokens=False).ids
                                          for d in docs])
        hfn, _ = best_of(n, lambda: [e.ids for e in hf.encode_batch(docs,
                                                                    add_special_tokens=False)])
        all_special = [ours.encode(d, allowed_special="all") for d in docs]
        nbytes = mb * 1e6
        own = sum(len(self.hf_own.encode(d, add_special_tokens=False).ids) for d in docs)
        bpt_ours, bpt_hf = nbytes / sum(map(len, ids_ours)), nbytes / own

        def speed(t: Timing) -> str:
            return f"{mb / t.wall:.1f} ({mb / t.cpu:.1f})"

        def faster(ours_t: Timing, peer_t: Timing) -> tuple[str, str]:
            return f"{peer_t.wall / ours_t.wall:.2f}x", f"{peer_t.cpu / ours_t.cpu:.2f}x"

        cores = self.cores
        rows = [
            ("encode 1 thread, MB/s", kind, speed(t1), f"tiktoken {speed(tik1)}",
             *faster(t1, tik1), ">= 0.5x"),
            ("encode 1 thread, MB/s", kind, speed(t1), f"tokenizers {speed(hf1)}",
             *faster(t1, hf1), ""),
            (f"encode {cores} cores, MB/s", kind, speed(tn), f"tiktoken 1 thread {speed(tik1)}",
             f"{tik1.wall / tn.wall:.2f}x", "", ">= 1x"),
            (f"encode {cores} cores, MB/s", kind, speed(tn),
             f"tiktoken {cores} threads {speed(tikn)}", *faster(tn, tikn), ""),
            (f"encode {cores} cores, MB/s", kind, speed(tn), f"tokenizers {speed(hfn)}",
             *faster(tn, hfn), ""),
            ("bytes/token", kind, f"{bpt_ours:.3f}", f"tokenizers' own {bpt_hf:.3f}",
             f"{bpt_ours / bpt_hf:.3f}x", "", ""),
        ]
        return Measured(rows, mb, ids_ours == ids_tik == ids_batch, all_special == hf_ids)


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
    parser.add_argument(
        "--held-out-mb", type=float, default=4.0, help="MB of each held-out kind of text"
    )
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
        args.repeats, lambda: train_from_texts(train_docs, args.vocab_size, "gpt4", specials,
                                               build=Tokenizer.from_merges)
    )
    ours = result.tokenizer
    print(f"train: tinylm {t_ours}, tokenizers {t_hf}", flush=True)

    sample, size = [], 0
    for doc in train_docs:
        sample.append(doc)
        size += len(doc.encode("utf-8"))
        if size >= args.encode_mb * 1e6:
            break
    with tempfile.TemporaryDirectory() as tmp:
        hf_ours = tokenizers.Tokenizer.from_file(str(ours.save(tmp)))
    peers = Peers(ours, hf_ours, hf, ours.to_tiktoken(), specials, cores, args.repeats)
    held_mb = args.held_out_mb * 1e6
    texts = [
        ("training text", sample),
        ("held-out prose (man pages)", man_prose(int(held_mb))),
        ("multilingual (gettext catalogs)", translations(int(held_mb))),
    ]
    rows = [
        (
            "train 32k vocab, s" if args.vocab_size == 32768 else f"train {args.vocab_size:,}",
            "",
            f"{t_ours.wall:.2f} ({t_ours.cpu:.2f})",
            f"tokenizers {t_hf.wall:.2f} ({t_hf.cpu:.2f})",
            f"{t_ours.wall / t_hf.wall:.2f}x time",
            f"{t_ours.cpu / t_hf.cpu:.2f}x time",
            "<= 2x time",
        )
    ]
    described, same = [], True
    for kind, docs_ in texts:
        if not docs_:
            described.append(f"{kind}: none found on this machine, skipped")
            continue
        measured = peers.measure(kind, docs_)
        rows += measured.rows
        same = same and measured.same_tiktoken and measured.same_tokenizers
        described.append(
            f"{kind}: {measured.mb:.2f} MB in {len(docs_)} documents, ids identical to "
            f"tiktoken {measured.same_tiktoken}, to tokenizers {measured.same_tokenizers}"
        )
    held_bytes = sum(len(d.encode("utf-8")) for d in held_out)
    bpt_ours = held_bytes / sum(len(ours.encode(d)) for d in held_out)
    bpt_hf = held_bytes / sum(len(hf.encode(d, add_special_tokens=False).ids) for d in held_out)
    rows.append(
        (
            "bytes/token",
            "held-out documents of the corpus",
            f"{bpt_ours:.3f}",
            f"tokenizers {bpt_hf:.3f}",
            f"{bpt_ours / bpt_hf:.3f}x",
            "",
            ">= 1x",
        )
    )
    table = [
        "| measure: wall (CPU) | text | tinylm | peer | ratio, wall | ratio, CPU | target |",
        "|---|---|---|---|---|---|---|",
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
            f"{held_bytes / 1e6:.2f} MB held out (every 50th document). Encoded, each with a "
            f"cold cache: {'; '.join(described)}. Best of {args.repeats} runs by wall time; "
            "in brackets the CPU seconds of all threads and processes (MB per CPU-second for "
            "speeds), which a shared machine disturbs less. Speed ratios > 1 favour tinylm; the "
            "training ratio is tinylm's time / tokenizers' time.",
            "",
            *table,
            "",
            f"tinylm's training: {result.count_seconds:.2f} s counting "
            f"{result.unique_chunks:,} unique chunks, "
            f"{result.merge_seconds:.2f} s for {len(ours.merges):,} merges (last run). "
            "Identical ids (tinylm = tiktoken built from tinylm's merges, on every document): "
            f"see above for each text (tokenizers loads tinylm's tokenizer.json). Held-out prose "
            "and the multilingual sample are text of kinds the tokenizer was not trained on "
            "(the corpus has no man page and hardly any non-ASCII), where tinylm's memo of "
            "encoded chunks hits less often than on its own training text.",
        ]
    )
    print(section)
    if not same:
        sys.exit("ids differ between tinylm and a peer")
    if not args.no_write:
        write_results(section)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
