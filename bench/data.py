"""Data benchmark: encoding corpora of growing size into token shards, against tiktoken.

    .venv/bin/python bench/data.py                          # 100 MB, 500 MB, 2 GB (heavy)
    .venv/bin/python bench/data.py --sizes 20,60 --no-write # a quick look

The corpus is generated from what the machine has: Python's standard library sources (code),
man pages (decompressed, roff requests dropped) and /usr/share/doc (prose), each round of
copies shuffled and respelled (a few letters swapped per document copy) so that repeated text
is new text to the tokenizer's chunk cache. Each size is a prefix of the same shards; a
tokenizer is trained on a sample of the smallest. For each size a fresh process runs
`tinylm.data.encode_corpus` (read, encode on all cores, write uint16 shards) while this one
samples the resident memory of that process and all its children every 20 ms; then another
fresh process encodes the same pieces of text with tiktoken (built from tinylm's merges)
`encode_ordinary_batch` on all threads, timing only the encode calls. Token counts must agree.
Targets: peak RSS under 1 GB at 2 GB; MB/s within 10% from the smallest size to the largest;
at least tiktoken's all-thread rate. Results go to bench/results.md (the data section).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import resource
import string
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results.md"
START, END = "<!-- data:start -->", "<!-- data:end -->"
SHARD_BYTES = 10_000_000
ROFF = re.compile(r"\\f(\[[^]]*\]|\(..|.)|\\s[-+]?\d|\\\(..|\\[&|^%-]")


def _read(path: Path) -> str | None:
    import gzip

    try:
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError):
        return None
    return text if text.strip() and "\0" not in text else None


def base_documents(limit: int) -> list[str]:
    """Code and prose documents, alternating between the kinds, about `limit` bytes in all."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = (p for p in sorted(stdlib.rglob("*.py")) if "site-packages" not in p.parts)
    man = sorted(Path("/usr/share/man").glob("man[1-8]/*.gz"))
    doc = sorted(p for p in Path("/usr/share/doc").rglob("*") if p.is_file())
    prose = (p for pair in zip(man, doc, strict=False) for p in pair)
    docs, total = [], 0
    for path in (p for pair in zip(code, prose, strict=False) for p in pair):
        text = _read(path)
        if text is None:
            continue
        if "/man/" in str(path):  # roff: keep the text lines, drop the font escapes
            text = ROFF.sub("", "\n".join(ln for ln in text.splitlines() if ln[:1] not in ".'"))
        docs.append(text)
        total += len(text.encode("utf-8"))
        if total >= limit:
            break
    return docs


def generate(directory: Path, total: int, base: list[str], seed: int = 0) -> list[Path]:
    """Text shards of about SHARD_BYTES holding `total` bytes: rounds of the base documents,
    shuffled, every copy with one to three letter pairs swapped (the first round too, so that
    every prefix has the same mix: an unchanged first round tokenizes more easily)."""
    rng = random.Random(seed)
    shards: list[Path] = []
    written = 0
    buffer: list[str] = []
    size = 0
    while written + size < total:
        order = list(range(len(base)))
        rng.shuffle(order)
        for i in order:
            letters = rng.sample(string.ascii_lowercase, 2 * rng.randint(1, 3))
            table = str.maketrans("".join(letters), "".join(letters[1::2] + letters[::2]))
            text = base[i].translate(table)
            buffer.append(text)
            size += len(text.encode("utf-8"))
            if size >= SHARD_BYTES or written + size >= total:
                shards.append(directory / f"shard_{len(shards):05d}.txt")
                shards[-1].write_text("\n\n".join(buffer), encoding="utf-8")
                written += shards[-1].stat().st_size
                buffer, size = [], 0
                if written >= total:
                    return shards
    return shards


# ---- the measured children ----------------------------------------------------------------


def child_encode(files: list[str], tokenizer: str, cache: str) -> dict:
    """Encode into shards in a fresh cache; wall seconds of encode_corpus alone."""
    from tinylm.data import encode_corpus
    from tinylm.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer)
    baseline = _rss_kb(os.getpid())
    cpu, start = _cpu(), time.perf_counter()
    stream = encode_corpus(files, tok, cache)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cpu": _cpu() - cpu, "bytes": stream.index["n_bytes"],
            "tokens": len(stream), "docs": stream.index["n_docs"],
            "baseline_rss_mb": baseline / 1024}


