"""The sealer: checksums and judges committed RAM snapshots after the fact.

Keeping the checksum out of ``save`` is what makes the blocking time a bare
copy; the sealer computes one ``xxh3`` checksum per tensor entry
(:mod:`~hpresil.checkpoint.integrity`, ~3x faster than the copy here), checks
each floating-point leaf for NaN/Inf right after hashing it and judges the
snapshot's health (:mod:`~hpresil.checkpoint.health`: ``snapshot_poisoned`` /
``snapshot_suspect`` events), and writes ``slot<K>.seal.json`` bound to the
record's ``commit_id``, holding
``LOCK_SH`` on the slot so the writer cannot reuse it meanwhile (it skips
locked slots, waits a little, and asks through ``slot<K>.reclaim`` for
slots whose commit is older than a sealed one: the sealer then abandons that
seal between two chunks, see :mod:`~hpresil.checkpoint.ram.slots`). Newest
commits are sealed first.

The same class runs as a :class:`~hpresil.runtime.api.NodeService` in
``hpresil-run`` (all ranks of the node) and, outside it, in a background
thread of the training process (:meth:`Sealer.start_background`, that
process's rank only). Either way the work happens on the sealer's own thread:
``tick`` only wakes it, so a large snapshot never delays the runtime's other
services.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch

from hpresil.checkpoint.api import FORMAT_VERSION, CommitRecord, Seal, rank_dir, record_digest, slot_path
from hpresil.checkpoint.divergence import replica_summary
from hpresil.checkpoint.health import HealthConfig, RankHealth, Verdict, probe_for
from hpresil.checkpoint.integrity import checksum_cancellable
from hpresil.checkpoint.ram.files import SlotInfo, frombuffer, scan, write_atomic
from hpresil.checkpoint.ram.pin import SlotGone, pin
from hpresil.errors import ConfigError, IntegrityError
from hpresil.events import NullEventLog
from hpresil.events.api import EventSink
from hpresil.runtime.api import NodeService, RuntimeContext, WorkerGroupInfo

__all__ = ["Sealer", "SealerConfig"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True, slots=True)
class SealerConfig:
    """Settings of the :class:`Sealer`.

    Attributes:
        interval: how often the sealing thread looks for commits without being woken.
        health: how snapshots are judged (:class:`~hpresil.checkpoint.health.HealthConfig`).
    """

    interval: timedelta = timedelta(milliseconds=200)
    health: HealthConfig = dataclasses.field(default_factory=HealthConfig)

    def __post_init__(self) -> None:
        if self.interval <= timedelta(0):
            raise ConfigError(f"interval={self.interval}: must be > 0")


class Sealer(NodeService):
    """Writes seals for committed, unsealed RAM snapshots.

    Args:
        config: tuning; defaults are fine (the node runtime builds services as
            ``cls(config)``).
        shm_dir: the job's shared-memory directory (as a node service:
            :meth:`start` provides it).
        events: where ``checkpoint_sealed`` goes (as a node service: the runtime's).
        ranks: seal only these ranks' directories (default: all).
        after_pass: called on the thread after every pass (the in-process
            Checkpointer ticks its drainer from here).
    """

    name = "sealer"

    def __init__(
        self,
        config: SealerConfig | None = None,
        *,
        shm_dir: str | None = None,
        events: EventSink | None = None,
        ranks: Sequence[int] | None = None,
        after_pass: Callable[[], None] | None = None,
    ) -> None:
        self.config = config or SealerConfig()
        self.shm_dir = shm_dir
        self.events: EventSink = events or NullEventLog()
        self.ranks = None if ranks is None else list(ranks)
        self.after_pass = after_pass
        self._lock = threading.Lock()  # one sealing pass at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cache: dict[str, Any] = {}
        self._maps: dict[str, tuple[tuple[int, int], mmap.mmap, torch.Tensor]] = {}
        self._bad: set[str] = set()  # commit ids that could not be sealed
        self._health: dict[int, RankHealth] = {}
        self._episode = False  # an unhealthy snapshot was logged and no healthy one sealed since

    # -- node service ----------------------------------------------------
    def start(self, ctx: RuntimeContext) -> None:
        """Node-service hook: seals the job's shared-memory directory."""
        self.shm_dir = ctx.shm_dir
        self.events = ctx.events
        self.start_background()

    def on_workers_started(self, group: WorkerGroupInfo) -> None:
        """Node-service hook (nothing to do)."""

    def on_workers_stopped(self, group: WorkerGroupInfo) -> None:
        """Node-service hook: the last commits of a failed group are sealed promptly."""
        self.notify()

    def tick(self) -> None:
        """Node-service hook: wakes the sealing thread (never seals inline)."""
        self.notify()

    def stop(self, timeout: timedelta = timedelta(seconds=10)) -> None:
        """Seals what is pending within ``timeout``, then stops the thread."""
        self.flush(timeout)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=max(0.1, timeout.total_seconds()))
            self._thread = None
        self._unmap_all()

    # -- in-process ------------------------------------------------------
    def start_background(self) -> None:
        """Starts the sealing thread (idempotent)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="hpresil-sealer", daemon=True)
            self._thread.start()

    def notify(self) -> None:
        """Wakes the thread: a commit may be waiting."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.config.interval.total_seconds())
            self._wake.clear()
            try:
                while not self._stop.is_set() and self.seal_once():
                    pass
                if self.after_pass is not None:
                    self.after_pass()
            except Exception:  # never let the thread die on an unexpected error
                log.exception("sealer pass failed; retrying")

    def flush(self, timeout: timedelta = timedelta(seconds=10)) -> bool:
        """Seals until no committed snapshot is unsealed, or ``timeout``.

        Returns:
            Whether everything committed is sealed.
        """
        deadline = time.monotonic() + timeout.total_seconds()
        while True:
            self.seal_once()
            if not self._pending():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)  # a writer holds the slot; its commit comes soon

    # -- sealing ---------------------------------------------------------
    def _pending(self) -> list[SlotInfo]:
        """Unsealed commits, newest first: the newest is what a restore wants;
        older ones are fallbacks should the newest fail its check."""
        if self.shm_dir is None:
            return []
        todo = [i for i in scan(self.shm_dir, self.ranks, self._cache) if i.seal is None and i.record.commit_id not in self._bad]
        return sorted(todo, key=lambda i: (i.record.step, i.record.created), reverse=True)

    def seal_once(self) -> bool:
        """Seals the newest unsealed commit that is not being written.

        Returns:
            Whether a seal was written.
        """
        with self._lock:
            for info in self._pending():
                if self._seal(info):
                    return True
            return False

    def _seal(self, info: SlotInfo) -> bool:
        assert self.shm_dir is not None
        path = slot_path(self.shm_dir, info.rank, info.slot, "bin")
        reclaim = slot_path(self.shm_dir, info.rank, info.slot, "reclaim")
        if os.path.exists(reclaim):
            return False  # the writer wants this slot back: its commit is about to go
        try:
            with pin(self.shm_dir, info, timeout=None, full=True) as held:
                record = held.record
                t0 = time.perf_counter()
                buf = self._map(path, held.fd, held.size)
                sums: dict[str, str] = {}
                nonfinite: set[str] = set()
                check = self.config.health.check_finite
                # entries the device already checked: probed only to confirm a non-finite norm
                on_device = int(record.checked, 16) if record.checked else 0
                hinted = set(record.nonfinite)
                wanted = _Throttled(lambda: os.path.exists(reclaim), 0.002)
                index = -1
                for e in record.entries:
                    if e.kind != "tensor":
                        continue
                    index += 1
                    skip = on_device >> index & 1 and e.key not in hinted
                    probe = probe_for(e.dtype) if check and not skip else None
                    got = checksum_cancellable(buf[e.offset : e.offset + e.nbytes], wanted, probe=probe)
                    if got is None:
                        log.debug("rank %d step %d: slot %d reclaimed by the writer; seal abandoned",
                                  record.rank, record.step, info.slot)
                        return False
                    sums[e.key] = got
                    if probe is not None and probe.nonfinite:
                        nonfinite.add(e.key)
                verdict = self._judge(record, nonfinite)
                seal = Seal(
                    version=FORMAT_VERSION,
                    commit_id=record.commit_id,
                    step=record.step,
                    rank=record.rank,
                    health=verdict.health,
                    causes=list(verdict.causes),
                    poisoned=list(verdict.keys),
                    detail=verdict.detail,
                    replica=replica_summary(record.entries, sums),
                    checksums=sums,
                    sealed=time.time(),
                    record=record_digest(record),
                )
                # Written while still holding the lock: the writer unlinks seals
                # only under LOCK_EX, so a seal can never outlive its record's data.
                write_atomic(slot_path(self.shm_dir, info.rank, info.slot, "seal.json"), seal.to_json())
                duration = time.perf_counter() - t0
        except SlotGone:
            return False  # the writer is reusing it; the record is about to go
        except IntegrityError as exc:
            log.error("rank %d step %d: %s; not sealing", info.rank, info.record.step, exc)
            self._bad.add(info.record.commit_id)
            return False
        except OSError as exc:
            log.warning("rank %d step %d: cannot seal %s: %s", info.rank, info.record.step, path, exc)
            return False
        log.debug("rank %d step %d: sealed slot %d in %.3fs", record.rank, record.step, info.slot, duration)
        self._report(record, verdict)
        self.events.emit(
            "checkpoint_sealed",
            step=record.step,
            rank=record.rank,
            slot=info.slot,
            bytes=record.nbytes,
            duration_s=round(duration, 6),
        )
        return True

    def _judge(self, record: CommitRecord, nonfinite: set[str]) -> Verdict:
        judge = self._health.get(record.rank)
        if judge is None:
            assert self.shm_dir is not None
            path = os.path.join(rank_dir(self.shm_dir, record.rank), "health.json")
            judge = self._health[record.rank] = RankHealth(self.config.health, path)
        keys = [e.key for e in record.entries if e.kind == "tensor"]
        return judge.judge(keys, nonfinite, record.step, record.loss)

    def _report(self, record: CommitRecord, verdict: Verdict) -> None:
        # One console line per episode (the first bad snapshot this node sees, until a
        # healthy one is sealed again): a NaN reaches every rank and the next snapshots too.
        loud = verdict.health != "ok" and not self._episode
        self._episode = verdict.health != "ok" and (self._episode or loud)
        if verdict.health == "poisoned":
            log.log(logging.ERROR if loud else logging.DEBUG, "rank %d step %d: snapshot poisoned: %s", record.rank,
                    record.step, verdict.detail)
            self.events.emit("snapshot_poisoned", step=record.step, rank=record.rank, keys=list(verdict.keys[:50]),
                             causes=list(verdict.causes), detail=verdict.detail)
        elif verdict.health == "suspect":
            log.log(logging.WARNING if loud else logging.DEBUG, "rank %d step %d: snapshot suspect: %s", record.rank,
                    record.step, verdict.detail)
            self.events.emit("snapshot_suspect", step=record.step, rank=record.rank, causes=list(verdict.causes),
                             loss=record.loss, detail=verdict.detail)

    def _map(self, path: str, fd: int, size: int) -> torch.Tensor:
        # Mappings are kept: re-mapping a slot each time would fault every page again.
        st = os.fstat(fd)
        ident = (st.st_ino, size)
        hit = self._maps.get(path)
        if hit is not None and hit[0] == ident:
            return hit[2]
        if hit is not None:
            del self._maps[path], hit
        # mmap keeps a dup of the descriptor it maps, and a dup shares the open
        # file description that holds the flock: map through a second open so
        # the kept mapping never holds the lock.
        map_fd = os.open(path, os.O_RDONLY)
        try:
            mm = mmap.mmap(map_fd, size, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), mmap.PROT_READ)
        finally:
            os.close(map_fd)
        buf = frombuffer(mm)
        self._maps[path] = (ident, mm, buf)
        return buf

    def _unmap_all(self) -> None:
        # Dropping the tensor and the mmap together unmaps (mmap.close() would
        # refuse while the tensor still exports the buffer).
        self._maps.clear()


class _Throttled:
    """A predicate asked at most once per ``interval`` seconds (``False`` in
    between): the reclaim request is a ``stat``, and a snapshot has thousands of
    small entries; the writer waits at most one interval longer."""

    def __init__(self, ask: Callable[[], bool], interval: float) -> None:
        self._ask = ask
        self._interval = interval
        self._next = 0.0

    def __call__(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self._interval
        return self._ask()
