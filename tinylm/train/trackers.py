"""Live logging of a run to the trackers people watch runs in: TensorBoard, W&B and MLflow.

`train.log` names them (`--log tensorboard,wandb,mlflow`, or `--set train.log=...`); each is
an optional extra (`pip install 'tinylm[wandb]'`). `check_trackers` runs when the config is
built, so a missing package is one line before any work. The shared loop opens them on rank 0
(`open_trackers`) and sends them every record it writes to metrics.jsonl, so a tracker holds
exactly the values of metrics.jsonl, under the same names (DPO's are TRL's: rewards/chosen ...).

Each tracker has one small interface: `open(run_dir, start_step, saved_id, header) -> id`,
`log(step, metrics)`, `close()`. Where things go:
  tensorboard  RUN/tensorboard/ event files; a resumed run purges the steps after its checkpoint
  wandb        offline unless WANDB_MODE says otherwise, files in RUN/wandb (or WANDB_DIR)
  mlflow       MLFLOW_TRACKING_URI when set, else a SQLite store in RUN/mlruns/
`--resume` continues the same tracker run: the ids are kept in RUN/trackers.json.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Protocol

from tinylm.errors import TinyLMError
from tinylm.model import Transformer, param_breakdown
from tinylm.nesting import loads_json
from tinylm.textio import atomic_write_json

IDS_FILE = "trackers.json"
PROJECT = "tinylm"  # W&B project and MLflow experiment, unless WANDB_PROJECT / MLFLOW_...


def _required(name: str) -> list[str]:
    """The modules tracker `name` imports. The local MLflow store is SQLite, through
    SQLAlchemy and Alembic, which mlflow-skinny leaves out."""
    if name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
        return ["mlflow", "sqlalchemy", "alembic"]
    return {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "mlflow": ["mlflow"]}[name]


KNOWN = ("tensorboard", "wandb", "mlflow")


def check_trackers(names: list[str]) -> list[str]:
    """`names` (items may be comma lists) normalised: lower case, no repeats. A `TinyLMError`
    for an unknown name or one whose package is not installed, so the mistake shows before
    any work starts."""
    wanted: list[str] = []
    for name in (part.strip().lower() for raw in names for part in str(raw).split(",")):
        if name and name not in wanted:
            wanted.append(name)
    for name in wanted:
        if name not in KNOWN:
            raise TinyLMError(f"train.log: unknown tracker {name!r}; known: {', '.join(KNOWN)}")
        missing = [m for m in _required(name) if find_spec(m) is None]
        if missing:
            raise TinyLMError(f"train.log: {name} needs {', '.join(missing)}, not installed",
                              f"pip install 'tinylm[{name}]'")
    return wanted


class Tracker(Protocol):
    """What the loop needs of a tracker."""

    name: str

    def open(self, run_dir: Path, start_step: int, saved_id: str | None,
             header: dict[str, Any]) -> str | None:
        """Start (or, with `saved_id`, continue) the tracker's run; return its id to keep."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record `metrics` at optimizer step `step`."""

    def close(self) -> None:
        """Flush and end the run."""


class TensorBoardTracker:
    """Scalars in RUN/tensorboard/ through torch's SummaryWriter."""

    name = "tensorboard"

    def open(self, run_dir: Path, start_step: int, saved_id: str | None,
             header: dict[str, Any]) -> str | None:
        """A new event file; steps after `start_step` in older files are purged (hidden), so a
        resumed run, or a fresh run in an old directory, shows each step once."""
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        for key, value in header.items():
            text = value if isinstance(value, str) else f"```\n{json.dumps(value, indent=2)}\n```"
            self.writer.add_text(key, text, start_step)
        return None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """One scalar per metric."""
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        """Flush the event file."""
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run, offline unless the user set WANDB_MODE."""

    name = "wandb"

    def open(self, run_dir: Path, start_step: int, saved_id: str | None,
             header: dict[str, Any]) -> str | None:
        """wandb.init with the kept id (resume="allow" continues it); quiet, so --json stays
        clean and the progress bars are not captured."""
        import wandb

        options: dict[str, Any] = {}
        if not os.environ.get("WANDB_MODE"):
            options["mode"] = "offline"
        if not os.environ.get("WANDB_DIR"):
            options["dir"] = str(run_dir)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT), name=run_dir.name,
            id=saved_id, resume="allow",
            settings=wandb.Settings(silent=True, console="off"), **options)
        self.run.config.update(header, allow_val_change=True)  # a resume may change settings
        return str(self.run.id)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """One history row per step."""
        self.run.log(metrics, step=step)

    def close(self) -> None:
        """Finish the run (offline: its files are complete for `wandb sync`)."""
        self.run.finish()


class MlflowTracker:
    """An MLflow run through MlflowClient (no global active run)."""

    name = "mlflow"

    def __init__(self) -> None:
        self.pending: list[Any] = []  # the queued log_batch operations (RunOperations)

    def open(self, run_dir: Path, start_step: int, saved_id: str | None,
             header: dict[str, Any]) -> str | None:
        """The kept run (status back to RUNNING) or a new one in experiment "tinylm"; the
        config as params (MLflow params cannot change, so a resume adds only new keys) and
        as config.json."""
        from mlflow import MlflowClient

        for noisy in ("mlflow", "alembic"):  # the SQLite store logs its migrations at INFO
            logging.getLogger(noisy).setLevel(logging.WARNING)
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None
        if not uri:
            store = (run_dir / "mlruns").resolve()
            store.mkdir(parents=True, exist_ok=True)
            uri, artifacts = f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()
        self.client = client = MlflowClient(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        experiment = client.get_experiment_by_name(name)
        experiment_id = (experiment.experiment_id if experiment else
                         client.create_experiment(name, artifact_location=artifacts))
        known = {}
        if saved_id:
            known = client.get_run(saved_id).data.params
            client.update_run(saved_id, status="RUNNING")
            self.run_id = saved_id
        else:
            self.run_id = client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        from mlflow.entities import Param

        client.set_tag(self.run_id, "tinylm.run_dir", header["run_dir"])
        params = [Param(k, str(v)[:6000]) for k, v in flatten(header).items() if k not in known]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(self.run_id, params=params[i:i + 100])
        client.log_dict(self.run_id, header, "config.json")
        return self.run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """One batch of metrics at `step`, written by MLflow's logging thread (a SQLite commit
        per batch would otherwise cost the step its time)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        pending = self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step)
                                                              for k, v in metrics.items()],
                                        synchronous=False)
        self.pending.append(pending)

    def close(self) -> None:
        """Wait for the queued metrics, then mark the run FINISHED. (The client's own
        operations are waited on: `mlflow.flush_async_logging()` would open MLflow's default
        store, an mlflow.db in the working directory.)"""
        for pending in self.pending:
            pending.wait()
        self.pending.clear()
        self.client.set_terminated(self.run_id)


