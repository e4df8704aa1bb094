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
