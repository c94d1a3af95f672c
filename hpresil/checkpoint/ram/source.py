"""The RAM tier as the restore path sees it (:class:`~.api.SnapshotSource`).

On a tmpfs with 4 KiB pages, reads use ``preadv`` from the slot file straight
into the destination rather than a mapping: a freshly restarted process would
otherwise pay a page fault per page of the arena (measured here: ~0.7x the
copy itself for 512 MiB), while the kernel copies from the page cache without
touching page tables. On a tmpfs with huge pages (``huge=always`` or
``within_size``) mapping 512 MiB costs under a millisecond, so the slot is
mapped and copied from directly (~1.0x memcpy, against ~1.5x for ``preadv``).
Each 4 MiB chunk is hashed right after it lands, while it is still
in cache, so verifying costs a fraction of the copy; the chunks of all the
entries read together are spread over a few threads (``preadv`` and torch's
sum release the GIL).

Unsealed commits are *unverified*: with ``verify=True`` they are not offered
at all, so a restore uses the newest sealed snapshot. A commit proves the copy
completed; only the seal lets the reader prove the bytes have not changed
since, and computing a checksum at restore time would only bless whatever is
there now.
"""

from __future__ import annotations

import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import torch

from hpresil.checkpoint.api import CommitRecord, Entry, Seal, SnapshotRef, SnapshotSource, TierName, record_digest
from hpresil.checkpoint.health import worst
from hpresil.checkpoint import integrity
from hpresil.checkpoint.integrity import Checksum
from hpresil.checkpoint.ram.files import SlotInfo, scan
from hpresil.checkpoint.ram.pin import Pinned, pin
from hpresil.errors import IntegrityError, StorageError
from hpresil.runtime.shm import huge_page_mode

__all__ = ["RamSource", "read_batch", "read_verified", "CHUNK"]

log = logging.getLogger(__name__)

#: Bytes per read-and-hash task: small enough that the hash reads from cache
#: right behind the copy, large enough to amortise the syscall (4 MiB measured
#: best here); rounded to whole checksum leaves so the chunks' checksums merge.
CHUNK = 4 << 20
#: Below this many bytes a batch is read serially: handing chunks to threads costs more than it saves.
_PARALLEL_MIN = 16 << 20


def read_batch(
    items: Sequence[tuple[int, int, torch.Tensor, str | None, str]],
    pool: ThreadPoolExecutor | None = None,
    maps: dict[int, torch.Tensor] | None = None,
) -> None:
    """Reads many entries, spreading their chunks over ``pool``'s threads.

    Args:
        items: ``(fd, file offset, out, expected checksum or None, key)``;
            ``out`` is a contiguous ``uint8`` CPU tensor of the entry's length.
        pool: threads (serial when ``None``).
        maps: a ``uint8`` view of the whole file per descriptor, copied from
            instead of ``preadv`` (huge-page tmpfs).

    Raises:
        StorageError: a file is shorter than its entry.
        IntegrityError: a checksum differs (the first failing key is named).
    """
    tasks = []
    views = []
    step = max(integrity.LEAF, CHUNK - CHUNK % integrity.LEAF)
    for idx, (fd, offset, out, expected, _) in enumerate(items):
        n = out.numel()
        views.append(memoryview(out.numpy()) if n else memoryview(b""))
        tasks += [(idx, lo) for lo in range(0, n, step)]

    def chunk(task: tuple[int, int]) -> Checksum | None:
        idx, lo = task
        fd, offset, out, expected, _ = items[idx]
        n = out.numel()
        hi = min(lo + step, n)
        got = 0
        mapped = maps.get(fd) if maps else None
        if mapped is not None:
            if mapped.numel() < offset + hi:
                raise StorageError(f"snapshot file ends at {mapped.numel()}, entry needs {offset + n}")
            out[lo:hi].copy_(mapped[offset + lo : offset + hi])
            got = hi - lo
        while lo + got < hi:
            r = os.preadv(fd, [views[idx][lo + got : hi]], offset + lo + got)
            if r <= 0:
                raise StorageError(f"snapshot file ends at {offset + lo + got}, entry needs {offset + n}")
            got += r
        return None if expected is None else Checksum.like(expected).update(out[lo:hi])

    parallel = pool is not None and len(tasks) > 1 and sum(out.numel() for _, _, out, _, _ in items) >= _PARALLEL_MIN
    sums = pool.map(chunk, tasks) if parallel else map(chunk, tasks)
    totals = [Checksum.like(expected) for _, _, _, expected, _ in items]
    for (idx, _), part in zip(tasks, sums):
        if part is not None:
            totals[idx].merge(part)
    for (fd, offset, out, expected, key), total in zip(items, totals):
        if expected is not None and total.hexdigest() != expected:
            raise IntegrityError(f"{key}: checksum {total.hexdigest()} != sealed {expected}")


