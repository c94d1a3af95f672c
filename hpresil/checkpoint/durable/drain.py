"""Drains RAM snapshots to the durable tier, off the training path.

The :class:`Drainer` runs in the node runtime (a :class:`~hpresil.runtime.api.NodeService`
named ``"drain"``) or in-process (``Drainer(shm_dir=..., events=...).drain_once()``). Each
pass scans ``<shm_dir>/ckpt/rank*/slot*.json`` for committed, sealed records with
``durable=True``, picks the newest step that every local rank holds (older pending
steps are skipped), takes ``LOCK_SH`` on each rank's slot arena, re-reads the
record to confirm its ``commit_id``, streams the arena to storage through
:class:`~hpresil.checkpoint.durable.writer.DurableWriter`, and releases the locks. The
node that completes the set of rank markers commits the step and applies
retention (``keep`` from the record).

Failures never reach training: they are logged, reported as ``tier_degraded``
events, and retried on a later pass after an exponential backoff; nothing
committed is touched by a failed upload.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import threading
import time
from datetime import timedelta
from typing import Any

from hpresil.checkpoint.durable.writer import DurableWriter, RankUpload
from hpresil.checkpoint.durable.layout import ArenaSlice, assign_owners, plan_rank_file
from hpresil.checkpoint.durable.stores import Buffer, DurableStore, open_store
from hpresil.checkpoint.durable.stores.api import redact
from hpresil.checkpoint.ram.files import ScanCache, SlotInfo, scan
from hpresil.checkpoint.ram.pin import Pinned, SlotGone, pin
from hpresil.errors import ConfigError
from hpresil.events.api import EventSink
from hpresil.runtime.api import NodeService, RuntimeContext, WorkerGroupInfo

__all__ = ["DrainConfig", "Drainer"]

log = logging.getLogger(__name__)

@dataclasses.dataclass(kw_only=True, slots=True)
class DrainConfig:
    """Settings of the :class:`Drainer`.

    Attributes:
        scan_interval: how often ``tick()`` looks for new snapshots.
        upload_timeout: bound on one upload attempt of one step, unless its
            records carry their own (``CheckpointConfig.upload_timeout``).
        backoff_initial: wait before the first retry after a failure.
        backoff_max: the longest wait between retries (doubling from ``backoff_initial``).
        stall_after: an upload that takes no piece (an S3 part, a written
            buffer) for this long is reported (``tier_degraded``, ``reason:
            stalled``) while it goes on; ``tier_restored`` when bytes flow
            again. A frozen server is otherwise silent until the transport's
            read timeout (60 s for S3) or ``upload_timeout``.
        storage_options: passed to :func:`~hpresil.checkpoint.durable.stores.open_store`
            (e.g. ``part_size``, ``concurrency`` for s3).
    """

    scan_interval: timedelta = timedelta(milliseconds=500)
    upload_timeout: timedelta = timedelta(minutes=10)
    backoff_initial: timedelta = timedelta(seconds=1)
    backoff_max: timedelta = timedelta(seconds=60)
    stall_after: timedelta = timedelta(seconds=15)
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.upload_timeout <= timedelta(0) or self.scan_interval <= timedelta(0) or self.stall_after <= timedelta(0):
            raise ConfigError("scan_interval, upload_timeout and stall_after must be > 0")
        if not timedelta(0) < self.backoff_initial <= self.backoff_max:
            raise ConfigError(
                f"backoff_initial={self.backoff_initial} backoff_max={self.backoff_max}: "
                "need 0 < backoff_initial <= backoff_max"
            )


@dataclasses.dataclass(slots=True)
class _Transfer:
    """The upload in flight: its step, when a piece last went through, bytes so far."""

    step: int
    url: str
    last: float
    bytes: int = 0
    stalled: float | None = None  # when its stall began, once reported


class Drainer(NodeService):
    """Copies sealed RAM snapshots marked ``durable`` to the durable tier.

    Args:
        config: tuning; defaults are fine (the node runtime builds services as
            ``cls(config)``).
        shm_dir: the job's shared-memory directory (``$HPRESIL_SHM_DIR``; as a
            node service: :meth:`start` provides it).
        events: where ``checkpoint_drained`` and ``tier_degraded`` go.
    """

    name = "drain"

    def __init__(
        self,
        config: DrainConfig | None = None,
        *,
        shm_dir: str | None = None,
        events: EventSink | None = None,
    ) -> None:
        self.shm_dir = shm_dir
        self.events = events
        self.config = config or DrainConfig()
        self._group: WorkerGroupInfo | None = None
        self._stores: dict[str, DurableStore] = {}
        # step -> local rank -> (commit_id, timeline) uploaded (or found uploaded)
        self._done: dict[int, dict[int, tuple[str, str]]] = {}
        self._parsed: ScanCache = {}
        self._unhealthy: set[str] = set()  # commit ids not uploaded for their health (logged once)
        self._failures = 0
        self._retry_at = 0.0
        self._next_scan = 0.0
        self._drain_lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._warm = False
        self._transfer: _Transfer | None = None
        self._transfer_lock = threading.Lock()

    # ------------------------------------------------------------ NodeService

    def start(self, ctx: RuntimeContext) -> None:
        """Adopts the runtime's shm directory and event sink; starts the worker thread."""
        self.shm_dir = ctx.shm_dir
        self.events = ctx.events
        self._thread = threading.Thread(target=self._loop, name="hpresil-drain", daemon=True)
        self._thread.start()

    def on_workers_started(self, group: WorkerGroupInfo) -> None:
        """Restricts draining to this group's local ranks and world size."""
        self._group = group

    def on_workers_stopped(self, group: WorkerGroupInfo) -> None:
        """Nothing to do: snapshots stay in shared memory and keep draining."""

    def tick(self) -> None:
        """Reports a stalled upload; hands a drain pass to the worker thread when
        one is due. Never blocks."""
        now = time.monotonic()
        self._check_stall(now)
        if now < self._next_scan or now < self._retry_at or not self._idle.is_set():
            return
        self._next_scan = now + self.config.scan_interval.total_seconds()
        self._idle.clear()
        self._wake.set()

    def stop(self, timeout: timedelta) -> None:
        """Finishes the pending upload and one last pass within ``timeout``, then stops."""
        deadline = time.monotonic() + timeout.total_seconds()
        if self._thread is None:
            return
        if self._idle.wait(max(0.0, deadline - time.monotonic())):
            self._idle.clear()
            self._retry_at = 0.0
            self._wake.set()
            self._idle.wait(max(0.0, deadline - time.monotonic()))
        if not self._idle.is_set():
            log.warning("durable drain still uploading at shutdown; abandoning it (the last committed checkpoint is intact)")
        self._stopping = True
        self._wake.set()
        self._thread.join(max(0.0, deadline - time.monotonic()))

    def unsaved(self) -> str | None:
        """After :meth:`stop`: which snapshots flagged for the durable tier this node
        holds newer than anything it uploaded, or ``None`` (the node runtime then
        keeps the shared memory instead of deleting the only copy). Local files
        only, no storage call."""
        try:
            found = self._scan()
        except Exception as exc:  # noqa: BLE001 - an unreadable shm dir holds nothing to keep
            log.debug("cannot scan for undrained snapshots: %s", exc)
            return None
        floor = self._floor(found)
        pending = sorted({s.record.step for snaps in found.values() for s in snaps
                          if s.record.step >= floor and not self._is_done(s)})
        if not pending:
            return None
        return f"durable-flagged step(s) {pending} not uploaded (newest uploaded here: {floor if floor >= 0 else 'none'})"

    def _loop(self) -> None:
        if not self._warm:
            try:
                self._warm_up()  # now, while the workers start, not during their first steps
            except Exception as exc:  # noqa: BLE001 - retried at the first durable snapshot
                self._warm = False
                log.debug("durable drain: warm-up import failed: %s", exc)
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                self._idle.set()
                return
            try:
                self.drain_once()
            except Exception:  # noqa: BLE001 - a bug here must not kill the runtime
                log.exception("durable drain pass failed")
            finally:
                self._idle.set()

    # ------------------------------------------------------------ one pass

    def drain_once(self) -> bool:
        """Uploads the newest pending durable snapshot of this node's ranks, now.

        Returns:
            True when something was uploaded or committed; False when there was
            nothing to do or the attempt failed (reported, retried later).
        """
        with self._drain_lock:
            step = None
            try:
                picked = self._pick()
                if picked is None:
                    return False
                step, snaps = picked
                return self._drain(step, snaps)
            except Exception as exc:  # noqa: BLE001 - never raise into training
                self._degraded(step, exc)
                return False

    def _scan(self) -> dict[int, list[SlotInfo]]:
        """Sealed snapshots flagged for the durable tier, by rank (headers only)."""
        assert self.shm_dir is not None, "Drainer needs shm_dir (or start(ctx))"
        found: dict[int, list[SlotInfo]] = {}
        for info in scan(self.shm_dir, cache=self._parsed):
            if info.record.durable_url and not self._warm:
                self._warm_up()
            if info.record.durable and info.seal is not None:
                if info.seal.health != "ok":
                    # Never uploaded: retention then only ever counts healthy steps.
                    if info.record.commit_id not in self._unhealthy:
                        self._unhealthy.add(info.record.commit_id)
                        log.warning("rank %d step %d: snapshot %s (%s); not uploading it to the durable tier",
                                    info.rank, info.record.step, info.seal.health, ", ".join(info.seal.causes))
                    continue
                found.setdefault(info.rank, []).append(info)
        return found

    def _warm_up(self) -> None:
        """Imports DCP's metadata classes on this (drain) thread when it starts
        (and, failing that, at the first snapshot with a durable tier). The import
        takes seconds of CPU in the agent's process: done lazily at the first
        durable commit it stalled a worker restart happening at the same moment,
        and on a busy host it slowed the first snapshot's training steps."""
        self._warm = True
        t0 = time.monotonic()
        for module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"):
            importlib.import_module(module)

        log.debug("durable drain: DCP metadata classes imported in %.2fs", time.monotonic() - t0)

    def _pick(self) -> tuple[int, dict[int, SlotInfo]] | None:
        found = self._scan()
        if not found:
            return None
        group = self._group
        if group is not None:
            ranks = set(group.global_ranks)
            world = group.world_size
        else:
            newest = max((s for snaps in found.values() for s in snaps), key=lambda s: (s.record.step, s.record.created))
            world = newest.record.world_size
            ranks = {r for r, snaps in found.items() if any(s.record.world_size == world for s in snaps)}
        by_rank = {
            r: {s.record.step: s for s in found.get(r, []) if s.record.world_size == world} for r in ranks
        }
        common = set.intersection(*(set(v) for v in by_rank.values())) if by_rank else set()
        floor = self._floor(found)  # never go back behind a step already drained
        todo = sorted((s for s in common if s >= floor and not all(self._is_done(by_rank[r][s]) for r in ranks)),
                      reverse=True)
        if not todo:
            return None
        step = todo[0]
        if len(todo) > 1 and (group is None or len(ranks) < world):
            step = self._prefer_started(todo, ranks, by_rank)
        return step, {r: by_rank[r][step] for r in sorted(ranks) if not self._is_done(by_rank[r][step])}

    def _is_done(self, info: SlotInfo) -> bool:
        """This very commit was uploaded (or found uploaded): a snapshot of the
        same step from a later timeline is not."""
        return self._done.get(info.record.step, {}).get(info.rank, ("", ""))[0] == info.record.commit_id

    def _floor(self, found: dict[int, list[SlotInfo]]) -> int:
        """The newest step drained in the timeline of the newest snapshot here,
        or -1. After a restore to an older step the job's new timeline starts
        below what the old one drained; its steps are drained again (and
        replace the abandoned timeline's, see ``DurableWriter.upload``)."""
        snaps = [s for ss in found.values() for s in ss]
        if not snaps:
            return -1
        timeline = max(snaps, key=lambda s: (s.record.step, s.record.created)).record.timeline
        return max((step for step, ranks in self._done.items() if any(t == timeline for _, t in ranks.values())),
                   default=-1)

    def _prefer_started(self, todo: list[int], ranks: set[int], by_rank: dict[int, dict[int, SlotInfo]]) -> int:
        """Among pending steps (newest first), one that another node already
        started uploading, else the newest. Each node's drainer picks on its
        own; without this, nodes that fall behind a fast save cadence upload
        different steps and no step ever has every rank."""
        for step in todo:
            url = by_rank[min(ranks)][step].record.durable_url
            if not url:
                continue
            try:
                if DurableWriter(self._store(url)).started_elsewhere(step, ranks):
                    return step
            except Exception as exc:  # noqa: BLE001 - a preference only; the upload reports failures
                log.debug("cannot list durable step %d: %s", step, exc)
                break
        return todo[0]

    def _store(self, url: str) -> DurableStore:
        store = self._stores.get(url)
        if store is None:
            store = open_store(url, **self.config.storage_options)
            self._stores[url] = store
        return store

    def _drain(self, step: int, snaps: dict[int, SlotInfo]) -> bool:
        first = snaps[min(snaps)].record
        if not first.durable_url:
            raise ConfigError(f"step {step}: snapshot is marked durable but has no durable_url; set CheckpointConfig.durable")
        t0 = time.monotonic()
        with contextlib.ExitStack() as held:
            pinned: list[Pinned] = []
            for snap in snaps.values():
                try:
                    # the writer holds LOCK_EX only while it commits
                    pinned.append(held.enter_context(pin(self.shm_dir or "", snap, timeout=0.1, full=True,
                                                         sealed=True, mapped=True)))
                except SlotGone as exc:
                    log.debug("durable drain of step %d waits: %s", step, exc)
                    return False
            # The store named by the full record, checked against its seal (the scan read headers only).
            first = min(pinned, key=lambda p: p.record.rank).record
            writer = DurableWriter(self._store(first.durable_url or ""))
            # Every node derives the same owners from the layout (the scan read headers only).
            owners = assign_owners(min(pinned, key=lambda p: p.record.rank).record.entries, first.world_size)
            uploads = []
            for p in pinned:
                assert p.seal is not None
                segments, rank_obj = plan_rank_file(p.record, p.seal.checksums, owners)
                bufs: list[Buffer] = [p.view(s.offset, s.nbytes) if isinstance(s, ArenaSlice) else s for s in segments]
                uploads.append(RankUpload(rank_obj, bufs))
            timeout = first.upload_timeout or self.config.upload_timeout.total_seconds()
            self._transfer = _Transfer(step=step, url=redact(first.durable_url or ""), last=time.monotonic())
            try:
                nbytes, ranks = writer.upload(step, uploads, timeout=timeout, progress=self._progress)
            finally:
                self._transfer = None
            del uploads, bufs
        committed = writer.try_commit(step, first.world_size)
        if committed:
            writer.retain(first.keep)
        self._done.setdefault(step, {}).update({r: (p.record.commit_id, p.record.timeline) for r, p in snaps.items()})
        for old in [s for s in self._done if s < step]:
            del self._done[old]
        duration = time.monotonic() - t0
        if self._failures:
            log.info("durable tier %s recovered after %d failed attempts", redact(first.durable_url or ""), self._failures)
        self._failures = 0
        self._retry_at = 0.0
        log.info(
            "drained step %d ranks %s to %s: %.1f MB in %.2fs%s",
            step, ranks, redact(first.durable_url or ""), nbytes / 1e6, duration, " (committed)" if committed else "",
        )
        if not ranks and not committed:
            return False  # our ranks were uploaded earlier (e.g. before a restart); others are pending
        self._emit(
            "checkpoint_drained",
            step=step,
            tier="durable",
            duration_s=round(duration, 4),
            bytes=nbytes,
            mb_per_s=round(nbytes / 1e6 / duration, 2) if duration > 0 else 0.0,
            ranks=ranks,
            committed=committed,
        )
        return True

    def _check_stall(self, now: float) -> None:
        transfer = self._transfer
        limit = self.config.stall_after.total_seconds()
        with self._transfer_lock:
            if transfer is None or transfer.stalled is not None or now - transfer.last <= limit:
                return
            transfer.stalled = transfer.last
        idle = now - transfer.last
        log.warning("durable upload of step %d to %s has made no progress for %.0fs (%d bytes so far); "
                    "still waiting (upload_timeout bounds it)", transfer.step, transfer.url, idle, transfer.bytes)
        self._emit("tier_degraded", tier="durable", reason="stalled", step=transfer.step, stalled_s=round(idle, 1),
                   bytes=transfer.bytes, error=f"no upload progress for {idle:.0f}s")

    def _progress(self, nbytes: int) -> None:
        transfer = self._transfer
        if transfer is None:
            return
        now = time.monotonic()
        with self._transfer_lock:  # a store may write several files on threads of its own
            transfer.last = now
            transfer.bytes += nbytes
            stalled, transfer.stalled = transfer.stalled, None
        if stalled is not None:
            log.info("durable upload of step %d to %s is moving again after %.0fs", transfer.step, transfer.url,
                     now - stalled)
            self._emit("tier_restored", tier="durable", reason="stalled", step=transfer.step,
                       stalled_s=round(now - stalled, 1))

    def _degraded(self, step: int | None, exc: BaseException) -> None:
        self._failures += 1
        delay = min(
            self.config.backoff_max.total_seconds(),
            self.config.backoff_initial.total_seconds() * 2 ** (self._failures - 1),
        )
        self._retry_at = time.monotonic() + delay
        for url in list(self._stores):  # reconnect (and re-probe) on the next attempt
            self._stores.pop(url).close()
        error = f"{type(exc).__name__}: {exc}"
        log.warning("durable drain of step %s failed (attempt %d, retry in %.0fs): %s", step, self._failures, delay, error)
        self._emit("tier_degraded", tier="durable", error=error, step=step, attempt=self._failures, retry_in_s=delay)

    def _emit(self, event: str, **fields: Any) -> None:
        if self.events is not None:
            self.events.emit(event, **fields)
