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

CUDA tensors are copied device→host into the arena registered as pinned
memory, with ``non_blocking=True`` on a side stream that first waits for the
current stream. The current stream then waits (on the GPU, not the host) for
the copies, so later kernels cannot modify a tensor before it is copied, and
``save`` returns after enqueueing. A background thread writes the commit
record once the copy's event completes; the next save (and ``wait``) joins it.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import mmap
import os
import threading
import time
import uuid
from typing import Any, Callable, Sequence

import torch

from hpresil.checkpoint.api import FORMAT_VERSION, Entry, rank_dir, slot_path
from hpresil.checkpoint.flatten import Leaf, dtype_from_name, dtype_name, encode_json
from hpresil.checkpoint.health import DeviceFlags, device_finite_flags
from hpresil.checkpoint.ram.files import drop_newer, scan, unlink, write_atomic
from hpresil.checkpoint.ram.slots import SlotTable
from hpresil.errors import CheckpointError, StorageError

__all__ = ["ALIGN", "Layout", "RamWriter", "build_layout", "signature"]

log = logging.getLogger(__name__)

#: Alignment of every entry in the arena (a cache line; also keeps 8-byte views legal).
ALIGN = 64


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclasses.dataclass(slots=True)
class Layout:
    """Where each tensor leaf lives in the arena.

    Attributes:
        signature: what the layout depends on (keys, dtypes, shapes, sharding).
        entries: tensor entries with their offsets, in leaf order.
        nbytes: bytes of the arena the layout uses.
        entries_json: the tensor entries serialised once (comma separated).
    """

    signature: tuple[Any, ...]
    entries: list[Entry]
    nbytes: int
    entries_json: str


def _path(leaf: Leaf) -> list[str | int] | None:
    # bool is an int subclass but would round-trip as true/false: leave it out.
    ok = all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in leaf.path)
    return list(leaf.path) if ok else None


def signature(leaves: Sequence[Leaf], compared: frozenset[str] = frozenset()) -> tuple[Any, ...]:
    """The layout-relevant description of ``leaves`` (cheap; compared every save)."""
    return (compared, *(
        (l.key, l.value.dtype, tuple(l.value.shape), l.global_shape, l.global_offset, l.replicated)
        for l in leaves
        if isinstance(l.value, torch.Tensor)
    ))


def build_layout(leaves: Sequence[Leaf], sig: tuple[Any, ...] | None = None,
                 compared: frozenset[str] = frozenset()) -> Layout:
    """Assigns 64-byte aligned arena regions to the tensor leaves (``compared``:
    the keys the divergence check compares)."""
    entries: list[Entry] = []
    offset = 0
    for leaf in leaves:
        t = leaf.value
        if not isinstance(t, torch.Tensor):
            continue
        nbytes = t.numel() * t.element_size()
        entries.append(
            Entry(
                key=leaf.key,
                kind="tensor",
                dtype=dtype_name(t.dtype),
                shape=list(t.shape),
                global_shape=list(leaf.global_shape),
                global_offset=list(leaf.global_offset),
                offset=offset,
                nbytes=nbytes,
                replicated=leaf.replicated,
                compared=leaf.key in compared,
                path=_path(leaf),
            )
        )
        offset = _align(offset + nbytes)
    text = ",".join(json.dumps(e.to_json_obj(), separators=(",", ":")) for e in entries)
    return Layout(signature=signature(leaves, compared) if sig is None else sig, entries=entries, nbytes=offset,
                  entries_json=text)


