"""`tinylm quickstart`: every stage of a model's life on the built-in synthetic world, measured.

    DIR/data/        the synthetic world (`tinylm data synth`)
    DIR/tokenizer/   a byte-level BPE tokenizer trained on its corpus
    DIR/base/        pretrained on the corpus
    DIR/sft/         full instruction tuning of base on questions about the training facts
    DIR/lora/        LoRA tuning of base on the same data, to compare with full tuning
    DIR/dpo/         sft aligned with DPO to prefer one-sentence answers with a fixed closing
    DIR/rl/          sft reinforced with GRPO on questions about the training facts
    DIR/report.md, DIR/report.json   the numbers below, and links to each run's loss curve

Every model is scored the same way, by greedy generation through the chat template:
exact match on `sft_eval.jsonl` (questions on facts that only pretraining saw, scored by
`tinylm.synth.scoring.exact_match`), and the preferred-style share on the prompts of
`prefs_eval.jsonl` (`shows_preference`); base, sft, lora and dpo also on whether they end their
turn (`tinylm.turns`: p(<|im_end|>) after the right answer, and the share of replies sampled
at temperature 0.7 that end within 48 tokens). Preference accuracy is `tinylm eval`'s: the DPO run's
log-prob ratio against its base. `pretrain.unigram_bpb` is the entropy of the corpus's own token
frequencies in bits per byte: a model that knew nothing but those frequencies, fitted on the
text it is scored on (a floor for any unigram model, so the comparison flatters the baseline).

The stages call the same library functions as the commands, so a report's numbers are what a
user gets by running the commands by hand with the overrides that the plan lists.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinylm.console import SILENT, Output, Stopwatch, format_value
from tinylm.dpo import dpo
from tinylm.evaluate import eval_preference
from tinylm.finetune import finetune
from tinylm.generate import load_for_generation
from tinylm.pretrain import pretrain
from tinylm.rl.evaluate import encode_prompts, evaluate_rewards
from tinylm.rl.rewards import parse_rewards
from tinylm.rl.stage import rl
from tinylm.run import load_run, read_run_config
from tinylm.sft.evaluate import greedy_replies
from tinylm.synth import synthesize
from tinylm.synth.scoring import exact_match, shows_preference
from tinylm.textio import atomic_write_text, check_output_dir
from tinylm.tokenizer import Tokenizer
from tinylm.train.distributed import resolve_device
from tinylm.train.report import read_metrics
from tinylm.turns import ends_turn_share, p_turn_end


@dataclass(frozen=True)
class Plan:
    """What quickstart runs: the data size, the presets and each stage's `--set` overrides."""

    name: str
    synth_size: str
    vocab_size: int
    preset: str
    pretrain: tuple[str, ...]
    finetune: tuple[str, ...]
    lora: tuple[str, ...]
    dpo: tuple[str, ...]
    rl: tuple[str, ...] = ()
    samples: int = 3  # held-out questions shown with every model's answer


_TUNE = ("data.exact_match=0", "train.warmup_steps=10")
# DPO at a higher lr than the command's default (5e-5), with the chosen answers' NLL added
# (RPO). Measured on the default plan's tuned model: plain DPO at 5e-5 reaches full preference
# accuracy in 60 steps without moving one greedy generation, and at 5e-4 it collapses the model
# (0% exact match); with the NLL term at 3e-4, 100 steps move 94% of generations to the
# preferred style and keep exact match within a point.
_DPO = ("sft_weight=2.0",)
# GRPO of the tuned model on questions about the training facts (rl.jsonl), reward `exact`,
# sampling at the temperature the report scores (SAMPLED_TEMPERATURE). Scored on rl_eval.jsonl
# (the held-out questions of sft_eval.jsonl). Measured on the default plan's tuned model, 100
# steps: lr 1e-4 took held-out exact match from 69% to 89% greedy and from 53% to 85% sampled;
# 2e-4 to 87% / 84%; 5e-4 was unstable (56% / 51%), 1e-3 broke every answer.
_RL = ("reward=exact", "temperature=0.7", "num_generations=8", "max_completion_length=24",
       "train.eval_every=0")
