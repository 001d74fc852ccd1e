"""Plain torch DDP under ``torchrun`` (one process per device; many machines through torchrun's rendezvous).

``torchrun --nproc-per-node K -m detkd train CONFIG`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; :func:`init_distributed` reads them (NCCL on CUDA, gloo on CPU) and is a no-op without WORLD_SIZE.
Only rank 0 writes files and shows progress; logged values are averaged over ranks.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool


#: minutes a rank may wait in a collective (rank 0's evaluation of a large validation set can take a while)
COLLECTIVE_TIMEOUT_MIN = 60


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu. A bare "cuda" becomes the current GPU, which
    :func:`init_distributed` sets to this process's LOCAL_RANK under torchrun."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"train.device: {name!r} is not a device (auto, cpu, cuda, cuda:N)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but torch sees no CUDA GPU here (use train.device=auto or cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"train.device={name} but torch sees {torch.cuda.device_count()} GPU(s)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return get_rank() == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's environment; single-process info when WORLD_SIZE is unset."""
    if "WORLD_SIZE" not in os.environ or is_distributed():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return DistInfo(get_rank(), get_world_size(), local_rank, resolve_device(device), is_main())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    # Evaluation runs on rank 0 while the others wait in a collective: allow it longer than the 10-minute default.
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=COLLECTIVE_TIMEOUT_MIN))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistInfo(rank, world, local_rank, dev, rank == 0)


def wrap_ddp(trainable: nn.Module, device: torch.device, *, find_unused_parameters: bool = False) -> nn.Module:
    """DDP-wrap ``trainable`` (already on ``device``); returned unchanged when not distributed."""
    if not is_distributed() or get_world_size() == 1:
        return trainable
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(trainable, device_ids=ids, find_unused_parameters=find_unused_parameters)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo works on CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Mean of each value over ranks (every rank must pass the same keys); identity when not distributed."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= get_world_size()
    return dict(zip(keys, t.tolist()))


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any rank (keeps ranks in step on skip/stop decisions)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank; ``[obj]`` when not distributed."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