class _Slot:
    """One slot file of the writer: descriptor (also the flock handle) and mapping."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.mm: mmap.mmap | None = None
        self.buf: torch.Tensor | None = None
        self.size = 0
        self.views: list[torch.Tensor] = []
        self.views_sig: tuple[Any, ...] | None = None
        self.cuda_registered = False

    def ensure(self, nbytes: int) -> None:
        """Makes the file and mapping at least ``nbytes`` long.

        Raises:
            OSError: ``ENOSPC`` when the shared-memory filesystem is full.
        """
        if self.buf is not None and self.size >= nbytes:
            return
        self.unmap()
        size = max(nbytes, ALIGN)
        try:
            # Reserves the pages now: a full tmpfs fails here, not with SIGBUS mid-copy.
            os.posix_fallocate(self.fd, 0, size)
        except OSError:
            os.ftruncate(self.fd, 0)  # give back whatever was reserved
            raise
        self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        self.buf = torch.frombuffer(self.mm, dtype=torch.uint8)
        self.size = size

    def views_for(self, layout: Layout) -> list[torch.Tensor]:
        """Typed views of the arena for each entry of ``layout`` (cached)."""
        if self.views_sig is not layout.signature:
            assert self.buf is not None
            self.views = [
                self.buf[e.offset : e.offset + e.nbytes].view(dtype_from_name(e.dtype)).view(e.shape)
                for e in layout.entries
            ]
            self.views_sig = layout.signature
        return self.views

    def register_cuda(self) -> bool:
        """Pins the mapping for asynchronous device→host copies (once)."""
        if not self.cuda_registered and self.buf is not None:
            rc = torch.cuda.cudart().cudaHostRegister(self.buf.data_ptr(), self.size, 0)
            self.cuda_registered = int(rc) == 0
            if not self.cuda_registered:
                log.warning("cudaHostRegister(%s) failed (%s); device copies will be synchronous", self.path, rc)
        return self.cuda_registered

    def unmap(self) -> None:
        if self.cuda_registered and self.buf is not None:
            torch.cuda.cudart().cudaHostUnregister(self.buf.data_ptr())
            self.cuda_registered = False
        self.views, self.views_sig, self.buf = [], None, None
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        self.size = 0

    def close(self) -> None:
        self.unmap()
        os.close(self.fd)


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
        self._slots = [_Slot(slot_path(shm_dir, rank, k, "bin")) for k in range(slots)]
        self._layout: Layout | None = None
        self._pending: threading.Thread | None = None
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
    ) -> int | None:
        """Copies ``leaves`` into a free slot and commits it.

        Args:
            on_commit: called with ``(slot, step)`` once the record is in place
                (from a background thread for device tensors).
            loss: a number or one-element tensor stored in the record; a
                device tensor is copied behind the snapshot and read at the
                commit, so the save never waits for it.
            compared: keys of the entries the divergence check compares.

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
            Entry(key=l.key, kind="json", value=encode_json(l.value, l.key), path=_path(l)).to_json_obj()
            for l in leaves
            if not isinstance(l.value, torch.Tensor)
        ]
        while True:
            k = self._table.pick_and_lock()
            if k is None:
                log.warning("rank %d step %d: every RAM slot that may be overwritten is being read (sealer, drain "
                            "or peer send slower than the saves?); skipping this snapshot", self.rank, step)
                return None
            slot = self._slots[k]
            # The record goes first: from here until the rename the slot is untrusted.
            unlink(slot_path(self.shm_dir, self.rank, k, "json"))
            self._table.commits.pop(k, None)
            unlink(slot_path(self.shm_dir, self.rank, k, "seal.json"))
            unlink(slot_path(self.shm_dir, self.rank, k, "reclaim"))
            try:
                slot.ensure(layout.nbytes)
                break
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
        committed = False
        try:
            views = slot.views_for(layout)
            tensors = [l.value for l in leaves if isinstance(l.value, torch.Tensor)]
            event, loss_now = self._copy(slot, views, tensors, _loss_tensor(loss))
            loss_read = (lambda: _loss_number(loss)) if loss_now is None else loss_now
            commit = lambda: self._commit(k, step, layout, json_entries, world_size, durable, durable_url, keep,  # noqa: E731
                                          on_commit, loss_read())
            if event is None:
                commit()
            else:
                self._pending = threading.Thread(target=self._commit_after, args=(event, commit), name="hpresil-commit", daemon=True)
                self._pending.start()
            committed = True
        finally:
            if not committed:
                fcntl.flock(slot.fd, fcntl.LOCK_UN)
        return layout.nbytes

    def _copy(
        self, slot: _Slot, views: list[torch.Tensor], tensors: list[torch.Tensor], loss: torch.Tensor | None
    ) -> tuple[Any, Callable[[], float | None] | None]:
        """Copies the tensors; returns the event device copies complete on
        (``None``: done) and, for a device ``loss``, how to read it after that
        event (``None``: read the argument as it is)."""
        cuda = [i for i, t in enumerate(tensors) if t.is_cuda]
        for i, t in enumerate(tensors):
            if not t.is_cuda and views[i].numel():
                views[i].copy_(t)
        on_device = loss is not None and loss.is_cuda
        self._flags = None
        if not cuda and not on_device:
            return None, None
        if not slot.register_cuda():
            for i in cuda:
                views[i].copy_(tensors[i])
            return None, None
        main = torch.cuda.current_stream()
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._stream.wait_stream(main)  # copy the values as of this save
        read = None
        with torch.cuda.stream(self._stream):
            for i in cuda:
                views[i].copy_(tensors[i], non_blocking=True)
            self._flags = device_finite_flags(tensors, cuda, self._flags_host)
            if on_device:
                assert loss is not None
                host = self._loss_host.get(loss.dtype)
                if host is None:
                    host = self._loss_host[loss.dtype] = torch.empty((), dtype=loss.dtype, pin_memory=True)
                host.copy_(loss.detach().reshape(()), non_blocking=True)
                read = lambda: float(host.item())  # noqa: E731  after the event: no device wait
            event = torch.cuda.Event()
            event.record(self._stream)
        main.wait_stream(self._stream)  # later kernels must not modify what is being copied
        return event, read

    def _commit_after(self, event: Any, commit: Callable[[], None]) -> None:
        try:
            event.synchronize()
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
        if self._pending is not None:
            self._pending.join()
            self._pending = None
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
            for slot in self._slots:
                slot.close()
            self._slots = []


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