SAMPLED_TEMPERATURE = 0.7
SAMPLES_PER_PROMPT = 8  # sampled exact match: the share of these samples that are right
PLANS = {
    # About 10 minutes on 2 CPU cores. Muon memorises the world's facts twice as well as AdamW
    # in the same 300 steps (statement completion of held-out facts: 155 vs 75 of 200).
    "default": Plan(
        "default", "small", 1700, "tiny",
        pretrain=("train.max_steps=450", "train.batch_tokens=4096", "train.warmup_steps=30",
                  "train.optimizer=muon", "train.eval_every=150", "train.save_every=0"),
        finetune=(*_TUNE, "train.max_steps=150", "train.eval_every=50"),
        lora=(*_TUNE, "train.max_steps=150", "train.eval_every=50", "lora.targets=all-linear"),
        dpo=(*_DPO, "train.lr=3e-4", "train.max_steps=100", "train.eval_every=50"),
        rl=(*_RL, "train.lr=1e-4", "train.max_steps=100"),
    ),
    # About 2 minutes on 2 CPU cores: every stage and number, at a fraction of the steps.
    "fast": Plan(
        "fast", "small", 1024, "tiny",
        pretrain=("train.max_steps=60", "train.batch_tokens=4096", "train.warmup_steps=10",
                  "train.optimizer=muon", "train.eval_every=30", "train.save_every=0"),
        finetune=(*_TUNE, "train.max_steps=30", "train.eval_every=15"),
        lora=(*_TUNE, "train.max_steps=30", "train.eval_every=15", "lora.targets=all-linear"),
        dpo=(*_DPO, "train.lr=1e-3", "train.max_steps=40", "train.batch_size=8",
             "train.eval_every=20"),
        rl=(*_RL, "train.lr=1e-4", "train.max_steps=10", "train.batch_size=4"),
    ),
    # On a GPU: a larger world and the ~13M preset.
    "cuda": Plan(
        "cuda", "medium", 4096, "small",
        pretrain=("train.max_steps=1500", "train.batch_tokens=32768", "train.warmup_steps=100",
                  "train.optimizer=muon", "train.eval_every=250", "train.save_every=0"),
        finetune=(*_TUNE, "train.max_steps=400", "train.eval_every=100"),
        lora=(*_TUNE, "train.max_steps=400", "train.eval_every=100", "lora.targets=all-linear"),
        dpo=(*_DPO, "train.lr=3e-4", "train.max_steps=150", "train.eval_every=50"),
        rl=(*_RL, "train.lr=1e-4", "train.max_steps=200"),
    ),
}
STAGES = ("data", "tokenizer", "pretrain", "sft", "lora", "dpo", "rl")


def choose_plan(fast: bool, device: str) -> Plan:
    """The fast plan when asked; the GPU plan on CUDA; the default plan otherwise. A device that
    is not there is an error here, before anything is written."""

    on_cuda = resolve_device(device).type == "cuda"
    if fast:
        return PLANS["fast"]
    return PLANS["cuda"] if on_cuda else PLANS["default"]


def unigram_bpb(tokenizer: Any, text: str) -> float:
    """Bits per byte of `text` under its own token frequencies (special tokens left out)."""
    ids = tokenizer.encode(text)
    counts = Counter(ids)
    total = len(ids)
    bits = -sum(n * math.log2(n / total) for n in counts.values())
    return bits / len(text.encode("utf-8"))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file that quickstart itself wrote."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def score_run(run_dir: Path, data_dir: Path, device: str,
              with_preference: bool) -> tuple[dict[str, float], list[str]]:
    """Exact match on sft_eval and, when asked, the preferred-style share on prefs_eval's
    prompts, of the run's greedy answers; and its answers to the eval questions."""

    run = load_for_generation(run_dir, device)
    questions = read_jsonl(data_dir / "sft_eval.jsonl")
    replies = greedy_replies(run.model, run.tokenizer, [q["messages"][:-1] for q in questions],
                             max_new_tokens=32, batch_size=32)
    pairs = zip(replies, questions, strict=True)
    scores = {"exact_match": _share([exact_match(r, q) for r, q in pairs if r is not None])}
    if with_preference:
        prompts = [p["prompt"] for p in read_jsonl(data_dir / "prefs_eval.jsonl")]
        styled = greedy_replies(run.model, run.tokenizer, prompts, max_new_tokens=48,
                                batch_size=32)
        scores["preferred_share"] = _share([shows_preference(r) for r in styled if r is not None])
    return scores, [r or "" for r in replies]


