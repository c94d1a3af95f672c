"""``--device auto|cpu|cuda`` for the example scripts: which device trains,
and the process group that goes with it.

On CUDA each process takes the GPU of its ``LOCAL_RANK`` and joins one group
with two backends, ``cpu:gloo,cuda:nccl``: NCCL for the training's
collectives on GPU tensors, gloo for the CPU tensors that hpresil's restore
agreement and health votes exchange. cuBLAS gets the fixed workspace that
``torch.use_deterministic_algorithms(True)`` requires, so a run stays bitwise
reproducible on the GPU too.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["DEVICES", "init_distributed", "pick_device"]

#: The choices of ``--device``.
DEVICES = ("auto", "cpu", "cuda")


def pick_device(name: str) -> torch.device:
    """``auto``: this process's GPU when every local rank can have one of its
    own (``LOCAL_WORLD_SIZE`` GPUs or more), else the CPU.

    Raises:
        SystemExit: ``cuda`` was asked for and no GPU is visible.
    """
    if name == "auto":
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        name = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= local_ranks else "cpu"
    if name != "cuda":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible here; use --device cpu (or auto)")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, before its first handle
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def init_distributed(device: torch.device, timeout: float | None = None) -> tuple[int, int]:
    """Joins the torchrun/hpresil-run job, or forms a one-process group when
    run directly; returns ``(rank, world size)``."""
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=None if timeout is None else timedelta(seconds=timeout))
    else:
        # A real (size-1) group keeps one code path for DDP, FSDP and logging.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()
