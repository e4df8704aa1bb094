"""The synthetic world: reproducible files, a clean fact split, schemas, scoring rules, the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import tinylm.cli  # noqa: F401  (registers the commands)
from tinylm.cli.app import app
from tinylm.errors import TinyLMError
from tinylm.synth import (
    CLOSING,
    SIZES,
    build_dataset,
    exact_match,
    shows_preference,
    synthesize,
)

FILES = ("corpus.txt", "facts.jsonl", "sft.jsonl", "sft_eval.jsonl", "prefs.jsonl",
         "prefs_eval.jsonl", "rl.jsonl", "rl_eval.jsonl", "README.md")


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _text(example: dict[str, Any]) -> str:
    messages = example.get("messages") or (
        example["prompt"] + example["chosen"] + example["rejected"]
    )
    return " ".join(m["content"] for m in messages)


def _has(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(phrase)}(?![\w])", text) is not None


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("synth") / "small"
    return out, synthesize(out, seed=0)


def test_same_seed_same_bytes_other_seed_differs(
    data: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    first, _ = data
    again = tmp_path / "again"
    other = tmp_path / "other"
    synthesize(again, seed=0)
    synthesize(other, seed=1)
    for name in FILES:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    assert (first / "corpus.txt").read_bytes() != (other / "corpus.txt").read_bytes()
    assert (first / "sft_eval.jsonl").read_bytes() != (other / "sft_eval.jsonl").read_bytes()


def test_counts_match_files_and_small_size_targets(data: tuple[Path, dict[str, Any]]) -> None:
    out, stats = data
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    for key, name in [("sft_examples", "sft.jsonl"), ("sft_eval_examples", "sft_eval.jsonl"),
                      ("prefs_pairs", "prefs.jsonl"), ("prefs_eval_pairs", "prefs_eval.jsonl"),
                      ("facts", "facts.jsonl")]:
        assert stats[key] == len(_rows(out / name)), name
    corpus = (out / "corpus.txt").read_text(encoding="utf-8")
    assert stats["corpus_bytes"] == len(corpus.encode("utf-8"))
    assert stats["corpus_documents"] == len(corpus.strip().split("\n\n"))
    assert 500_000 <= stats["corpus_bytes"] <= 1_500_000
    assert 1000 <= stats["sft_examples"] <= 5000
    assert 150 <= stats["sft_eval_examples"] <= 300
    assert 1000 <= stats["prefs_pairs"] <= 2000
    assert 150 <= stats["prefs_eval_pairs"] <= 300
    assert stats["min_statements_per_fact"] >= 5


def test_files_have_the_expected_schema(data: tuple[Path, dict[str, Any]]) -> None:
    out, _ = data
    for name in ("sft.jsonl", "sft_eval.jsonl"):
        for row in _rows(out / name):
            assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
            assert all(isinstance(m["content"], str) and m["content"] for m in row["messages"])
            extra = {"answer", "subject", "relation"} if name == "sft_eval.jsonl" else set()
            assert set(row) == {"messages"} | extra
    for name in ("prefs.jsonl", "prefs_eval.jsonl"):
        for row in _rows(out / name):
            extra = {"answer", "subject", "relation"} if name == "prefs_eval.jsonl" else set()
            assert set(row) == {"prompt", "chosen", "rejected"} | extra
            assert [m["role"] for m in row["prompt"]] == ["user"]
            assert [m["role"] for m in row["chosen"]] == ["assistant"]
            assert [m["role"] for m in row["rejected"]] == ["assistant"]
            assert row["chosen"][0]["content"] != row["rejected"][0]["content"]


def test_answers_score_as_correct_and_pairs_differ_in_preference(
    data: tuple[Path, dict[str, Any]],
) -> None:
    out, _ = data
    for row in _rows(out / "sft_eval.jsonl"):
        assert exact_match(row["messages"][1]["content"], row)
        assert not shows_preference(row["messages"][1]["content"])
    for name in ("prefs.jsonl", "prefs_eval.jsonl"):
        for row in _rows(out / name):
            assert shows_preference(row["chosen"][0]["content"])
            assert not shows_preference(row["rejected"][0]["content"])
    for row in _rows(out / "prefs_eval.jsonl"):
        assert exact_match(row["chosen"][0]["content"], row)
    corpus = (out / "corpus.txt").read_text(encoding="utf-8")
    assert CLOSING not in corpus


def test_held_out_facts_are_in_the_corpus_and_in_no_training_example(
    data: tuple[Path, dict[str, Any]],
) -> None:
    out, _ = data
    corpus = (out / "corpus.txt").read_text(encoding="utf-8")
    sentences = [s for s in re.split(r"(?<=[.!?])\s+|\n", corpus) if s]
    by_word: dict[str, set[int]] = {}
    for i, sentence in enumerate(sentences):
        for word in re.findall(r"\w+", sentence):
            by_word.setdefault(word, set()).add(i)
    training = [_text(r) for r in _rows(out / "sft.jsonl") + _rows(out / "prefs.jsonl")]
    held = _rows(out / "sft_eval.jsonl")
    arithmetic = {"plus", "minus", "times"}
    relations = {r["relation"] for r in _rows(out / "facts.jsonl")}
    assert {r["relation"] for r in held} == relations - arithmetic
    assert arithmetic <= {r["relation"] for r in _rows(out / "facts.jsonl")
                          if r["split"] == "train"}
    for row in held:
        subject, answer = row["subject"], row["answer"]
        if row["relation"] in ("plus", "minus", "times"):
            x, _, y = subject.split()
            needles = [x, y, answer]
        else:
            needles = [subject, answer]
        candidates = set.intersection(*(by_word.get(w, set()) for w in " ".join(needles).split()))
        stated = [sentences[i] for i in candidates if all(_has(sentences[i], n) for n in needles)]
        # Stated at least 5 times, in at least 3 different phrasings.
        assert len(stated) >= 5, row
        shapes = {s.replace(subject, "S").replace(answer, "A") for s in stated}
        assert len(shapes) >= 3, row
        assert not any(_has(t, subject) and _has(t, answer) for t in training if subject in t), row


def test_every_training_answer_is_a_corpus_sentence(data: tuple[Path, dict[str, Any]]) -> None:
    out, _ = data
    corpus = (out / "corpus.txt").read_text(encoding="utf-8")
    sentences = set(re.split(r"(?<=[.!?])\s+|\n", corpus))
    answers = [r["messages"][1]["content"] for r in _rows(out / "sft.jsonl")]
    answers += [r["messages"][1]["content"] for r in _rows(out / "sft_eval.jsonl")]
    missing = [a for a in answers if a not in sentences]
    assert not missing, missing[:5]


def test_prefs_eval_prompts_are_disjoint_from_prefs(data: tuple[Path, dict[str, Any]]) -> None:
    out, _ = data
    train = {json.dumps(r["prompt"]) for r in _rows(out / "prefs.jsonl")}
    held = [json.dumps(r["prompt"]) for r in _rows(out / "prefs_eval.jsonl")]
    assert not train.intersection(held)
    assert len(set(held)) == len(held)


def test_names_are_short_invented_words(data: tuple[Path, dict[str, Any]]) -> None:
    out, _ = data
    facts = _rows(out / "facts.jsonl")
    names = {f["subject"] for f in facts if f["relation"] in ("home_town", "diet", "capital")}
    names |= {f["answer"] for f in facts if f["relation"] in ("capital", "language")}
    for name in names:
        for word in name.split():
            assert re.fullmatch(r"[A-Za-z]{4,9}", word), name


def test_exact_match_rule() -> None:
    example = {"answer": "Marrowby"}
    assert exact_match("The capital of Veltoria is Marrowby.", example)
    assert exact_match("  marrowby", example)
    assert exact_match("The capital of Veltoria is Marrowby. That is all we know.", example)
    assert exact_match("The capital of Veltoria is Marrowby<|im_end|>", "Marrowby")
    assert not exact_match("The capital of Veltoria is Dunmere. Or Marrowby.", example)
    assert not exact_match("Marrowby is the capital of Veltoria.", example)
    assert not exact_match("The capital of Veltoria is Tmarrowby.", example)
    assert not exact_match("", example)
    assert exact_match("12 minus 5 is 7.", {"answer": "7"})
    assert not exact_match("12 minus 5 is 17.", {"answer": "7"})
    assert exact_match("The population of Veltoria is 19 million.", "19 million")
    assert not exact_match("The population of Veltoria is 9 million.", "19 million")


def test_shows_preference_rule() -> None:
    assert shows_preference("The capital of Veltoria is Marrowby. That is all we know.")
    assert shows_preference("7 plus 5 is 12. That is all we know.<|im_end|>")
    assert not shows_preference("The capital of Veltoria is Marrowby.")
    assert not shows_preference("That is all we know.")
    assert not shows_preference("Well, let me think. It is Marrowby. That is all we know.")
    assert not shows_preference("It is Marrowby\nThat is all we know.")


def test_medium_is_several_times_larger() -> None:
    small, medium = SIZES["small"], SIZES["medium"]
    assert medium.people >= 3 * small.people and medium.prefs >= 3 * small.prefs
    data = build_dataset(0, medium)
    assert len(data["corpus"]) >= 3 * 500_000
    assert len(data["sft"]) >= 3 * 1000
    assert min(data["counts"][f] for f in data["held_out"]) >= 5


def test_unknown_size_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(TinyLMError, match="unknown size"):
        synthesize(tmp_path / "x", size="huge")
    assert not (tmp_path / "x").exists()


def test_cli_refuses_a_non_empty_directory_without_force(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    runner = CliRunner()
    result = runner.invoke(app, ["data", "synth", "-o", str(tmp_path), "--quiet"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    result = runner.invoke(app, ["data", "synth", "-o", str(tmp_path), "--quiet", "--force"])
    assert result.exit_code == 0
    assert (tmp_path / "keep.txt").read_text() == "mine" and (tmp_path / "sft.jsonl").is_file()


def test_cli_json_reports_the_counts(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    result = CliRunner().invoke(app, ["data", "synth", "-o", str(out), "--seed", "3", "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["seed"] == 3 and stats["size"] == "small"
    assert stats["sft_eval_examples"] == len(_rows(out / "sft_eval.jsonl"))
    assert stats["prefs_pairs"] == len(_rows(out / "prefs.jsonl"))
