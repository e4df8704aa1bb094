"""The shared training loop: schedule, optimizer groups, accumulation, checkpoints, faults."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tinylm.errors import TinyLMError
from tinylm.losses import lm_loss
from tinylm.model import ModelConfig, Transformer
from tinylm.run import save_run
from tinylm.tokenizer import Tokenizer
from tinylm.train import checkpoint as ckpt
from tinylm.train.config import TrainConfig
from tinylm.train.loop import LossOutput, accumulation_steps, train
from tinylm.train.optim import Muon, build_optimizers, orthogonalize
from tinylm.train.report import read_metrics
from tinylm.train.schedule import lr_multiplier

TOK = Tokenizer.bytes_only()


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=TOK.vocab_size, n_layers=1, n_heads=2, d_model=16,
                                   max_seq_len=16))


def _rows(step: int, first: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows first..first+n of step `step`'s global batch (each row seeded on its own)."""
    rows = [torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(step * 100 + r))
            for r in range(first, first + n)]
    x = torch.stack(rows)
    return x[:, :-1], x[:, 1:]


def _loss(model: torch.nn.Module, batch: Any) -> Any:
    return lm_loss(model(batch[0]), batch[1])


def _save(directory: Path, model: torch.nn.Module, info: dict[str, Any]) -> None:
    save_run(directory, model, TOK, {"progress": info})  # type: ignore[arg-type]


def _cfg(**kw: Any) -> TrainConfig:
    base = {"max_steps": 6, "micro_batch": 4, "lr": 3e-3, "warmup_steps": 2, "log_every": 1,
            "save_every": 0, "eval_every": 0, "device": "cpu"}
    return TrainConfig(**{**base, **kw})


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def test_schedules() -> None:
    cos = TrainConfig(max_steps=10, warmup_steps=1, min_lr_ratio=0.1)
    assert lr_multiplier(0, cos) == pytest.approx(0.5)  # warmup: (step + 1) / (warmup + 1)
    assert lr_multiplier(1, cos) == pytest.approx(1.0)
    assert lr_multiplier(5, cos) == pytest.approx(0.55)  # half way down the cosine
    assert lr_multiplier(9, cos) == pytest.approx(0.1)  # the last step lands on the floor
    wsd = TrainConfig(max_steps=10, warmup_steps=0, schedule="wsd", decay_fraction=0.2,
                      min_lr_ratio=0.0)
    assert [lr_multiplier(s, wsd) for s in range(10)] == pytest.approx([1] * 8 + [0.5, 0.0])
    const = TrainConfig(max_steps=10, warmup_steps=3, schedule="constant")
    assert [lr_multiplier(s, const) for s in (0, 2, 3, 9)] == pytest.approx([0.25, 0.75, 1, 1])


def test_weight_decay_only_on_matrices_and_muon_on_hidden_matrices() -> None:
    model = _model()
    names = {id(p): n for n, p in model.named_parameters()}

    def group_names(optimizer: torch.optim.Optimizer, decay: bool | None = None) -> set[str]:
        return {names[id(p)] for g in optimizer.param_groups for p in g["params"]
                if decay is None or (g["weight_decay"] > 0) == decay}

    (adamw,) = build_optimizers(model, TrainConfig(weight_decay=0.1))
    decayed, plain = group_names(adamw, True), group_names(adamw, False)
    assert decayed == {n for n, p in model.named_parameters() if p.ndim == 2}
    assert "model.layers.0.input_layernorm.weight" in plain and "model.norm.weight" in plain
    muon, rest = build_optimizers(model, TrainConfig(optimizer="muon"))
    assert isinstance(muon, Muon)
    hidden = group_names(muon)
    assert "model.layers.0.self_attn.q_proj.weight" in hidden
    assert not any("embed" in n for n in hidden)
    assert "model.embed_tokens.weight" in group_names(rest)


def test_muon_orthogonalizes_and_agrees_with_torch() -> None:
    torch.manual_seed(0)
    for shape in ((32, 8), (8, 32)):
        singular = torch.linalg.svdvals(orthogonalize(torch.randn(shape)))
        assert singular.min() > 0.5 and singular.max() < 1.3  # all near 1, whatever the input
    weight, grad = torch.randn(16, 8), torch.randn(16, 8)
    mine, theirs = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())
    for param, optimizer in ((mine, Muon([mine], lr=0.02, weight_decay=0.1)),
                             (theirs, torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1))):
        param.grad = grad.clone()
        optimizer.step()
    # torch's runs Newton-Schulz in bf16, hence the tolerance; the update itself is ~0.02
    assert torch.allclose(mine, theirs, atol=2e-3)
    assert not torch.allclose(mine, weight, atol=1e-3)


