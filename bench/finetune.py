"""Finetuning benchmark: peak memory and step time of full vs LoRA tuning, on CPU.

    .venv/bin/python bench/finetune.py --threads 1        # writes bench/results.md
    .venv/bin/python bench/finetune.py --presets small --steps 12 --repeats 2 --no-write

Each configuration (preset x full/LoRA) runs in a fresh subprocess through the library API
(`tinylm.finetune.finetune`) on a random-init run of the preset (its own vocabulary size, with
byte-level tokens), on synthetic chat data generated in-script. Peak memory: the subprocess's
own peak RSS (VmHWM, reset through /proc/self/clear_refs once the libraries are imported, just
before the model is loaded) minus its RSS at that point, so the delta covers the model,
optimizer state, activations and reference copies (not ru_maxrss: a child inherits its parent's
peak through fork and exec). A delta below the float32 weights' bytes stops the bench.
Step time: CPU and wall time from one optimizer step's end to the next, the first `--warmup`
steps dropped; each configuration runs `--repeats` times (round-robin): medians, and the spread
of the runs and of single steps. Printed: each row, and the ratios LoRA / full per preset.

With trl installed, the small preset also goes through TRL's SFTTrainer on the exported model
(tinylm.interop.export_hf): the same chats (checked token by token, with the same trained-on
positions), batch, window, steps, threads, learning rate and AdamW settings, timed the same way
(a TrainerCallback stamps each step's end), once with settings matched to tinylm's step and
once with TRL's own defaults (bf16 autocast and gradient checkpointing, which explain the ~10x
gap an earlier version of this bench reported). The bench prints the positions per step of both
sides and the ratios tinylm / TRL.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from trl_peer import (  # bench/trl_peer.py: the TRL side and the step clock
    SFT_REMAINS,
    MemoryProbe,
    StepClock,
    peer_lines,
    trl_sft_worker,
    trl_specs,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results.md"
LOAD = os.getloadavg()
LARGE_PARAMS = 50_000_000  # presets from here on take --large-steps and --large-repeats
TRL_SKIP = "TRL comparison skipped: trl is not installed, the small preset was not run, or --no-trl"
WORDS = (
    "apple river stone cloud quiet north market lamp garden silver window paper bridge "
    "winter orange candle forest yellow music thunder"
).split()


def sentence(rng: random.Random, n: int) -> str:
    """n random words."""
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_sft_data(path: Path, n: int, seed: int = 0) -> Path:
    """n synthetic one-turn chats (prompt ~12 words, answer ~20) as messages JSONL."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            msgs = [
                {"role": "user", "content": sentence(rng, 12) + "?"},
                {"role": "assistant", "content": sentence(rng, 20) + "."},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def make_base(preset: str, directory: Path, max_seq_len: int) -> int:
    """A random-init run of `preset` (preset vocabulary, byte tokens) in `directory`; params."""
    import torch

    from tinylm.model import Transformer, param_breakdown
    from tinylm.pretrain import load_config
    from tinylm.run import save_run
    from tinylm.tokenizer import Tokenizer

    cfg = load_config(REPO / "tinylm" / "configs" / f"{preset}.yaml", [])
    model_cfg = cfg.model
    model_cfg.max_seq_len = max_seq_len
    torch.manual_seed(0)
    model = Transformer(model_cfg)
    directory.mkdir(parents=True, exist_ok=True)
    save_run(directory, model, Tokenizer.bytes_only(), {"stage": "bench"})
    return param_breakdown(model_cfg)["total"]


def step_series(run_dir: Path, key: str, warmup: int) -> list[float]:
    """Per-step increments of a cumulative metrics.jsonl field (log_every 1; `tokens`: the
    next-token positions of each step), the first `warmup` steps dropped."""
    from tinylm.train.report import read_metrics

    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    values = [0.0] + [r[key] for r in records]
    return [b - a for a, b in zip(values, values[1:], strict=False)][warmup:]


