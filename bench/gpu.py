"""GPU benchmark: pretraining tokens/s, MFU and peak memory of the 124M presets on one CUDA GPU,
in bf16 with and without torch.compile, and `tinylm quickstart --device cuda`, timed.

    .venv/bin/python bench/gpu.py --out gpu.json          # on a GPU machine (not yet timed)
    .venv/bin/python bench/gpu.py --from-json gpu.json    # its section into bench/results.md
    .venv/bin/python bench/gpu.py --minimal --out x.json  # the reduced CPU form, in seconds

Each configuration (preset x compile) runs `tinylm.pretrain.pretrain` (what `tinylm pretrain`
runs) in a fresh process, with the preset's own vocabulary: a tokenizer of that size is trained
first on real text the machine has (tinyshakespeare when present, then Python's standard
library sources); 40 steps of 4 micro-batches of 16 x 1,024 tokens each. A step's time is
metrics.jsonl's `elapsed_s` from one step to the next, the first `--warmup` steps
(compilation, allocator warm-up) left out; tokens/s counts the tokens
trained in the timed steps. MFU = tokens/s x `tinylm.model.flops_per_token` (6N plus attention,
PaLM's count) / the GPU's peak dense bf16 FLOP/s, from a table of known GPUs by name (else
"unknown" and no MFU; `--peak-tflops` gives it). Peak memory: torch.cuda.max_memory_allocated
over the run. Without CUDA the bench says so and runs a reduced form on the CPU (the tiny
preset, a few steps, float32, no compile, no quickstart) so that the script itself is tested.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results.md"
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
# Peak dense bf16 tensor FLOP/s from the vendor's data sheets; the first match on the name wins
# (PCIe and NVL cards are slower than the SXM parts the plain names stand for).
PEAK_BF16 = (
    (r"H100 PCIe", 756e12),
    (r"H100 NVL|H200 NVL", None),
    (r"H100|H200|GH200", 989e12),
    (r"A100", 312e12),
    (r"\bL4\b", 121e12),
)
TARGET_MFU = 0.40  # issue 17's target for the 124M presets with compile


def peak_flops(name: str, given_tflops: float | None) -> float | None:
    """Peak dense bf16 FLOP/s of the GPU called `name`: `given_tflops` when given, else the
    table's, else None (unknown: no MFU is printed)."""
    if given_tflops:
        return given_tflops * 1e12
    for pattern, flops in PEAK_BF16:
        if re.search(pattern, name):
            return flops
    return None


