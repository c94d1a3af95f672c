"""Restores into device tensors at the host-to-device limit.

Reading a CUDA tensor's bytes into a fresh pageable tensor and copying it with
a synchronous ``copy_`` costs a bounce through pageable memory and a host
synchronize per entry. Instead the entries bound for the device are read in
groups of up to :data:`GROUP` bytes into pinned host memory — the source reads
each group's entries with its own threads and verifies their checksums there,
as for host tensors — and each group's copies are enqueued asynchronously on
one side stream. So group *k*'s host-to-device copy runs while group *k+1* is
read and verified, and there is one synchronize at the end.

Each group is staged in one pinned buffer of :data:`GROUP` bytes (an entry
larger than that gets a buffer of its own size) from torch's caching host
allocator: a block is reused once the copy that read it completed (torch
records that event), so a restore holds a few groups of pinned memory. Pinning
fresh memory costs about as much as copying it, so :func:`warm_staging` — run
in the background when the Checkpointer starts on a device state — pins
:data:`WARM` buffers ahead and returns them to the allocator's cache, where the
restore finds them. The cache is handed back to the driver after the restore,
since restores are rare.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from hpresil.checkpoint.api import Entry, SnapshotSource

__all__ = ["GROUP", "WARM", "read_to_device", "release_staging", "warm_staging"]

log = logging.getLogger(__name__)

#: Bytes of entries read into pinned memory before their copies are enqueued.
GROUP = 64 << 20
#: Staging buffers pinned ahead by :func:`warm_staging` (two groups in flight, one being read).
WARM = 3
#: Entries start on this alignment within a staging buffer.
_ALIGN = 4096


def warm_staging() -> None:
    """Pins :data:`WARM` staging buffers and returns them to torch's caching
    host allocator, so the next restore into device tensors does not pay for
    pinning (run it off the training thread)."""
    try:
        buffers = [torch.empty(GROUP, dtype=torch.uint8, pin_memory=True) for _ in range(WARM)]
        del buffers
    except RuntimeError as exc:  # no CUDA after all, or no pinned memory left
        log.info("staging buffers not pinned ahead: %s", exc)


def _span(entry: Entry) -> int:
    """Bytes ``entry`` takes in a staging buffer (up to where the next one starts)."""
    return (entry.nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


def _staged(group: Sequence[tuple[int, Entry, torch.Tensor]]) -> list[torch.Tensor]:
    """Slices of one pinned buffer for the entries of ``group``."""
    offsets, end = [], 0
    for _, entry, _ in group:
        offsets.append(end)
        end += _span(entry)
    buffer = torch.empty(max(end, GROUP), dtype=torch.uint8, pin_memory=True)
    return [buffer[o : o + entry.nbytes] for o, (_, entry, _) in zip(offsets, group)]


def _groups(items: Sequence[tuple[int, Entry, torch.Tensor]]) -> list[list[tuple[int, Entry, torch.Tensor]]]:
    out: list[list[tuple[int, Entry, torch.Tensor]]] = []
    size = GROUP
    for item in items:
        n = _span(item[1])
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
            hosts = _staged(group)
            source.read_many(step, [(rank, entry, host) for (rank, entry, _), host in zip(group, hosts)])
            with torch.cuda.stream(stream):
                for (_, _, target), host in zip(group, hosts):
                    target.view(-1).view(torch.uint8).copy_(host, non_blocking=True)
    finally:
        stream.synchronize()  # the blocks are free only once their copies completed
        release_staging()


def release_staging() -> None:
    """Hands the pinned blocks torch's caching host allocator holds unused back
    to the driver (after a restore, or once the buffers pinned ahead went unused)."""
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()
