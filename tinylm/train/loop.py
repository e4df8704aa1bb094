"""The training loop shared by pretrain, finetune and dpo: one function, `train`.

A stage gives it a model, a batch source and a loss; the loop does the rest the same way for
all of them: optimizer and schedule, gradient accumulation, clipping, bf16 autocast on CUDA,
`torch.compile`, DDP / FSDP2 under torchrun, periodic evaluation, metrics.jsonl, atomic and
verified checkpoints (`tinylm.train.checkpoint`), exact resume, Ctrl-C, `max_time`, and a stop
with a clear message at the first NaN/inf loss or gradient norm. A checkpoint is never written
from weights that are not finite, so the last checkpoint is always a good one.

    batches(step, micro) -> batch
        `step` is the 0-based optimizer step; `micro` numbers the micro-batches of that step
        across all processes (process r runs micro = r * accum_steps ... (r+1) * accum_steps - 1),
        so a batch source that is a pure function of (seed, step, micro) gives the same global
        batch on any number of processes, and resume is exact. Tensors may live on the CPU; the
        loop moves tensors (also inside tuples, lists and dicts) to the device.
    batches(step, micro, rows) -> batch or None
        when `accum_steps` is a `tinylm.train.batching.BatchSplit` whose processes run parts of
        the source's micro-batches: just the rows `rows` (a slice) of micro-batch `micro`, or
        None when the micro-batch is too short to have any of them (an epoch's last). Micro-
        batches the processes run whole are asked for as `batches(step, micro)`.
    loss_fn(model, batch) -> (loss_sum, count) or LossOutput(loss_sum, count, tokens, metrics)
        `loss_sum`: the loss SUMMED over `count` units (tokens for a language-model loss,
        pairs for DPO). The loop divides the gradient by the count over the whole global
        batch, so masked losses with uneven counts are weighted correctly. `tokens`: tokens
        processed (default: count). `metrics`: extra sums (e.g. rewards) logged as sum / count.
    evaluate(model) -> {"val_loss": ..., ...}
        called on every process (it may use collectives), in eval mode under no_grad.
    save_model(directory, model, info)
        writes the model files of a checkpoint (e.g. `tinylm.run.save_run`); `info` holds
        step, tokens and the last evaluation for the stage's config.json.
    load_model(checkpoint, model)
        reads them back on resume (default: `tinylm.run.load_weights` of model.safetensors).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinylm.console import SILENT, Output
from tinylm.errors import TinyLMError
from tinylm.losses import LossOutput
from tinylm.run import WEIGHTS_FILE, load_weights
from tinylm.seeds import step_seed
from tinylm.train import checkpoint as ckpt
from tinylm.train.batching import BatchSplit
from tinylm.train.config import TrainConfig
from tinylm.train.distributed import (
    DistInfo,
    PlacedModel,
    all_reduce_sum,
    barrier,
    broadcast_object,
    gradient_sync,
    place_model,
    reshard,
    wrap_for_training,
)
from tinylm.train.optim import build_optimizers, set_lr
from tinylm.train.report import MetricsLog, finish_report
from tinylm.train.schedule import lr_multiplier
from tinylm.train.trackers import open_trackers

BatchFn = Callable[[int, int], Any]
LossFn = Callable[[nn.Module, Any], tuple]
EvalFn = Callable[[nn.Module], dict[str, float]]
SaveFn = Callable[[Path, nn.Module, dict[str, Any]], None]
LoadFn = Callable[[Path, nn.Module], None]


@dataclass
class TrainResult:
    """How a call to `train` ended."""

    run_dir: Path
    step: int
    tokens: int
    elapsed_s: float
    loss: float | None
    eval: dict[str, float] = field(default_factory=dict)
    stopped: str = "finished"  # "finished", "max_time" or "interrupted"
    checkpoint: Path | None = None
    signal: int = 0  # what interrupted it: signal.SIGINT (Ctrl-C) or signal.SIGTERM


def accumulation_steps(global_units: int, micro_units: int, world_size: int, what: str) -> int:
    """Micro-batches per process and step so that `global_units` are seen per step."""
    per_step = micro_units * world_size
    if global_units < per_step or global_units % per_step:
        raise TinyLMError(
            f"{what} ({global_units:,}) must be a multiple of micro_batch x sequence x processes "
            f"({micro_units:,} x {world_size} = {per_step:,})",
            "change train.micro_batch or the batch size",
        )
    return global_units // per_step


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (`auto` or `bf16`), plain float32 otherwise."""
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: Any, device: torch.device) -> Any:
    """`batch` with every tensor in it (also in tuples, lists, dicts) on `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _catch_stop_signals() -> Iterator[list[int]]:
    """[signal number], set by the first Ctrl-C or SIGTERM (what schedulers such as Slurm, and
    torchrun passing one on, send before a kill): the loop then saves and stops. A second
    Ctrl-C aborts at once; a second SIGTERM does not, since a worker under torchrun gets one
    from the scheduler (Slurm signals every process of a job step) and one from torchrun."""
    flag = [0]
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag[0] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag[0] = flag[0] or signum

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _default_load(checkpoint: Path, model: nn.Module) -> None:
    load_weights(model, checkpoint / WEIGHTS_FILE)  # type: ignore[arg-type]


class _Session:
    """The state of one `train` call: model, optimizers, counters and how to save."""

    def __init__(self, placed: PlacedModel, cfg: TrainConfig, dist: DistInfo, run_dir: Path,
                 save_model: SaveFn, load_model: LoadFn) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        self.cfg, self.dist, self.run_dir = cfg, dist, run_dir
        self.save_model, self.load_model = save_model, load_model
        # Under FSDP rank 0 keeps an unsharded CPU copy to write (and read) whole weights.
        self.model, self.shadow = placed.module, placed.shadow
        self.optimizers = build_optimizers(self.model, cfg)
        self.full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        self.progress: dict[str, Any] = {"step": 0, "tokens": 0, "elapsed_s": 0.0, "eval_s": 0.0,
                                         "seed": cfg.seed, "last_eval": {}}

    def weights_finite(self) -> bool:
        """True when no parameter holds NaN or inf (collective: each rank checks its shards)."""
        bad = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        for param in self.model.parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            bad += (~torch.isfinite(local.detach())).any().to(bad.dtype)
        return all_reduce_sum(bad, self.dist).item() == 0

    def save(self, step: int) -> Path | None:
        """A checkpoint after `step` steps (collective; rank 0 writes). Its path on rank 0.
        Raises `TinyLMError` instead when the weights are not finite."""
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        if not self.weights_finite():
            raise diverged(self.run_dir, f"training diverged at step {step}: the update left "
                           "NaN or inf in the weights")
        optim_state = get_optimizer_state_dict(self.model, self.optimizers, options=self.full)
        to_write = self.model
        if self.cfg.fsdp:
            full_weights = get_model_state_dict(self.model, options=self.full)
            if self.shadow is not None:
                self.shadow.load_state_dict(full_weights)
                to_write = self.shadow
        path = None
        if self.dist.is_main:
            info = {k: self.progress[k] for k in ("step", "tokens", "elapsed_s", "last_eval")}
            path = ckpt.write_checkpoint(
                self.run_dir, step, lambda d: self.save_model(d, to_write, info),
                optim_state, dict(self.progress), self.cfg.keep_checkpoints,
            )
        barrier(self.dist)
        return path

    def restore(self, out: Output) -> Path:
        """Load the newest good checkpoint into the model and optimizers; return its path.
        Damaged newer ones are set aside with a warning (`checkpoint.prepare_resume`)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        found: tuple[Any, ...] = (None, {}, {}, None)  # path, progress, optimizer, error
        if self.dist.is_main:
            try:
                path, state = ckpt.prepare_resume(self.run_dir, out)
                found = (path, *ckpt.read_train_state(path, state), None)
            except TinyLMError as exc:
                found = (None, {}, {}, (exc.args[0], exc.hint))
        path, progress, optim_state, error = broadcast_object(found, self.dist)
        if error is not None:  # on every process, so that none waits for the others
            raise TinyLMError(*error)
        if self.cfg.fsdp:
            weights: dict[str, torch.Tensor] = {}
            if self.shadow is not None:
                self.load_model(path, self.shadow)
                weights = self.shadow.state_dict()
            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
            set_model_state_dict(self.model, weights, options=options)
        elif self.dist.is_main:
            self.load_model(path, self.model)  # DDP copies rank 0's weights to the others
        # The moments come from the checkpoint; hyper-parameters (lr, decay, betas) from the
        # current config, so `--set train.lr=...` on resume takes effect.
        settings = [[{k: v for k, v in g.items() if k != "params"} for g in o.param_groups]
                    for o in self.optimizers]
        set_optimizer_state_dict(self.model, self.optimizers, optim_state,
                                 options=StateDictOptions(full_state_dict=True))
        for optimizer, groups in zip(self.optimizers, settings, strict=True):
            for group, setting in zip(optimizer.param_groups, groups, strict=True):
                group.update(setting)
        self.progress.update(progress)
        self.progress.pop("format", None)
        return path