def write_corpus(path: Path, target_bytes: int) -> Path:
    """Real text for the tokenizer and the training windows: tinyshakespeare when present, then
    the standard library's .py files, until `target_bytes`."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = [SHAKESPEARE] if SHAKESPEARE.is_file() else []
    sources += sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    total = 0
    with path.open("w", encoding="utf-8") as f:
        for source in sources:
            try:
                text = source.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            f.write(text + "\n")
            total += len(text.encode("utf-8")) + 1
            if total >= target_bytes:
                break
    return path


def metrics_timing(run_dir: Path, warmup: int) -> dict[str, Any]:
    """Tokens/s and mean step time over the steps after the first `warmup` (metrics.jsonl)."""
    from tinylm.train.report import read_metrics

    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    timed = list(zip(steps[warmup - 1 :], steps[warmup:], strict=False)) if warmup else []
    if not timed:
        sys.exit(f"{run_dir}: fewer than {warmup + 1} logged steps; raise --steps")
    seconds = sum(b["elapsed_s"] - a["elapsed_s"] for a, b in timed)
    tokens = sum(b["tokens"] - a["tokens"] for a, b in timed)
    return {"tokens_per_s": tokens / seconds, "step_s": seconds / len(timed),
            "steps_timed": len(timed), "first_step_s": steps[0]["elapsed_s"],
            "final_loss": steps[-1]["loss"]}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this fresh process: pretrain, then its timing and memory."""
    import torch

    from tinylm.model import flops_per_token
    from tinylm.pretrain import pretrain
    from tinylm.run import read_run_config
    from tinylm.train.config import TrainConfig  # noqa: F401  (fails early if the API moved)

    work = Path(spec["work"])
    run_dir = work / f"run-{spec['name']}"
    cuda = spec["device"] == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:  # the CPU form: on a shared machine extra threads only contend
        torch.set_num_threads(1)
    start = time.perf_counter()
    pretrain([spec["data"]], run_dir, config=spec["preset"], tokenizer=spec["tokenizer"],
             overrides=spec["overrides"], force=True)
    total = time.perf_counter() - start
    saved = read_run_config(run_dir)
    from tinylm.model import ModelConfig

    model_cfg = ModelConfig(**saved["model"])
    seq_len = saved["pretrain"]["data"].get("seq_len") or model_cfg.max_seq_len
    return {
        **metrics_timing(run_dir, spec["warmup"]),
        "total_s": total,
        "flops_per_token": flops_per_token(model_cfg, seq_len),
        "vocab_size": model_cfg.vocab_size,
        "seq_len": seq_len,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "threads": torch.get_num_threads(),
    }


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """`worker(spec)` in a fresh Python process (its own compile caches and memory peak)."""
    env = {**os.environ, "TINYLM_CACHE": str(Path(spec["work"]) / "cache")}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                          capture_output=True, text=True, check=False, cwd=REPO, env=env)
    if proc.returncode != 0:
        return {**spec, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    return {**spec, **json.loads(proc.stdout.strip().splitlines()[-1])}


def run_quickstart(work: Path, fast: bool) -> dict[str, Any]:
    """`tinylm quickstart --device cuda`, timed from outside; its report's stage times."""
    out_dir = work / "quickstart"
    command = [sys.executable, "-m", "tinylm", "quickstart", "--device", "cuda", "-o",
               str(out_dir), "--force", "--json", "--quiet", *(["--fast"] if fast else [])]
    env = {**os.environ, "TINYLM_CACHE": str(work / "cache")}
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"command": " ".join(command[1:]), "wall_s": wall,
                "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    report = json.loads((out_dir / "report.json").read_text(encoding="utf-8"))
    stages = ("data", "tokenizer", "pretrain", "sft", "lora", "dpo")
    return {
        "command": "tinylm quickstart --device cuda" + (" --fast" if fast else ""),
        "wall_s": wall,
        "plan": report["plan"],
        "stage_s": {k: report[k]["wall_s"] for k in stages if "wall_s" in report.get(k, {})},
        "val_bpb": report["pretrain"]["val_bpb"],
        "exact_match": {k: report[k]["exact_match"] for k in ("base", "sft", "lora", "dpo")},
        "preferred_share": [report["dpo"]["preferred_share_before"],
                            report["dpo"]["preferred_share_after"]],
    }


def machine(cuda: bool) -> dict[str, Any]:
    """The device, torch and load figures printed with the numbers."""
    import torch

    about: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()),
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        about.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30,
                     cuda=torch.version.cuda)
    return about


def plan(args: argparse.Namespace, cuda: bool) -> list[tuple[str, str, bool]]:
    """(preset, precision, compile) per configuration."""
    if not cuda:
        return [("tiny", "fp32", False)]
    return [(p, "bf16", c) for p in args.presets for c in (False, True)]


def tokens_per_step(args: argparse.Namespace, cuda: bool) -> int:
    """Tokens per optimizer step: `--accum` micro-batches of `--micro-batch` sequences."""
    return args.accum * args.micro_batch * (args.seq or (1024 if cuda else 128))