def _cpu() -> float:
    """CPU seconds of this process's threads and its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def child_tiktoken(files: list[str], tokenizer: str, max_bytes: int) -> dict:
    """tiktoken's encode_ordinary_batch on all threads over the same pieces tinylm encodes
    (tinylm.textio.iter_text), 64 pieces a call; only the calls are timed."""
    from tinylm.data import PIECE_CHARS
    from tinylm.textio import iter_text
    from tinylm.tokenizer import Tokenizer
    from tinylm.tokenizer.parallel import available_cpus

    enc = Tokenizer.load(tokenizer).to_tiktoken()
    threads = available_cpus()
    seconds, cpu, n_bytes, tokens, docs, batch = 0.0, 0.0, 0, 0, 0, []

    def run() -> tuple[float, float, int]:
        used, start = _cpu(), time.perf_counter()
        ids = enc.encode_ordinary_batch(batch, num_threads=threads)
        return time.perf_counter() - start, _cpu() - used, sum(map(len, ids))

    for piece in iter_text(files, max_chars=PIECE_CHARS):
        batch.append(piece.text)
        n_bytes += len(piece.text.encode("utf-8"))
        docs += piece.doc_end
        if len(batch) == 64:
            took, used, n = run()
            seconds, cpu, tokens, batch = seconds + took, cpu + used, tokens + n, []
        if max_bytes and n_bytes >= max_bytes:
            break
    if batch:
        took, used, n = run()
        seconds, cpu, tokens = seconds + took, cpu + used, tokens + n
    return {"seconds": seconds, "cpu": cpu, "bytes": n_bytes, "tokens": tokens, "docs": docs,
            "threads": threads}


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants (from /proc/PID/task/TID/children)."""
    found, stack = [], [pid]
    while stack:
        p = stack.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                stack += [int(c) for c in task.read_text().split()]
            except OSError:  # the process ended meanwhile
                pass
    return found