def for_preset(args: argparse.Namespace, n_params: int) -> argparse.Namespace:
    """`args` with --large-steps / --large-repeats as --steps / --repeats for a preset of
    LARGE_PARAMS or more (a 124M step takes seconds on a CPU; its memory needs one run)."""
    if n_params < LARGE_PARAMS:
        return args
    return argparse.Namespace(**{
        **vars(args),
        "steps": args.large_steps or args.steps,
        "repeats": args.large_repeats or args.repeats,
    })


def common_overrides(args: argparse.Namespace) -> list[str]:
    """Few steps, small micro-batches, no evaluation or checkpoints, CPU."""
    return [
        f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch}",
        f"train.micro_batch={args.batch}",
        "train.log_every=1",
        "train.eval_every=0",
        "train.save_every=0",
        "train.device=cpu",
        f"data.max_length={args.seq}",
        "data.val_fraction=0",
    ]


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this (fresh) process: its peak-memory delta and step times."""
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["stage"] == "trl-sft":
        return trl_sft_worker(spec)
    if spec["stage"] == "finetune":
        from tinylm.finetune import finetune as train_fn
    else:
        from tinylm.dpo import dpo as train_fn
    import peft  # noqa: F401  (imported before the baseline, as the TRL side imports its libraries)

    work = Path(spec["work"])
    run_dir = work / f"run-{spec['name']}"
    memory = MemoryProbe()
    memory.start()
    clock = StepClock()
    start = time.perf_counter()
    train_fn(
        str(work / f"base-{spec['preset']}"),
        [spec["data"]],
        run_dir,
        overrides=spec["overrides"],
        force=True,
    )
    total = time.perf_counter() - start
    tokens = step_series(run_dir, "tokens", spec["warmup"])
    cfg = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    counts = cfg["data"]["train"]
    return {
        **memory.result(),
        "total_s": total,
        **clock.result(spec["warmup"]),
        "trainable": cfg.get("parameters", {}).get("trainable"),
        "positions_per_step": sum(tokens) / len(tokens),
        "targets_per_example": counts["target_tokens"] / max(counts["kept"], 1),
        "threads": torch.get_num_threads(),
    }


def run_config(spec: dict[str, Any], script: str = __file__) -> dict[str, Any]:
    """`worker(spec)` of `script` in a fresh Python process (so ru_maxrss is this config's)."""
    proc = subprocess.run(
        [sys.executable, script, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    if proc.returncode != 0:
        sys.exit(f"{spec['name']} failed:\n{proc.stderr[-3000:]}")
    return {**spec, **json.loads(proc.stdout.strip().splitlines()[-1])}


def repeated(specs: list[dict[str, Any]], repeats: int, script: str = __file__) -> list[dict]:
    """Each spec run `repeats` times round-robin, each time in a fresh process (load changes on
    a shared machine hit all of them alike); per spec, the medians over the runs and the
    spread: `cpu_runs` (each run's mean CPU step), `spread_runs` (their half-range over the
    median) and `spread_steps` (the standard deviation of single steps over their mean)."""
    runs: list[list[dict[str, Any]]] = [[] for _ in specs]
    for _ in range(repeats):
        for i, spec in enumerate(specs):
            runs[i].append(run_config(spec, script))
    merged = []
    for results in runs:
        cpu_runs = [r["cpu_s"] for r in results]
        steps = [t for r in results for t in r["cpu_steps"]]
        median = statistics.median(cpu_runs)
        merged.append({
            **results[0],
            "cpu_s": median,
            "step_s": statistics.median(r["step_s"] for r in results),
            "peak_mb": statistics.median(r["peak_mb"] for r in results),
            "delta_mb": statistics.median(r["delta_mb"] for r in results),
            "cpu_runs": cpu_runs,
            "spread_runs": (max(cpu_runs) - min(cpu_runs)) / 2 / median,
            "spread_steps": statistics.pstdev(steps) / statistics.fmean(steps),
            "repeats": len(results),
        })
    return merged


def baseline_note(rows: list[dict[str, Any]]) -> str:
    """What the old measure would have started from: ru_maxrss at the baseline (a peak the
    worker inherits from the parent) next to the RSS the deltas start from, per preset."""
    parts = []
    for preset in dict.fromkeys(r["preset"] for r in rows):
        mine = [r for r in rows if r["preset"] == preset]
        parts.append(
            f"{preset} {min(r['baseline_mb'] for r in mine):,.0f}-"
            f"{max(r['baseline_mb'] for r in mine):,.0f} MiB (ru_maxrss "
            f"{min(r['ru_maxrss_at_baseline_mb'] for r in mine):,.0f}-"
            f"{max(r['ru_maxrss_at_baseline_mb'] for r in mine):,.0f})"
        )
    return (
        "- baselines: RSS at the baseline " + "; ".join(parts) + ". ru_maxrss, in brackets, "
        "holds the peak a worker inherits from the parent that built the base run; the "
        "deltas above start from the RSS"
    )


def check_memory(rows: list[dict[str, Any]], params: dict[str, int]) -> None:
    """Every configuration loads the whole model in float32 after the baseline (LoRA too: the
    frozen base), so a delta below the parameters' bytes is a broken measurement: stop."""
    for r in rows:
        weights_mb = params[r["preset"]] * 4 / 2**20
        if r["delta_mb"] < weights_mb:
            sys.exit(
                f"{r['preset']}, {r['mode']}: RSS delta {r['delta_mb']:,.0f} MiB is below the "
                f"{weights_mb:,.0f} MiB of its float32 weights: the memory measurement is wrong"
            )


MEMORY_TEXT = (
    "RSS delta: the process's peak RSS (VmHWM, reset at the baseline through "
    "/proc/self/clear_refs) minus its RSS at the baseline, after importing the libraries and "
    "before loading the model; the worker's own figures, not ru_maxrss, which a child "
    "inherits from its parent. Checked: every delta is at least the float32 weights' bytes."
)


def steps_text(args: argparse.Namespace) -> str:
    """'N steps', with the large presets' count when it differs."""
    large = args.large_steps or args.steps
    extra = f" ({large} for presets of 50M+ parameters)" if large != args.steps else ""
    return f"{args.steps} steps{extra}"


def repeats_text(args: argparse.Namespace) -> str:
    """'N runs', with the large presets' count when it differs; medians over the runs."""
    large = args.large_repeats or args.repeats
    extra = f" ({large} for presets of 50M+ parameters)" if large != args.repeats else ""
    return f"{args.repeats} runs each{extra}: medians; spread: half the range of the runs' " \
        "mean CPU step over the median / the standard deviation of single steps over their mean"


def environment(command: str, threads: int) -> list[str]:
    """Command, date, machine and load lines."""
    return [
        f"Command: `{command}`  ",
        f"Date: {datetime.date.today()}, machine: "
        f"{platform.machine()} with {os.cpu_count()} CPU cores, torch on {threads} thread(s);"
        f" load average {LOAD[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        "(the machine was shared with other work, so absolute times are noisy)  ",
    ]


def table(rows: list[dict[str, Any]], params: dict[str, int]) -> list[str]:
    """One markdown row per configuration."""
    lines = [
        "| preset | params | mode | trainable | peak RSS MiB | RSS delta MiB | step s CPU | "
        "spread runs / steps | step s wall | runs x steps timed | positions/step |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        trainable = f"{r['trainable']:,}" if r["trainable"] else "?"
        runs_spread = f"±{100 * r['spread_runs']:.1f}%" if r["repeats"] > 1 else "-"
        lines.append(
            f"| {r['preset']} | {params[r['preset']]:,} | {r['mode']} | {trainable} | "
            f"{r['peak_mb']:,.0f} | {r['delta_mb']:,.0f} | {r['cpu_s']:.3f} | "
            f"{runs_spread} / "
            f"±{100 * r['spread_steps']:.1f}% | "
            f"{r['step_s']:.3f} | {r['repeats']} x {r['steps_timed']} | "
            f"{r['positions_per_step']:,.0f} |"
        )
    return lines


def ratios(rows: list[dict[str, Any]], baseline: str) -> list[str]:
    """Per preset and non-baseline mode: memory and step-time ratios mode / baseline."""
    lines = []
    for r in rows:
        if r["mode"] == baseline or r["stage"].startswith("trl"):
            continue
        b = next(x for x in rows if x["preset"] == r["preset"] and x["mode"] == baseline)
        lines.append(
            f"- {r['preset']}: {r['mode']} / {baseline}: RSS delta "
            f"**{r['delta_mb'] / b['delta_mb']:.2f}**, peak RSS "
            f"{r['peak_mb'] / b['peak_mb']:.2f}, step time CPU "
            f"**{r['cpu_s'] / b['cpu_s']:.2f}** (wall {r['step_s'] / b['step_s']:.2f})"
        )
    return lines


def write_section(name: str, section: str) -> None:
    """Replace (or append) the `## name` section of bench/results.md between its markers."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"## {name}\n\n{start}\n{section}\n{end}\n"
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.is_file() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
        text = head.rsplit(f"## {name}", 1)[0] + block + tail.lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    RESULTS.write_text(text, encoding="utf-8")


def parse(description: str) -> argparse.ArgumentParser:
    """The options both benches share."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--presets", nargs="+", default=["small", "gpt2-124m"])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="steps not timed")
    parser.add_argument("--batch", type=int, default=2, help="examples per step (one micro-batch)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per window (data.max_length)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: steady timings on a shared machine)",
    )
    parser.add_argument("--no-write", action="store_true", help="do not update results.md")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL comparison")
    parser.add_argument(
        "--trl-defaults",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run TRL with its own defaults (bf16, checkpointing)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="run each configuration N times, round-robin: medians and spread",
    )
    parser.add_argument("--large-steps", type=int, help="--steps for presets of 50M+ params")
    parser.add_argument("--large-repeats", type=int, help="--repeats for presets of 50M+")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = parse(__doc__.splitlines()[0]).parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    rows, params = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_sft_data(work / "sft.jsonl", 64)
        common = {
            "work": str(work),
            "data": str(data),
            "threads": args.threads,
            "warmup": args.warmup,
        }
        for preset in args.presets:
            params[preset] = make_base(preset, work / f"base-{preset}", args.seq)
            sized = for_preset(args, params[preset])
            specs = [
                {
                    **common,
                    "stage": "finetune",
                    "preset": preset,
                    "mode": mode,
                    "name": f"{preset}-{mode}",
                    "overrides": common_overrides(sized) + ["data.exact_match=0", *extra],
                }
                for mode, extra in (("full", []), ("LoRA", ["lora.enabled=true"]))
            ]
            if preset == "small" and not args.no_trl and importlib.util.find_spec("trl"):
                specs += trl_specs(sized, common, "trl-sft", 3e-4)  # tinylm's full-tuning lr
            rows += repeated(specs, sized.repeats)
            print("\n".join(table(rows[-len(specs) :], params)[2:]), flush=True)
    check_memory(rows, params)
    command = "python bench/finetune.py " + " ".join(sys.argv[1:])
    lines = ratios(rows, "full") + [""] + environment(command.strip(), args.threads)
    lines += [
        f"Setup: random-init runs of each preset (the preset's vocabulary, byte tokens), "
        f"{args.batch} synthetic one-turn chats per step in one micro-batch, windows of "
        f"{args.seq} tokens, AdamW, {steps_text(args)} of which the first {args.warmup} "
        "are not timed (a step: from one optimizer step's end to the next, stamped by torch's "
        "optimizer hook on both sides; CPU seconds of the process, which other work on a "
        "shared machine disturbs less than wall seconds); each configuration in a fresh "
        f"process, round-robin, {repeats_text(args)}. {MEMORY_TEXT} TRL: SFTTrainer on the "
        "exported model (tinylm.interop.export_hf), the same "
        "chats as conversational prompt-completion rows (completion_only_loss: the "
        "answer and its <|im_end|>, as tinylm), max_length = window + 1 ids, no packing "
        "or padding-free, same lr, schedule, AdamW betas, decay and clipping; matched: "
        "float32, no gradient checkpointing, fused torch.optim.AdamW, no logging or saving.",
        "",
    ]
    lines += table(rows, params) + ["", baseline_note(rows)]
    trl_lines = peer_lines(rows, "trl-sft", "full", "SFTTrainer", SFT_REMAINS)
    lines += trl_lines or [TRL_SKIP]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_section("finetune", section)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