def overrides(args: argparse.Namespace, precision: str, compile_: bool, cuda: bool) -> list[str]:
    """Pretraining settings of one configuration: `--accum` micro-batches a step, no checkpoint
    or evaluation on the way (one small evaluation and the final save come after the timing)."""
    seq = args.seq or (1024 if cuda else 128)
    return [f"train.max_steps={args.steps}", f"train.micro_batch={args.micro_batch}",
            f"train.batch_tokens={tokens_per_step(args, cuda)}", f"data.seq_len={seq}",
            f"train.precision={precision}", f"train.compile={str(compile_).lower()}",
            f"train.device={'cuda' if cuda else 'cpu'}", "train.log_every=1",
            "train.eval_every=0", "train.save_every=0", f"train.eval_tokens={4 * seq}",
            f"train.warmup_steps={min(10, args.steps)}"]


def render(result: dict[str, Any]) -> str:
    """The markdown section: setup, one row per configuration, the quickstart line."""
    about, rows = result["machine"], result["rows"]
    where = (f"{about['gpu']} ({about['gpu_memory_gib']:.0f} GiB), CUDA {about['cuda']}"
             if "gpu" in about else f"no CUDA GPU: the reduced CPU form ({about['cpus']} cores)")
    peak = result["peak_flops"]
    lines = [
        f"Command: `{result['command']}`  ",
        f"Date: {about['date']}; {where}; torch {about['torch']}, Python {about['python']}; "
        f"load average {about['load_average'][0]:.1f} at the start  ",
        "Peak dense bf16 FLOP/s taken for MFU: "
        + (f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown for this device (no MFU)"),
        "",
        "| preset | precision | compile | vocab | seq | tokens/step | tokens/s | step ms | "
        "MFU | peak mem GiB | first step s | steps timed |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['precision']} | {r['compile']} | failed: "
                         f"{' '.join(r['error'])} |||||||||")
            continue
        mfu = r["tokens_per_s"] * r["flops_per_token"] / peak if peak else None
        r["mfu"] = mfu
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        lines.append(
            f"| {r['preset']} | {r['precision']} | {'yes' if r['compile'] else 'no'} | "
            f"{r['vocab_size']:,} | {r['seq_len']} | {r['tokens_per_step']:,} | "
            f"{r['tokens_per_s']:,.0f} | {1000 * r['step_s']:.1f} | "
            f"{f'{100 * mfu:.1f}%' if mfu is not None else '-'} | {mem} | "
            f"{r['first_step_s']:.1f} | {r['steps_timed']} |"
        )
    for preset in sorted({r["preset"] for r in rows}):
        pair = {r["compile"]: r for r in rows if r["preset"] == preset and "error" not in r}
        if True in pair and False in pair:
            lines.append(f"- {preset}: torch.compile / eager tokens/s "
                         f"**{pair[True]['tokens_per_s'] / pair[False]['tokens_per_s']:.2f}x**"
                         + (f"; MFU with compile {100 * pair[True]['mfu']:.1f}% (target "
                            f"{100 * TARGET_MFU:.0f}%)" if pair[True].get("mfu") else ""))
    qs = result.get("quickstart")
    if qs is None:
        lines.append("- quickstart: not run (no CUDA, or --quickstart skip)")
    elif "error" in qs:
        lines.append(f"- `{qs['command']}` failed after {qs['wall_s']:.0f} s: {qs['error']}")
    else:
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in qs["stage_s"].items())
        lines.append(
            f"- `{qs['command']}` (plan {qs['plan']}): **{qs['wall_s']:.0f} s** wall ({stages});"
            f" val bpb {qs['val_bpb']:.3f}; exact match base/sft/lora/dpo "
            + "/".join(f"{100 * v:.1f}%" for v in qs["exact_match"].values())
            + f"; preferred style {100 * qs['preferred_share'][0]:.1f}% -> "
            f"{100 * qs['preferred_share'][1]:.1f}%"
        )
    lines.append(
        "Setup: `tinylm.pretrain.pretrain` per configuration in a fresh process, the preset "
        "with a tokenizer of its own vocabulary trained on tinyshakespeare + Python stdlib "
        f"sources; {result['steps']} steps, the first {result['warmup']} not timed "
        "(compilation); tokens/s from metrics.jsonl; MFU = tokens/s x "
        "flops_per_token / peak."
    )
    return "\n".join(lines)


