"""Finetuning benchmark: peak memory and step time of full vs LoRA tuning, on CPU.

    .venv/bin/python bench/finetune.py                     # writes bench/results.md
    .venv/bin/python bench/finetune.py --presets small --steps 4 --no-write

Each configuration (preset x full/LoRA) runs in a fresh subprocess through the library API
(`tinylm.finetune.finetune`) on a random-init run of the preset (its own vocabulary size, with
byte-level tokens), on synthetic chat data generated in-script. Peak memory: the subprocess's
`ru_maxrss` at the end minus its value just before the base run is loaded (torch imported), so
the delta covers the model, optimizer state, activations and the reference copies. Step time:
the mean of the per-step times logged in metrics.jsonl, the first `--warmup` steps dropped.
Printed: each row, and the ratios LoRA / full per preset. With trl installed, the small preset
also goes through TRL's SFTTrainer on the exported model (tinylm.interop.export_hf) with the
same data, batch, window and steps: the step-time ratio tinylm / TRL.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results.md"
LOAD = os.getloadavg()
TRL_SKIP = "TRL comparison skipped: trl is not installed, the small preset was not run, or --no-trl"
WORDS = ("apple river stone cloud quiet north market lamp garden silver window paper bridge "
         "winter orange candle forest yellow music thunder").split()


def rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sentence(rng: random.Random, n: int) -> str:
    """n random words."""
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_sft_data(path: Path, n: int, seed: int = 0) -> Path:
    """n synthetic one-turn chats (prompt ~12 words, answer ~20) as messages JSONL."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            msgs = [{"role": "user", "content": sentence(rng, 12) + "?"},
                    {"role": "assistant", "content": sentence(rng, 20) + "."}]
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


def step_times(run_dir: Path, warmup: int) -> list[float]:
    """Per-step seconds from metrics.jsonl (log_every 1), the first `warmup` dropped."""
    from tinylm.train.report import read_metrics

    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    elapsed = [0.0] + [r["elapsed_s"] for r in records]
    return [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)][warmup:]


def common_overrides(args: argparse.Namespace) -> list[str]:
    """Few steps, small micro-batches, no evaluation or checkpoints, CPU."""
    return [f"train.max_steps={args.steps}", f"train.batch_size={args.batch}",
            f"train.micro_batch={args.batch}", "train.log_every=1", "train.eval_every=0",
            "train.save_every=0", "train.device=cpu", f"data.max_length={args.seq}",
            "data.val_fraction=0"]


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this (fresh) process: its peak-memory delta and step times."""
    import torch

    torch.set_num_threads(spec["threads"])
    work = Path(spec["work"])
    base = work / f"base-{spec['preset']}"
    before = rss_mb()
    run_dir = work / f"run-{spec['name']}"
    if spec["stage"] == "trl-sft":
        return trl_worker(spec, before)
    if spec["stage"] == "finetune":
        from tinylm.finetune import finetune as train_fn
    else:
        from tinylm.dpo import dpo as train_fn
    start = time.perf_counter()
    train_fn(str(base), [spec["data"]], run_dir, overrides=spec["overrides"], force=True)
    total = time.perf_counter() - start
    times = step_times(run_dir, spec["warmup"])
    cfg = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    return {"peak_mb": rss_mb(), "delta_mb": rss_mb() - before, "total_s": total,
            "step_s": sum(times) / len(times), "steps_timed": len(times),
            "trainable": cfg.get("parameters", {}).get("trainable")}


def trl_worker(spec: dict[str, Any], before: float) -> dict[str, Any]:
    """TRL's SFTTrainer on the exported base run, same data, steps and batch; step times from
    a callback (the first `warmup` dropped)."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tinylm.interop.export import export_hf

    work, t = Path(spec["work"]), spec["trl"]
    hf_dir = work / f"hf-{spec['preset']}"
    export_hf(work / f"base-{spec['preset']}", hf_dir, force=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            times.append(time.perf_counter() - self.start)

    config = SFTConfig(output_dir=str(work / "trl-out"), max_steps=t["steps"],
                       per_device_train_batch_size=t["batch"], gradient_accumulation_steps=1,
                       max_length=t["seq"], learning_rate=3e-4, logging_steps=1,
                       save_strategy="no", report_to="none", use_cpu=True,
                       dataloader_num_workers=0, assistant_only_loss=False)
    trainer = SFTTrainer(model=model, args=config, processing_class=tokenizer,
                         train_dataset=load_dataset("json", data_files=spec["data"])["train"],
                         callbacks=[Timer()])
    start = time.perf_counter()
    trainer.train()
    timed = times[spec["warmup"]:]
    # peak RSS only: the delta read 0 in a trial run (unexplained), so none is reported
    return {"peak_mb": rss_mb(), "delta_mb": None,
            "total_s": time.perf_counter() - start, "step_s": sum(timed) / len(timed),
            "steps_timed": len(timed), "trainable": sum(p.numel() for p in model.parameters())}


def run_config(spec: dict[str, Any]) -> dict[str, Any]:
    """`worker(spec)` in a fresh Python process (so ru_maxrss is this config's alone)."""
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                          capture_output=True, text=True, check=False, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"{spec['name']} failed:\n{proc.stderr[-3000:]}")
    return {**spec, **json.loads(proc.stdout.strip().splitlines()[-1])}


