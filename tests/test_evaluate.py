"""`tinylm eval` by data kind: detection, instruction metrics, preference accuracy, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tinylm.cli  # noqa: F401  (registers the commands)
from tinylm.chat import encode_chat
from tinylm.cli.app import app
from tinylm.errors import TinyLMError
from tinylm.evaluate import detect_kind, evaluate_data
from tinylm.generate import stop_token_ids
from tinylm.losses import sequence_logps
from tinylm.model import ModelConfig, Transformer
from tinylm.run import load_run, save_run
from tinylm.sft import PreferencePair, collate_padded, encode_pairs
from tinylm.sft.data import read_conversations
from tinylm.sft.render import encode_example
from tinylm.tokenizer import Tokenizer

runner = CliRunner()
TOK = Tokenizer.bytes_only()
ANIMALS = ["cat", "dog", "cow", "owl", "bee", "ant"]


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=TOK.vocab_size, n_layers=2, n_heads=2, d_model=32,
                         max_seq_len=64)
    return Transformer(config).eval()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fit(model: Transformer, examples: list, steps: int) -> Transformer:
    """A few Adam steps on the response tokens of `examples` (makes the model prefer them)."""
    batch = collate_padded(examples, TOK.eot_id)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        logps = sequence_logps(model(batch.input_ids), batch.labels, batch.loss_mask)
        loss = -logps.sum() / batch.loss_mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def pairs_rows(swap: bool = False) -> list[dict]:
    rows = []
    for animal in ANIMALS:
        good, bad = animal, animal[::-1].upper()  # the tuned run never sees the rejected
        if swap:
            good, bad = bad, good
        rows.append({"prompt": f"Name: {animal}", "chosen": good, "rejected": bad})
    return rows


def direct_logp(model: Transformer, example) -> float:
    """Summed log p of the target tokens, the example run alone, position by position."""
    ids = torch.tensor([example.input_ids])
    log_probs = torch.log_softmax(model(ids)[0].double(), -1)
    return sum(log_probs[t, example.input_ids[t + 1]].item()
               for t in range(len(example.input_ids) - 1) if example.loss_mask[t + 1])


# ---- detection ---------------------------------------------------------------------------------

def test_detects_the_kind_of_data(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("hello")
    assert detect_kind([str(text)]) == "text"
    assert detect_kind([str(tmp_path)]) == "text"
    assert detect_kind([str(write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}]))]) == "text"
    assert detect_kind([str(write_jsonl(tmp_path / "p.jsonl", pairs_rows()))]) == "preference"
    for name, row in [("m", {"messages": [{"role": "user", "content": "a"}]}),
                      ("pc", {"prompt": "a", "completion": "b"}),
                      ("al", {"instruction": "a", "output": "b"})]:
        assert detect_kind([str(write_jsonl(tmp_path / f"{name}.jsonl", [row]))]) \
            == "instruction"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('\n{"question": "a", "answer": "b"}\n')
    with pytest.raises(TinyLMError, match=r"bad\.jsonl:2: fits no data kind"):
        detect_kind([str(bad)])
    with pytest.raises(TinyLMError, match="mixes kinds"):
        detect_kind([str(text), str(tmp_path / "p.jsonl")])


def test_bad_file_exits_2_with_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_run(run, tiny_model(), TOK, {"stage": "pretrain"})
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "a"}])
    result = runner.invoke(app, ["eval", "-m", str(run), "-d", str(bad)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bad.jsonl:1" in lines[0]


# ---- instruction data --------------------------------------------------------------------------

def test_instruction_metrics_equal_direct_computation(tmp_path):
    rows = [{"prompt": f"Name: {a}", "completion": a} for a in ANIMALS]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    convs = read_conversations(data)
    model = fit(tiny_model(), [encode_example(TOK, list(c.messages)) for c in convs[:4]], 40)
    run = tmp_path / "run"
    run.mkdir()
    save_run(run, model, TOK, {"stage": "finetune"})

    result = runner.invoke(app, ["eval", "-m", str(run), "-d", str(data), "--json",
                                 "--max-new-tokens", "6", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert numbers["kind"] == "instruction" and numbers["examples"] == len(rows)

    examples = [encode_example(TOK, list(c.messages)) for c in convs]
    nats = -sum(direct_logp(model, e) for e in examples)
    count = sum(e.n_targets for e in examples)
    assert numbers["val_loss"] == pytest.approx(nats / count, rel=1e-5)

    stops, hits = stop_token_ids(TOK), 0
    for conv in convs:
        prompt, answer = conv.reference
        ids = encode_chat(TOK, prompt, add_generation_prompt=True)
        new: list[int] = []
        with torch.no_grad():
            for _ in range(6):
                token = int(model(torch.tensor([ids + new]))[0, -1].argmax())
                if token in stops:
                    break
                new.append(token)
        hits += TOK.decode(new).strip() == answer.strip()
    assert hits >= 1  # the trained examples are learned: the check is not vacuous
    assert numbers["val_exact_match"] == pytest.approx(hits / len(convs))


# ---- preference pairs --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(base run, a run tuned towards the chosen answers naming that base, the pairs file)."""
    root = tmp_path_factory.mktemp("pref")
    base = root / "base"
    base.mkdir()
    save_run(base, tiny_model(), TOK, {"stage": "pretrain"})
    data = write_jsonl(root / "pairs.jsonl", pairs_rows())
    pairs = [PreferencePair(({"role": "user", "content": r["prompt"]},),
                            ({"role": "assistant", "content": r["chosen"]},),
                            ({"role": "assistant", "content": r["rejected"]},)) for r in
             pairs_rows()]
    encoded, _ = encode_pairs(TOK, pairs, 64)
    tuned = root / "tuned"
    tuned.mkdir()
    model = fit(tiny_model(), [c for c, _ in encoded], 30)
    save_run(tuned, model, TOK, {"stage": "dpo", "base_run": {"path": str(base.resolve())}})
    return base, tuned, data