def write_section(section: str) -> None:
    """Replace (or append) the `## gpu` section of bench/results.md."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from finetune import write_section as write  # bench/finetune.py: the markers' format

    write("gpu", section)


def parse() -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["gpt2-124m", "llama-124m"])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per configuration")
    p.add_argument("--warmup", type=int, default=6, help="first steps not timed")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per forward")
    p.add_argument("--accum", type=int, default=4, help="micro-batches per step (CPU: 1)")
    p.add_argument("--seq", type=int, default=0, help="tokens per sequence (0: 1024, CPU 128)")
    p.add_argument("--corpus-mb", type=float, default=24.0, help="MB of text (CPU: 1)")
    p.add_argument("--quickstart", choices=["full", "fast", "skip"], default="full")
    p.add_argument("--peak-tflops", type=float, help="the GPU's peak dense bf16 TFLOP/s")
    p.add_argument("--minimal", action="store_true", help="the CPU form, 4 steps (for tests)")
    p.add_argument("--out", default="gpu.json", help="where to write the JSON results")
    p.add_argument("--write", action="store_true", help="also update bench/results.md")
    p.add_argument("--from-json", help="render a saved JSON result into bench/results.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
        write_section(render(result))
        print(f"wrote the gpu section of {RESULTS}")
        return
    import torch

    from tinylm.pretrain import load_config
    from tinylm.tokenizer import Tokenizer

    cuda = torch.cuda.is_available() and not args.minimal
    if not cuda:
        print("no CUDA GPU here" + (" (--minimal)" if args.minimal else "")
              + ": running the reduced CPU form (tiny preset, float32, no compile, no "
              "quickstart); the GPU figures need a CUDA machine", flush=True)
        args.steps, args.warmup = (4, 2) if args.minimal else (min(args.steps, 8), 2)
        args.micro_batch, args.accum = min(args.micro_batch, 4), 1
        args.corpus_mb = min(args.corpus_mb, 1.0)
    about = machine(cuda)
    name = about.get("gpu", "cpu")
    peak = peak_flops(name, args.peak_tflops) if cuda else None
    print(f"device: {name}; peak bf16 {'unknown' if peak is None else f'{peak / 1e12:.0f}e12'}",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = write_corpus(work / "corpus.txt", int(args.corpus_mb * 1e6))
        tokenizers: dict[int, str] = {}
        for preset, precision, compile_ in plan(args, cuda):
            vocab = load_config(preset, []).tokenizer.vocab_size or 2048
            if vocab not in tokenizers:
                t0 = time.perf_counter()
                tok = Tokenizer.train_files([corpus], vocab)
                tokenizers[vocab] = str(tok.save(work / f"tok-{vocab}"))
                print(f"tokenizer {vocab:,}: {time.perf_counter() - t0:.1f} s", flush=True)
            spec = {"work": str(work), "data": str(corpus), "tokenizer": tokenizers[vocab],
                    "preset": preset, "precision": precision, "compile": compile_,
                    "name": f"{preset}-{precision}-{'compile' if compile_ else 'eager'}",
                    "device": "cuda" if cuda else "cpu", "warmup": args.warmup,
                    "overrides": overrides(args, precision, compile_, cuda)}
            row = run_worker(spec)
            row["tokens_per_step"] = tokens_per_step(args, cuda)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("overrides", "work")}),
                  flush=True)
        quickstart = None
        if cuda and args.quickstart != "skip":
            quickstart = run_quickstart(work, args.quickstart == "fast")
    result = {"command": "python bench/gpu.py " + " ".join(sys.argv[1:]), "machine": about,
              "peak_flops": peak, "steps": args.steps, "warmup": args.warmup, "rows": rows,
              "quickstart": quickstart}
    section = render(result)
    print(section)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    if args.write:
        write_section(section)
        print(f"wrote the gpu section of {RESULTS}")
    if any("error" in r for r in rows):
        sys.exit("a configuration failed (see the table)")


if __name__ == "__main__":
    main()
