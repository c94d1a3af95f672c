"""Restores into device tensors at the host-to-device limit.

Reading a CUDA tensor's bytes into a fresh pageable tensor and copying it with
a synchronous ``copy_`` costs a bounce through pageable memory and a host
synchronize per entry. Instead the entries bound for the device are read in
groups of up to :data:`GROUP` bytes into pinned host memory — the source reads
each group's entries with its own threads and verifies their checksums there,
as for host tensors — and each group's copies are enqueued asynchronously on
one side stream. So group *k*'s host-to-device copy runs while group *k+1* is
read and verified, and there is one synchronize at the end.

Pinned buffers come from torch's caching host allocator: a block is reused
once the copy that read it completed (torch records that event), so the
pinned memory in use stays a few groups (an entry larger than a group takes a
block of its own size), and it is handed back to the driver at the end, since
restores are rare.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from hpresil.checkpoint.api import Entry, SnapshotSource

__all__ = ["GROUP", "read_to_device"]

log = logging.getLogger(__name__)

#: Bytes of entries read into pinned memory before their copies are enqueued.
GROUP = 64 << 20


def _groups(items: Sequence[tuple[int, Entry, torch.Tensor]]) -> list[list[tuple[int, Entry, torch.Tensor]]]:
    out: list[list[tuple[int, Entry, torch.Tensor]]] = []
    size = GROUP
    for item in items:
        n = item[1].nbytes
        if size + n > GROUP:
            out.append([])
            size = 0
        out[-1].append(item)
        size += n
    return out


def read_to_device(source: SnapshotSource, step: int, items: Sequence[tuple[int, Entry, torch.Tensor]]) -> None:
    """Reads ``(rank, entry, target)`` into device tensors ``target`` (each
    contiguous, of the entry's dtype and shape) through pinned staging.

    Raises:
        IntegrityError: a checksum differs (raised by the source).
        StorageError: the source cannot read an entry.
    """
    if not items:
        return
    device = items[0][2].device
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))  # earlier kernels that use the targets come first
    try:
        for group in _groups(items):
            hosts = [torch.empty(entry.nbytes, dtype=torch.uint8, pin_memory=True) for _, entry, _ in group]
            source.read_many(step, [(rank, entry, host) for (rank, entry, _), host in zip(group, hosts)])
            with torch.cuda.stream(stream):
                for (_, _, target), host in zip(group, hosts):
                    target.view(-1).view(torch.uint8).copy_(host, non_blocking=True)
        stream.synchronize()
    finally:
        empty = getattr(torch._C, "_host_emptyCache", None)
        if empty is not None:
            stream.synchronize()  # the blocks are free only once their copies completed
            empty()