def sampled_exact_match(run_dir: Path, data_dir: Path, device: str, seed: int) -> float:
    """The share of SAMPLES_PER_PROMPT answers at SAMPLED_TEMPERATURE to each question of
    rl_eval.jsonl (the held-out questions) that are right (`exact` reward, seeded)."""

    run = load_for_generation(run_dir, device)
    context = run.model.config.max_seq_len
    prompts, ids, _ = encode_prompts(run.tokenizer, [str(data_dir / "rl_eval.jsonl")],
                                     ("answer",), context - 32)
    scores = evaluate_rewards(run.model, run.tokenizer, prompts, ids, parse_rewards("exact"),
                              max_new_tokens=32, temperature=SAMPLED_TEMPERATURE,
                              generations=SAMPLES_PER_PROMPT, seed=seed, batch_size=128)
    return scores["val_rewards/exact/mean"]


def turn_scores(run_dir: Path, data_dir: Path, device: str, seed: int) -> dict[str, float]:
    """Does the run end its turn (`tinylm.turns`): p(<|im_end|>) right after the right answers
    of sft_eval.jsonl, and the share of its replies sampled at SAMPLED_TEMPERATURE that end
    with <|im_end|> within 48 tokens."""

    run = load_for_generation(run_dir, device)
    conversations = [q["messages"] for q in read_jsonl(data_dir / "sft_eval.jsonl")]
    return {"p_turn_end": p_turn_end(run.model, run.tokenizer, conversations),
            "ends_turn_share": ends_turn_share(run.model, run.tokenizer,
                                               [c[:-1] for c in conversations],
                                               temperature=SAMPLED_TEMPERATURE, seed=seed)}


