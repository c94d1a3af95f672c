"""A snapshot's copy into its slot, overlapped with training
(:mod:`hpresil.checkpoint.fence` says which tensors and why).

:meth:`Copier.copy` copies the unguarded tensors at once and leaves the
guarded ones in flight: host tensors to the commit thread (on that thread
alone, GIL released), device tensors to a side CUDA stream that first waits
for the current one, into the arena registered as pinned memory. Host
tensors are checked for NaN/Inf in their copy (fused natively, see
:mod:`hpresil.checkpoint.finite`), so the sealer need not probe them.
:meth:`Copier.fence` (the optimizers' step pre-hook) waits for them: a
stream wait on the GPU, a join on the host. The commit thread then writes
the record (the writer's ``commit``); the next save, and :meth:`Copier.wait`,
join it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import queue
import threading
import weakref
from typing import Any, Callable, Sequence

import torch

from hpresil.checkpoint.flatten import dtype_name
from hpresil.checkpoint.finite import copy_check, encoding
from hpresil.checkpoint.health import DeviceFlags, FiniteProbe, checked_bitmap, device_finite_flags
from hpresil.checkpoint.ram.arena import Slot

__all__ = ["Copier", "Flight", "copy_checked", "memcpy", "settle"]


@dataclasses.dataclass(slots=True)
class Flight:
    """A snapshot's copy that goes on after ``save`` returned."""

    #: (tensor index, arena view, tensor) host copies left to the commit thread
    host: list[tuple[int, torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=list)
    #: set once those host copies are done
    host_done: threading.Event | None = None
    #: recorded on the copy stream after the device copies
    event: Any = None
    #: the device of that stream
    device: Any = None
    #: reads a device loss once ``event`` completed
    loss: Callable[[], float | None] | None = None
    #: the device's NaN/Inf verdicts of this snapshot (read once ``event`` completed)
    flags: DeviceFlags | None = None
    #: tensor indices of the host entries whose copy (in ``save`` or on the commit thread) checked for NaN/Inf,
    #: and of those that hold one
    host_checked: list[int] = dataclasses.field(default_factory=list)
    host_nonfinite: list[int] = dataclasses.field(default_factory=list)

    def note(self, i: int, nonfinite: bool | None) -> None:
        """Records host entry ``i``'s verdict from its checked copy (``None``: not checked)."""
        if nonfinite is not None:
            self.host_checked.append(i)
            if nonfinite:
                self.host_nonfinite.append(i)

    def verdicts(self, keys: list[str]) -> tuple[str, list[str]] | None:
        """``(checked bitmap, keys holding NaN/Inf)`` for the record, given the
        tensor entries' keys in layout order; ``None`` when nothing was checked."""
        indices, bad = list(self.host_checked), [keys[i] for i in self.host_nonfinite]
        if self.flags is not None:
            indices += self.flags.indices
            bad += self.flags.nonfinite(keys)
        return (checked_bitmap(indices, len(keys)), bad) if indices else None

    @property
    def idle(self) -> bool:
        """Nothing left in flight: the record can be written now."""
        return not self.host and self.event is None


def memcpy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copies ``src`` into the arena view ``dst`` on the calling thread alone: a
    plain ``memmove`` with the GIL released for contiguous tensors (torch's
    ``copy_`` would start intra-op threads competing with the training thread's)."""
    if src.is_contiguous() and src.dtype == dst.dtype and not src.is_conj() and not src.is_neg():
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size())
    else:
        dst.copy_(src)


#: Bytes copied, then read back from cache by the NaN/Inf probe, at a time.
PROBE_CHUNK = 4 << 20


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> bool | None:
    """:func:`memcpy`, checking the copied bytes for NaN/Inf (the sealer then
    skips this entry's probe): whether ``dst`` holds one, ``None`` when the
    dtype or layout is not checked here. The check is fused into the copy
    where the native module is built; otherwise it reads each chunk back from
    cache right behind its copy."""
    enc = encoding(dtype_name(src.dtype))
    if enc is None:
        memcpy(dst, src)
        return None
    fused = copy_check(dst, src, enc)
    if fused is not None:
        return fused
    if not src.is_contiguous() or src.dtype != dst.dtype or src.is_conj() or src.is_neg():
        memcpy(dst, src)
        return None
    probe = FiniteProbe(dtype_name(src.dtype))
    into, out = dst.reshape(-1).view(torch.uint8), src.reshape(-1).view(torch.uint8)
    raw = into.numpy()
    for lo in range(0, into.numel(), PROBE_CHUNK):
        hi = min(lo + PROBE_CHUNK, into.numel())
        memcpy(into[lo:hi], out[lo:hi])
        probe(raw[lo:hi])
    return probe.nonfinite


def _copy_now(flight: Flight, i: int, dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copies unguarded host tensor ``i`` before ``save`` returns: with the
    fused native check where it runs (no slower than the copy), else with
    torch's ``copy_`` (the sealer probes it then)."""
    enc = encoding(dtype_name(src.dtype))
    nonfinite = copy_check(dst, src, enc) if enc is not None else None
    if nonfinite is None:
        dst.copy_(src)
    flight.note(i, nonfinite)


#: Every copier of this process (see :func:`settle`).
_LIVE: "weakref.WeakSet[Copier]" = weakref.WeakSet()


def settle() -> None:
    """Waits until no snapshot of this process is still being copied or
    committed. Fault injection calls it, so a fault planned "at step N" hits
    after snapshot N is complete, as it would with a blocking save."""
    for copier in list(_LIVE):
        copier._idle.wait()


class Copier:
    """The copy side of one :class:`~hpresil.checkpoint.ram.writer.RamWriter`."""

    def __init__(self) -> None:
        # The commit thread (started at the first overlapped save) and what it is given.
        self._worker: threading.Thread | None = None
        self._jobs: queue.SimpleQueue[tuple[Flight, Callable[[], None], Callable[[], None]] | None] = \
            queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._flight: Flight | None = None  # the copy in flight, until wait()
        self._error: BaseException | None = None
        self._stream: Any = None
        self._loss_host: dict[torch.dtype, torch.Tensor] = {}  # pinned, one per loss dtype
        self._flags_host: dict[int, torch.Tensor] = {}  # pinned, by length: the device's NaN/Inf verdicts
        _LIVE.add(self)

    def copy(self, slot: Slot, views: list[torch.Tensor], tensors: list[torch.Tensor], loss: torch.Tensor | None,
              guarded: Sequence[bool] | None) -> Flight:
        """Copies the unguarded tensors now and enqueues the rest (see
        :mod:`hpresil.checkpoint.fence`): guarded host tensors go to the commit
        thread, device tensors to the copy stream."""
        late = list(guarded) if guarded is not None else [False] * len(tensors)
        flight = Flight()
        for i, t in enumerate(tensors):
            if not t.is_cuda and views[i].numel():
                if late[i]:
                    flight.host.append((i, views[i], t))
                else:
                    _copy_now(flight, i, views[i], t)
        if flight.host:
            flight.host_done = threading.Event()
        cuda = [i for i, t in enumerate(tensors) if t.is_cuda]
        on_device = loss is not None and loss.is_cuda
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
            flight.flags = device_finite_flags(tensors, cuda, self._flags_host)
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

    def start(self, flight: Flight, commit: Callable[[], None], unlock: Callable[[], None]) -> None:
        """Hands ``flight`` to the commit thread: it finishes the copies, then
        calls ``commit`` (or ``unlock`` when a copy failed)."""
        self._flight = flight
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="hpresil-commit", daemon=True)
            self._worker.start()
        self._idle.clear()
        self._jobs.put((flight, commit, unlock))

    def wait(self) -> BaseException | None:
        """Waits for the flight's commit; returns its error, if any (once)."""
        self._idle.wait()
        self._flight = None
        error, self._error = self._error, None
        return error

    def close(self) -> None:
        """Stops the commit thread (after :meth:`wait`)."""
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join()
            self._worker = None

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

    def _finish(self, flight: Flight, commit: Callable[[], None], unlock: Callable[[], None]) -> None:
        """The commit thread: the host copies, the device copies' completion, the record."""
        try:
            try:
                for i, dst, src in flight.host:
                    flight.note(i, copy_checked(dst, src))
            finally:
                if flight.host_done is not None:
                    flight.host_done.set()
            if flight.event is not None:
                flight.event.synchronize()
        except BaseException as exc:  # surfaced by the next wait(); the slot stays without a record
            unlock()
            self._error = exc
            return
        try:
            commit()
        except BaseException as exc:  # surfaced by the next wait()
            self._error = exc