def read_verified(
    fd: int,
    offset: int,
    out: torch.Tensor,
    expected: str | None,
    pool: ThreadPoolExecutor | None = None,
) -> None:
    """Reads ``out.numel()`` bytes at ``offset`` of ``fd`` into ``out`` and,
    when ``expected`` is given, checks their checksum (the value
    :func:`hpresil.checkpoint.integrity.checksum` computes); see :func:`read_batch`."""
    read_batch([(fd, offset, out, expected, "entry")], pool)


class RamSource(SnapshotSource):
    """Snapshots in this node's shared-memory directory (every rank saved here).

    Args:
        shm_dir: the job's shared-memory directory on this node.
        verify: offer only sealed snapshots and check checksums on read.
        lock_timeout: seconds to wait for a writer to release a slot.
        threads: reader threads (default: up to 8, bounded by the CPU count).
        mapped: copy from a mapping of the slot instead of ``preadv`` (default:
            when ``shm_dir`` is on a tmpfs with huge pages).
    """

    tier: TierName = "ram"

    def __init__(
        self,
        shm_dir: str,
        *,
        verify: bool = True,
        lock_timeout: float = 10.0,
        threads: int | None = None,
        mapped: bool | None = None,
    ) -> None:
        self.shm_dir = shm_dir
        self.verify = verify
        self.lock_timeout = lock_timeout
        self._threads = threads or max(1, min(8, os.cpu_count() or 1))
        self._pool: ThreadPoolExecutor | None = None
        self._huge = huge_page_mode(shm_dir) in ("always", "within_size") if mapped is None else mapped
        self._maps: dict[int, torch.Tensor] = {}  # fd -> view of its mapping (huge-page tmpfs)
        self._infos: dict[int, dict[int, SlotInfo]] = {}  # step -> rank -> newest slot
        self._open: dict[tuple[int, int], Pinned] = {}  # (rank, slot) -> pinned slot
        self._held = contextlib.ExitStack()
        self._cache: dict[str, Any] = {}
        self._full: dict[tuple[int, str], CommitRecord] = {}
        self._seals: dict[tuple[int, str], Seal] = {}

    def steps(self) -> list[SnapshotRef]:
        """Committed (and, with ``verify``, sealed) snapshots, newest first."""
        self._infos = {}
        skipped = 0
        for info in scan(self.shm_dir, cache=self._cache):
            if self.verify and info.seal is None:
                skipped += 1
                continue
            per_rank = self._infos.setdefault(info.record.step, {})
            old = per_rank.get(info.rank)
            if old is None or old.record.created < info.record.created:
                per_rank[info.rank] = info
        if skipped:
            log.info("RAM tier: %d unsealed snapshot(s) in %s not offered (unverified)", skipped, self.shm_dir)
        refs = []
        for step, per_rank in self._infos.items():
            by_ws: dict[int, set[int]] = {}
            health: dict[int, str] = {}
            for rank, info in per_rank.items():
                ws = info.record.world_size
                by_ws.setdefault(ws, set()).add(rank)
                health[ws] = worst(health.get(ws, "ok"), info.seal.health if info.seal is not None else "ok")
            refs += [SnapshotRef(tier="ram", step=step, world_size=ws, ranks=frozenset(r), health=health[ws])
                     for ws, r in by_ws.items()]
        return sorted(refs, key=lambda r: (r.step, r.world_size), reverse=True)

    def records(self, step: int) -> dict[int, CommitRecord]:
        """Layouts of ``step`` per saving rank.

        Raises:
            StorageError: a snapshot was replaced since :meth:`steps`.
            IntegrityError: with ``verify``, a record differs from the one sealed.
        """
        if not self._infos:
            self.steps()
        out = {}
        for rank, info in self._infos.get(step, {}).items():
            key = (rank, info.record.commit_id)
            if key not in self._full:
                record = info.load_record(self.shm_dir)
                if self.verify:
                    if key not in self._seals:
                        self._seals[key] = info.load_seal(self.shm_dir)
                    sealed = self._seals[key].record
                    if sealed and sealed != record_digest(record):
                        raise IntegrityError(f"RAM snapshot of rank {rank} step {step}: its commit record "
                                             f"changed since it was sealed ({info.path(self.shm_dir, 'json')})")
                self._full[key] = record
            out[rank] = self._full[key]
        return out

    def read(self, step: int, rank: int, entry: Entry, out: torch.Tensor) -> None:
        """Copies ``entry`` of ``rank`` at ``step`` into ``out`` (verified when sealed).

        Raises:
            IntegrityError: the bytes fail their checksum or the seal lacks the entry.
            StorageError: the snapshot is gone, locked by a writer, or truncated.
        """
        self.read_many(step, [(rank, entry, out)])

    def read_many(self, step: int, items: Sequence[tuple[int, Entry, torch.Tensor]]) -> None:
        """:meth:`read` for many ``(rank, entry, out)`` at once, in parallel
        (the restore path batches the entries it can read in place)."""
        batch = []
        for rank, entry, out in items:
            info = self._infos.get(step, {}).get(rank)
            if info is None:
                raise StorageError(f"RAM tier has no snapshot of rank {rank} at step {step}")
            fd = self._locked(info)
            expected = None
            if self.verify:
                key = (rank, info.record.commit_id)
                if key not in self._seals:
                    self._seals[key] = info.load_seal(self.shm_dir)
                expected = self._seals[key].checksums.get(entry.key)
                if expected is None:
                    raise IntegrityError(f"seal of rank {rank} step {step} has no checksum for {entry.key}")
            if out.numel() != entry.nbytes:
                raise StorageError(f"{entry.key}: output buffer has {out.numel()} bytes, entry {entry.nbytes}")
            batch.append((fd, entry.offset, out, expected, f"rank {rank} step {step} {entry.key}"))
        if self._pool is None and self._threads > 1:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="hpresil-read")
        read_batch(batch, self._pool, self._maps)

    def _locked(self, info: SlotInfo) -> int:
        key = (info.rank, info.slot)
        held = self._open.get(key)
        if held is None:
            # Held until close(): the writer then cannot reuse the slot mid-restore.
            held = self._pin(info, mapped=self._huge)
            self._open[key] = held
            if held.mm is not None:
                self._maps[held.fd] = held.tensor()
        return held.fd

    def _pin(self, info: SlotInfo, *, mapped: bool) -> Pinned:
        try:
            return self._held.enter_context(pin(self.shm_dir, info, timeout=self.lock_timeout, mapped=mapped))
        except OSError as exc:  # the mapping failed (pin raises no other OSError)
            if not mapped:
                raise
            log.info("cannot map %s (%s); reading it with preadv", info.path(self.shm_dir), exc)
            return self._pin(info, mapped=False)

    def close(self) -> None:
        """Releases the slot locks and reader threads."""
        self._maps.clear()
        self._open.clear()
        self._held.close()  # unlocks and unmaps every pinned slot
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
