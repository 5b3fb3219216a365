"""Processes of one run under torchrun: which device each rank computes on, the process group, and "rank 0 does
it, the others adopt the result" for work that measures the machine or writes the run directory.

Without torchrun (WORLD_SIZE unset or 1) every function is the single-process case: device as asked, no group,
`main_then_share` just calls its function.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, TypeVar

import torch

from compressor.errors import CompressorError, UsageError

T = TypeVar("T")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def compute_device(device: str | torch.device) -> torch.device:
    """The torch.device this process computes on. Under torchrun `cuda` means each rank's own GPU,
    cuda:LOCAL_RANK (rank 0 and rank 1 on one GPU would only contend for it); a fixed `cuda:N` there is refused,
    since every rank would take the same GPU."""
    device = torch.device(device) if isinstance(device, str) else device
    if device.type != "cuda" or world_size() <= 1:
        return device
    if device.index is not None and device.index != local_rank():
        raise UsageError(f"--device {device} under torchrun: every rank would use that one GPU. Pass --device cuda: "
                         "each rank then takes cuda:LOCAL_RANK (its own GPU).")
    return torch.device("cuda", local_rank())


def init_process_group(device: str | torch.device) -> tuple[int, int]:
    """Join the process group when launched by torchrun (nccl for CUDA, gloo for the CPU); (rank, world size)."""
    import torch.distributed as dist

    if world_size() <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if compute_device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def _group_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    import torch.distributed as dist

    if _group_size() > 1:
        dist.barrier()


def main_then_share(work: Callable[[], T]) -> T:
    """Rank 0 runs `work` (a measurement, a write into the run directory) while the other ranks wait; every rank
    returns rank 0's result. An error of rank 0 is raised on every rank with the same message and exit code, so
    the launch fails as one (no rank left waiting for a collective)."""
    import torch.distributed as dist

    if _group_size() <= 1:
        return work()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", work())]
        except Exception as exc:  # every rank fails with it; a non-CompressorError stays an internal error here
            if isinstance(exc, CompressorError):
                box = [("error", (type(exc).__name__, exc.exit_code, exc.title, exc.render()))]
            else:
                box = [("error", ("RankZeroFailed", 1, "error", f"rank 0 failed: {type(exc).__name__}: {exc}"))]
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise _remote_error(*value)
    return value


def _remote_error(name: str, exit_code: int, title: str, message: str) -> CompressorError:
    """rank 0's CompressorError on another rank: same message, exit code and title."""
    cls = type(re.sub(r"\W", "", name) or "RemoteError", (CompressorError,), {})
    cls.exit_code, cls.title = exit_code, title
    return cls(message)
