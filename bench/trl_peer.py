"""The TRL side of bench/finetune.py and bench/dpo.py: TrainingArguments matched to tinylm's
step, the step clock both sides use, a recorder of TRL's batches, SFTTrainer's worker, and the
comparison lines.

Both sides run in fresh processes with the same torch threads; a step's time, wall and CPU,
runs from one optimizer step's end to the next, stamped by the same torch optimizer hook.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any


def _status_mb(field: str) -> float:
    """A VmRSS / VmHWM line of /proc/self/status, in MiB (Linux reports kB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} (these benches need Linux)")


class MemoryProbe:
    """Peak memory of what runs after `start()`, measured by this process alone.

    ru_maxrss is no use here: Linux carries a parent's peak over fork and exec into the child
    (a worker started by a parent that built the 124M base began at ~856 MiB whatever it did).
    VmHWM, the high-water mark of this process's own address space, starts afresh at exec, and
    writing 5 to /proc/self/clear_refs resets it to the current RSS, so peak - baseline is what
    the measured work added on top of the imported libraries."""

    def __init__(self) -> None:
        self.maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.baseline_mb = 0.0
        self.reset = False

    def start(self) -> None:
        """Baseline: the current RSS; the peak from here on."""
        self.baseline_mb = _status_mb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:  # kernels before 4.0; VmHWM then also counts the imports' own peak
            self.reset = False

    def result(self) -> dict[str, Any]:
        """peak_mb (VmHWM), delta_mb (peak - baseline) and how they were measured."""
        peak = _status_mb("VmHWM")
        return {
            "peak_mb": peak,
            "delta_mb": peak - self.baseline_mb,
            "baseline_mb": self.baseline_mb,
            "peak_reset": self.reset,
            "ru_maxrss_at_baseline_mb": self.maxrss_mb,
        }


