"""The RAM arena: where each tensor lives in a slot, the slot files, and
their preparation off the training thread.

A slot is a file in ``<shm_dir>/ckpt/rank<R>/`` allocated with
``posix_fallocate`` (a full tmpfs fails with ``ENOSPC`` there, not with a
``SIGBUS`` mid-copy), mapped with ``MAP_POPULATE`` (page faults happen once,
not in ``save``), and, when the state has CUDA tensors, registered as pinned
memory (``cudaHostRegister``) so device→host copies run asynchronously.
That costs ~0.5 s per GiB and slot. :class:`Preparer` does it on a
background thread as soon as the layout is known — at the first restore or
save, and again when the layout grows — and re-maps and re-pins the slot
files a restarted process finds, while it restores and starts up. A save
whose slot is not ready waits within its budget or is skipped with a
``checkpoint_skipped`` event (reason ``arena_preparing``); states up to
:data:`INLINE_PREP` bytes are prepared inline, which costs less than a step.
A slot's :attr:`Slot.lock` is held by the thread while it maps the slot and
by the writer from picking the slot until its commit, so the thread never
remaps a slot an overlapped copy is still writing to.

Host memory: each slot holds the whole state of its rank, so a node needs
``slots × local ranks × state bytes per rank`` of shared memory, all of it
pinned when the state is on the GPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import mmap
import os
import threading
from typing import Any, Sequence

import torch

from hpresil.checkpoint.api import Entry
from hpresil.checkpoint.flatten import Leaf, dtype_from_name, dtype_name

#: ``cudaHostRegisterPortable``: pinned for every CUDA context, not only the registering thread's.
_PORTABLE = 1

__all__ = ["ALIGN", "INLINE_PREP", "Layout", "Preparer", "Slot", "align", "build_layout", "cuda_device", "entry_path",
           "signature"]

log = logging.getLogger(__name__)

#: States up to this many bytes are prepared on the saving thread (it costs
#: less than a training step; a test's snapshot is never skipped for it).
INLINE_PREP = 64 << 20

#: Alignment of every entry in the arena (a cache line; also keeps 8-byte views legal).
ALIGN = 64


def align(n: int) -> int:
    """``n`` rounded up to :data:`ALIGN` (where the next entry may start)."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


def cuda_device(leaves: Sequence[Leaf]) -> int | None:
    """The index of the CUDA device the first device tensor among ``leaves`` is on
    (``None``: a host state), the device the arena is pinned for."""
    return next((l.value.device.index for l in leaves if isinstance(l.value, torch.Tensor) and l.value.is_cuda),
                None)


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


def entry_path(leaf: Leaf) -> list[str | int] | None:
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
                path=entry_path(leaf),
            )
        )
        offset = align(offset + nbytes)
    text = ",".join(json.dumps(e.to_json_obj(), separators=(",", ":")) for e in entries)
    return Layout(signature=signature(leaves, compared) if sig is None else sig, entries=entries, nbytes=offset,
                  entries_json=text)