def trl_line(rows: list[dict[str, Any]]) -> str:
    """The tinylm / TRL step-time ratio (small preset, full tuning), or why there is none."""
    trl_row = next((r for r in rows if r["stage"] == "trl-sft"), None)
    if trl_row is None:
        return TRL_SKIP
    ours = next(r for r in rows if r["preset"] == "small" and r["mode"] == "full")
    return (f"- small, full tuning: tinylm / TRL SFTTrainer step time "
            f"**{ours['step_s'] / trl_row['step_s']:.2f}**, peak RSS "
            f"{ours['peak_mb'] / trl_row['peak_mb']:.2f} (TRL on the exported model, the same "
            "data, batch, window and steps; TRL's loss covers all tokens, tinylm's the "
            "assistant's; the size of TRL's step-time gap was not investigated)")


def environment(command: str, threads: int) -> list[str]:
    """Command, date, machine and load lines."""
    return [f"Command: `{command}`  ", f"Date: {datetime.date.today()}, machine: "
            f"{platform.machine()} with {os.cpu_count()} CPU cores, torch on {threads} thread(s);"
            f" load average {LOAD[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
            "(the machine was shared with other work, so absolute times are noisy)  "]


def table(rows: list[dict[str, Any]], params: dict[str, int]) -> list[str]:
    """One markdown row per configuration."""
    lines = ["| preset | params | mode | trainable | peak RSS MiB | RSS delta MiB | "
             "step s (mean) | steps timed |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        trainable = f"{r['trainable']:,}" if r["trainable"] else "?"
        delta = "n/a" if r["delta_mb"] is None else f"{r['delta_mb']:,.0f}"
        lines.append(f"| {r['preset']} | {params[r['preset']]:,} | {r['mode']} | {trainable} | "
                     f"{r['peak_mb']:,.0f} | {delta} | {r['step_s']:.3f} | "
                     f"{r['steps_timed']} |")
    return lines


def ratios(rows: list[dict[str, Any]], baseline: str) -> list[str]:
    """Per preset and non-baseline mode: memory-delta and step-time ratios mode / baseline."""
    lines = []
    for r in rows:
        if r["mode"] == baseline or r["stage"] == "trl-sft":
            continue
        b = next(x for x in rows if x["preset"] == r["preset"] and x["mode"] == baseline)
        lines.append(f"- {r['preset']}: {r['mode']} / {baseline}: RSS delta "
                     f"**{r['delta_mb'] / b['delta_mb']:.2f}**, peak RSS "
                     f"{r['peak_mb'] / b['peak_mb']:.2f}, step time "
                     f"**{r['step_s'] / b['step_s']:.2f}**")
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
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steady timings on a shared machine)")
    parser.add_argument("--no-write", action="store_true", help="do not update results.md")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL comparison")
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
        for preset in args.presets:
            params[preset] = make_base(preset, work / f"base-{preset}", args.seq)
            for mode, extra in (("full", []), ("LoRA", ["lora.enabled=true"])):
                spec = {"stage": "finetune", "preset": preset, "mode": mode,
                        "name": f"{preset}-{mode}", "work": str(work), "data": str(data),
                        "threads": args.threads, "warmup": args.warmup,
                        "overrides": common_overrides(args) + ["data.exact_match=0", *extra]}
                rows.append(run_config(spec))
                print(table(rows[-1:], params)[-1], flush=True)
        if "small" in params and not args.no_trl and importlib.util.find_spec("trl"):
            spec = {"stage": "trl-sft", "preset": "small", "mode": "TRL SFTTrainer, full",
                    "name": "small-trl", "work": str(work), "data": str(data),
                    "threads": args.threads, "warmup": args.warmup,
                    "trl": {"steps": args.steps, "batch": args.batch, "seq": args.seq}}
            rows.append(run_config(spec))
            print(table(rows[-1:], params)[-1], flush=True)
    command = "python bench/finetune.py " + " ".join(sys.argv[1:])
    lines = ratios(rows, "full") + [""] + environment(command.strip(), args.threads)
    lines += [f"Setup: random-init runs of each preset (the preset's vocabulary, byte tokens), "
              f"{args.batch} synthetic one-turn chats per step in one micro-batch, windows of "
              f"{args.seq} tokens, AdamW, {args.steps} steps of which the first {args.warmup} "
              "are not timed; each configuration in a fresh process. RSS delta: peak RSS minus "
              "the RSS after importing torch, before loading the base run.", ""]
    lines += table(rows, params) + ["", trl_line(rows)]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_section("finetune", section)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
