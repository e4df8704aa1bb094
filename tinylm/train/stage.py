"""One launcher for every training stage: pretrain, finetune, dpo, rl and any later one.

A stage describes itself with a `Stage` (its name, config class, what it needs) and a `build`
function that turns a `StageContext` (the effective config, the inputs, the process group)
into a `Plan` (the placed model, batch source, loss, evaluation, what config.json records).
`launch` does everything else, once and the same way for all stages:

    config      defaults < --config YAML < --set < flag values; on --resume the run's saved
                settings take the place of the YAML, and its base run and data are the defaults
    checks      the output (no overwrite without --force, never over an input), the base run
    --force     clears what an earlier run left (`tinylm.run.clear_run`)
    torchrun    the process group and device (`tinylm.train.distributed`)
    placement   `StageContext.place` puts a model on the training device (sharded under
                --fsdp) before the stage runs anything with it, so reference log-probs and
                evaluations run on the training device too
    checkpoints plain runs (`tinylm.run.save_run`) or adapter runs naming their base
    the loop    `tinylm.train.loop.train`

A stage with no base run (pretrain) sets `needs_base=False`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from tinylm.config import build_config
from tinylm.console import SILENT, Output
from tinylm.errors import TinyLMError
from tinylm.lora import load_adapter
from tinylm.run import (
    WEIGHTS_FILE,
    clear_run,
    load_weights,
    read_run_config,
    run_inputs,
    save_adapter_run,
    save_run,
)
from tinylm.textio import check_distinct, check_output_dir
from tinylm.tokenizer import Tokenizer
from tinylm.train.batching import BatchSplit
from tinylm.train.checkpoint import resume_source
from tinylm.train.config import TrainConfig
from tinylm.train.distributed import (
    DistInfo,
    PlacedModel,
    place_model,
    setup_distributed,
    shutdown_distributed,
)
from tinylm.train.loop import BatchFn, EvalFn, LossFn, TrainResult, train


@dataclass
class StageContext:
    """What a stage's `build` gets: the effective config and the resolved inputs."""

    cfg: Any
    run_dir: Path
    base: Path | None
    data: list[str]
    val_data: list[str]
    dist: DistInfo
    resume: bool
    saved: dict[str, Any] | None  # on --resume: the config.json of `source`
    source: Path | None  # on --resume: the newest intact checkpoint
    options: dict[str, Any]  # stage-specific inputs (pretrain: the --tokenizer spec)
    out: Output
    placed: dict[int, PlacedModel] = field(default_factory=dict)

    def place(self, model: nn.Module, frozen: bool = False) -> nn.Module:
        """`model` on the training device (sharded under --fsdp); `frozen`: a model that
        never trains (a DPO reference), set to eval mode without gradients."""
        train_cfg: TrainConfig = self.cfg.train
        if frozen:
            model = model.eval().requires_grad_(False)
        placed = place_model(model, self.dist, fsdp=train_cfg.fsdp, keep_shadow=not frozen)
        self.placed[id(placed.module)] = placed
        return placed.module

    def frozen_copy(self, model: nn.Module) -> nn.Module:
        """A frozen copy of (the not yet placed) `model`, placed like the policy."""
        return self.place(copy.deepcopy(model), frozen=True)


@dataclass
class Plan:
    """What a stage hands the launcher: everything the shared loop needs, and what the run's
    config.json records (`meta`, `progress` added at each checkpoint)."""

    model: nn.Module  # returned by `StageContext.place`
    batches: BatchFn
    loss_fn: LossFn
    train: TrainConfig  # automatic values (None) resolved
    accum_steps: int | BatchSplit  # a BatchSplit keeps the global batch on any process count
    tokenizer: Tokenizer
    meta: dict[str, Any]
    report_config: dict[str, Any]
    evaluate: EvalFn | None = None
    adapter_base: Path | None = None  # a LoRA run: the adapter names this base run


