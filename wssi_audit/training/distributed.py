"""torch.distributed for `finetune`: one process per device, started by torchrun.

Under `torchrun --nproc_per_node=N` (or several nodes with torchrun's own rendezvous flags) the
environment carries RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR; the process group is NCCL on CUDA
(each process on cuda:LOCAL_RANK) and gloo on CPU. Without that environment the run is one process
and every collective below is a no-op. Rank 0 is the only process that reads or writes files.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import InputError

# Seconds the GIL is left to gloo's worker threads before the group is destroyed (see close).
TEARDOWN_PAUSE = 0.05


@dataclass
class ProcessGroup:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str | None  # None for a single process
    owned: bool  # this module initialized the process group (and so destroys it)

    @property
    def writer(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1 or self.backend is not None

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) in place; the tensor must live on this process's device (NCCL: CUDA)."""
        if self.active:
            dist.all_reduce(tensor)
        return tensor

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (pickled; for checkpoints and small results)."""
        if not self.active:
            return obj
        holder = [obj if self.writer else None]
        dist.broadcast_object_list(holder, src=0, device=self._object_device)
        return holder[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        """Destroy the group this module made. A gloo worker thread may still be freeing the last
        collective's tensors, which takes the GIL; the group's destructor joins those threads while
        holding the GIL. A DDP reducer freed at interpreter exit ran that destructor within
        milliseconds of the last collective and deadlocked (7 of 40 runs interrupted right after a
        step, torch 2.9; native stacks in docs/reliability.md). So cyclic garbage (a reducer) is
        freed first, and the GIL is given up for a moment before the group goes."""
        if self.owned and dist.is_initialized():
            gc.collect()
            time.sleep(TEARDOWN_PAUSE)
            dist.destroy_process_group()

    @property
    def _object_device(self) -> torch.device | None:
        return self.device if self.backend == "nccl" else None


def launched() -> bool:
    """True when torchrun (or another launcher with the same environment) started this process."""
    return "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def _device(option: str, local_rank: int, distributed: bool) -> torch.device:
    if option == "auto":
        option = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(option)
    except RuntimeError:
        raise InputError(f"bad --device '{option}': use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda requested but no CUDA device is available")
        if distributed:
            if device.index is not None:
                raise InputError("under torchrun each process uses cuda:LOCAL_RANK: pass --device cuda or auto")
            if local_rank >= torch.cuda.device_count():
                raise InputError(
                    f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices: "
                    "start at most that many processes per node"
                )
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise InputError(f"bad --device '{option}': use auto, cpu, cuda or cuda:N")
    return device


def join(device_option: str) -> ProcessGroup:
    """This process's place: a torchrun process group (initialized here) or a single process."""
    if dist.is_available() and dist.is_initialized():  # the caller set one up: use it, leave it
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = _device(device_option, local, dist.get_world_size() > 1)
        return ProcessGroup(dist.get_rank(), dist.get_world_size(), local, device, dist.get_backend(), False)
    if not launched():
        return ProcessGroup(0, 1, 0, _device(device_option, 0, False), None, False)
    if not dist.is_available():
        raise InputError("started by torchrun, but this torch build has no torch.distributed")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(device_option, local, True)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method="env://")
    return ProcessGroup(dist.get_rank(), dist.get_world_size(), local, device, backend, True)