def train(
    model: nn.Module | PlacedModel,
    batches: BatchFn,
    loss_fn: LossFn,
    cfg: TrainConfig,
    *,
    run_dir: str | Path,
    accum_steps: int | BatchSplit,
    save_model: SaveFn,
    evaluate: EvalFn | None = None,
    load_model: LoadFn = _default_load,
    dist: DistInfo | None = None,
    resume: bool = False,
    config: dict[str, Any] | None = None,
    title: str = "train",
    out: Output = SILENT,
) -> TrainResult:
    """Train `model` for `cfg.max_steps` optimizer steps (or `cfg.max_time` seconds).

    `model` is placed on the device (and sharded under FSDP) here unless it comes placed
    (`tinylm.train.distributed.place_model`, as the stage launcher does).
    Each step runs `accum_steps` micro-batches per process, then one optimizer update. Writes
    RUN/metrics.jsonl, checkpoints (every `cfg.save_every` steps and at the end), and at the
    end report.md and loss_curve.png (with `config`, the effective settings, in the report).
    With `resume`, continues from the latest checkpoint in `run_dir` exactly. Raises
    `TinyLMError` if the loss becomes NaN or infinite (the last good checkpoint stays).
    """
    dist = dist or DistInfo()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        ckpt.remove_partial(run_dir)
    if dist.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    placed = model if isinstance(model, PlacedModel) else place_model(model, dist, cfg.fsdp)
    session = _Session(placed, cfg, dist, run_dir, save_model, load_model)
    resumed_from = session.restore(out) if resume else None
    progress = session.progress
    log = None
    if dist.is_main:
        resume_step = progress["step"] if resume else None
        trackers = open_trackers(cfg.log, run_dir, resume_step=resume_step, config=config or {},
                                 model=placed.module, warn=out.warn)  # TensorBoard, W&B...
        with disk_errors(run_dir):
            log = MetricsLog(run_dir, resume_step, trackers)
    if resumed_from is not None:
        out.info(f"resuming from {resumed_from} (step {progress['step']})")
    runner = _Runner(session, wrap_for_training(placed.module, dist, cfg.compile, cfg.fsdp),
                     batches,
                     loss_fn, evaluate, accum_steps, log, out)
    try:
        with _catch_stop_signals() as interrupted, out.progress(title, total=cfg.max_steps) as bar:
            bar.advance(progress["step"])
            result = runner.run(interrupted, bar)
    finally:
        if log is not None:
            log.close()
    if dist.is_main:
        summary = _summary(result)
        with disk_errors(run_dir):
            finish_report(run_dir, title, summary, config or {})
        out.table(f"{title}: {run_dir}", summary)
    return result