def trl_args(t: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """SFTConfig / DPOConfig keyword arguments that match tinylm's step (shared by both TRL
    comparisons); each comment names the TRL default replaced. What cannot be matched is
    listed in SFT_REMAINS and bench/dpo.py's DPO_REMAINS."""
    return {
        "output_dir": str(out_dir),
        "max_steps": t["steps"],
        "per_device_train_batch_size": t["batch"],
        "gradient_accumulation_steps": 1,
        # tinylm's tuning schedule and AdamW: warmup 10 then cosine to 0, betas (0.9, 0.95),
        # no weight decay, clipping at 1
        "learning_rate": t["lr"],
        "lr_scheduler_type": "cosine",
        "warmup_steps": 10,
        "adam_beta2": 0.95,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "optim": "adamw_torch_fused",  # TRL's default; tinylm's AdamW is the fused kernel too
        "gradient_checkpointing": False,  # TRL default True: recomputes the blocks in backward
        "bf16": False,  # TRL default True: bf16 autocast, several times slower on this CPU
        "logging_strategy": "no",  # default every 10 steps (tinylm logs each step, cheaply)
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": 1337,
        "torch_compile": False,
    }


# TRL's own defaults for what trl_args changes (as an earlier version of the bench ran)
TRL_DEFAULTS = {
    "gradient_checkpointing": True,
    "bf16": True,
    "logging_strategy": "steps",
    "logging_steps": 10,
}


class StepClock:
    """Wall and CPU time at the end of every optimizer step, from torch's global optimizer
    step hook: the same stamp on tinylm's side and TRL's (its AcceleratedOptimizer calls the
    torch optimizer). A step's time runs from the previous step's end to its own: data,
    forward, backward, clipping, update and the trainer's own work between steps."""

    def __init__(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.wall: list[float] = []
        self.cpu: list[float] = []
        register_optimizer_step_post_hook(self._stamp)

    def _stamp(self, *args: Any) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def result(self, warmup: int) -> dict[str, Any]:
        """Mean wall and CPU seconds of the steps after the first `warmup` (at least 1)."""

        def timed(stamps: list[float]) -> list[float]:
            return [b - a for a, b in zip(stamps, stamps[1:], strict=False)][warmup - 1 :]

        wall, cpu = timed(self.wall), timed(self.cpu)
        return {
            "step_s": sum(wall) / len(wall),
            "cpu_s": sum(cpu) / len(cpu),
            "steps_timed": len(wall),
            "cpu_steps": cpu,  # each timed step's CPU seconds, for the spread
        }


class BatchRecorder:
    """TRL side: the shape and non-padding next-token positions of every training batch."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[int], int]] = []

    def trainer_class(self, base: type) -> type:
        """`base` (SFTTrainer, DPOTrainer) recording each batch before its training step."""
        batches = self.batches

        class Recorded(base):  # type: ignore[misc, valid-type]
            def training_step(self, model: Any, inputs: Any, *a: Any, **k: Any) -> Any:
                mask = inputs["attention_mask"]
                batches.append((list(mask.shape), int(mask.sum()) - mask.shape[0]))
                return super().training_step(model, inputs, *a, **k)

        return Recorded

    def result(self, warmup: int) -> dict[str, Any]:
        """Mean positions per step and the first timed batch's padded shape."""
        timed = self.batches[warmup:]
        return {
            "positions_per_step": sum(n for _, n in timed) / len(timed),
            "padded_shape": timed[0][0],
        }


def prompt_completion(path: str) -> list[dict[str, Any]]:
    """The chats of `path` as TRL's conversational prompt-completion rows (the answer is the
    completion, so TRL's completion_only_loss trains on it, as tinylm does)."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]


def same_tokens(spec: dict[str, Any], dataset: Any, key: str) -> str:
    """How many TRL examples hold exactly tinylm's token ids and trained-on positions."""
    from tinylm.sft import encode_conversations, read_conversations
    from tinylm.tokenizer import Tokenizer

    tok = Tokenizer.load(Path(spec["work"]) / f"base-{spec['preset']}")
    ours, _ = encode_conversations(tok, read_conversations(spec["data"]), spec["trl"]["seq"])
    ids = sum(e.input_ids == list(r["input_ids"]) for e, r in zip(ours, dataset, strict=True))
    masks = sum(
        list(e.loss_mask) == [x != -100 for x in r[key]] for e, r in zip(ours, dataset, strict=True)
    )
    return f"{ids}/{len(ours)} same ids, {masks}/{len(ours)} same trained-on positions"


def trl_sft_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's SFTTrainer on the exported base run: the same chats, batch, window and steps."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    work, t = Path(spec["work"]), spec["trl"]
    hf_dir = work / f"hf-{spec['preset']}"  # exported by trl_specs
    memory = MemoryProbe()
    memory.start()
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    # max_length seq + 1 ids: seq next-token positions per example, tinylm's window
    config = SFTConfig(
        **{**trl_args(t, work / "trl-out"), **t.get("config", {})},
        max_length=t["seq"] + 1,
        packing=False,
        padding_free=False,
        completion_only_loss=True,
    )
    recorder, clock = BatchRecorder(), StepClock()
    trainer = recorder.trainer_class(SFTTrainer)(
        model=model,
        args=config,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(prompt_completion(spec["data"])),
    )
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    labels = [[x != -100 for x in r["labels"]] for r in trainer.train_dataset]
    return {
        **memory.result(),
        "total_s": total,
        **clock.result(spec["warmup"]),
        **recorder.result(spec["warmup"]),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "targets_per_example": sum(sum(m[1:]) for m in labels) / len(labels),
        "same_data": same_tokens(spec, trainer.train_dataset, "labels"),
        "threads": torch.get_num_threads(),
        "settings": {
            k: getattr(config, k)
            for k in (
                "gradient_checkpointing",
                "bf16",
                "optim",
                "torch_compile",
                "packing",
                "padding_free",
                "completion_only_loss",
                "max_length",
                "logging_steps",
            )
        },
    }


def trl_specs(
    args: argparse.Namespace, common: dict[str, Any], stage: str, lr: float
) -> list[dict[str, Any]]:
    """TRL on the small preset, exported here (in the parent process, so that the export's
    memory stays out of the workers' RSS): matched settings, then TRL's defaults."""
    from tinylm.interop.export import export_hf

    work = Path(common["work"])
    export_hf(work / "base-small", work / "hf-small", force=True)
    trl = {"steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": lr}
    variants = [("matched", {})] + ([("defaults", TRL_DEFAULTS)] if args.trl_defaults else [])
    peer = "SFTTrainer" if stage == "trl-sft" else "DPOTrainer"
    return [
        {
            **common,
            "stage": stage,
            "preset": "small",
            "mode": f"TRL {peer}, {name}",
            "name": f"small-trl-{name}",
            "trl": {**trl, "config": config},
        }
        for name, config in variants
    ]


def same_work_line(ours: dict[str, Any], peer: dict[str, Any]) -> str:
    """Do both sides do the same work per step? Positions, trained-on tokens, parameters."""
    same = (
        ours["positions_per_step"] == peer["positions_per_step"]
        and ours["trainable"] == peer["trainable"]
        and ours["threads"] == peer["threads"]
    )
    return (
        f"- same work per step: {'yes' if same else '**NO**'}: next-token positions per "
        f"step tinylm {ours['positions_per_step']:,.0f}, TRL {peer['positions_per_step']:,.0f}"
        f" (TRL's padded batch {' x '.join(map(str, peer['padded_shape']))} ids); trained-on "
        f"tokens per sequence {ours['targets_per_example']:.1f} / "
        f"{peer['targets_per_example']:.1f}; trainable parameters {ours['trainable']:,} / "
        f"{peer['trainable']:,}; torch threads {ours['threads']} / {peer['threads']}; "
        f"data: {peer['same_data']}"
    )


def ratio_range(ours: dict[str, Any], peer: dict[str, Any]) -> str:
    """The lowest and highest ratio of one run's mean CPU step to the peer's run of the same
    round (the rounds ran one after the other, so a pair shared the machine's load)."""
    pairs = [a / b for a, b in zip(ours["cpu_runs"], peer["cpu_runs"], strict=False)]
    return f"{min(pairs):.2f} to {max(pairs):.2f}"


def peer_lines(
    rows: list[dict[str, Any]], stage: str, ours_mode: str, peer: str, remains: str
) -> list[str]:
    """Ratios tinylm / TRL (matched settings, then TRL's defaults) on the small preset."""
    matched = next((r for r in rows if r["stage"] == stage and "matched" in r["mode"]), None)
    if matched is None:
        return []
    ours = next(r for r in rows if r["preset"] == "small" and r["mode"] == ours_mode)
    lines = [
        f"- small, {ours_mode}: tinylm / TRL {peer} with matched settings: step time CPU "
        f"**{ours['cpu_s'] / matched['cpu_s']:.2f}** (median of {ours['repeats']} runs a "
        f"side; run by run {ratio_range(ours, matched)}; "
        f"wall {ours['step_s'] / matched['step_s']:.2f}), RSS delta "
        f"{ours['delta_mb'] / matched['delta_mb']:.2f}, peak RSS "
        f"{ours['peak_mb'] / matched['peak_mb']:.2f}",
        same_work_line(ours, matched),
    ]
    defaults = next((r for r in rows if r["stage"] == stage and "defaults" in r["mode"]), None)
    if defaults is not None:
        lines.append(
            f"- with TRL's own defaults (bf16 autocast, gradient checkpointing, "
            f"logging every 10 steps): tinylm / TRL step time CPU "
            f"**{ours['cpu_s'] / defaults['cpu_s']:.2f}** (run by run "
            f"{ratio_range(ours, defaults)}; wall "
            f"{ours['step_s'] / defaults['step_s']:.2f}); TRL defaults / TRL matched "
            f"{defaults['cpu_s'] / matched['cpu_s']:.1f}x"
        )
        lines.append(f"- {defaults_text()}")
    return [*lines, f"- {remains}"]


def cpu_bf16() -> str:
    """Whether this CPU has bf16 matrix instructions (the flags Linux lists), in words: TRL's
    default bf16 autocast is several times slower than float32 on one without them."""
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    found = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if found:
        return f"this CPU has bf16 instructions ({', '.join(found)}), so bf16 autocast costs little"
    return "this CPU has no bf16 instructions, so bf16 autocast runs its products slowly"


def defaults_text() -> str:
    """What TRL's defaults change, and what that does on this CPU."""
    return (
        "TRL's defaults turn on bf16 autocast (also on a CPU) and gradient checkpointing "
        f"(every block recomputed in the backward); {cpu_bf16()}"
    )


SFT_REMAINS = (
    "what stays different with matched settings: TRL's fused LM head "
    "computes the log-probs in chunks plus per-token entropy and top-1 accuracy for its "
    "metrics at every step; TRL passes the padding attention mask to SDPA (tinylm right-pads "
    "and needs none under causal attention) and feeds 129 ids per row (the last hidden state "
    "is dropped), tinylm 128. Both run torch's fused AdamW kernel (TRL's default, and "
    "tinylm's)."
)
