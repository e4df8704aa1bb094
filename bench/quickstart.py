"""The quickstart's figures, measured: the default plan for several seeds, each from a clean cache.

    python bench/quickstart.py                      # seeds 0 1 2, prints the table
    python bench/quickstart.py --write-readme       # and puts it in README.md between its markers
    python bench/quickstart.py --seeds 0 --fast     # one seed of the fast plan (a quick look)

Each seed runs `tinylm quickstart --device cpu --json --quiet --seed S` in its own process, with
its own empty TINYLM_CACHE, so no run reuses another's token shards. The table gives, for each
figure the README quotes, the median over the seeds and the range (min-max), and the wall time.
Also printed: the machine (CPU model, flags that pick PyTorch's kernels, torch threads), since
the figures depend on the floating-point path, and each seed's figures, for results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BEGIN, END = "<!-- quickstart-table: bench/quickstart.py -->", "<!-- /quickstart-table -->"

# (row label, report section, key, format): the README's figures
FIGURES = [
    ("pretrain: val bpb", "pretrain", "val_bpb", "{:.3f}"),
    ("pretrain: unigram bpb of the corpus", "pretrain", "unigram_bpb", "{:.3f}"),
    ("base: exact match (held-out facts)", "base", "exact_match", "{:.1%}"),
    ("sft: exact match", "sft", "exact_match", "{:.1%}"),
    ("sft: p(end of turn) after a right answer", "sft", "p_turn_end", "{:.3f}"),
    ("lora: exact match", "lora", "exact_match", "{:.1%}"),
    ("lora: p(end of turn) after a right answer", "lora", "p_turn_end", "{:.3f}"),
    ("lora: share of parameters trained", "lora", "trainable_fraction", "{:.1%}"),
    ("dpo: preference accuracy", "dpo", "pref_accuracy", "{:.1%}"),
    ("dpo: preferred style before", "dpo", "preferred_share_before", "{:.1%}"),
    ("dpo: preferred style after", "dpo", "preferred_share_after", "{:.1%}"),
    ("dpo: exact match", "dpo", "exact_match", "{:.1%}"),
    ("rl: greedy exact match before", "rl", "exact_match_before", "{:.1%}"),
    ("rl: greedy exact match after", "rl", "exact_match", "{:.1%}"),
    ("rl: sampled exact match before", "rl", "sampled_exact_match_before", "{:.1%}"),
    ("rl: sampled exact match after", "rl", "sampled_exact_match_after", "{:.1%}"),
    ("tuned models: share of sampled replies that end their turn (min of sft/lora/dpo)",
     None, "ends_turn_share", "{:.1%}"),
    ("wall time of the pretrain stage (s)", "pretrain", "wall_s", "{:.0f}"),
    ("wall time in all (s)", None, "wall_s", "{:.0f}"),
]


def machine() -> str:
    """The CPU and the settings that decide the floating-point path."""
    import torch

    model, flags = platform.processor(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model.strip():
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                have = set(line.split(":", 1)[1].split())
                picked = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
                flags = " ".join(f for f in picked if f in have)
    except OSError:
        pass
    return (f"{model or 'unknown CPU'}; {os.cpu_count()} cores; flags: {flags or 'none'}; torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads, "
            f"{torch.backends.cpu.get_cpu_capability()} kernels")


def run_seed(seed: int, fast: bool, work: Path) -> dict:
    """One quickstart in a subprocess with a fresh cache; its report."""
    out, cache = work / f"seed{seed}", work / f"cache{seed}"
    cmd = [sys.executable, "-m", "tinylm", "quickstart", "-o", str(out), "--device", "cpu",
           "--seed", str(seed), "--json", "--quiet", "--force", *(["--fast"] if fast else [])]
    env = {**os.environ, "TINYLM_CACHE": str(cache)}
    print(f"seed {seed}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads((out / "report.json").read_text(encoding="utf-8"))


def figure(report: dict, section: str | None, key: str) -> float:
    if section is not None:
        return float(report[section][key])
    if key == "ends_turn_share":
        return min(float(report[s][key]) for s in ("sft", "lora", "dpo"))
    return float(report[key])


def table(reports: list[dict], seeds: list[int], plan: str) -> str:
    """The markdown table: median and range per figure over the seeds."""
    lines = [f"| figure ({plan} plan, seeds {', '.join(map(str, seeds))}) | median | range |",
             "|---|---|---|"]
    for label, section, key, fmt in FIGURES:
        values = [figure(r, section, key) for r in reports]
        low, high = min(values), max(values)
        spread = fmt.format(low) if low == high else f"{fmt.format(low)} - {fmt.format(high)}"
        lines.append(f"| {label} | {fmt.format(statistics.median(values))} | {spread} |")
    return "\n".join(lines)


def per_seed(reports: list[dict], seeds: list[int]) -> str:
    head = "| figure | " + " | ".join(f"seed {s}" for s in seeds) + " |"
    lines = [head, "|---|" + "---|" * len(seeds)]
    for label, section, key, fmt in FIGURES:
        cells = " | ".join(fmt.format(figure(r, section, key)) for r in reports)
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines)


def write_readme(block: str) -> None:
    text = README.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{README}: no {BEGIN} ... {END} markers to write the table between")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    README.write_text(text[:start] + "\n" + block + "\n" + text[end:], encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fast", action="store_true", help="the fast plan instead")
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tinylm-qs-bench-") as tmp:
        reports = [run_seed(s, args.fast, Path(tmp)) for s in args.seeds]
    plan = reports[0]["plan"]
    block = (f"{table(reports, args.seeds, plan)}\n\nMeasured by `python bench/quickstart.py` "
             f"on {machine()}.")
    print(block)
    print("\nEach seed:\n\n" + per_seed(reports, args.seeds))
    if args.write_readme:
        write_readme(block)


if __name__ == "__main__":
    main()
