"""GRPO benchmark: step time and peak memory of `tinylm rl` against TRL's GRPOTrainer, on CPU.

    .venv/bin/python bench/rl.py                     # the small preset, 8 steps after 2 warm-up
    .venv/bin/python bench/rl.py --preset tiny --steps 6 --repeats 2

Both sides train the same random-init model (tinylm's run, and `tinylm export`'s transformers
directory of it) with the same settings: G completions of at most --completion tokens for each
of --prompts prompts a step (the same weights end a turn equally rarely on both sides; the
mean completion lengths are printed), one optimizer step per generation batch, beta 0 (no
reference), loss_type dapo, temperature 1, AdamW with tinylm's tuning settings, float32,
no gradient checkpointing, the same torch threads, the same reward (the share of lower-case
letters, so the advantages are not all zero). Each side runs in a fresh process per repeat
(round-robin, so load changes hit both alike); a step's time runs from one optimizer step's
end to the next (bench/trl_peer.py's StepClock: generation, rewards, forward, backward and
update); peak memory is the process's own VmHWM above its RSS before the model is loaded.
Printed: each side's medians, and the ratios tinylm / TRL.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from trl_peer import MemoryProbe, StepClock  # bench/trl_peer.py

REPO = Path(__file__).resolve().parents[1]
WORDS = "apple river stone cloud quiet north market lamp garden silver window paper".split()


def lower_share(text: str) -> float:
    """The reward both sides use: the share of lower-case ASCII letters in the completion."""
    text = text.replace("<|im_end|>", "")
    return sum("a" <= c <= "z" for c in text) / max(len(text), 1)


def tinylm_reward(prompt: str, completion: str, example: dict) -> float:
    """`--reward rl.py:tinylm_reward` (tinylm's signature)."""
    return lower_share(completion)


def trl_reward(completions: list, **kwargs: Any) -> list[float]:
    """The same reward in TRL's signature (conversational completions are message lists)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [lower_share(t) for t in texts]


def prepare(args: argparse.Namespace, work: Path) -> None:
    """A random-init run of the preset with byte tokens (vocabulary = the tokenizer's, so that
    neither side can sample an id without a token), its export, and the prompts."""
    import torch

    from tinylm.interop.export import export_hf
    from tinylm.model import Transformer
    from tinylm.pretrain import load_config
    from tinylm.run import save_run
    from tinylm.tokenizer import Tokenizer

    tokenizer = Tokenizer.bytes_only()
    model_cfg = load_config(REPO / "tinylm" / "configs" / f"{args.preset}.yaml", []).model
    model_cfg.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    (work / "base").mkdir()
    save_run(work / "base", Transformer(model_cfg), tokenizer, {"stage": "bench"})
    export_hf(work / "base", work / "hf", force=True)
    rng = random.Random(0)
    with (work / "prompts.jsonl").open("w") as f:
        for _ in range(max(64, args.prompts * (args.steps + args.warmup))):
            question = " ".join(rng.choice(WORDS) for _ in range(8)) + "?"
            f.write(json.dumps({"prompt": question, "answer": "x"}) + "\n")


def tinylm_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """`tinylm.rl.stage.rl` on the base run, timed and measured in this process."""
    import matplotlib.pyplot  # noqa: F401  (the run's loss curve; imported before the baseline,
    import peft  # noqa: F401  as the TRL side imports its libraries before its own)

    import tinylm.generate  # noqa: F401
    from tinylm.rl.stage import rl

    work = Path(spec["work"])
    steps = spec["steps"] + spec["warmup"]
    overrides = [
        f"reward={Path(__file__).resolve()}:tinylm_reward", f"num_generations={spec['G']}",
        f"max_completion_length={spec['completion']}", "temperature=1.0", "beta=0",
        "loss_type=dapo", f"train.batch_size={spec['prompts']}",
        f"train.micro_batch={spec['prompts'] * spec['G']}", f"train.max_steps={steps}",
        f"train.lr={spec['lr']}", "train.log_every=1", "train.eval_every=0",
        "train.save_every=0", "train.device=cpu", f"train.seed={spec['seed']}",
    ]
    memory = MemoryProbe()
    memory.start()
    clock = StepClock()
    rl(str(work / "base"), [str(work / "prompts.jsonl")], work / f"rl-{spec['run']}",
       overrides=overrides, force=True)
    from tinylm.train.report import read_metrics

    records = [r for r in read_metrics(work / f"rl-{spec['run']}" / "metrics.jsonl")
               if "reward" in r]
    lengths = [r["completions/mean_length"] for r in records]
    return {**memory.result(), **clock.result(spec["warmup"]),
            "mean_completion_length": statistics.fmean(lengths)}


def trl_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's GRPOTrainer on the exported model with the matched settings."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    work = Path(spec["work"])
    rows = [json.loads(line) for line in (work / "prompts.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]}
                                 for r in rows])
    n = spec["prompts"] * spec["G"]
    config = GRPOConfig(
        output_dir=str(work / "trl-out"), max_steps=spec["steps"] + spec["warmup"],
        per_device_train_batch_size=n, gradient_accumulation_steps=1, steps_per_generation=1,
        num_generations=spec["G"], max_completion_length=spec["completion"],
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type="dapo",
        scale_rewards="group", num_iterations=1, epsilon=0.2,
        learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=0,
        adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused",
        gradient_checkpointing=False,  # GRPOConfig's default True recomputes the blocks
        bf16=False,  # GRPOConfig's default True: bf16 autocast, slow on a CPU without it
        logging_strategy="no", save_strategy="no", report_to="none", use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, seed=spec["seed"], log_completions=False,
    )
    memory = MemoryProbe()
    memory.start()
    model = AutoModelForCausalLM.from_pretrained(work / "hf")
    tokenizer = AutoTokenizer.from_pretrained(work / "hf", padding_side="left")
    clock = StepClock()
    lengths: list[float] = []

    class Measured(GRPOTrainer):
        def _generate_and_score_completions(self, inputs: Any) -> Any:
            output = super()._generate_and_score_completions(inputs)
            lengths.append(float(output["completion_mask"].sum(-1).float().mean()))
            return output

    trainer = Measured(model=model, reward_funcs=trl_reward, args=config,
                       train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return {**memory.result(), **clock.result(spec["warmup"]),
            "mean_completion_length": statistics.fmean(lengths),
            "threads": torch.get_num_threads()}


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One side in a fresh Python process; its JSON result."""
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                          capture_output=True, text=True, check=False, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"{spec['side']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    """Parse the options, run both sides `--repeats` times round-robin, print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("-G", type=int, default=8, help="completions per prompt")
    parser.add_argument("--completion", type=int, default=32, help="tokens per completion")
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="steps before the timed ones")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        import torch

        torch.set_num_threads(spec["threads"])
        worker = tinylm_worker if spec["side"] == "tinylm" else trl_worker
        print(json.dumps(worker(spec)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(args, work)
        common = {"work": tmp, "prompts": args.prompts, "G": args.G, "seed": 0,
                  "completion": args.completion, "steps": args.steps, "warmup": args.warmup,
                  "threads": args.threads, "lr": args.lr}
        runs: dict[str, list[dict[str, Any]]] = {"tinylm": [], "TRL": []}
        for repeat in range(args.repeats):
            for side in runs:
                runs[side].append(run_worker({**common, "side": side, "run": repeat}))
    load = os.getloadavg()
    print(f"GRPO, preset {args.preset}: {args.prompts} prompts x G {args.G} completions of "
          f"{args.completion} tokens a step, {args.steps} timed steps after {args.warmup}, "
          f"{args.threads} torch threads, {args.repeats} repeat(s); load average "
          f"{load[0]:.1f} (other work on this machine slows both sides)")
    medians = {}
    for side, results in runs.items():
        medians[side] = {k: statistics.median(r[k] for r in results)
                         for k in ("step_s", "cpu_s", "delta_mb", "mean_completion_length")}
        m = medians[side]
        print(f"  {side:7s} step {m['step_s']:.3f} s wall, {m['cpu_s']:.3f} s CPU; peak memory "
              f"+{m['delta_mb']:,.0f} MiB; mean completion {m['mean_completion_length']:.1f} "
              "tokens")
    ours, peer = medians["tinylm"], medians["TRL"]
    print(f"  tinylm / TRL: step time {ours['step_s'] / peer['step_s']:.2f} (wall), "
          f"{ours['cpu_s'] / peer['cpu_s']:.2f} (CPU); memory "
          f"{ours['delta_mb'] / peer['delta_mb']:.2f}")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    if "--worker" not in sys.argv:
        print(f"  bench time {time.perf_counter() - start:.0f} s")