@dataclass(frozen=True)
class Stage:
    """A training stage: `name` is config.json's "stage" and the key of its settings there."""

    name: str
    config_class: type
    build: Callable[[StageContext], Plan]
    what: str  # "a finetuning run", for the --resume error
    no_data: tuple[str, str]  # (message, hint) when no --data is given
    needs_base: bool = True
    saved_settings: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    def load_config(self, yaml_path: str | Path | None = None,
                    overrides: list[str] | None = None, base: dict[str, Any] | None = None,
                    values: dict[str, Any] | None = None) -> Any:
        """The effective config: defaults < `base` (a saved run) < YAML < `--set` < `values`
        (flag values, already typed)."""
        return build_config(self.config_class, yaml_path, overrides, base, values=values)

    def settings_of(self, saved: dict[str, Any]) -> dict[str, Any]:
        """The stage's settings as saved in a run's config.json."""
        return self.saved_settings(saved) if self.saved_settings else saved[self.name]


def launch(
    stage: Stage,
    run_dir: str | Path,
    *,
    base: str | Path | None = None,
    data: list[str] | None = None,
    val_data: list[str] | None = None,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    resume: bool = False,
    force: bool = False,
    out: Output = SILENT,
) -> TrainResult:
    """Run `stage` into `run_dir` (see the module docstring); the same under torchrun."""
    run_dir = Path(run_dir)
    saved, source = None, None
    if resume:
        source = resume_source(run_dir)  # the newest checkpoint whose settings are intact
        saved = read_run_config(source)
        if saved.get("stage") != stage.name:
            raise TinyLMError(f"{run_dir}: not {stage.what}; cannot --resume it")
        if config is not None:
            out.warn("--resume uses the run's saved config; --config is ignored (use --set)")
        cfg = stage.load_config(None, overrides, stage.settings_of(saved), values)
        base = base or saved.get("base_run", {}).get("path")
        recorded = saved.get("data", {})
        data = data or recorded.get("files")
        val_data = val_data or recorded.get("val_files") or None
    else:
        check_output_dir(run_dir, force)
        cfg = stage.load_config(config, overrides, None, values)
    if stage.needs_base:
        if base is None:
            raise TinyLMError("no base run", "give --base RUN (a pretrained or finetuned run)")
        for source in run_inputs(base):  # --force would clear the base run before reading it
            check_distinct(source, run_dir)
    if not data:
        raise TinyLMError(*stage.no_data)
    dist = setup_distributed(cfg.train.device)
    try:
        if not resume and force and run_dir.is_dir() and dist.is_main:
            clear_run(run_dir)
        ctx = StageContext(cfg, run_dir, Path(base) if base is not None else None,
                           [str(p) for p in data], [str(p) for p in val_data or []], dist,
                           resume, saved, source, dict(options or {}),
                           out if dist.is_main else SILENT)
        plan = stage.build(ctx)
        return _train(plan, ctx)
    finally:
        shutdown_distributed()


def _train(plan: Plan, ctx: StageContext) -> TrainResult:
    """The shared loop on a plan, with checkpoints in the run format the plan asks for."""
    placed = ctx.placed.get(id(plan.model))
    if placed is None:
        raise RuntimeError(f"stage {plan.meta.get('stage')}: the model was not placed")
    tokenizer, meta, adapter_base = plan.tokenizer, plan.meta, plan.adapter_base

    def save_model(directory: Path, model: nn.Module, info: dict[str, Any]) -> None:
        if adapter_base is not None:
            save_adapter_run(directory, model, adapter_base, {**meta, "progress": info},
                             tokenizer)
        else:
            save_run(directory, model, tokenizer, {**meta, "progress": info})  # type: ignore

    def load_model(checkpoint: Path, model: nn.Module) -> None:
        if adapter_base is not None:
            load_adapter(model, checkpoint)
        else:
            load_weights(model, checkpoint / WEIGHTS_FILE)  # type: ignore[arg-type]

    return train(placed, plan.batches, plan.loss_fn, plan.train, run_dir=ctx.run_dir,
                 accum_steps=plan.accum_steps, save_model=save_model, evaluate=plan.evaluate,
                 load_model=load_model, dist=ctx.dist, resume=ctx.resume,
                 config=plan.report_config, title=plan.meta["stage"], out=ctx.out)