@contextlib.contextmanager
def disk_errors(run_dir: Path) -> Iterator[None]:
    """Turn an OS error while writing the run's files (a full disk, a quota, permissions)
    into one clear `TinyLMError`."""
    try:
        yield
    except OSError as exc:
        raise TinyLMError(f"{run_dir}: could not write the run's files ({exc})",
                          "free disk space or fix permissions, then continue with --resume"
                          ) from exc


def diverged(run_dir: Path, what: str) -> TinyLMError:
    """The error that stops a run whose loss, gradients or weights are no longer finite."""
    last = ckpt.latest_checkpoint(run_dir)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
    return TinyLMError(
        f"{what}; stopped, {kept}",
        "lower the learning rate (train.lr) or raise train.warmup_steps, and check the data "
        "for broken examples; then start again, or --resume with the new settings",
    )


def _summary(result: TrainResult) -> dict[str, Any]:
    rows: dict[str, Any] = {"steps": result.step, "tokens": result.tokens,
                            "time_s": round(result.elapsed_s, 1),
                            "tokens_per_s": round(result.tokens / max(result.elapsed_s, 1e-9))}
    if result.loss is not None:
        rows["train_loss"] = result.loss
    rows.update(result.eval)
    rows["stopped"] = result.stopped
    rows["run"] = str(result.run_dir)
    return rows


