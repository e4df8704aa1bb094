"""DPO benchmark: peak memory and step time of full DPO, --precompute-ref and LoRA DPO, on CPU.

    .venv/bin/python bench/dpo.py                     # writes bench/results.md
    .venv/bin/python bench/dpo.py --presets small --steps 4 --no-write

Each configuration (preset x full / full with precompute_ref / LoRA) runs in a fresh subprocess
through the library API (`tinylm.dpo.dpo`) on a random-init run of the preset (its vocabulary
size, byte tokens), on synthetic preference pairs generated in-script. Memory and time are
measured as in bench/finetune.py (ru_maxrss delta; mean logged step time after `--warmup`
steps). With precompute_ref the reference pass over the training pairs happens before the
first step, so it is in the memory but not in the step time. Printed: each row and the ratios
against full DPO. TRL's DPOTrainer comparison is skipped with the printed reason.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune import (  # noqa: E402  (bench/finetune.py, the shared measuring code)
    RESULTS,
    common_overrides,
    environment,
    make_base,
    parse,
    ratios,
    run_config,
    sentence,
    table,
    write_section,
)

TRL_SKIP = ("TRL DPOTrainer comparison skipped: not wired up within this bench's time budget "
            "(trl 1.16's API on the exported model was not verified here); no TRL numbers "
            "recorded")
MODES = (("full", []), ("full, precompute_ref", ["precompute_ref=true"]),
         ("LoRA", ["lora.enabled=true"]))


def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """n synthetic pairs (prompt ~12 words; chosen and rejected ~20 words) as JSONL."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": sentence(rng, 12) + "?",
                                "chosen": sentence(rng, 20) + ".",
                                "rejected": sentence(rng, 20) + "!"}) + "\n")
    return path


def main() -> None:
    args = parse(__doc__.splitlines()[0]).parse_args()
    rows, params = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_pairs(work / "pairs.jsonl", 32)
        for preset in args.presets:
            params[preset] = make_base(preset, work / f"base-{preset}", args.seq)
            for mode, extra in MODES:
                spec = {"stage": "dpo", "preset": preset, "mode": mode,
                        "name": f"{preset}-{mode.replace(', ', '-')}", "work": str(work),
                        "data": str(data), "threads": args.threads, "warmup": args.warmup,
                        "overrides": common_overrides(args) + extra}
                rows.append(run_config(spec))
                print(table(rows[-1:], params)[-1], flush=True)
    command = "python bench/dpo.py " + " ".join(sys.argv[1:])
    lines = ratios(rows, "full") + [""] + environment(command.strip(), args.threads)
    lines += [f"Setup: random-init runs of each preset (the preset's vocabulary, byte tokens), "
              f"{args.batch} synthetic preference pairs per step in one micro-batch, at most "
              f"{args.seq} tokens per side, sigmoid loss, beta 0.1, {args.steps} steps of which "
              f"the first {args.warmup} are not timed; each configuration in a fresh process. "
              "RSS delta: peak RSS minus the RSS after importing torch, before loading the base "
              "run (full DPO holds a second copy of the model as reference; precompute_ref and "
              "LoRA do not).", ""]
    lines += table(rows, params) + ["", TRL_SKIP]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_section("dpo", section)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