TRACKERS: dict[str, Callable[[], Tracker]] = {
    "tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def model_parameters(model: Any) -> dict[str, int]:
    """The model's parameter breakdown (`tinylm.model.param_breakdown`) and how many train."""

    core = next((m for m in model.modules() if isinstance(m, Transformer)), None)
    parts = param_breakdown(core.config) if core is not None else {}
    return {**parts, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


class Trackers:
    """The trackers of one run, fed every record the loop writes to metrics.jsonl."""

    def __init__(self, opened: list[Tracker], warn: Callable[[str], None]) -> None:
        self.opened, self.warn = opened, warn
        self._step, self._sent = -1, set[str]()

    def log(self, record: dict[str, Any]) -> None:
        """Send the numbers of one metrics.jsonl record at its step."""
        step = int(record.get("step", 0))
        if step != self._step:
            self._step, self._sent = step, set()
        # A step's training and evaluation records both carry tokens and elapsed_s; a tracker
        # keeps one value per name and step, so each name goes once a step, as it came first.
        metrics = {k: float(v) for k, v in record.items()
                   if k != "step" and k not in self._sent and isinstance(v, (int, float))
                   and not isinstance(v, bool)}
        self._sent |= set(metrics)
        for tracker in list(self.opened):
            try:
                tracker.log(step, metrics)
            except Exception as exc:  # a tracker that fails must not cost the training run
                self.opened.remove(tracker)
                self.warn(f"{tracker.name}: logging failed ({_one_line(exc)}); it is off for "
                          "the rest of this run (metrics.jsonl has everything)")

    def close(self) -> None:
        """End every tracker's run."""
        for tracker in self.opened:
            try:
                tracker.close()
            except Exception as exc:  # the run's own files are written; say so, go on
                self.warn(f"{tracker.name}: could not close its run ({_one_line(exc)})")
        self.opened = []


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def open_trackers(names: list[str], run_dir: Path, *, resume_step: int | None,
                  config: dict[str, Any], model: Any,
                  warn: Callable[[str], None]) -> Trackers | None:
    """Open the trackers `names` for `run_dir` (rank 0 only), logging the effective config,
    the parameter breakdown and the run directory. With `resume_step`, continue the tracker
    runs kept in RUN/trackers.json after that step. None when `names` is empty."""

    names = check_trackers(names)
    if not names:
        return None
    header = {"config": config, "params": model_parameters(model),
              "run_dir": str(Path(run_dir).resolve())}
    ids_path = Path(run_dir) / IDS_FILE
    ids: dict[str, Any] = {}
    if resume_step is not None and ids_path.is_file():
        ids = loads_json(ids_path.read_text(encoding="utf-8"))
    opened: list[Tracker] = []
    for name in names:
        tracker = TRACKERS[name]()
        try:
            ids[name] = tracker.open(Path(run_dir), resume_step or 0, ids.get(name), header)
        except Exception as exc:  # e.g. W&B online without a login; the run has not started
            Trackers(opened, warn).close()
            raise TinyLMError(f"train.log: {name} could not start ({_one_line(exc)})",
                              "fix its settings (WANDB_MODE, MLFLOW_TRACKING_URI, ...) or "
                              "leave it out of train.log") from exc
        opened.append(tracker)
    atomic_write_json(ids_path, {k: v for k, v in ids.items() if v is not None})
    return Trackers(opened, warn)