def measure(args: list[str]) -> dict:
    """Run `bench/data.py --child ARGS` in a fresh process; its JSON result, the peak of the
    summed RSS of its process tree, and the largest single RSS (ru_maxrss)."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], sum(_rss_kb(p) for p in _tree(proc.pid)))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    if status != 0:
        sys.exit(f"child {args[0]} failed ({status})")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "peak_rss_mb": peak[0] / 1024, "maxrss_mb": usage.ru_maxrss / 1024}


def write_results(section: str) -> None:
    """Replace the data section of bench/results.md (append it if absent)."""
    block = f"{START}\n{section.rstrip()}\n{END}"
    text = RESULTS.read_text(encoding="utf-8")
    if START in text and END in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n## data\n\n" + block + "\n"
    RESULTS.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100,500,2000", help="corpus sizes in MB")
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--base-mb", type=float, default=80, help="MB of distinct base text")
    parser.add_argument("--train-mb", type=float, default=20, help="tokenizer sample, MB")
    parser.add_argument("--peer-max-mb", type=float, default=120,
                        help="tiktoken encodes at most this prefix of each size (its rate does "
                        "not depend on the size)")
    parser.add_argument("--workdir", help="where to write the corpus (default: a temp dir)")
    parser.add_argument("--no-write", action="store_true", help="do not update results.md")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "encode":
            print(json.dumps(child_encode(rest[2:], rest[0], rest[1])))
        else:
            print(json.dumps(child_tiktoken(rest[2:], rest[0], int(float(rest[1])))))
        return

    import tiktoken

    sys.path.insert(0, str(REPO))
    from tinylm.tokenizer import Tokenizer
    from tinylm.tokenizer.parallel import available_cpus

    sizes = [int(float(s) * 1e6) for s in args.sizes.split(",")]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        base = base_documents(int(args.base_mb * 1e6))
        shards = generate(work, max(sizes), base)
        del base
        smallest = shards[:max(1, -(-min(sizes) // SHARD_BYTES))]  # a sample spread over them
        tok = Tokenizer.train_files(smallest, args.vocab_size, max_bytes=int(args.train_mb * 1e6))
        tok_path = tok.save(work / "tokenizer.json")
        rows = []
        for size in sizes:
            files, total = [], 0
            for shard in shards:
                if total >= size:
                    break
                files.append(str(shard))
                total += shard.stat().st_size
            ours = measure(["encode", str(tok_path), str(work / f"cache{size}"), *files])
            cap = 0 if total <= args.peer_max_mb * 1e6 else args.peer_max_mb * 1e6
            peer = measure(["tiktoken", str(tok_path), str(cap), *files])
            rows.append((size, ours, peer))
            print(f"{size / 1e6:.0f} MB: tinylm {ours['bytes'] / 1e6 / ours['seconds']:.1f} MB/s,"
                  f" peak RSS {ours['peak_rss_mb']:.0f} MB; tiktoken "
                  f"{peer['bytes'] / 1e6 / peer['seconds']:.1f} MB/s", flush=True)
            for cache in work.glob(f"cache{size}"):
                subprocess.run(["rm", "-rf", str(cache)], check=True)
    load_after = os.getloadavg()
    section = report(rows, args, tiktoken.__version__, available_cpus(), load_before, load_after)
    print(section)
    if not args.no_write:
        write_results(section)
        print(f"wrote {RESULTS}")


def report(rows: list, args: argparse.Namespace, tiktoken_version: str, cpus: int,
           before: tuple, after: tuple) -> str:
    """The markdown section: one row per size, then the targets."""
    lines = [
        f"`.venv/bin/python bench/data.py --sizes {args.sizes}` on "
        f"{datetime.date.today()}; {cpus} cores, Python {sys.version.split()[0]}, tiktoken "
        f"{tiktoken_version}; load average {before[0]:.1f} before, {after[0]:.1f} after (the "
        "machine is shared with other work: wall-clock rates move with its load; MB per "
        "CPU-second moves less). Text shards of generated prose + code (stdlib sources, man "
        f"pages, /usr/share/doc, respelled copies); vocab {args.vocab_size:,}; peak RSS: "
        "the summed RSS of the encoding process and its children, sampled every 20 ms "
        "(the process alone after importing tinylm and torch: baseline).",
        "",
        "| MB | tokens | tinylm s | MB/s | tokens/s | MB/CPU-s, M tokens/CPU-s | peak RSS MB "
        "(baseline) "
        "| tiktoken MB/s, MB/CPU-s (threads, MB encoded) | tinylm / tiktoken | tokens equal |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for _, ours, peer in rows:
        rate = ours["bytes"] / 1e6 / ours["seconds"]
        peer_rate = peer["bytes"] / 1e6 / peer["seconds"]
        # tinylm adds an end-of-text token per document; tiktoken's counts have none
        same = (str(peer["tokens"] == ours["tokens"] - ours["docs"])
                if peer["bytes"] == ours["bytes"] else "(prefix)")
        lines.append(
            f"| {ours['bytes'] / 1e6:.0f} | {ours['tokens']:,} | {ours['seconds']:.1f} | "
            f"{rate:.1f} | "
            f"{ours['tokens'] / ours['seconds']:,.0f} | {ours['bytes'] / 1e6 / ours['cpu']:.1f}, "
            f"{ours['tokens'] / 1e6 / ours['cpu']:.2f} "
            f"| {ours['peak_rss_mb']:.0f} ({ours['baseline_rss_mb']:.0f}) | {peer_rate:.1f}, "
            f"{peer['bytes'] / 1e6 / peer['cpu']:.1f} ({peer['threads']}, "
            f"{peer['bytes'] / 1e6:.0f}) | {rate / peer_rate:.2f}x | "
            f"{same} |")
    first, last = rows[0][1], rows[-1][1]
    spread = (last["bytes"] / last["seconds"]) / (first["bytes"] / first["seconds"])
    cpu_spread = (last["bytes"] / last["cpu"]) / (first["bytes"] / first["cpu"])
    token_spread = (last["tokens"] / last["cpu"]) / (first["tokens"] / first["cpu"])
    lines += ["", f"- largest / smallest size: MB/s {spread:.2f}x, MB per CPU-second "
              f"{cpu_spread:.2f}x, tokens per CPU-second {token_spread:.2f}x (target: within 10%)",
              f"- peak RSS at the largest size: {last['peak_rss_mb']:.0f} MB (target < 1,024 MB)",
              "- tinylm / tiktoken, all threads, wall: "
              + ", ".join(f"{(o['bytes'] / o['seconds']) / (p['bytes'] / p['seconds']):.2f}x"
                          for _, o, p in rows) + "; per CPU-second: "
              + ", ".join(f"{(o['bytes'] / o['cpu']) / (p['bytes'] / p['cpu']):.2f}x"
                          for _, o, p in rows) + " (target >= 1x)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
