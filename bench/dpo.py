"""DPO benchmark: peak memory and step time of full DPO, --precompute-ref and LoRA DPO, on CPU.

    .venv/bin/python bench/dpo.py --threads 1          # writes bench/results.md
    .venv/bin/python bench/dpo.py --presets small --steps 6 --repeats 2 --no-write

Each configuration (preset x full / full with precompute_ref / LoRA) runs in a fresh subprocess
through the library API (`tinylm.dpo.dpo`) on a random-init run of the preset (its vocabulary
size, byte tokens), on synthetic preference pairs generated in-script. Memory and time are
measured as in bench/finetune.py (the worker's own peak RSS over its baseline; CPU step times
after `--warmup` steps, `--repeats` runs of each configuration: medians and spread). With
precompute_ref the reference pass over the training pairs happens before the first step, so it
is in the memory but not in the step time. With trl installed, the small preset also goes
through TRL's DPOTrainer on the exported model with the same pairs, batch, lengths, beta, loss
and optimizer (a frozen reference copy on both sides): the ratio tinylm / TRL. Printed: each
row and the ratios against full DPO.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune import (  # noqa: E402  (bench/finetune.py, the shared measuring code)
    MEMORY_TEXT,
    RESULTS,
    baseline_note,
    check_memory,
    common_overrides,
    environment,
    for_preset,
    make_base,
    parse,
    ratios,
    repeated,
    repeats_text,
    sentence,
    steps_text,
    table,
    worker,
    write_section,
)
from trl_peer import (  # noqa: E402
    BatchRecorder,
    MemoryProbe,
    StepClock,
    peer_lines,
    trl_args,
    trl_specs,
)

TRL_SKIP = "TRL DPOTrainer comparison skipped: trl is not installed, no small preset, or --no-trl"
MODES = (
    ("full", []),
    ("full, precompute_ref", ["precompute_ref=true"]),
    ("LoRA", ["lora.enabled=true"]),
)
DPO_REMAINS = (
    "what stays different with matched settings: TRL's fused LM head computes the policy's "
    "log-probs in chunks plus per-token entropy, mean logit and top-1 accuracy for its metrics "
    "(the reference pass only the log-probs); TRL passes the padding attention mask to SDPA "
    "(tinylm right-pads and needs none) and feeds 129 ids per row, tinylm 128; TRL reloads the "
    "reference from the exported directory, tinylm deep-copies the policy (both hold one "
    "frozen float32 copy). `--trl-defaults` also runs TRL with its own defaults."
)


def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """n synthetic pairs (prompt ~12 words; chosen and rejected ~20 words) as JSONL."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(
                json.dumps(
                    {
                        "prompt": sentence(rng, 12) + "?",
                        "chosen": sentence(rng, 20) + ".",
                        "rejected": sentence(rng, 20) + "!",
                    }
                )
                + "\n"
            )
    return path