class _Runner:
    """The step loop proper; separated from `train` so each part reads in one screen."""

    def __init__(self, session: _Session, train_model: nn.Module, batches: BatchFn,
                 loss_fn: LossFn, evaluate: EvalFn | None, accum_steps: int | BatchSplit,
                 log: MetricsLog | None, out: Output) -> None:
        self.s, self.model, self.batches, self.loss_fn = session, train_model, batches, loss_fn
        self.evaluate, self.log, self.out = evaluate, log, out
        self.split = accum_steps if isinstance(accum_steps, BatchSplit) else None
        self.accum = self.split.accum if self.split is not None else int(accum_steps)
        self.cfg, self.dist = session.cfg, session.dist
        self.autocast = autocast_context(self.dist.device, self.cfg.precision)
        self.params = [p for p in session.model.parameters() if p.requires_grad]

    def micro_batch(self, step: int, k: int) -> tuple[Any, float]:
        """This process's `k`-th micro-batch of `step`, and its weight (0 for a stand-in)."""
        if self.split is None:
            return self.batches(step, self.dist.rank * self.accum + k), 1.0
        source, rows = self.split.part(self.dist.rank, k)
        if self.split.whole:
            return self.batches(step, source), 1.0
        batch = self.batches(step, source, rows)  # type: ignore[call-arg]
        if batch is None:
            # No row of this short micro-batch is this process's: its first row, weighted 0,
            # still runs forward and backward, so DDP's and FSDP's collectives stay in step.
            return self.batches(step, source, slice(0, 1)), 0.0  # type: ignore[call-arg]
        return batch, 1.0

    def forward_backward(self, step: int) -> dict[str, torch.Tensor]:
        """All micro-batches of one step; the summed loss, count, tokens and extra metrics."""
        sums: dict[str, torch.Tensor] = {}
        for micro in range(self.accum):
            batch, weight = self.micro_batch(step, micro)
            batch = to_device(batch, self.dist.device)
            with gradient_sync(self.model, micro == self.accum - 1):
                with self.autocast:
                    result = LossOutput(*self.loss_fn(self.model, batch))
                (result.loss_sum * weight).backward()
            parts = {"loss": result.loss_sum.detach(), "count": result.count,
                     "tokens": result.count if result.tokens is None else result.tokens,
                     **(result.metrics or {})}
            for key, value in parts.items():
                value = torch.as_tensor(value, dtype=torch.float64, device=self.dist.device)
                value = value * weight
                sums[key] = sums[key] + value.detach() if key in sums else value.detach()
        return sums

    def run(self, interrupted: list[int], bar: Any) -> TrainResult:
        """Steps until max_steps, max_time, Ctrl-C or SIGTERM (on any rank); evaluates, logs
        and saves on the way."""
        cfg, dist, p = self.cfg, self.dist, self.s.progress
        start = time.perf_counter() - p["elapsed_s"]
        window_time, window_tokens = 0.0, 0  # tokens/s leaves evaluation and saving out
        loss, saved, stopped = None, None, "finished"
        self.model.train()
        while p["step"] < cfg.max_steps:
            step_start, step = time.perf_counter(), p["step"]
            lr_scale = lr_multiplier(step, cfg)
            set_lr(self.s.optimizers, lr_scale)
            torch.manual_seed(step_seed(cfg.seed, step, dist.rank))  # dropout, exact on resume
            sums = self.forward_backward(step)
            keys = sorted(sums)
            time_up = cfg.max_time is not None and step_start - start >= cfg.max_time
            flags = torch.tensor([float(interrupted[0] > 0), float(time_up and dist.is_main)],
                                 dtype=torch.float64, device=dist.device)
            reduced = all_reduce_sum(torch.cat([torch.stack([sums[k] for k in keys]), flags]), dist)
            values = reduced.tolist()
            totals = {k: values[i] for i, k in enumerate(keys)}
            stop_interrupt, stop_time = values[-2] > 0, values[-1] > 0
            count = max(totals["count"], 1e-12)
            for param in self.params:  # gradients hold sums; make them the global-batch mean
                if param.grad is not None:
                    param.grad.mul_(dist.world_size / count)
            norm = torch.nn.utils.clip_grad_norm_(
                self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            loss = totals["loss"] / count
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                self._diverged(step, loss, grad_norm)
            for optimizer in self.s.optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            p["step"] = step + 1
            p["tokens"] += int(totals["tokens"])
            p["elapsed_s"] = time.perf_counter() - start
            window_time += time.perf_counter() - step_start
            window_tokens += int(totals["tokens"])
            tok_s = window_tokens / max(window_time, 1e-9)
            bar.advance(1, loss=loss, tok_s=round(tok_s))
            last = p["step"] == cfg.max_steps or stop_interrupt or stop_time
            if p["step"] % cfg.log_every == 0 or last:
                extra = {k: totals[k] / count for k in keys if k not in ("loss", "count", "tokens")}
                lr = self.s.optimizers[-1].param_groups[0]["lr"]  # AdamW's, under Muon too
                self._log({"step": p["step"], "loss": loss, "lr": lr,
                           "tokens": p["tokens"], "elapsed_s": round(p["elapsed_s"], 3),
                           "tokens_per_s": round(tok_s, 1), "grad_norm": grad_norm, **extra})
                window_time, window_tokens = 0.0, 0
            stopped = "interrupted" if stop_interrupt else "max_time" if stop_time else stopped
            due_eval = cfg.eval_every > 0 and p["step"] % cfg.eval_every == 0
            if self.evaluate is not None and (due_eval or (last and not stop_interrupt)):
                self._eval(start)
            if (cfg.save_every > 0 and p["step"] % cfg.save_every == 0) or last:
                saved = self.s.save(p["step"])
            if stop_interrupt or stop_time:
                break
        by = (interrupted[0] or signal.SIGINT) if stopped == "interrupted" else 0
        return TrainResult(self.s.run_dir, p["step"], p["tokens"], p["elapsed_s"], loss,
                           dict(p["last_eval"]), stopped, saved, int(by))

    def _eval(self, start: float) -> None:
        assert self.evaluate is not None
        p = self.s.progress
        t0 = time.perf_counter()
        self.model.eval()
        with torch.no_grad(), self.autocast:
            metrics = self.evaluate(self.model)
        self.model.train()
        if self.cfg.fsdp:
            reshard(self.s.model)
        p["eval_s"] += time.perf_counter() - t0
        p["elapsed_s"] = time.perf_counter() - start
        p["last_eval"] = {k: float(v) for k, v in metrics.items()}
        self._log({"step": p["step"], **p["last_eval"], "tokens": p["tokens"],
                   "elapsed_s": round(p["elapsed_s"], 3), "eval_s": round(p["eval_s"], 3)})
        shown = "  ".join(f"{k} {v:.4f}" for k, v in p["last_eval"].items())
        self.out.info(f"step {p['step']}: {shown}")

    def _log(self, record: dict[str, Any]) -> None:
        if self.log is not None:
            with disk_errors(self.s.run_dir):
                self.log.write(record)

    def _diverged(self, step: int, loss: float, grad_norm: float) -> None:
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        raise diverged(self.s.run_dir, f"training diverged at step {step + 1}: {what}")
