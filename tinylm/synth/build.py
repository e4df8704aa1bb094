"""From a seed to the files: the fact split, instruction data, preference pairs and writing.

The split is by fact: `held_out` facts about the world (the same share of every relation, so
every answer type is seen in training) get no training question and no training preference
pair; they are asked only in `sft_eval.jsonl` and `prefs_eval.jsonl`, and are known only from
the corpus. Arithmetic is taught in training only: a sum is not a fact about the world that a
small model can look up, and in a probe (a 1M-parameter model pretrained on 4.6M tokens of the
small corpus, then tuned) held-out sums scored 0-7% while held-out world facts scored ~80%.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

from tinylm.console import SILENT, Output
from tinylm.errors import TinyLMError
from tinylm.synth.corpus import build_corpus
from tinylm.synth.readme import readme
from tinylm.synth.scoring import CLOSING
from tinylm.synth.templates import ARITHMETIC, RELATIONS, answer, question
from tinylm.synth.world import SIZES, Fact, SizeSpec, build_world
from tinylm.textio import atomic_write_text, check_output_dir

_RAMBLES = (
    "Hmm, that is an interesting question, and there is a lot one could say about it. "
    "Let me think for a moment. {answer}",
    "Well, I am not completely sure about this one, because people say many different things. "
    "{answer} At least, I think so.",
    "Good question! There are so many facts to keep track of, and it is easy to mix them up. "
    "Anyway, here is what I know. {answer}",
)
# Share of each kind of rejected answer in the preference pairs.
_REJECTED_KINDS = (("plain", 0.4), ("wrong", 0.3), ("rambling", 0.3))


def split_facts(rng: random.Random, facts: list[Fact], n_held_out: int) -> set[Fact]:
    """`n_held_out` facts, the same share of each relation (largest remainder), drawn by `rng`."""
    by_relation: dict[str, list[Fact]] = {}
    for fact in facts:
        by_relation.setdefault(fact.relation, []).append(fact)
    share = n_held_out / len(facts)
    quota = {r: int(len(fs) * share) for r, fs in by_relation.items()}
    rest = sorted(by_relation, key=lambda r: -(len(by_relation[r]) * share - quota[r]))
    for r in rest[: n_held_out - sum(quota.values())]:
        quota[r] += 1
    held: set[Fact] = set()
    for relation, fs in by_relation.items():
        # Keep at least one training fact of every relation so that its format is taught.
        held.update(rng.sample(fs, min(quota[relation], len(fs) - 1)))
    return held


def _chat(user: str, assistant: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": assistant}]}


def _key(fact: Fact) -> dict[str, str]:
    return {"answer": fact.answer, "subject": fact.subject, "relation": fact.relation}


def _wrong_value(rng: random.Random, fact: Fact, pools: dict[str, list[str]]) -> str:
    if fact.relation in ARITHMETIC:
        value = int(fact.answer)
        choices = [value + d for d in (-3, -2, -1, 1, 2, 3) if value + d >= 0]
        return str(rng.choice(choices))
    return rng.choice([v for v in pools[fact.relation] if v != fact.answer])


def _pair(rng: random.Random, fact: Fact, pools: dict[str, list[str]]) -> dict[str, Any]:
    prompt = question(fact, rng.randrange(len(RELATIONS[fact.relation].questions)))
    kind = rng.choices([k for k, _ in _REJECTED_KINDS], [w for _, w in _REJECTED_KINDS])[0]
    if kind == "plain":
        rejected = answer(fact)
    elif kind == "wrong":
        rejected = answer(fact, _wrong_value(rng, fact, pools))
    else:
        rejected = rng.choice(_RAMBLES).format(answer=answer(fact))
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": f"{answer(fact)} {CLOSING}"}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def build_dataset(seed: int, spec: SizeSpec) -> dict[str, Any]:
    """Every file's content (as Python objects and text), from a seed; writes nothing."""
    rng = random.Random(seed)
    world = build_world(rng, spec)
    facts = world.facts()
    corpus, counts = build_corpus(rng, world, spec)
    world_facts = [f for f in facts if f.relation not in ARITHMETIC]
    held = split_facts(rng, world_facts, spec.held_out)
    train = [f for f in facts if f not in held]
    held_out = [f for f in facts if f in held]
    pools: dict[str, list[str]] = {}
    for fact in facts:
        if fact.answer not in pools.setdefault(fact.relation, []):
            pools[fact.relation].append(fact.answer)

    sft = [_chat(question(f, i), answer(f))
           for f in train for i in range(len(RELATIONS[f.relation].questions))]
    rng.shuffle(sft)
    sft_eval = []
    for f in held_out:
        i = rng.randrange(len(RELATIONS[f.relation].questions))
        sft_eval.append(_chat(question(f, i), answer(f)) | _key(f))
    rng.shuffle(sft_eval)

    pref_facts: list[Fact] = []
    while len(pref_facts) < spec.prefs:  # every training fact once, then again, in new orders
        pref_facts += rng.sample(train, len(train))
    prefs = [_pair(rng, f, pools) for f in pref_facts[: spec.prefs]]
    prefs_eval = [_pair(rng, f, pools) | _key(f) for f in held_out]
    rng.shuffle(prefs_eval)
    # RL prompts (`tinylm rl --reward exact`): one question per training fact, and the very
    # questions of sft_eval. Their own generator, so the other files stay as they were.
    rl_rng = random.Random(f"{seed}/rl")
    rl = [{"prompt": question(f, rl_rng.randrange(len(RELATIONS[f.relation].questions)))}
          | _key(f) for f in train]
    rl_rng.shuffle(rl)
    rl_eval = [{"prompt": row["messages"][0]["content"]} | _key_of(row) for row in sft_eval]
    return {
        "world": world, "facts": facts, "held_out": held, "counts": counts, "corpus": corpus,
        "sft": sft, "sft_eval": sft_eval, "prefs": prefs, "prefs_eval": prefs_eval,
        "rl": rl, "rl_eval": rl_eval,
    }


