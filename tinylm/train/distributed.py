"""One process or many: torchrun detection, DDP / FSDP2 wrapping, and collectives.

Under `torchrun` the environment holds RANK, LOCAL_RANK and WORLD_SIZE; then a process group is
started (gloo on CPU, NCCL on CUDA) and every helper here works across processes. Without it the
same helpers are no-ops, so the training loop has one code path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from tinylm.errors import TinyLMError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its rank among `world_size` processes and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that logs and saves."""
        return self.rank == 0


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """`auto` -> cuda if present else cpu; `cuda` without a GPU is a user error."""
    if choice not in ("auto", "cpu", "cuda"):
        raise TinyLMError(f"--device {choice!r}: expected auto, cpu or cuda")
    if choice == "cuda" and not torch.cuda.is_available():
        raise TinyLMError("--device cuda: no CUDA GPU is available", "use --device cpu")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def setup_distributed(device: str = "auto") -> DistInfo:
    """Start the process group when run under torchrun (WORLD_SIZE > 1); pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not tdist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        tdist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def shutdown_distributed() -> None:
    """Destroy the process group if this process started one."""
    if tdist.is_initialized():
        tdist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """Sum `tensor` over all processes, in place (nothing to do on one process)."""
    if dist.active:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def barrier(dist: DistInfo) -> None:
    """Wait until every process gets here."""
    if dist.active:
        tdist.barrier()


def broadcast_object(obj: Any, dist: DistInfo) -> Any:
    """Rank 0's `obj` on every process."""
    if not dist.active:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def shard_model(model: nn.Module, dist: DistInfo) -> None:
    """FSDP2: shard each block of every `nn.ModuleList` (the layers), then the whole model."""
    if not dist.active:
        raise TinyLMError("--fsdp needs several processes", "run under torchrun --nproc_per_node=N")
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                fully_shard(block)
    fully_shard(model)


@dataclass
class PlacedModel:
    """A model on its training device: `module` (sharded under FSDP2), and under FSDP2 on
    rank 0 an unsharded CPU `shadow` copy through which whole weights are written and read."""

    module: nn.Module
    shadow: nn.Module | None = None


def place_model(model: nn.Module, dist: DistInfo, fsdp: bool = False,
                keep_shadow: bool = True) -> PlacedModel:
    """Move `model` to this process's device and, with `fsdp`, shard it over the processes
    (keeping rank 0's CPU shadow copy when `keep_shadow`). The one place a stage's models
    are put where they run."""
    import copy

    model.to(dist.device)
    shadow = copy.deepcopy(model).to("cpu") if fsdp and keep_shadow and dist.is_main else None
    if fsdp:
        shard_model(model, dist)
    return PlacedModel(model, shadow)


def reshard(model: nn.Module) -> None:
    """FSDP2 keeps the root's parameters gathered after a forward without backward (eval);
    shard them again so optimizer and checkpoint see the sharded parameters."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def wrap_for_training(model: nn.Module, dist: DistInfo, compile: bool, fsdp: bool) -> nn.Module:
    """The module the loop calls: `torch.compile`d if asked, inside DDP when several processes
    train without FSDP. Parameters stay shared with `model`, which checkpoints read."""
    wrapped: nn.Module = torch.compile(model) if compile else model  # type: ignore[assignment]
    if dist.active and not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        wrapped = DistributedDataParallel(wrapped, device_ids=device_ids)
    return wrapped


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Let the backward inside reduce gradients across processes only when `enabled`
    (the last micro-batch of an accumulation); DDP and FSDP2 both skip it otherwise."""
    if hasattr(model, "no_sync") and not enabled:
        with model.no_sync():  # type: ignore[operator]
            yield
        return
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(enabled)
    yield


def _job_store(timeout_s: float) -> Any:
    """A client of the key-value store torchrun's launcher keeps for the whole job (at
    MASTER_ADDR:MASTER_PORT, the convention torchrun documents), or None without one."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from datetime import timedelta

    return tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=timedelta(seconds=timeout_s))


def _error_key() -> str:
    job = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return f"tinylm/error/{job}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def claim_error_report(timeout_s: float = 10.0) -> bool:
    """Whether this process should print the user's error it raised. Under torchrun only the
    first process of the job to raise one does, so an error every process meets (a bad config)
    is printed once, and one that a single process meets (a file missing on one node) is
    printed too. Outside torchrun, or without the launcher's store, always."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    try:
        store = _job_store(timeout_s)
        return store is None or store.add(_error_key(), 1) == 1
    except (RuntimeError, ValueError, KeyError):  # the store is gone: twice beats never
        return True


def peer_reported_error(timeout_s: float = 5.0) -> bool:
    """True under torchrun when another process of the job has printed a user's error: this
    process's broken collective (its peer exited) is a consequence, not news."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    try:
        store = _job_store(timeout_s)
        return store is not None and bool(store.check([_error_key()]))
    except (RuntimeError, ValueError, KeyError):
        return False