def conversational(path: str) -> list[dict[str, Any]]:
    """The pairs as TRL's conversational rows: tinylm renders string pairs with the chat
    template (the prompt as the user's turn), so TRL gets the same text as messages."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in rows
    ]


def same_pairs(spec: dict[str, Any], dataset: Any) -> str:
    """How many sides TRL tokenizes (then truncates to max_length) exactly as tinylm, with the
    same trained-on positions."""
    from tinylm.sft import encode_pairs, read_preference_pairs
    from tinylm.tokenizer import Tokenizer

    seq = spec["trl"]["seq"]
    tok = Tokenizer.load(Path(spec["work"]) / f"base-{spec['preset']}")
    ours, _ = encode_pairs(tok, read_preference_pairs(spec["data"]), seq)
    ids = masks = 0
    for pair, row in zip(ours, dataset, strict=True):
        for side, key in zip(pair, ("chosen_ids", "rejected_ids"), strict=True):
            theirs = (row["prompt_ids"] + row[key])[: seq + 1]
            mask = ([False] * len(row["prompt_ids"]) + [True] * len(row[key]))[: seq + 1]
            ids += side.input_ids == theirs
            masks += list(side.loss_mask) == mask
    n = 2 * len(ours)
    return f"{ids}/{n} sides same ids, {masks}/{n} same trained-on positions"


def trl_dpo_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's DPOTrainer on the exported base run: the same pairs, batch, lengths and steps; a
    frozen reference copy (TRL loads one when given no ref_model), as tinylm's full DPO."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(spec["threads"])
    work, t = Path(spec["work"]), spec["trl"]
    hf_dir = work / f"hf-{spec['preset']}"  # exported by trl_specs
    memory = MemoryProbe()
    memory.start()
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    config = DPOConfig(
        **{**trl_args(t, work / "trl-out"), **t.get("config", {})},
        beta=0.1,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=False,
        max_length=t["seq"] + 1,
        disable_dropout=True,
    )
    recorder, clock = BatchRecorder(), StepClock()
    trainer = recorder.trainer_class(DPOTrainer)(
        model=model,
        ref_model=None,
        args=config,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(conversational(spec["data"])),
    )
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    rows = list(trainer.train_dataset)
    targets = [
        min(len(r[k]), t["seq"] + 1 - len(r["prompt_ids"]))
        for r in rows
        for k in ("chosen_ids", "rejected_ids")
    ]
    return {
        **memory.result(),
        "total_s": total,
        **clock.result(spec["warmup"]),
        **recorder.result(spec["warmup"]),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "targets_per_example": sum(targets) / len(targets),
        "same_data": same_pairs(spec, rows),
        "threads": torch.get_num_threads(),
    }


def dpo_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this process: TRL's side here, tinylm's in bench/finetune.py."""
    if spec["stage"] == "trl-dpo":
        return trl_dpo_worker(spec)
    result = worker(spec)
    run = json.loads((Path(spec["work"]) / f"run-{spec['name']}" / "config.json").read_text())
    counts = run["data"]["train"]  # pairs: target tokens per side
    return {**result, "targets_per_example": counts["target_tokens"] / max(2 * counts["kept"], 1)}


def main() -> None:
    parser = parse(__doc__.splitlines()[0])
    # 36 min at load average 15 on 2 cores: the small preset 3 runs of 10 steps (tinylm
    # and TRL alike), gpt2-124m (~8 s a full step on one thread) one run of 5 for its memory
    parser.set_defaults(steps=10, warmup=2, repeats=3, large_steps=5, large_repeats=1,
                        trl_defaults=False)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(dpo_worker(json.loads(args.worker))))
        return
    started = time.perf_counter()
    rows, params = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # enough pairs for every step (precompute_ref scores all of them before training)
        steps = max(args.steps, args.large_steps or 0)
        data = write_pairs(work / "pairs.jsonl", max(8, steps * args.batch))
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
                    "stage": "dpo",
                    "preset": preset,
                    "mode": mode,
                    "name": f"{preset}-{mode.replace(', ', '-')}",
                    "overrides": common_overrides(sized) + extra,
                }
                for mode, extra in MODES
            ]
            if preset == "small" and not args.no_trl and importlib.util.find_spec("trl"):
                specs += trl_specs(sized, common, "trl-dpo", 5e-5)  # tinylm's full DPO lr
            rows += repeated(specs, sized.repeats, __file__)
            print("\n".join(table(rows[-len(specs) :], params)[2:]), flush=True)
    check_memory(rows, params)
    command = "python bench/dpo.py " + " ".join(sys.argv[1:])
    lines = ratios(rows, "full") + [""] + environment(command.strip(), args.threads)
    lines += [
        f"Setup: random-init runs of each preset (the preset's vocabulary, byte tokens), "
        f"{args.batch} synthetic preference pairs per step in one micro-batch (chosen and "
        f"rejected in one forward), at most {args.seq} next-token positions per side, "
        f"sigmoid loss, beta 0.1, {steps_text(args)} of which the first {args.warmup} "
        "are not timed (CPU and wall time from one optimizer step's end to the next, as in "
        f"the finetune section); each configuration in a fresh process, round-robin, "
        f"{repeats_text(args)}. {MEMORY_TEXT} Full DPO holds a second copy "
        "of the model as reference; precompute_ref and LoRA do not. TRL: DPOTrainer on "
        "the exported model, the same pairs as conversational rows, max_length = "
        "positions + 1, precompute_ref_log_probs off, lr 5e-5 as tinylm, the "
        "TrainingArguments of the finetune section (float32, no gradient checkpointing, "
        "fused torch.optim.AdamW "
        f"with tinylm's betas and clipping). Bench wall time "
        f"{time.perf_counter() - started:.0f} s.",
        "",
    ]
    lines += table(rows, params) + ["", baseline_note(rows)]
    lines += peer_lines(rows, "trl-dpo", "full", "DPOTrainer", DPO_REMAINS) or [TRL_SKIP]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_section("dpo", section)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
