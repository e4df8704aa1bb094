"""train.log: TensorBoard, W&B and MLflow get metrics.jsonl's values, read back through each
library's own reader; --resume continues the same tracker runs; a missing package or an unknown
name is one line before any work."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import tinylm.cli  # noqa: F401  (registers the commands)
from tinylm.cli.app import app
from tinylm.errors import TinyLMError
from tinylm.train.config import TrainConfig
from tinylm.train.report import read_metrics
from tinylm.train.trackers import IDS_FILE, check_trackers

runner = CliRunner()
ALL = "tensorboard,wandb,mlflow"

CONFIG = """\
model: {family: llama, n_layers: 1, n_heads: 2, d_model: 32, max_seq_len: 32}
train: {max_steps: 6, batch_tokens: 256, micro_batch: 4, warmup_steps: 2, lr: 3.0e-3,
        eval_every: 3, save_every: 3, log_every: 1, eval_tokens: 1024, device: cpu}
data: {seq_len: 32, val_fraction: 0.1, cache_dir: CACHE}
"""


def _need_all() -> None:
    for module in ("tensorboard", "wandb", "mlflow", "sqlalchemy", "alembic"):
        pytest.importorskip(module, reason=f"{module} is not installed (pip install "
                            "'tinylm[tensorboard,wandb,mlflow]')")


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trackers as a user without any tracker settings has them (nothing leaves this machine)."""
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI",
                 "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture
def setup(tmp_path: Path, shakespeare_text: str) -> tuple[Path, Path]:
    data = tmp_path / "shakes.txt"
    data.write_text(shakespeare_text[:30_000], encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.replace("CACHE", str(tmp_path / "cache")), encoding="utf-8")
    return config, data


def _pretrain(setup: tuple[Path, Path], out: Path, *extra: str) -> Any:
    config, data = setup
    return runner.invoke(app, ["pretrain", "-c", str(config), "-d", str(data), "-t", "bytes",
                               "-o", str(out), "-q", *extra])


# The readers: each library's own.

def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()  # also drops the steps a resumed writer purged
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def wandb_records(path: Path) -> list[Any]:
    """The records of an offline .wandb file: W&B's protobuf Records in LevelDB's log format
    (32 KiB blocks; each chunk has a 7-byte header: CRC, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, body, records = 7, b"", []
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # the rest of a block too short for a header is padding
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        body += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full or last chunk: a record is complete
            records.append(wandb_internal_pb2.Record.FromString(body))
            body = b""
    return records


def wandb_runs(run: Path) -> list[dict[str, Any]]:
    """Each offline run directory's id, config and history {step: {key: value}}, oldest first."""
    runs = []
    for path in sorted((run / "wandb").glob("offline-run-*/run-*.wandb")):
        info: dict[str, Any] = {"id": None, "config": {}, "history": {}}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                info["id"] = record.run.run_id
            items = (record.run.config.update if kind == "run" else
                     record.config.update if kind == "config" else [])
            for item in items:
                info["config"][item.key or "/".join(item.nested_key)] = json.loads(
                    item.value_json)
            if kind == "history":
                row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                       for i in record.history.item}
                info["history"][record.history.step.num] = row
        runs.append(info)
    return runs