def _key_of(row: dict[str, Any]) -> dict[str, str]:
    return {k: row[k] for k in ("answer", "subject", "relation")}


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def synthesize(
    out_dir: str | Path, seed: int = 0, size: str = "small", force: bool = False,
    out: Output = SILENT,
) -> dict[str, Any]:
    """Write the synthetic world's files into `out_dir`; return the counts of what was written.

    The same seed and size always give byte-identical files. `out_dir` must be absent or empty
    unless `force` (then the files are replaced, other files in it are left alone).
    """
    if size not in SIZES:
        raise TinyLMError(f"unknown size {size!r}", f"choose one of: {', '.join(SIZES)}")
    path = check_output_dir(out_dir, force)
    out.info(f"generating the {size} synthetic world (seed {seed})")
    data = build_dataset(seed, SIZES[size])
    facts_rows = [
        {"relation": f.relation, "subject": f.subject, "answer": f.answer,
         "split": "held_out" if f in data["held_out"] else "train",
         "statements": data["counts"][f]}
        for f in data["facts"]
    ]
    stats = {
        "size": size,
        "seed": seed,
        "facts": len(data["facts"]),
        "held_out_facts": len(data["held_out"]),
        "min_statements_per_fact": min(data["counts"][f] for f in data["facts"]),
        "corpus_documents": data["corpus"].count("\n\n") + 1,
        "corpus_bytes": len(data["corpus"].encode("utf-8")),
        "sft_examples": len(data["sft"]),
        "sft_eval_examples": len(data["sft_eval"]),
        "prefs_pairs": len(data["prefs"]),
        "prefs_eval_pairs": len(data["prefs_eval"]),
        "rl_prompts": len(data["rl"]),
        "rl_eval_prompts": len(data["rl_eval"]),
    }
    relations = Counter(f.relation for f in data["facts"])
    files = {
        "corpus.txt": data["corpus"],
        "facts.jsonl": _jsonl(facts_rows),
        "sft.jsonl": _jsonl(data["sft"]),
        "sft_eval.jsonl": _jsonl(data["sft_eval"]),
        "prefs.jsonl": _jsonl(data["prefs"]),
        "prefs_eval.jsonl": _jsonl(data["prefs_eval"]),
        "rl.jsonl": _jsonl(data["rl"]),
        "rl_eval.jsonl": _jsonl(data["rl_eval"]),
        # Last: a README in the directory means every file before it was written.
        "README.md": readme(stats, relations, data["sft"][0], data["prefs"][0]),
    }
    for name, text in files.items():
        atomic_write_text(path / name, text)
    out.info(f"wrote {len(files)} files to {path}")
    return {"out_dir": str(path), **stats}