def test_preference_accuracy_of_a_run_without_base_is_by_logp(runs, tmp_path):
    base, _, data = runs
    result = evaluate_data(base, [str(data)], device="cpu", batch_size=4)
    assert result["kind"] == "preference" and result["pairs"] == len(ANIMALS)
    assert "pref_accuracy" not in result  # no base to compare with
    model = load_run(base).model
    rows = pairs_rows()
    pairs = [PreferencePair(({"role": "user", "content": r["prompt"]},),
                            ({"role": "assistant", "content": r["chosen"]},),
                            ({"role": "assistant", "content": r["rejected"]},)) for r in rows]
    encoded, _ = encode_pairs(TOK, pairs, 64)
    wins = [direct_logp(model, c) > direct_logp(model, r) for c, r in encoded]
    assert result["pref_accuracy_logp"] == pytest.approx(sum(wins) / len(wins))
    swapped = write_jsonl(tmp_path / "swapped.jsonl", pairs_rows(swap=True))
    flipped = evaluate_data(base, [str(swapped)], device="cpu")
    assert flipped["pref_accuracy_logp"] == pytest.approx(1 - sum(wins) / len(wins))


def test_tuned_run_prefers_the_chosen_answers_against_its_base(runs, tmp_path):
    base, tuned, data = runs
    result = runner.invoke(app, ["eval", "-m", str(tuned), "-d", str(data), "--json"])
    assert result.exit_code == 0, result.output
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert numbers["pref_accuracy"] == 1.0 and numbers["pref_accuracy_logp"] == 1.0
    assert numbers["reward_margin"] > 0 and numbers["base_run"] == str(base.resolve())
    swapped = write_jsonl(tmp_path / "swapped.jsonl", pairs_rows(swap=True))
    flipped = evaluate_data(tuned, [str(swapped)], device="cpu")
    assert flipped["pref_accuracy"] == 0.0 and flipped["pref_accuracy_logp"] == 0.0
    table = runner.invoke(app, ["eval", "-m", str(tuned), "-d", str(data)])
    assert table.exit_code == 0 and "pref_accuracy" in table.stdout


def test_missing_base_run_is_a_user_error(runs, tmp_path):
    _, tuned, data = runs
    moved = tmp_path / "orphan"
    moved.mkdir()
    save_run(moved, load_run(tuned).model, TOK,
             {"stage": "dpo", "base_run": {"path": str(tmp_path / "gone")}})
    result = runner.invoke(app, ["eval", "-m", str(moved), "-d", str(data)])
    assert result.exit_code == 2 and "base run" in result.stderr


def test_adapter_run_is_compared_with_its_base(runs, tmp_path):
    from tinylm.lora import LoraSettings, apply_lora
    from tinylm.run import save_adapter_run

    base, _, data = runs
    pairs = [PreferencePair(({"role": "user", "content": r["prompt"]},),
                            ({"role": "assistant", "content": r["chosen"]},),
                            ({"role": "assistant", "content": r["rejected"]},)) for r in
             pairs_rows()]
    encoded, _ = encode_pairs(TOK, pairs, 64)
    torch.manual_seed(0)
    peft = apply_lora(load_run(base).model, LoraSettings(enabled=True, dropout=0.0))
    params = [p for p in peft.parameters() if p.requires_grad]
    batch = collate_padded([c for c, _ in encoded], TOK.eot_id)
    optimizer = torch.optim.Adam(params, lr=3e-2)
    for _ in range(20):
        loss = -sequence_logps(peft(batch.input_ids), batch.labels, batch.loss_mask).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_adapter_run(adapter, peft, base, {"stage": "dpo"})
    TOK.save(adapter / "tokenizer.json")
    result = evaluate_data(adapter, [str(data)], device="cpu")
    assert result["base_run"] == str(base.resolve())
    assert result["pref_accuracy"] == 1.0
