"""Pretraining benchmark: time to quality on tinyshakespeare, in one run on one machine.

    .venv/bin/python bench/pretrain.py                    # both runs; writes bench/results.md
    .venv/bin/python bench/pretrain.py --only tuned --set train.lr=3e-3 --no-write

1. classic: nanoGPT's CPU recipe (configs/classic.yaml: gpt2 family, byte tokens, 4 layers,
   4 heads, d_model 128, context 64, batch 12, lr 1e-3, 2,000 steps, dropout 0);
2. tuned: tinylm's preset for this data (configs/shakespeare.yaml), which trains its own
   tokenizer; that training time is counted.

Both train on the first 80% of tinyshakespeare.txt and are scored on the last 10% (split at a
line boundary, the same text for both), in bits per byte over the whole validation text, every
`--eval-every` steps (the tuned run, with 2.5x fewer steps, twice as often). The preset was
tuned on that last 10%, so the 10% before it, which no run trains on and no choice was made
by, is scored too, by each final model: the held-out figure. Time is training
wall-clock time with evaluation excluded (the loop logs `eval_s`, the seconds spent evaluating).
Printed: each run's val bpb against time; the time the tuned preset needs to reach the classic
recipe's final bpb divided by the classic time (target <= 0.5); the tuned bpb at the classic
recipe's total time (target: >= 10% lower).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
RESULTS = REPO / "bench" / "results.md"
START, END = "<!-- pretrain:start -->", "<!-- pretrain:end -->"
LOAD = os.getloadavg()


def split_text(work: Path) -> tuple[Path, Path, Path]:
    """train.txt (the first 80%), held.txt (80-90%) and val.txt (the last 10%), cut at lines.
    val.txt is the split the shakespeare preset was tuned on; held.txt was never scored while
    choosing it (it was training text then), and no run here trains on it."""
    text = SHAKESPEARE.read_text(encoding="utf-8")
    cut80 = text.index("\n", int(len(text) * 0.8)) + 1
    cut90 = text.index("\n", int(len(text) * 0.9)) + 1
    paths = work / "train.txt", work / "held.txt", work / "val.txt"
    for path, part in zip(paths, (text[:cut80], text[cut80:cut90], text[cut90:]), strict=True):
        path.write_text(part, encoding="utf-8")
    return paths


def run(name: str, preset: str, tokenizer: str | None, splits: tuple[Path, Path, Path],
        work: Path, overrides: list[str]) -> dict[str, Any]:
    """Train one preset; its (time, val bpb) curve, with tokenizer training time counted, and
    its final bpb on the held-out split."""
    from tinylm.console import Output
    from tinylm.evaluate import evaluate_data
    from tinylm.pretrain import load_config, pretrain, resolve_tokenizer
    from tinylm.train.distributed import DistInfo
    from tinylm.train.report import read_metrics

    train, held, val = splits
    config = REPO / "tinylm" / "configs" / f"{preset}.yaml"
    overrides = [f"data.cache_dir={work / 'cache'}", "train.eval_tokens=0",
                 "train.save_every=0", "train.device=cpu", *overrides]
    tok_seconds = 0.0
    if tokenizer is None:  # the preset trains its tokenizer: the same call the CLI makes
        cfg = load_config(config, overrides)
        start = time.perf_counter()
        tok = resolve_tokenizer(None, cfg, [str(train)], False, DistInfo(), Output(quiet=True))
        tok_seconds = time.perf_counter() - start
        tokenizer = str(tok.save(work / f"{name}-tokenizer"))
    run_dir = work / name
    result = pretrain([str(train)], run_dir, config=config, tokenizer=tokenizer,
                      val_data=[str(val)], overrides=overrides, out=Output(quiet=True))
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if "val_bpb" in r]
    curve = [(tok_seconds + r["elapsed_s"] - r["eval_s"], r["step"], r["val_bpb"]) for r in evals]
    from tinylm.model import param_breakdown
    from tinylm.run import load_run

    loaded = load_run(run_dir)
    held_out = evaluate_data(run_dir, [str(held)], device="cpu")  # `tinylm eval`
    return {"name": name, "preset": preset, "curve": curve, "tok_seconds": tok_seconds,
            "held_bpb": held_out["val_bpb"],
            "steps": result.step, "tokens": result.tokens,
            "params": param_breakdown(loaded.model.config)["total"],
            "vocab": loaded.tokenizer.vocab_size}


def time_to_reach(curve: list[tuple[float, int, float]], target: float) -> float | None:
    """First time the curve's bpb is <= target, linearly interpolated between evaluations."""
    previous = None
    for t, _, bpb in curve:
        if bpb <= target:
            if previous is None:
                return t
            t0, b0 = previous
            return t0 + (t - t0) * (b0 - target) / (b0 - bpb)
        previous = (t, bpb)
    return None