def test_accumulation_equals_one_big_batch(tmp_path: Path) -> None:
    big = train(_model(), lambda step, micro: _rows(step, 0, 4), _loss, _cfg(micro_batch=4),
                run_dir=tmp_path / "big", accum_steps=1, save_model=_save)
    small = train(_model(), lambda step, micro: _rows(step, 2 * micro, 2), _loss,
                  _cfg(micro_batch=2), run_dir=tmp_path / "small", accum_steps=2, save_model=_save)
    assert big.tokens == small.tokens == 6 * 4 * 8
    a, b = _losses(tmp_path / "big"), _losses(tmp_path / "small")
    assert [s for s, _ in a] == list(range(1, 7))
    assert [x for _, x in a] == pytest.approx([x for _, x in b], rel=1e-5)


def test_uneven_counts_are_weighted_per_token(tmp_path: Path) -> None:
    """Micro-batches with 1 and 7 counted tokens: the step's loss is the mean over 8 tokens."""
    def masked(model: torch.nn.Module, batch: Any) -> LossOutput:
        x, y, micro = batch
        mask = torch.zeros_like(y)
        mask[0, : 1 if micro == 0 else 7] = 1
        loss_sum, count = lm_loss(model(x), y, mask)
        return LossOutput(loss_sum, count, tokens=y.numel())

    def batches(step: int, micro: int) -> tuple:
        return (*_rows(step, micro, 1), micro)

    model = _model()
    with torch.no_grad():
        expected = []
        for micro in (0, 1):
            x, y = _rows(0, micro, 1)
            mask = torch.zeros_like(y)
            mask[0, : 1 if micro == 0 else 7] = 1
            expected.append(lm_loss(model(x), y, mask))
    want = float(sum(s for s, _ in expected) / sum(c for _, c in expected))
    result = train(model, batches, masked, _cfg(max_steps=1, micro_batch=1),
                   run_dir=tmp_path / "r", accum_steps=2, save_model=_save)
    assert _losses(tmp_path / "r")[0][1] == pytest.approx(want, rel=1e-6)
    assert result.tokens == 16  # tokens processed, not tokens counted


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ctrl_c_saves_and_resume_is_exact(tmp_path: Path, optimizer: str) -> None:
    cfg = _cfg(max_steps=6, save_every=2, keep_checkpoints=2, optimizer=optimizer)
    train(_model(), lambda s, m: _rows(s, 0, 4), _loss, cfg, run_dir=tmp_path / "full",
          accum_steps=1, save_model=_save)

    def interrupting(step: int, micro: int) -> Any:
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as if Ctrl-C during step 3
        return _rows(step, 0, 4)

    run = tmp_path / "cut"
    stopped = train(_model(), interrupting, _loss, cfg, run_dir=run, accum_steps=1,
                    save_model=_save)
    assert stopped.stopped == "interrupted" and stopped.step == 3
    assert ckpt.latest_checkpoint(run) == ckpt.checkpoint_dir(run, 3)
    with open(run / "metrics.jsonl", "a") as f:  # lines a killed run wrote past its checkpoint
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")
    resumed = train(_model(seed=99), lambda s, m: _rows(s, 0, 4), _loss, cfg, run_dir=run,
                    accum_steps=1, save_model=_save, resume=True)
    assert resumed.stopped == "finished" and resumed.step == 6
    assert _losses(run) == _losses(tmp_path / "full")  # exact, including the resumed steps
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_0000004", "step_0000006"]
    final = load_file(str(run / "model.safetensors"))
    reference = load_file(str(tmp_path / "full" / "model.safetensors"))
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    assert (run / "report.md").is_file() and (run / "loss_curve.png").stat().st_size > 1000
    # A resumed run takes new settings (here a longer horizon and another lr) from its config.
    longer = _cfg(max_steps=8, save_every=2, lr=1e-3, optimizer=optimizer)
    train(_model(), lambda s, m: _rows(s, 0, 4), _loss, longer, run_dir=run, accum_steps=1,
          save_model=_save, resume=True)
    last = read_metrics(run / "metrics.jsonl")[-1]
    assert last["step"] == 8 and last["lr"] == pytest.approx(1e-3 * lr_multiplier(7, longer))


