"""The RAM tier: per-rank arenas of shared-memory slots (format in :mod:`.api`).

Writer (:class:`RamWriter`, in the training process): each slot is a file in
``<shm_dir>/ckpt/rank<R>/``, prepared once per layout off the training thread
(:mod:`~hpresil.checkpoint.ram.arena`) and reused while the state's layout
is unchanged. A save copies each tensor into a cached view of its 64-byte
aligned region, then writes the commit record (its tensor part is serialised
once per layout). No checksum is computed here: the sealer does that after
the commit, off the training thread.

Slot choice, and waiting for a slot that readers hold, is
:mod:`~hpresil.checkpoint.ram.slots`. A crash mid-copy leaves that slot without
a record, so it is never trusted, and every other slot is untouched.

The copy overlaps training (:mod:`~hpresil.checkpoint.ram.copier`): what an
optimizer step guards (:mod:`hpresil.checkpoint.fence`) is copied after
``save`` returns and :meth:`RamWriter.fence` (the optimizers' step pre-hook)
waits for it; the commit thread writes the record once everything is
copied, and the next save (and ``wait``) joins it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import time
import uuid
from typing import Any, Callable, Sequence

import torch

from hpresil.checkpoint.api import FORMAT_VERSION, Entry, rank_dir, slot_path
from hpresil.checkpoint.flatten import Leaf, encode_json
from hpresil.checkpoint.ram.arena import (ALIGN, INLINE_PREP, Layout, Preparer, Slot, build_layout, cuda_device,
                                          entry_path, signature)
from hpresil.checkpoint.ram.copier import Copier, Flight
from hpresil.checkpoint.ram.files import drop_newer, scan, unlink, write_atomic
from hpresil.checkpoint.ram.slots import SlotTable
from hpresil.errors import CheckpointError, StorageError

__all__ = ["ALIGN", "Layout", "RamWriter", "build_layout", "signature"]

log = logging.getLogger(__name__)

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
        self._copier = Copier()
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
        device = cuda_device(leaves)
        while True:
            k = self._table.pick_and_lock(durable)
            if k is None:
                log.warning("rank %d step %d: every RAM slot that may be overwritten is being read (sealer, drain "
                            "or peer send slower than the saves?); skipping this snapshot", self.rank, step)
                self.skip_reason = "slots_busy"
                return None
            slot = self._slots[k]
            try:
                if not self._ready(k, layout.nbytes, device):  # else it returns holding slot.lock
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
            flight = self._copier.copy(slot, views, tensors, _loss_tensor(loss), guarded)
            loss_now = _loss_number(loss) if flight.loss is None else None
            loss_read = (lambda: loss_now) if flight.loss is None else flight.loss
            commit = lambda: self._commit(k, step, layout, json_entries, world_size, durable, durable_url, keep,  # noqa: E731
                                          on_commit, loss_read(), flight)
            if flight.idle:
                commit()
            else:
                self._copier.start(flight, commit, lambda: _unlock(slot))
            committed = True
        finally:
            if not committed:
                _unlock(slot)
        return layout.nbytes

    def prepare(self, leaves: Sequence[Leaf], extra: int = 0) -> None:
        """Starts preparing every slot for ``leaves`` plus ``extra`` bytes (what
        the optimizers' first step will add) in the background; the
        Checkpointer calls it once the state is known, at the first restore."""
        nbytes = build_layout(leaves).nbytes + extra
        if nbytes > INLINE_PREP:
            self._preparer.request(nbytes, cuda_device(leaves))

    def _ready(self, k: int, nbytes: int, device: int | None) -> bool:
        """Whether slot ``k`` is ready for this save; if so, its ``lock`` is
        now held (until the commit: the preparation thread never remaps a slot
        a copy is in flight to). Small states are prepared here; otherwise
        this waits for the preparation thread within the slot budget.

        Raises:
            OSError: the slot cannot be allocated.
        """
        slot = self._slots[k]
        if slot.error is not None:
            raise slot.error
        if slot.lock.acquire(blocking=False):
            if slot.ready(nbytes, device):
                return True
            if nbytes <= INLINE_PREP:
                try:
                    slot.prepare_locked(nbytes, device)
                except BaseException:
                    slot.lock.release()
                    raise
                return True
            slot.lock.release()
        # The preparation thread holds the slot, or the state is large: wait for it within budget.
        self._preparer.request(nbytes, device, first=k)
        t0 = time.monotonic()
        budget = self._table.budget()
        ok = self._preparer.wait_ready(slot, nbytes, device, budget)
        ok = ok and slot.lock.acquire(timeout=max(0.0, budget - (time.monotonic() - t0)))
        self._table.spend(time.monotonic() - t0)
        if ok and not slot.ready(nbytes, device):
            slot.lock.release()
            ok = False
        if slot.error is not None:
            if ok:
                slot.lock.release()
            raise slot.error
        return ok

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
        flight: Flight,
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
            verdicts = flight.verdicts([e.key for e in layout.entries])  # after the copies completed
            if verdicts is not None:
                head["checked"], head["nonfinite"] = verdicts
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
            _unlock(slot)
        if on_commit is not None:
            on_commit(k, step)

    def fence(self) -> None:
        """Makes the caller wait for the guarded part of the copy in flight (the
        optimizers' step pre-hook; see :meth:`.copier.Copier.fence`)."""
        self._copier.fence()

    def wait(self) -> None:
        """Waits for a pending (overlapped) commit.

        Raises:
            StorageError: the pending commit failed.
        """
        exc = self._copier.wait()
        if exc is not None:
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
            self._copier.close()
            self._preparer.stop()
            for slot in self._slots:
                slot.close()
            self._slots = []


def _unlock(slot: Slot) -> None:
    """Ends the writer's hold of ``slot``: its ``flock`` and its lock."""
    fcntl.flock(slot.fd, fcntl.LOCK_UN)
    slot.lock.release()


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