def _share(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def _curve(records: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if key in r]
    return values[-1] if values else None


def run_quickstart(out_dir: str | Path, *, fast: bool = False, device: str = "auto",
                   seed: int = 0, force: bool = False, out: Output = SILENT) -> dict[str, Any]:
    """Run every stage into `out_dir` and write report.md / report.json; return the report."""

    plan = choose_plan(fast, device)
    root = check_output_dir(out_dir, force)
    clock = Stopwatch()
    stage_out = Output(quiet=True) if out.json else out
    wall: dict[str, float] = {}

    def stage(name: str, what: str) -> Stopwatch:
        out.info(f"\n[bold]quickstart {STAGES.index(name) + 1}/{len(STAGES)}: {what}[/bold]")
        return Stopwatch()

    def common(extra: tuple[str, ...]) -> list[str]:
        return [*extra, f"train.seed={seed}", f"train.device={device}"]

    t = stage("data", f"the synthetic world ({plan.synth_size}, seed {seed})")
    data_dir = root / "data"
    synth = synthesize(data_dir, seed=seed, size=plan.synth_size, force=True, out=stage_out)
    corpus = data_dir / "corpus.txt"
    wall["data"] = t.elapsed

    t = stage("tokenizer", f"byte-level BPE, {plan.vocab_size:,} tokens")
    # On the corpus only: a tokenizer trained on the tuning data too would give the closing
    # that DPO teaches tokens of its own whose embeddings pretraining never trained, and
    # DPO's small steps cannot train them in time (measured: 0% preferred style after DPO).
    tokenizer = Tokenizer.train_files([corpus], plan.vocab_size, out=stage_out)
    tokenizer.save(check_output_dir(root / "tokenizer", True))
    wall["tokenizer"] = t.elapsed

    t = stage("pretrain", f"the {plan.preset} preset on corpus.txt")
    base = pretrain([str(corpus)], root / "base", config=plan.preset,
                    tokenizer=str(root / "tokenizer"), overrides=common(plan.pretrain),
                    force=True, out=stage_out)
    base_scores, base_answers = score_run(root / "base", data_dir, device, False)
    wall["pretrain"] = t.elapsed

    tune_data = {"data": [str(data_dir / "sft.jsonl")],
                 "val_data": [str(data_dir / "sft_eval.jsonl")]}
    t = stage("sft", "full instruction tuning (loss on the answers only)")
    sft = finetune(str(root / "base"), run_dir=root / "sft", overrides=common(plan.finetune),
                   force=True, out=stage_out, **tune_data)
    sft_scores, sft_answers = score_run(root / "sft", data_dir, device, True)
    wall["sft"] = t.elapsed

    t = stage("lora", "LoRA tuning of the same base on the same data")
    lora = finetune(str(root / "base"), run_dir=root / "lora",
                    overrides=common((*plan.lora, "lora.enabled=true")), force=True,
                    out=stage_out, **tune_data)
    lora_scores, lora_answers = score_run(root / "lora", data_dir, device, False)
    counts = read_run_config(root / "lora")["parameters"]
    trainable, total = counts["trainable"], counts["total"]
    wall["lora"] = t.elapsed

    t = stage("dpo", "DPO of the tuned model: one sentence, then 'That is all we know.'")
    aligned = dpo(str(root / "sft"), [str(data_dir / "prefs.jsonl")], root / "dpo",
                  val_data=[str(data_dir / "prefs_eval.jsonl")], overrides=common(plan.dpo),
                  force=True, out=stage_out)
    dpo_scores, dpo_answers = score_run(root / "dpo", data_dir, device, True)
    preference = eval_preference(load_run(root / "dpo", "cpu"),
                                 [str(data_dir / "prefs_eval.jsonl")], 16)
    wall["dpo"] = t.elapsed

    t = stage("rl", "GRPO of the tuned model, reward: exact match on training questions")
    sampled_before = sampled_exact_match(root / "sft", data_dir, device, seed)
    reinforced = rl(str(root / "sft"), [str(data_dir / "rl.jsonl")], root / "rl",
                    overrides=common(plan.rl), force=True, out=stage_out)
    rl_scores, rl_answers = score_run(root / "rl", data_dir, device, False)
    sampled_after = sampled_exact_match(root / "rl", data_dir, device, seed)
    wall["rl"] = t.elapsed

    turns = {name: turn_scores(root / name, data_dir, device, seed)
             for name in ("base", "sft", "lora", "dpo")}
    base_metrics = read_metrics(root / "base" / "metrics.jsonl")
    report: dict[str, Any] = {
        "plan": plan.name,
        "seed": seed,
        "device": device,
        "data": {"facts": synth["facts"], "held_out_facts": synth["held_out_facts"],
                 "corpus_bytes": synth["corpus_bytes"], "sft_eval": synth["sft_eval_examples"],
                 "prefs_eval": synth["prefs_eval_pairs"], "wall_s": wall["data"]},
        "tokenizer": {"vocab_size": tokenizer.vocab_size, "wall_s": wall["tokenizer"]},
        "pretrain": {"preset": plan.preset, "steps": base.step, "tokens": base.tokens,
                     "loss": base.loss, "val_loss": _curve(base_metrics, "val_loss"),
                     "val_bpb": base.eval.get("val_bpb", _curve(base_metrics, "val_bpb")),
                     "unigram_bpb": unigram_bpb(tokenizer, corpus.read_text(encoding="utf-8")),
                     "parameters": sum(p.numel() for p in
                                       load_run(root / "base", "cpu").model.parameters()),
                     "wall_s": wall["pretrain"]},
        "base": {"exact_match": base_scores["exact_match"]},
        "sft": {"steps": sft.step, "loss": sft.loss, "val_loss": sft.eval.get("val_loss"),
                "exact_match": sft_scores["exact_match"], "wall_s": wall["sft"]},
        "lora": {"steps": lora.step, "loss": lora.loss, "val_loss": lora.eval.get("val_loss"),
                 "exact_match": lora_scores["exact_match"], "trainable_parameters": trainable,
                 "trainable_fraction": trainable / total, "wall_s": wall["lora"]},
        "dpo": {"steps": aligned.step, "loss": aligned.loss,
                "pref_accuracy": preference["pref_accuracy"],
                "reward_margin": preference["reward_margin"],
                "preferred_share_before": sft_scores["preferred_share"],
                "preferred_share_after": dpo_scores["preferred_share"],
                "exact_match": dpo_scores["exact_match"], "wall_s": wall["dpo"]},
        "rl": {"steps": reinforced.step, "loss": reinforced.loss,
               "exact_match_before": sft_scores["exact_match"],
               "exact_match": rl_scores["exact_match"],
               "sampled_exact_match_before": sampled_before,
               "sampled_exact_match_after": sampled_after, "wall_s": wall["rl"]},
        "wall_s": clock.elapsed,
    }
    for name, scores in turns.items():
        report[name].update(scores)
    questions = read_jsonl(data_dir / "sft_eval.jsonl")[: plan.samples]
    report["samples"] = [
        {"question": q["messages"][0]["content"], "answer": q["answer"],
         "base": base_answers[i], "sft": sft_answers[i], "lora": lora_answers[i],
         "dpo": dpo_answers[i], "rl": rl_answers[i]}
        for i, q in enumerate(questions)
    ]
    write_report(root, report)
    return report


def write_report(root: Path, report: dict[str, Any]) -> None:
    """DIR/report.json (the numbers) and DIR/report.md (tables, curves, samples)."""

    atomic_write_text(root / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(root / "report.md", render_markdown(report))


# p(<|im_end|>) after a right answer; the share of sampled replies that end their turn
_TURNS = ("p_turn_end", "ends_turn_share")
_ROWS = {
    "pretrain": ("steps", "tokens", "parameters", "loss", "val_loss", "val_bpb", "unigram_bpb",
                 "wall_s"),
    "base": ("exact_match", *_TURNS),
    "sft": ("steps", "loss", "val_loss", "exact_match", *_TURNS, "wall_s"),
    "lora": ("steps", "loss", "val_loss", "exact_match", *_TURNS, "trainable_parameters",
             "trainable_fraction", "wall_s"),
    "dpo": ("steps", "loss", "pref_accuracy", "reward_margin", "preferred_share_before",
            "preferred_share_after", "exact_match", *_TURNS, "wall_s"),
    "rl": ("steps", "loss", "exact_match_before", "exact_match", "sampled_exact_match_before",
           "sampled_exact_match_after", "wall_s"),
}
_TITLES = {
    "pretrain": "Pretraining (base/)",
    "base": "The base model, asked through the chat template",
    "sft": "Full instruction tuning (sft/)",
    "lora": "LoRA tuning (lora/)",
    "dpo": "DPO (dpo/, from sft/)",
    "rl": f"GRPO (rl/, from sft/); sampled: {SAMPLES_PER_PROMPT} answers per question at "
          f"temperature {SAMPLED_TEMPERATURE}",
}
_CURVES = {"pretrain": "base", "sft": "sft", "lora": "lora", "dpo": "dpo", "rl": "rl"}


def _cell(value: Any) -> str:

    return "-" if value is None else format_value(value)


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: a table per stage, each run's loss curve, and sample answers."""
    data = report["data"]
    lines = [
        "# tinylm quickstart report",
        "",
        f"Plan `{report['plan']}`, seed {report['seed']}, device {report['device']}: "
        f"{_cell(report['wall_s'])} s in all. The world has {data['facts']:,} facts, "
        f"{data['held_out_facts']:,} of them held out of every tuning set; exact match is "
        f"scored on {data['sft_eval']:,} questions about those, and the preferred style on "
        f"{data['prefs_eval']:,} prompts of prefs_eval.jsonl (see data/README.md).",
    ]
    for stage, keys in _ROWS.items():
        lines += ["", f"## {_TITLES[stage]}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_cell(report[stage].get(key))} |" for key in keys]
        if stage in _CURVES:
            lines += ["", f"![{stage} loss curve]({_CURVES[stage]}/loss_curve.png)"]
    lines += ["", "## Sample answers to held-out questions", ""]
    for sample in report["samples"]:
        lines += [f"**{sample['question']}** (answer: {sample['answer']})", ""]
        lines += [f"- {name}: {sample[name].strip()!r}"
                  for name in ("base", "sft", "lora", "dpo", "rl")]
        lines.append("")
    return "\n".join(lines)