class Slot:
    """One slot file of the writer: descriptor (also the flock handle), mapping,
    and whether the background preparation made it ready."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.mm: mmap.mmap | None = None
        self.buf: torch.Tensor | None = None
        self.size = 0
        self.views: list[torch.Tensor] = []
        self.views_sig: tuple[Any, ...] | None = None
        self.cuda_registered = False
        self.pin_failed = False  # cudaHostRegister refused: device copies are synchronous
        #: held by the preparation thread while it maps the slot, and by the writer from
        #: picking the slot until its commit (a copy in flight is never remapped under it)
        self.lock = threading.Lock()
        #: why the last background preparation failed (``ENOSPC``), raised by the next save that takes the slot
        self.error: OSError | None = None

    def ready(self, nbytes: int, device: int | None) -> bool:
        """Whether the slot is mapped for ``nbytes`` (and pinned, for device state)."""
        return self.buf is not None and self.size >= nbytes and (
            device is None or self.cuda_registered or self.pin_failed)

    def prepare(self, nbytes: int, device: int | None, *, blocking: bool = True) -> bool:
        """Allocates and maps the slot for ``nbytes`` and pins it for ``device``.

        Args:
            blocking: wait for the preparation thread if it holds the slot
                (else return ``False`` at once).

        Returns:
            Whether this call prepared it.

        Raises:
            OSError: ``ENOSPC`` when the shared-memory filesystem is full.
        """
        if not self.lock.acquire(blocking=blocking):
            return False
        try:
            self.prepare_locked(nbytes, device)
            return True
        finally:
            self.lock.release()

    def prepare_locked(self, nbytes: int, device: int | None) -> None:
        """:meth:`prepare` by the holder of :attr:`lock`.

        Raises:
            OSError: ``ENOSPC`` when the shared-memory filesystem is full.
        """
        self.error = None
        self.ensure(nbytes)
        if device is not None:
            self.register_cuda()

    def ensure(self, nbytes: int) -> None:
        """Makes the file and mapping at least ``nbytes`` long.

        Raises:
            OSError: ``ENOSPC`` when the shared-memory filesystem is full.
        """
        if self.buf is not None and self.size >= nbytes:
            return
        self.unmap()
        # A file a restarted process finds keeps its size: the state before the
        # optimizer's first step is smaller than the one saved later.
        size = max(nbytes, ALIGN, os.fstat(self.fd).st_size)
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
            rc = torch.cuda.cudart().cudaHostRegister(self.buf.data_ptr(), self.size, _PORTABLE)
            self.cuda_registered = int(rc) == 0
            self.pin_failed = not self.cuda_registered
            if not self.cuda_registered:
                log.warning("cudaHostRegister(%s) failed (%s); device copies will be synchronous", self.path, rc)
        return self.cuda_registered

    def unmap(self) -> None:
        """Unpins and unmaps the slot (the file stays)."""
        if self.cuda_registered and self.buf is not None:
            torch.cuda.cudart().cudaHostUnregister(self.buf.data_ptr())
            self.cuda_registered = False
        self.pin_failed = False
        self.views, self.views_sig, self.buf = [], None, None
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        self.size = 0

    def close(self) -> None:
        """Unmaps the slot and closes its descriptor."""
        self.unmap()
        os.close(self.fd)


class Preparer:
    """Prepares slots on a background thread (one job at a time; a newer
    request replaces a pending one).

    Args:
        slots: the writer's slots, prepared in this order.
        rank: for the log.
    """

    def __init__(self, slots: Sequence[Slot], rank: int) -> None:
        self._slots = list(slots)
        self._rank = rank
        self._cond = threading.Condition()
        self._want: tuple[int, int | None, int] | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._current: tuple[int, int | None] | None = None  # (bytes, device) of the job being prepared

    def request(self, nbytes: int, device: int | None, first: int = 0) -> None:
        """Makes every slot ready for ``nbytes`` on ``device`` in the background,
        slot ``first`` first."""
        with self._cond:
            if self._current is not None and self._current[1] == device:
                nbytes = max(nbytes, self._current[0])  # a smaller layout fits what is being prepared
            if all(s.ready(nbytes, device) for s in self._slots):
                return
            if self._stopped or self._want == (nbytes, device, first):
                return
            self._want = (nbytes, device, first)
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hpresil-arena", daemon=True)
                self._thread.start()

    def wait_ready(self, slot: Slot, nbytes: int, device: int | None, timeout: float) -> bool:
        """Waits up to ``timeout`` seconds for ``slot`` to be ready."""
        with self._cond:
            return self._cond.wait_for(lambda: slot.ready(nbytes, device) or slot.error is not None, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._want is not None or self._stopped)
                if self._stopped:
                    return
                assert self._want is not None
                nbytes, device, first = self._want
                self._want = None
                self._current = (nbytes, device)
            order = [first] + [k for k in range(len(self._slots)) if k != first]
            for k in order:
                slot = self._slots[k]
                if self._stopped or self._want is not None:
                    break  # a newer request (or close) supersedes this one
                if slot.ready(nbytes, device):
                    continue
                try:
                    if device is not None:
                        torch.cuda.set_device(device)  # this thread's context: the state's device
                    slot.prepare(nbytes, device)
                except OSError as exc:
                    slot.error = exc
                    log.warning("rank %d: cannot prepare RAM slot %d (%s)", self._rank, k, exc)
                except Exception:  # noqa: BLE001 - a CUDA error: the save registers inline or copies synchronously
                    log.exception("rank %d: preparing RAM slot %d failed", self._rank, k)
                with self._cond:
                    self._cond.notify_all()
            with self._cond:
                self._current = None

    def stop(self) -> None:
        """Stops the thread after the slot it is preparing."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