def mlflow_run(run: Path) -> tuple[Any, Any]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{(run / 'mlruns' / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name("tinylm")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def expected(run: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl as {step: {name: first value at that step}} (what trackers get)."""
    by_step: dict[int, dict[str, float]] = {}
    for record in read_metrics(run / "metrics.jsonl"):
        row = by_step.setdefault(record["step"], {})
        for key, value in record.items():
            if key != "step":
                row.setdefault(key, value)
    return by_step


def check_all_trackers(run: Path, names: tuple[str, ...]) -> None:
    """Every number of metrics.jsonl is in each tracker at its step, and nothing else."""
    want = expected(run)
    assert any(name in row for row in want.values() for name in names)
    scalars = tensorboard_scalars(run)
    client, ml_run = mlflow_run(run)
    history = {}
    for info in wandb_runs(run):  # a resumed offline run: the later directory wins
        history.update(info["history"])
    for name in {k for row in want.values() for k in row}:
        steps = [(s, row[name]) for s, row in sorted(want.items()) if name in row]
        tb = scalars[name]
        assert [s for s, _ in tb] == [s for s, _ in steps], name  # each step once
        assert [v for _, v in tb] == pytest.approx([v for _, v in steps], rel=1e-6)  # float32
        ml = {m.step: m.value for m in client.get_metric_history(ml_run.info.run_id, name)}
        assert ml == pytest.approx(dict(steps), rel=1e-12), name
        wb = {s: row[name] for s, row in history.items() if name in row}
        assert wb == pytest.approx(dict(steps), rel=1e-12), name


def check_headers(run: Path) -> None:
    """The effective config, the parameter breakdown and the run directory are in each."""
    config = json.loads((run / "config.json").read_text())
    client, ml_run = mlflow_run(run)
    params = ml_run.data.params
    assert params["run_dir"] == str(run.resolve())
    assert int(params["params.total"]) > 0 and "params.embedding" in params
    assert ml_run.data.tags["tinylm.run_dir"] == str(run.resolve())
    logged = wandb_runs(run)[0]["config"]
    assert logged["run_dir"] == str(run.resolve())
    assert logged["params"]["total"] == int(params["params.total"])
    stage = config["stage"]
    assert logged["config"]["train"]["lr"] == config[stage]["train"]["lr"]
    assert float(params["config.train.lr"]) == config[stage]["train"]["lr"]


@pytest.mark.slow
def test_pretrain_logs_metrics_jsonl_to_all_three_and_resume_continues(
    setup: tuple[Path, Path], tmp_path: Path, isolated: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _need_all()
    run = tmp_path / "run"
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = _pretrain(setup, run, "--set", f"train.log={ALL}")
    assert result.exit_code == 0, result.output
    assert not list(elsewhere.iterdir())  # everything in the run, nothing in the cwd
    assert result.output.strip() == ""  # --quiet: the trackers print nothing either
    check_all_trackers(run, ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_bpb"))
    check_headers(run)
    ids = json.loads((run / IDS_FILE).read_text())
    assert set(ids) == {"wandb", "mlflow"}
    assert not list((run / "wandb").glob("run-*"))  # offline: no synced (online) run
    # A kill after step 6 whose last checkpoint is step 3: resume replays steps 4-6.
    shutil.rmtree(run / "checkpoints" / "step_0000006")
    result = runner.invoke(app, ["pretrain", "-o", str(run), "--resume", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / IDS_FILE).read_text()) == ids
    runs = wandb_runs(run)
    assert [r["id"] for r in runs] == [ids["wandb"], ids["wandb"]]  # the same W&B run
    assert min(runs[1]["history"]) == 4
    client, ml_run = mlflow_run(run)  # still one MLflow run: the same one
    assert ml_run.info.run_id == ids["mlflow"] and ml_run.info.status == "FINISHED"
    check_all_trackers(run, ("loss",))  # TensorBoard: steps 4-6 once, from the resumed run


@pytest.mark.slow
def test_dpo_metrics_reach_the_trackers_under_trls_names(tmp_path: Path, isolated: None) -> None:
    _need_all()
    import torch

    from tinylm.model import ModelConfig, Transformer
    from tinylm.run import save_run
    from tinylm.tokenizer import Tokenizer

    tok = Tokenizer.bytes_only()
    torch.manual_seed(0)
    base = tmp_path / "base"
    base.mkdir()
    save_run(base, Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layers=1, n_heads=2,
                                           d_model=32, max_seq_len=64)), tok,
             {"stage": "pretrain"})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i % 4}", "chosen": "yes",
                                         "rejected": "no"}) + "\n" for i in range(16)))
    run = tmp_path / "dpo"
    result = runner.invoke(app, ["dpo", "-b", str(base), "-d", str(pairs), "-o", str(run),
                                 "--max-steps", "3", "--batch-size", "4", "--eval-every", "3",
                                 "--set", "train.micro_batch=4", "--set", "train.log_every=1",
                                 "--set", f"train.log={ALL}", "-q"])
    assert result.exit_code == 0, result.output
    trl_names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected")
    check_all_trackers(run, trl_names)
    check_headers(run)


def test_unknown_tracker_is_one_line_naming_the_known_ones(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    with pytest.raises(TinyLMError, match="unknown tracker 'tensorbord'; known: tensorboard, "
                       "wandb, mlflow"):
        TrainConfig(log=["tensorbord"])
    assert TrainConfig(log="TensorBoard, tensorboard").log == ["tensorboard"]
    assert TrainConfig().log == []
    result = _pretrain(setup, tmp_path / "run", "--set", "train.log=csv")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "unknown tracker 'csv'" in lines[0], result.output


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow"])
def test_missing_package_is_one_line_before_any_work(
    name: str, setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setitem(sys.modules, name, None)  # `import name` fails as if not installed
    with pytest.raises(TinyLMError) as caught:
        check_trackers([name])
    assert f"pip install 'tinylm[{name}]'" in str(caught.value)
    run = tmp_path / "run"
    result = _pretrain(setup, run, "--set", f"train.log=tensorboard,{name}")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0]
    assert f"pip install 'tinylm[{name}]'" in lines[0]
    assert not (run / "metrics.jsonl").exists()  # nothing trained
    assert not (tmp_path / "cache").exists()  # not even the data was encoded
