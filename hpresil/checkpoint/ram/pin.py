"""Holding a committed slot while reading it: the one way every reader does it.

A reader (sealer, durable drain, RAM restore, peer send, replica serving)
opens ``slot<K>.bin``, takes ``LOCK_SH`` (the writer skips or waits for
slots held so), and only then re-reads the record and checks it still
carries the ``commit_id`` it listed: the slot may have been reused between
the scan and the lock. See :mod:`hpresil.checkpoint.api` for the protocol.

:func:`pin` does exactly that, optionally reading the seal and mapping the
arena, and releases everything when the block ends::

    with pin(shm_dir, info, timeout=0.1, full=True, sealed=True, mapped=True) as p:
        upload(p.record, p.seal, p.view(offset, nbytes))
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import mmap
import os
from typing import Iterator

import torch

from hpresil.checkpoint.api import CommitRecord, Seal, record_digest, slot_path
from hpresil.checkpoint.ram.files import SlotInfo, frombuffer, lock_shared, read_record, read_seal
from hpresil.errors import IntegrityError, StorageError

__all__ = ["Pinned", "SlotGone", "pin", "arena_bytes"]

log = logging.getLogger(__name__)


class SlotGone(StorageError):
    """The slot cannot be pinned as listed: it is gone, held by a writer,
    reused for another commit, or lost its seal. Readers skip it or retry."""


def arena_bytes(record: CommitRecord) -> int:
    """Bytes of the arena a record's tensor entries occupy."""
    return max((e.offset + e.nbytes for e in record.entries if e.kind == "tensor"), default=0)


@dataclasses.dataclass(slots=True)
class Pinned:
    """A slot held with ``LOCK_SH`` (see :func:`pin`).

    Attributes:
        fd: the locked slot file (read-only).
        size: its size in bytes.
        record: the record read under the lock (entries only with ``full``).
        seal: the seal bound to it (with ``sealed``), else ``None``.
        mm: a read-only mapping of the file (with ``mapped``), else ``None``.
    """

    fd: int
    size: int
    record: CommitRecord
    seal: Seal | None = None
    mm: mmap.mmap | None = None
    _tensor: torch.Tensor | None = None

    def view(self, offset: int, nbytes: int) -> memoryview:
        """Bytes ``[offset, offset + nbytes)`` of the mapping."""
        assert self.mm is not None, "pin(..., mapped=True) maps the arena"
        return memoryview(self.mm)[offset : offset + nbytes]

    def tensor(self) -> torch.Tensor:
        """The whole mapping as a read-only ``uint8`` tensor."""
        assert self.mm is not None, "pin(..., mapped=True) maps the arena"
        if self._tensor is None:
            self._tensor = frombuffer(self.mm)
        return self._tensor


@contextlib.contextmanager
def pin(
    shm_dir: str,
    info: SlotInfo,
    *,
    timeout: float | None,
    full: bool = False,
    sealed: bool = False,
    mapped: bool = False,
) -> Iterator[Pinned]:
    """Holds ``info``'s slot with ``LOCK_SH`` for the block.

    Args:
        shm_dir: the root the slot lives under (RAM tier or replicas).
        info: the slot as a scan listed it.
        timeout: seconds to wait for a writer's lock (``None``: try once).
        full: read the whole record (entries), not only its header.
        sealed: require the seal bound to the record, read under the lock;
            with ``full`` the record must match the seal's digest.
        mapped: map the arena read-only (``MAP_POPULATE``: resident shared
            memory is faulted in one go).

    Raises:
        SlotGone: the slot is gone, stayed locked, was reused, or lost its seal.
        IntegrityError: the file is shorter than its record, or (with ``full``
            and ``sealed``) the record changed since it was sealed.
    """
    rank, slot = info.rank, info.slot
    path = slot_path(shm_dir, rank, slot, "bin")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise SlotGone(f"cannot open RAM snapshot {path}: {exc}") from exc
    pinned: Pinned | None = None
    try:
        if not lock_shared(fd, timeout):
            raise SlotGone(f"RAM snapshot {path} is held by a writer" + (f" (waited {timeout}s)" if timeout else ""))
        record = read_record(slot_path(shm_dir, rank, slot, "json"), header_only=not full)
        if record is None or record.commit_id != info.record.commit_id:
            raise SlotGone(f"RAM snapshot {path} (step {info.record.step}) was replaced since it was listed")
        seal = None
        if sealed:
            seal = read_seal(slot_path(shm_dir, rank, slot, "seal.json"), record.commit_id)
            if seal is None:
                raise SlotGone(f"RAM snapshot {path} (step {record.step}) lost its seal")
            if full and seal.record and seal.record != record_digest(record):
                raise IntegrityError(f"commit record of rank {rank} step {record.step} changed since it was sealed "
                                     f"({slot_path(shm_dir, rank, slot, 'json')})")
        size = os.fstat(fd).st_size
        need = max(record.nbytes, arena_bytes(record))
        if size < need:
            raise IntegrityError(f"RAM snapshot {path} is {size} bytes, shorter than its record's {need}")
        pinned = Pinned(fd=fd, size=size, record=record, seal=seal)
        if mapped and size:
            pinned.mm = mmap.mmap(fd, size, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)
        yield pinned
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)  # the mapping holds a dup of fd: unlock explicitly
        finally:
            os.close(fd)
        if pinned is not None and pinned.mm is not None:
            pinned._tensor = None
            try:
                pinned.mm.close()
            except BufferError:  # a view is still alive (a failed upload's traceback); GC unmaps it
                pass
