"""The RAM tier: per-rank arenas of shared-memory slots (format in :mod:`.api`).

Writer (:class:`RamWriter`, in the training process): each slot is a file in
``<shm_dir>/ckpt/rank<R>/`` that is allocated once with ``posix_fallocate``
(so a full tmpfs fails here with ``ENOSPC`` instead of a ``SIGBUS`` in the
middle of a copy), mapped with ``MAP_POPULATE`` (page faults happen once, at
allocation, not in ``save``), and reused while the state's layout is
unchanged. A save copies each tensor with ``copy_`` into a cached view of its
64-byte aligned region, then writes the commit record (its tensor part is
serialised once per layout). No checksum is computed here: the sealer does
that after the commit, off the training thread.

Slot choice, and waiting for a slot that readers hold, is
:mod:`~hpresil.checkpoint.ram.slots`. A crash mid-copy leaves that slot without
a record, so it is never trusted, and every other slot is untouched.

Overlap (:mod:`hpresil.checkpoint.fence`): tensors an optimizer step guards
are copied after ``save`` returns — host tensors by the commit thread with a
plain ``memmove``, device tensors device→host into the arena registered as
pinned memory, ``non_blocking`` on a side stream that first waits for the
current stream — and :meth:`RamWriter.fence` (the optimizers' step pre-hook)
waits for them. Unguarded tensors are copied first: on the host before
``save`` returns, on the device ahead of the guarded ones, with the current
stream waiting (on the GPU) for that part only. The commit thread writes the
record once everything is copied; the next save (and ``wait``) joins it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import json
import logging
import mmap
import os
import queue
import threading
import time
import uuid
import weakref
from typing import Any, Callable, Sequence

import torch

from hpresil.checkpoint.api import FORMAT_VERSION, Entry, rank_dir, slot_path
from hpresil.checkpoint.flatten import Leaf, encode_json
from hpresil.checkpoint.health import DeviceFlags, device_finite_flags
from hpresil.checkpoint.ram.arena import (ALIGN, INLINE_PREP, Layout, Preparer, Slot, build_layout, entry_path,
                                          signature)
from hpresil.checkpoint.ram.files import drop_newer, scan, unlink, write_atomic
from hpresil.checkpoint.ram.slots import SlotTable
from hpresil.errors import CheckpointError, StorageError

__all__ = ["ALIGN", "Layout", "RamWriter", "build_layout", "settle", "signature"]

log = logging.getLogger(__name__)

#: Every open writer of this process (see :func:`settle`).
_LIVE: "weakref.WeakSet[RamWriter]" = weakref.WeakSet()


def settle() -> None:
    """Waits until no snapshot of this process is still being copied or
    committed. Fault injection calls it, so a fault planned "at step N" hits
    after snapshot N is complete, as it would with a blocking save."""
    for writer in list(_LIVE):
        writer._idle.wait()


class RamWriter:
    """Writes one rank's snapshots into its slots.

    Args:
        shm_dir: the job's shared-memory directory on this node.
        rank: global rank.
        slots: number of slots (``CheckpointConfig.slots``).
        run_id: stored in every record.
        slot_wait: the longest one ``save`` waits for a reader to release a
            slot before it skips the snapshot (seconds; see
            :mod:`~hpresil.checkpoint.ram.slots`).
        upload_timeout: stored in every record (seconds; see
            :attr:`~hpresil.checkpoint.api.CommitRecord.upload_timeout`).
    """

    def __init__(self, shm_dir: str, rank: int, *, slots: int, run_id: str, slot_wait: float = 0.25,
                 upload_timeout: float = 0.0) -> None:
        self.shm_dir = shm_dir
        self.rank = rank
        self.run_id = run_id
        self.upload_timeout = upload_timeout
        #: set by the Checkpointer after each restore (see CommitRecord.timeline)
        self.timeline = ""
        os.makedirs(rank_dir(shm_dir, rank), mode=0o700, exist_ok=True)
        self._slots = [Slot(slot_path(shm_dir, rank, k, "bin")) for k in range(slots)]
        self._preparer = Preparer(self._slots, rank)
        #: why the last save that returned ``None`` was skipped (``slots_busy``, ``arena_preparing``)
        self.skip_reason = ""
        self._layout: Layout | None = None
        # The commit thread (started at the first overlapped save) and what it is given.
        self._worker: threading.Thread | None = None
        self._jobs: queue.SimpleQueue[tuple[_Flight, Callable[[], None], int] | None] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        _LIVE.add(self)
        self._flight: _Flight | None = None  # the copy in flight, until wait()
        self._pending_error: BaseException | None = None
        self._stream: Any = None
        self._loss_host: dict[torch.dtype, torch.Tensor] = {}  # pinned, one per loss dtype
        self._flags_host: dict[int, torch.Tensor] = {}  # pinned, by length: the device's NaN/Inf verdicts
        self._flags: DeviceFlags | None = None  # those of the snapshot being copied
        self._table = SlotTable(shm_dir, rank, [slot.fd for slot in self._slots], slot_wait)
        for k in range(slots):  # a writer killed while it waited for a slot leaves its requests behind
            unlink(slot_path(shm_dir, rank, k, "reclaim"))
        for info in scan(shm_dir, [rank]):
            if info.slot < slots:
                self._table.commits[info.slot] = (info.record.step, info.record.created, info.record.commit_id)
                if info.record.durable:
                    self._table.durable[info.slot] = info.record.commit_id

    @property
    def slot_wait(self) -> float:
        """The longest one ``save`` waits for a reader to release a slot (seconds)."""
        return self._table.slot_wait

    @slot_wait.setter
    def slot_wait(self, seconds: float) -> None:
        self._table.slot_wait = seconds

    # -- saving ----------------------------------------------------------
    def save(
        self,
        step: int,
        leaves: Sequence[Leaf],
        *,
        world_size: int,
        durable: bool,
        durable_url: str | None,
        keep: int,
        on_commit: Callable[[int, int], None] | None = None,
        loss: Any = None,
        compared: frozenset[str] = frozenset(),
        guarded: Sequence[bool] | None = None,
    ) -> int | None:
        """Copies ``leaves`` into a free slot and commits it.

        Args:
            on_commit: called with ``(slot, step)`` once the record is in place
                (from a background thread for device tensors).
            loss: a number or one-element tensor stored in the record; a
                device tensor is copied behind the snapshot and read at the
                commit, so the save never waits for it.
            compared: keys of the entries the divergence check compares.
            guarded: per tensor leaf, whether an optimizer step pre-hook calls
                :meth:`fence` before it changes (its copy may then overlap
                training; :mod:`hpresil.checkpoint.fence`).

        Returns:
            Bytes of tensor data copied, or ``None`` when every slot that may be
            overwritten stayed locked by a reader for as long as this save
            may wait (the save is skipped).

        Raises:
            StorageError: the slot cannot be allocated (``ENOSPC``) or written.
            CheckpointError: a leaf cannot be stored (plain value without a JSON form).
        """
        self.wait()
        sig = signature(leaves, compared)
        if self._layout is None or sig != self._layout.signature:
            self._layout = build_layout(leaves, sig, compared)
            log.info("rank %d: RAM arena layout %d entries, %.1f MiB", self.rank, len(self._layout.entries), self._layout.nbytes / 2**20)
        layout = self._layout
        json_entries = [
            Entry(key=l.key, kind="json", value=encode_json(l.value, l.key), path=entry_path(l)).to_json_obj()
            for l in leaves
            if not isinstance(l.value, torch.Tensor)
        ]
        tensors = [l.value for l in leaves if isinstance(l.value, torch.Tensor)]
        device = next((t.device.index for t in tensors if t.is_cuda), None)
        while True:
            k = self._table.pick_and_lock()
            if k is None:
                log.warning("rank %d step %d: every RAM slot that may be overwritten is being read (sealer, drain "
                            "or peer send slower than the saves?); skipping this snapshot", self.rank, step)
                self.skip_reason = "slots_busy"
                return None
            slot = self._slots[k]
            try:
                if not self._ready(k, layout.nbytes, device):
                    fcntl.flock(slot.fd, fcntl.LOCK_UN)  # its snapshot stays: nothing was written
                    log.info("rank %d step %d: RAM slot %d is still being prepared (%.1f MiB); skipping this "
                             "snapshot", self.rank, step, k, layout.nbytes / 2**20)
                    self.skip_reason = "arena_preparing"
                    return None
            except OSError as exc:
                fcntl.flock(slot.fd, fcntl.LOCK_UN)
                # Fewer slots still double-buffer; below two, the tier is unusable.
                self._table.unusable.add(k)
                if len(self._slots) - len(self._table.unusable) >= 2:
                    log.warning("rank %d: RAM slot %d unavailable (%s); continuing with %d slots",
                                self.rank, k, exc, len(self._slots) - len(self._table.unusable))
                    continue
                raise StorageError(
                    f"cannot allocate {layout.nbytes / 2**20:.1f} MiB RAM slot {slot.path}: {exc}"
                    + (" (shared memory is full: enlarge /dev/shm or lower slots)" if exc.errno == errno.ENOSPC else "")
                ) from exc
            # The record goes first: from here until the rename the slot is untrusted.
            unlink(slot_path(self.shm_dir, self.rank, k, "json"))
            self._table.commits.pop(k, None)
            unlink(slot_path(self.shm_dir, self.rank, k, "seal.json"))
            unlink(slot_path(self.shm_dir, self.rank, k, "reclaim"))
            break
        committed = False
        try:
            views = slot.views_for(layout)
            flight = self._copy(slot, views, tensors, _loss_tensor(loss), guarded)
            loss_now = _loss_number(loss) if flight.loss is None else None
            loss_read = (lambda: loss_now) if flight.loss is None else flight.loss
            commit = lambda: self._commit(k, step, layout, json_entries, world_size, durable, durable_url, keep,  # noqa: E731
                                          on_commit, loss_read())
            if flight.idle:
                commit()
            else:
                self._flight = flight
                if self._worker is None:
                    self._worker = threading.Thread(target=self._work, name="hpresil-commit", daemon=True)
                    self._worker.start()
                self._idle.clear()
                self._jobs.put((flight, commit, slot.fd))
            committed = True
        finally:
            if not committed:
                fcntl.flock(slot.fd, fcntl.LOCK_UN)
        return layout.nbytes

    def _copy(self, slot: Slot, views: list[torch.Tensor], tensors: list[torch.Tensor], loss: torch.Tensor | None,
              guarded: Sequence[bool] | None) -> _Flight:
        """Copies the unguarded tensors now and enqueues the rest (see
        :mod:`hpresil.checkpoint.fence`): guarded host tensors go to the commit
        thread, device tensors to the copy stream."""
        late = list(guarded) if guarded is not None else [False] * len(tensors)
        flight = _Flight()
        for i, t in enumerate(tensors):
            if not t.is_cuda and views[i].numel():
                if late[i]:
                    flight.host.append((views[i], t))
                else:
                    views[i].copy_(t)
        if flight.host:
            flight.host_done = threading.Event()
        cuda = [i for i, t in enumerate(tensors) if t.is_cuda]
        on_device = loss is not None and loss.is_cuda
        self._flags = None
        if not cuda and not on_device:
            return flight
        if not slot.register_cuda():
            for i in cuda:
                views[i].copy_(tensors[i])
            if on_device:
                assert loss is not None
                value = float(loss.item())
                flight.loss = lambda: value
            return flight
        device = tensors[cuda[0]].device if cuda else loss.device  # type: ignore[union-attr]
        main = torch.cuda.current_stream(device)
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device=device)
        side = self._stream
        side.wait_stream(main)  # copy the values as of this save
        first = [i for i in cuda if not late[i]]
        with torch.cuda.stream(side):
            for i in first:
                views[i].copy_(tensors[i], non_blocking=True)
            # The verdicts cover every device tensor before the main stream may touch the unguarded ones.
            self._flags = device_finite_flags(tensors, cuda, self._flags_host)
            if first:
                early = torch.cuda.Event()
                early.record(side)
                main.wait_event(early)  # forward may update buffers: not before they are copied
            for i in cuda:
                if late[i]:
                    views[i].copy_(tensors[i], non_blocking=True)
                    tensors[i].record_stream(side)  # its memory is not reused before the copy is done
            if on_device:
                assert loss is not None
                host = self._loss_host.get(loss.dtype)
                if host is None:
                    host = self._loss_host[loss.dtype] = torch.empty((), dtype=loss.dtype, pin_memory=True)
                host.copy_(loss.detach().reshape(()), non_blocking=True)
                loss.record_stream(side)
                flight.loss = lambda: float(host.item())  # after the event: no device wait
            flight.event, flight.device = torch.cuda.Event(), device
            flight.event.record(side)
        if not any(late[i] for i in cuda):
            main.wait_event(flight.event)  # nothing guarded on the device: later kernels wait for the copy
        return flight

    def prepare(self, leaves: Sequence[Leaf], extra: int = 0) -> None:
        """Starts preparing every slot for ``leaves`` plus ``extra`` bytes (what
        the optimizers' first step will add) in the background; the
        Checkpointer calls it once the state is known, at the first restore."""
        nbytes = build_layout(leaves).nbytes + extra
        device = next((l.value.device.index for l in leaves if isinstance(l.value, torch.Tensor) and l.value.is_cuda), None)
        if nbytes > INLINE_PREP:
            self._preparer.request(nbytes, device)

    def _ready(self, k: int, nbytes: int, device: int | None) -> bool:
        """Whether slot ``k`` is ready for this save (prepared inline when
        small; else waited for within the slot budget).

        Raises:
            OSError: the slot cannot be allocated.
        """
        slot = self._slots[k]
        if slot.error is not None:
            raise slot.error
        if slot.ready(nbytes, device):
            return True
        if nbytes <= INLINE_PREP:
            slot.prepare(nbytes, device)
            return True
        self._preparer.request(nbytes, device, first=k)
        t0 = time.monotonic()
        ok = self._preparer.wait_ready(slot, nbytes, device, self._table.budget())
        self._table.spend(time.monotonic() - t0)
        if slot.error is not None:
            raise slot.error
        return ok

    def fence(self) -> None:
        """Makes the caller wait for the guarded part of the copy in flight: the
        current CUDA stream waits on the GPU (no host synchronize), a host copy
        is joined. The optimizers' step pre-hooks call it."""
        flight = self._flight
        if flight is None:
            return
        if flight.host_done is not None:
            flight.host_done.wait()
        if flight.event is not None:
            torch.cuda.current_stream(flight.device).wait_event(flight.event)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._finish(*job)
            finally:
                self._idle.set()

    def _finish(self, flight: _Flight, commit: Callable[[], None], fd: int) -> None:
        """The commit thread: the host copies, the device copies' completion, the record."""
        try:
            try:
                for dst, src in flight.host:
                    _memcpy(dst, src)
            finally:
                if flight.host_done is not None:
                    flight.host_done.set()
            if flight.event is not None:
                flight.event.synchronize()
        except BaseException as exc:  # surfaced by the next wait(); the slot stays without a record
            fcntl.flock(fd, fcntl.LOCK_UN)
            self._pending_error = exc
            return
        try:
            commit()
        except BaseException as exc:  # surfaced by the next wait()
            self._pending_error = exc

    def _commit(
        self,
        k: int,
        step: int,
        layout: Layout,
        json_entries: list[dict[str, Any]],
        world_size: int,
        durable: bool,
        durable_url: str | None,
        keep: int,
        on_commit: Callable[[int, int], None] | None,
        loss: float | None,
    ) -> None:
        slot = self._slots[k]
        try:
            commit_id = uuid.uuid4().hex
            created = time.time()
            head = {
                "version": FORMAT_VERSION,
                "commit_id": commit_id,
                "run_id": self.run_id,
                "step": step,
                "rank": self.rank,
                "world_size": world_size,
                "slot": k,
                "nbytes": layout.nbytes,
                "durable": durable,
                "durable_url": durable_url,
                "keep": keep,
                "created": created,
                "timeline": self.timeline,
                "upload_timeout": self.upload_timeout,
                "loss": loss,
            }
            if self._flags is not None:  # read after the device copies completed
                head["checked"], head["nonfinite"] = self._flags.result([e.key for e in layout.entries])
            parts = [layout.entries_json] if layout.entries_json else []
            parts += [json.dumps(e, separators=(",", ":")) for e in json_entries]
            text = json.dumps(head, separators=(",", ":"))[:-1] + ',"entries":[' + ",".join(parts) + "]}"
            try:
                write_atomic(slot_path(self.shm_dir, self.rank, k, "json"), text)
            except OSError as exc:
                raise StorageError(f"cannot write commit record of {slot.path}: {exc}") from exc
            self._table.commits[k] = (step, created, commit_id)
            if durable:
                self._table.durable[k] = commit_id
        finally:
            fcntl.flock(slot.fd, fcntl.LOCK_UN)
        if on_commit is not None:
            on_commit(k, step)

    def wait(self) -> None:
        """Waits for a pending (device) commit.

        Raises:
            StorageError: the pending commit failed.
        """
        self._idle.wait()
        self._flight = None
        if self._pending_error is not None:
            exc, self._pending_error = self._pending_error, None
            raise StorageError(f"asynchronous commit failed: {exc}") from exc

    def keep(self, step: int | None) -> None:
        """Keeps the slot of ``step`` like the last known good one (see
        :mod:`~hpresil.checkpoint.ram.slots`); ``None`` stops."""
        self._table.keep_step = step

    def invalidate_after(self, step: int) -> list[int]:
        """Drops the records of this rank's snapshots newer than ``step`` (they
        belong to a timeline the job has abandoned by restoring ``step``).

        Returns:
            The dropped steps.
        """
        self.wait()
        return drop_newer(self.shm_dir, self.rank, step, self._table.commits)

    def release(self) -> None:
        """Unmaps and truncates every slot and forgets the records (degrading to
        no RAM tier frees the memory for the rest of the node)."""
        self.wait()
        self._preparer.stop()
        for k, slot in enumerate(self._slots):
            unlink(slot_path(self.shm_dir, self.rank, k, "json"))
            unlink(slot_path(self.shm_dir, self.rank, k, "seal.json"))
            slot.unmap()
            try:
                os.ftruncate(slot.fd, 0)
            except OSError:
                pass
        self._table.commits.clear()
        self._table.durable.clear()
        self._layout = None

    def close(self) -> None:
        """Waits for pending work and unmaps the slots (the files stay)."""
        try:
            self.wait()
        finally:
            if self._worker is not None:
                self._jobs.put(None)
                self._worker.join()
                self._worker = None
            self._preparer.stop()
            for slot in self._slots:
                slot.close()
            self._slots = []


@dataclasses.dataclass(slots=True)
class _Flight:
    """A snapshot's copy that goes on after ``save`` returned."""

    #: (arena view, tensor) host copies left to the commit thread
    host: list[tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=list)
    #: set once those host copies are done
    host_done: threading.Event | None = None
    #: recorded on the copy stream after the device copies
    event: Any = None
    #: the device of that stream
    device: Any = None
    #: reads a device loss once ``event`` completed
    loss: Callable[[], float | None] | None = None

    @property
    def idle(self) -> bool:
        """Nothing left in flight: the record can be written now."""
        return not self.host and self.event is None


def _memcpy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copies ``src`` into the arena view ``dst`` on the calling thread alone: a
    plain ``memmove`` with the GIL released for contiguous tensors (torch's
    ``copy_`` would start intra-op threads competing with the training thread's)."""
    if src.is_contiguous() and src.dtype == dst.dtype and not src.is_conj() and not src.is_neg():
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size())
    else:
        dst.copy_(src)


def _loss_tensor(loss: Any) -> torch.Tensor | None:
    """``loss`` when it is a one-element tensor.

    Raises:
        CheckpointError: ``loss`` is neither a number nor a one-element tensor.
    """
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1 or loss.is_complex():
            raise CheckpointError(f"save(loss=...): a tensor of shape {tuple(loss.shape)}; give the loss as a "
                                  "number or a one-element tensor (e.g. loss.detach())")
        return loss
    if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float))):
        raise CheckpointError(f"save(loss={loss!r}): give the loss as a number or a one-element tensor")
    return None


def _loss_number(loss: Any) -> float | None:
    """A CPU ``loss`` as a float (a CPU tensor's value is already there)."""
    if loss is None:
        return None
    return float(loss.item()) if isinstance(loss, torch.Tensor) else float(loss)