def test_sigterm_saves_and_stops_like_ctrl_c(tmp_path: Path) -> None:
    cfg = _cfg(max_steps=6, save_every=100)
    before = signal.getsignal(signal.SIGTERM)

    def terminating(step: int, micro: int) -> Any:
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, during step 2
        return _rows(step, 0, 4)

    run = tmp_path / "r"
    result = train(_model(), terminating, _loss, cfg, run_dir=run, accum_steps=1,
                   save_model=_save)
    assert (result.stopped, result.signal, result.step) == ("interrupted", signal.SIGTERM, 2)
    assert ckpt.latest_checkpoint(run) == ckpt.checkpoint_dir(run, 2)
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the caller's again
    finished = train(_model(), lambda s, m: _rows(s, 0, 4), _loss, _cfg(max_steps=2),
                     run_dir=tmp_path / "f", accum_steps=1, save_model=_save)
    assert (finished.stopped, finished.signal) == ("finished", 0)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    def exploding(model: torch.nn.Module, batch: Any) -> Any:
        x, y, step = batch
        loss_sum, count = lm_loss(model(x), y)
        return (loss_sum * float("nan") if step >= 2 else loss_sum), count

    run = tmp_path / "r"
    with pytest.raises(TinyLMError, match=r"diverged at step 3: loss nan.*step_0000002"):
        train(_model(), lambda s, m: (*_rows(s, 0, 4), s), exploding, _cfg(save_every=2),
              run_dir=run, accum_steps=1, save_model=_save)
    assert ckpt.latest_checkpoint(run) == ckpt.checkpoint_dir(run, 2)
    top = load_file(str(run / "model.safetensors"))
    good = load_file(str(ckpt.checkpoint_dir(run, 2) / "model.safetensors"))
    assert all(torch.equal(top[k], good[k]) for k in good)
    assert all(torch.isfinite(t).all() for t in top.values())


def test_max_time_stops_cleanly_with_eval_and_save(tmp_path: Path) -> None:
    evaluated = []

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        evaluated.append(model.training)
        return {"val_loss": 1.5}

    result = train(_model(), lambda s, m: _rows(s, 0, 4), _loss, _cfg(max_time=1e-9, max_steps=50),
                   run_dir=tmp_path / "r", accum_steps=1, save_model=_save, evaluate=evaluate)
    assert result.stopped == "max_time" and result.step == 1  # the step under way finishes
    assert evaluated == [False] and result.eval == {"val_loss": 1.5}
    assert result.checkpoint == ckpt.checkpoint_dir(tmp_path / "r", 1)
    assert read_metrics(tmp_path / "r" / "metrics.jsonl")[-1]["val_loss"] == 1.5


def test_checkpoint_writes_are_atomic(tmp_path: Path) -> None:
    model = _model()
    optimizer_state = {"state": {}, "param_groups": []}

    def crash(directory: Path) -> None:
        _save(directory, model, {})
        raise KeyboardInterrupt  # dies half way through a save

    with pytest.raises(KeyboardInterrupt):
        ckpt.write_checkpoint(tmp_path, 5, crash, optimizer_state, {"step": 5}, keep=2)
    assert list((tmp_path / ckpt.CHECKPOINTS).iterdir()) == []
    assert not (tmp_path / "model.safetensors").exists()
    # What a kill -9 leaves (a .tmp directory) is never taken for a checkpoint, and is removed.
    leftover = tmp_path / ckpt.CHECKPOINTS / ".tmp-step_0000009-x"
    (leftover / ckpt.STATE_DIR).mkdir(parents=True)
    (leftover / ckpt.STATE_DIR / ckpt.STATE_FILE).write_text("{}")
    for step in (1, 2, 3):
        ckpt.write_checkpoint(tmp_path, step, lambda d: _save(d, model, {}), optimizer_state,
                              {"step": step}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000002", "step_0000003"]
    ckpt.remove_partial(tmp_path)
    assert not leftover.exists()
    assert json.loads((tmp_path / "config.json").read_text())["progress"] == {}
    with pytest.raises(TinyLMError, match="no complete checkpoint"):
        ckpt.require_checkpoint(tmp_path / "elsewhere")


def test_batch_must_split_evenly() -> None:
    assert accumulation_steps(4096, 256, 2, "train.batch_tokens") == 8
    with pytest.raises(TinyLMError, match="multiple of"):
        accumulation_steps(1000, 256, 1, "train.batch_tokens")
    with pytest.raises(TinyLMError, match="train.lr"):
        TrainConfig(lr=-1)