def bpb_at(curve: list[tuple[float, int, float]], when: float) -> float:
    """The curve's bpb at time `when` (interpolated; its final value if it ended earlier)."""
    previous = None
    for t, _, bpb in curve:
        if t >= when and previous is not None:
            t0, b0 = previous
            return b0 + (bpb - b0) * (when - t0) / (t - t0)
        previous = (t, bpb)
    return curve[-1][2]


def report(results: list[dict[str, Any]], command: str, threads: int = 1) -> str:
    """The markdown section: setup, both curves, the two ratios."""
    lines = summary(results[0], results[1]) + [""] if len(results) == 2 else []
    lines += [f"Command: `{command}`  ", f"Date: {datetime.date.today()}, machine: "
              f"{platform.machine()} with {os.cpu_count()} CPU cores, torch on {threads} "
              f"thread(s); load average {LOAD[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at "
              "the end (the machine was shared with other work, so absolute times are noisy)  ",
              "Time: training wall-clock seconds, evaluation excluded; the tuned preset's "
              "tokenizer training is included. Data: the first 80% of tinyshakespeare.txt "
              "trains; the last 10% (cut at a line; the split the shakespeare preset was "
              "tuned on) is scored in full at every evaluation; the 10% before it (held out: "
              "never scored while the preset was chosen, never trained on here) is scored "
              "once, by the final model.", ""]
    lines += ["| run | preset | params | vocab | steps | tokens | tokens/s | tokenizer s | "
              "total s | final val bpb | held-out bpb |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        t, _, bpb = r["curve"][-1]
        lines.append(f"| {r['name']} | {r['preset']} | {r['params']:,} | {r['vocab']:,} | "
                     f"{r['steps']:,} | {r['tokens']:,} | {r['tokens'] / t:,.0f} | "
                     f"{r['tok_seconds']:.1f} | {t:.1f} | {bpb:.3f} | {r['held_bpb']:.3f} |")
    for r in results:
        lines += ["", f"{r['name']}: val bpb against time", "",
                  "| time s | step | val bpb |", "|---:|---:|---:|"]
        lines += [f"| {t:.1f} | {s} | {b:.3f} |" for t, s, b in r["curve"]]
    return "\n".join(lines)


def summary(classic: dict[str, Any], tuned: dict[str, Any]) -> list[str]:
    """The two headline numbers, as markdown lines."""
    total, _, final = classic["curve"][-1]
    reach = time_to_reach(tuned["curve"], final)
    at_equal = bpb_at(tuned["curve"], total)
    ratio = f"{reach / total:.2f}" if reach is not None else "not reached"
    gain = 100 * (final - at_equal) / final
    return [f"- time for tuned to reach classic's final {final:.3f} bpb / classic time: "
            f"**{ratio}** (target <= 0.5)",
            f"- tuned bpb at classic's total time ({total:.0f} s): **{at_equal:.3f}**, "
            f"{gain:.1f}% below classic's {final:.3f} (target >= 10%)",
            f"- held-out split (never used to choose the preset), final models: tuned "
            f"**{tuned['held_bpb']:.3f}** bpb, classic {classic['held_bpb']:.3f} "
            f"({100 * (classic['held_bpb'] - tuned['held_bpb']) / classic['held_bpb']:.1f}% "
            f"lower; on the tuning split {100 * (final - tuned['curve'][-1][2]) / final:.1f}%)"]


def write_results(section: str) -> None:
    """Replace (or add) the pretrain section of bench/results.md."""
    block = f"## pretrain\n\n{START}\n{section}\n{END}\n"
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.is_file() else "# Benchmarks\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        text = head.rsplit("## pretrain", 1)[0] + block + tail.lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    RESULTS.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["classic", "tuned"], help="run one of the two")
    parser.add_argument("--eval-every", type=int, default=100,
                        help="classic's steps between evaluations (tuned: half of it)")
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        help="extra KEY=VALUE for the tuned run (tuning experiments)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steady timings on a shared machine)")
    parser.add_argument("--no-write", action="store_true", help="do not update results.md")
    args = parser.parse_args()
    if not SHAKESPEARE.is_file():
        sys.exit(f"{SHAKESPEARE} not found")
    import torch

    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["TINYLM_CACHE"] = str(work / "cache")  # `tinylm eval`'s shards
        splits = split_text(work)
        if args.only in (None, "classic"):
            every = [f"train.eval_every={args.eval_every}"]
            results.append(run("classic", "classic", "bytes", splits, work, every))
            print(report(results[-1:], "", args.threads), flush=True)
        if args.only in (None, "tuned"):  # 2.5x fewer steps: evaluated twice as often
            every = [f"train.eval_every={max(1, args.eval_every // 2)}"]
            results.append(run("tuned", "shakespeare", None, splits, work,
                               every + args.overrides))
            print(report(results[-1:], "", args.threads), flush=True)
    command = "python bench/pretrain.py " + " ".join(sys.argv[1:])
    section = report(results, command.strip(), args.threads)
    if len(results) == 2:
        print("\n".join(summary(results[0], results[1])))
    if not args.no_write and len(results) == 2 and not args.overrides:
        write_results(section)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
