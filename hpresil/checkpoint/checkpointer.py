"""The user-facing :class:`Checkpointer`: save to RAM every step, restore from
the fastest tier that every rank can load (the restore side is
:mod:`~hpresil.checkpoint.restoring`, shutdown :mod:`~hpresil.checkpoint.closing`).

Under ``hpresil-run`` (``$HPRESIL_SHM_DIR`` set) the node runtime seals and
drains the snapshots; elsewhere (plain ``torchrun``, a single process) the
Checkpointer runs the :class:`~hpresil.checkpoint.ram.sealer.Sealer` and the
durable drainer on background threads of the training process, over a
per-job directory ``/dev/shm/hpresil/<run id>/<host>``.

When shared memory is full, the RAM tier degrades: a ``tier_degraded`` event
and a warning, the RAM slots are freed, and the snapshots due for the durable
tier are staged on disk instead (same format, drained in-process); training
goes on.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from typing import Any, Callable, Mapping

from hpresil import _env
from hpresil.checkpoint import flatten as fl
from hpresil.checkpoint import graceful_stop as stop
from hpresil.checkpoint import h2d
from hpresil.checkpoint.api import CheckpointConfig
from hpresil.checkpoint.closing import Closing
from hpresil.checkpoint.divergence import compare_keys
from hpresil.checkpoint.durable.drain import DrainConfig, Drainer
from hpresil.checkpoint.durable.stores import DurableStore, open_store
from hpresil.checkpoint.fence import StepFence, expected_state_bytes, find_optimizers
from hpresil.checkpoint.guard import Guard
from hpresil.checkpoint.ram.arena import cuda_device
from hpresil.checkpoint.ram.files import scan
from hpresil.checkpoint.ram.sealer import Sealer
from hpresil.checkpoint.ram.writer import RamWriter
from hpresil.checkpoint.restore import RestoreResult
from hpresil.checkpoint.restoring import Restoring
from hpresil.checkpoint.rollback import RollbackPolicy, SkipList
from hpresil.checkpoint.stateful import HANG_KEY, SKIP_KEY, HangCalibration, RNGState, default_shm_dir
from hpresil.errors import ConfigError, StorageError
from hpresil.events import worker_sink
from hpresil.events.api import EventSink
from hpresil.hang.heartbeat import heartbeat, phase
from hpresil.runtime.api import RuntimeContext, WorkerGroupInfo

__all__ = ["Checkpointer", "RNGState", "default_shm_dir"]

log = logging.getLogger(__name__)


class Checkpointer(Restoring, Closing):
    """Tiered checkpointing of a training state.

    Example::

        ckpt = hpresil.Checkpointer(state={"model": model, "optim": opt, "rng": RNGState()},
                                    durable="s3://bucket/run1", durable_every=50)
        start = ckpt.restore()
        for step in ckpt.steps(start + 1, total + 1):  # range() that a rollback rewinds
            loss = ...train...
            ckpt.save(step, loss=loss)
        ckpt.close()

    Args:
        state: what to save; values are tensors, nested dicts/lists, plain
            values, or objects with ``state_dict()``/``load_state_dict()``.
            Read on every save, restored in place.
        durable: fsspec URL of the durable tier (see :class:`CheckpointConfig`).
        every: snapshot to RAM every this many steps.
        durable_every: copy every this many steps to the durable tier (0: never).
        keep: durable checkpoints retained.
        slots: RAM buffers per rank.
        verify_on_restore: trust only sealed snapshots, and check checksums.
        config: all of the above at once (replaces them).
        shm_dir: RAM tier directory (default: ``$HPRESIL_SHM_DIR``, else
            :func:`default_shm_dir`).
        run_services: seal and drain on background threads here (default: only
            outside ``hpresil-run``, whose node runtime does it).
        events: event sink (default: :func:`hpresil.events.worker_sink`).
        rollback: what to do about an unhealthy state (default: from
            ``hpresil-run``'s ``--on-nonfinite``/``--on-spike``/``--on-divergence``,
            see :class:`~hpresil.checkpoint.rollback.RollbackPolicy`).

    Raises:
        ConfigError: an invalid setting or durable URL.
        StorageError: the durable store cannot be reached at the first start
            (after a restart the worker goes on from RAM and peers: ``tier_degraded``).
    """

    def __init__(
        self,
        state: Mapping[str, Any],
        *,
        durable: str | None = None,
        every: int = 1,
        durable_every: int = 50,
        keep: int = 3,
        slots: int = 3,
        verify_on_restore: bool = True,
        config: CheckpointConfig | None = None,
        shm_dir: str | None = None,
        run_services: bool | None = None,
        events: EventSink | None = None,
        rollback: RollbackPolicy | None = None,
    ) -> None:
        for key in (HANG_KEY, SKIP_KEY):
            if key in state:
                raise ConfigError(f"state key {key!r} is reserved by hpresil; rename that entry")
        self.policy = rollback or RollbackPolicy.from_env()
        self._skip = SkipList()
        # The hang watchdog's calibration travels with the checkpoint, so a
        # restarted job does not have to re-learn its step time; so do the
        # steps whose data a spike rollback skips.
        self.state = {**state, HANG_KEY: HangCalibration(), SKIP_KEY: self._skip}
        self.config = config or CheckpointConfig(
            every=every, durable=durable, durable_every=durable_every, keep=keep, slots=slots, verify_on_restore=verify_on_restore
        )
        runtime = _env.get(_env.SHM_DIR)
        self.shm_dir = os.path.abspath(shm_dir or runtime or default_shm_dir())
        # <root>/<run>/<host> of our own making: close() may remove the empty run and root directories too
        self._own_layout = not (shm_dir or runtime)
        self.run_services = (runtime is None) if run_services is None else run_services
        self.events: EventSink = events or worker_sink()
        self.run_id = _env.get(_env.RUN_ID) or _env.get("TORCHELASTIC_RUN_ID") or os.path.basename(os.path.dirname(self.shm_dir))
        self.durable_url = self._durable_url()
        self._store: DurableStore | None = None
        self._durable_down: str | None = None  # why a restarted worker could not open the durable store
        self._shared_checked = False  # whether every node sees the same durable store was checked
        if self.durable_url is not None:
            try:
                self._store = open_store(self.durable_url)  # ConfigError / StorageError: fail fast, before training
            except StorageError as exc:
                if _restart_count() == 0:
                    raise
                # The first attempt opened it: an outage, not a misconfiguration. Failing
                # here would turn it into a crash loop that uses up --max-restarts; the
                # snapshots stay flagged for the durable tier, whose drainer retries.
                self._durable_down = str(exc)
                log.warning("durable tier unreachable after a restart (%s); restoring from RAM or peers", exc)
                self.events.emit("tier_degraded", tier="durable", error=str(exc), fallback="ram")
        self._started = False
        self.rank, self.world_size = 0, 1
        self._ram: RamWriter | None = None
        self._staging: RamWriter | None = None
        self._last_snapshot: tuple[int, bool] | None = None  # (step, durable) of the newest snapshot taken
        self._last_step: int | None = None  # the step of the newest save() call, snapshot or not
        self._staging_dir: str | None = None
        self._services: list[tuple[Sealer, Any]] = []  # (sealer, drainer or None) per directory
        self._guard: Guard | None = None
        self._warming: threading.Thread | None = None  # pins restore staging buffers ahead
        #: Called with the step after every restore that loaded one (a rollback's
        #: too), e.g. to rebuild derived state; integrations set it.
        self.on_restored: Callable[[int], None] | None = None
        self._compared: tuple[tuple[str, ...], frozenset[str]] = ((), frozenset())
        self.last_restore: RestoreResult | None = None
        #: Optimizer step pre-hooks that wait for the snapshot copy in flight
        #: (:mod:`hpresil.checkpoint.fence`); integrations attach more.
        self.fence = StepFence(self._fence_wait)
        self._optimizers = find_optimizers(state)
        for opt in self._optimizers if self.config.overlap else ():
            self.fence.attach(opt)

    # -- setup -----------------------------------------------------------
    def _durable_url(self) -> str | None:
        if not self.config.durable_every:
            return None
        if self.config.durable:
            return self.config.durable
        base = _env.get(_env.LOG_DIR) or os.getcwd()
        return "file://" + os.path.join(os.path.abspath(base), "checkpoints")

    def _start(self) -> None:
        if self._started:
            return
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
            if self.world_size > 1:
                log.warning("WORLD_SIZE=%d but torch.distributed is not initialised: restores agree locally only", self.world_size)
        self._started = True
        self._guard = Guard(self.policy, self.shm_dir, self.rank, self.world_size, events=self.events,
                            distributed=self.world_size > 1 and dist.is_available() and dist.is_initialized(),
                            on_rollback=self._abandon_durable,
                            on_agreed=lambda step: self._ram.keep(step) if self._ram is not None else None)
        self._guard.skip = self._skip
        try:
            self._ram = RamWriter(self.shm_dir, self.rank, slots=self.config.slots, run_id=self.run_id,
                                  slot_wait=self.config.slot_wait.total_seconds(),
                                  upload_timeout=self.config.upload_timeout.total_seconds())
        except OSError as exc:
            self._degrade(exc)
            return
        # Allocating, mapping and pinning the slots overlaps the restore and the first steps,
        # and so does pinning the buffers a restore into device tensors stages through.
        leaves = fl.flatten(self.state).leaves
        self._ram.prepare(leaves, expected_state_bytes(self._optimizers))
        if cuda_device(leaves) is not None:
            self._warming = threading.Thread(target=h2d.warm_staging, name="hpresil-staging", daemon=True)
            self._warming.start()
        if self.run_services:
            self._start_services(self.shm_dir)

    def _start_services(self, directory: str) -> None:
        drainer = None
        if self.durable_url is not None:
            drainer = Drainer(DrainConfig(upload_timeout=self.config.upload_timeout), shm_dir=directory, events=self.events)
            drainer.start(RuntimeContext(run_id=self.run_id, node_id=socket.gethostname(), shm_dir=directory,
                                         log_dir=_env.get(_env.LOG_DIR) or os.getcwd(), events=self.events))
            # Only this rank: other local ranks run their own drainer.
            drainer.on_workers_started(WorkerGroupInfo(attempt=0, group_rank=0, group_world_size=1,
                                                       world_size=self.world_size, global_ranks=(self.rank,), pids=(os.getpid(),)))
        sealer = Sealer(shm_dir=directory, events=self.events, ranks=[self.rank],
                        after_pass=None if drainer is None else drainer.tick)
        sealer.start_background()
        self._services.append((sealer, drainer))

    # -- saving ----------------------------------------------------------
    def _fence_wait(self) -> None:
        for w in (self._ram, self._staging):
            if w is not None:
                w.fence()

    def save(self, step: int, *, loss: Any = None) -> bool:
        """Snapshots the state as of ``step`` (no-op unless ``step % every == 0``).

        Returns once the copy into shared memory is under way: what only an
        optimizer step changes is still being copied (on a CUDA side stream or
        a host thread) while the next forward and backward run, and that
        optimizer's step waits for it (:mod:`hpresil.checkpoint.fence`; the
        rule: between ``save`` and ``optimizer.step()`` parameters change only
        through the optimizer, else ``CheckpointConfig(overlap=False)``).
        Sealing and the durable upload happen in the background. Must be
        called on every rank.

        Args:
            loss: this step's loss (a number or a one-element tensor; a CUDA
                tensor is read once its copy completes, never forcing a host
                synchronize). A non-finite loss, or a spike over the recent
                snapshots' losses, marks the snapshot suspect
                (:mod:`hpresil.checkpoint.health`).

        Returns:
            Whether a snapshot was taken.

        Raises:
            CheckpointError: a state value cannot be stored (the message names it).
        """
        heartbeat(step)
        self._last_step = step
        if step % self.config.every:
            return False
        with phase("checkpoint"):
            self._start()
            assert self._guard is not None
            if self._guard.check(step, self._restore):
                return False  # rolled back: the state is an older step's now
            saved = self._save(step, loss=loss)
            self._guard.vote(step)
            return saved

    def should_stop(self, step: int) -> bool:
        """Whether the job is being stopped (SIGTERM); if so, snapshots ``step``
        for every tier, durable included, before returning ``True``.

        Call it on every rank after ``save(step)``; on ``True`` leave the loop
        and call :meth:`close`, which waits for the upload (under ``hpresil-run``
        the node runtime uploads it within ``--grace-period``). The first call
        installs a SIGTERM handler that only records the request (unless the
        program has its own); every call all-reduces one flag on a CPU group, so
        all ranks stop at the same step. See :mod:`hpresil.checkpoint.graceful_stop`.
        """
        stop.install_handler()
        if not stop.agree(stop.requested()):
            return False
        log.warning("rank %d: stop requested (SIGTERM); final snapshot of step %d", self.rank, step)
        heartbeat(step)
        if self._last_snapshot != (step, self.durable_url is not None):  # save(step) may have taken it already
            with phase("checkpoint"):
                self._save(step, final=True)
        for w in (self._ram, self._staging):
            if w is not None:
                w.wait()
        if not self.run_services and self._ram is not None:  # the node runtime seals it; the drain needs the seal
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline and not any(
                    i.record.step == step and i.seal is not None for i in scan(self.shm_dir, [self.rank])):
                time.sleep(0.02)
        return True

    def _save(self, step: int, final: bool = False, loss: Any = None) -> bool:
        self._start()
        if self._warming is not None and not self._warming.is_alive():
            self._warming = None
            h2d.release_staging()  # pinned for a restore that had nothing to read
        t0 = time.perf_counter()
        flat = fl.flatten(self.state)
        keys = tuple(l.key for l in flat.leaves if l.is_tensor)
        if keys != self._compared[0]:  # what the divergence check compares, once per layout
            self._compared = (keys, compare_keys(self.state, [(l.key, l.path) for l in flat.leaves if l.is_tensor]))
        durable = self.durable_url is not None and (final or step % self.config.durable_every == 0)
        writer = self._ram
        if writer is None:
            if not durable or self._staging is None:
                return False
            writer = self._staging
        try:
            nbytes = writer.save(
                step, flat.leaves, world_size=self.world_size, durable=durable, durable_url=self.durable_url,
                keep=self.config.keep, on_commit=self._on_commit, loss=loss, compared=self._compared[1],
                guarded=self.fence.guarded(flat.leaves),
            )
        except StorageError as exc:
            self._degrade(exc)
            return self._save(step, final, loss) if self._staging is not None and durable else False
        tier = "ram" if writer is self._ram else "durable"  # durable: staged on disk (RAM tier degraded)
        if nbytes is None:
            self.events.emit("checkpoint_skipped", step=step, tier=tier, reason=writer.skip_reason,
                             waited_s=round(time.perf_counter() - t0, 6))
            return False
        self._last_snapshot = (step, durable)
        blocking = time.perf_counter() - t0
        if writer is self._ram:
            self.events.emit("checkpoint_saved", step=step, tier=tier, blocking_s=round(blocking, 6), bytes=nbytes)
        else:
            self.events.emit("checkpoint_saved", step=step, tier=tier, blocking_s=round(blocking, 6), bytes=nbytes, staged=True)
        log.debug("rank %d step %d: saved %.1f MiB to %s in %.4fs", self.rank, step, nbytes / 2**20, tier, blocking)
        return True

    def _on_commit(self, slot: int, step: int) -> None:
        for sealer, _ in self._services:
            sealer.notify()

    def _degrade(self, exc: BaseException) -> None:
        """RAM tier unusable: free it and stage durable snapshots on disk."""
        if self._ram is not None:
            self._ram.release()
            self._ram.close()
            self._ram = None
        if self._staging is not None:  # staging failed too: nothing left to write to
            self._staging.close()
            self._staging = None
            log.error("rank %d: checkpoint staging failed too (%s); checkpointing is off", self.rank, exc)
            self.events.emit("tier_degraded", tier="durable", error=str(exc), fallback="none")
            return
        fallback = "durable" if self.durable_url is not None else "none"
        log.warning("rank %d: RAM tier unavailable (%s); continuing with %s checkpoints only", self.rank, exc, fallback)
        self.events.emit("tier_degraded", tier="ram", error=str(exc), fallback=fallback)
        if self.durable_url is None:
            return
        base = _env.get(_env.LOG_DIR) or tempfile.gettempdir()
        self._staging_dir = os.path.join(base, "hpresil-staging", os.path.basename(os.path.dirname(self.shm_dir)), f"rank{self.rank}")
        try:
            self._staging = RamWriter(self._staging_dir, self.rank, slots=2, run_id=self.run_id,
                                      upload_timeout=self.config.upload_timeout.total_seconds())
        except OSError as exc2:
            log.error("rank %d: cannot stage checkpoints in %s (%s); checkpointing is off", self.rank, self._staging_dir, exc2)
            return
        self._start_services(self._staging_dir)

def _restart_count() -> int:
    """How many times the launcher restarted this worker group (0: the first start)."""
    raw = os.environ.get("TORCHELASTIC_RESTART_COUNT") or _env.get(_env.ATTEMPT) or "0"
    return int(raw) if raw.isdigit() else 0
