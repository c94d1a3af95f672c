"""The user-facing :class:`Checkpointer`: save to RAM every step, restore from
the fastest tier that every rank can load.

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

import hashlib
import logging
import os
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping

import torch

from hpresil import _env
from hpresil.checkpoint import flatten as fl
from hpresil.checkpoint import graceful_stop as stop
from hpresil.checkpoint.api import CheckpointConfig, SnapshotSource, rank_dir
from hpresil.checkpoint.durable.drain import DrainConfig, Drainer
from hpresil.checkpoint.durable.shared import shared_by_all_nodes
from hpresil.checkpoint.durable.source import DurableSource
from hpresil.checkpoint.durable.stores import DurableStore, open_store
from hpresil.checkpoint.durable.stores.api import redact
from hpresil.checkpoint.durable.writer import is_committed, mark_unhealthy
from hpresil.checkpoint.peer.source import PeerSource
from hpresil.checkpoint.ram.files import drop_newer, scan
from hpresil.checkpoint.ram.sealer import Sealer
from hpresil.checkpoint.ram.source import RamSource
from hpresil.checkpoint.ram.writer import RamWriter
from hpresil.checkpoint.restore import RestoreResult, restore_state
from hpresil.checkpoint.divergence import compare_keys
from hpresil.checkpoint.guard import Guard
from hpresil.checkpoint.rollback import RollbackPolicy, SkipList, iterate
from hpresil.errors import ConfigError, NoCheckpointError, StorageError, UnhealthyStateError
from hpresil.hang.heartbeat import get as heartbeat_get
from hpresil.hang.heartbeat import heartbeat, phase
from hpresil.events import worker_sink
from hpresil.events.api import EventSink
from hpresil.runtime.api import RuntimeContext, WorkerGroupInfo
from hpresil.runtime.shm import remove_empty_parents

__all__ = ["Checkpointer", "RNGState", "default_shm_dir"]

log = logging.getLogger(__name__)


def default_shm_dir() -> str:
    """Where snapshots go without ``hpresil-run``: one directory per job and host.

    The job is ``$TORCHELASTIC_RUN_ID`` (shared by the workers of one
    ``torchrun`` launch and kept across its restarts), else ``$HPRESIL_RUN_ID``,
    else a hash of the working directory and script, so rerunning the same
    script resumes from RAM.
    """
    run_id = _env.get("TORCHELASTIC_RUN_ID") or _env.get(_env.RUN_ID)
    if run_id is None:
        script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
        run_id = "local-" + hashlib.sha1(f"{os.getcwd()}\0{script}".encode()).hexdigest()[:12]
    from hpresil.runtime.shm import safe_component

    return os.path.join("/dev/shm/hpresil", safe_component(run_id), safe_component(socket.gethostname()))


HANG_KEY = "hpresil_hang"
SKIP_KEY = "hpresil_skip"


def _agree_timeline() -> str:
    """A random id all ranks share from this restore on (rank 0's, broadcast as raw bytes)."""
    ident = torch.frombuffer(bytearray(os.urandom(16)), dtype=torch.uint8).clone()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.broadcast(ident, src=0)
    return bytes(ident.tolist()).hex()


class _HangCalibration:
    """The hang watchdog's calibration (slowest step and checkpoint seen) as a
    stateful entry of every checkpoint."""

    def __init__(self) -> None:
        self._loaded: dict[str, float] | None = None

    def state_dict(self) -> dict[str, float]:
        hb = heartbeat_get()
        return hb.calibration() if hb is not None else {"step_max": 0.0, "ckpt_max": 0.0, "n_steps": 0.0}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self._loaded = {k: float(v) for k, v in sd.items()}

    def agree(self) -> None:
        """Seeds this worker's heartbeat with the maximum over all ranks (one tiny all-reduce)."""
        loaded = self._loaded
        hb = heartbeat_get()
        if loaded is None or hb is None:
            return
        values = torch.tensor([loaded.get("step_max", 0.0), loaded.get("ckpt_max", 0.0), loaded.get("n_steps", 0.0)],
                              dtype=torch.float64)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        hb.seed({"step_max": float(values[0]), "ckpt_max": float(values[1]), "n_steps": float(values[2])})


class RNGState:
    """Random number generator states (Python, torch CPU, CUDA) as a stateful
    object, so ``state={"rng": RNGState()}`` saves them on every save and puts
    them back on restore. Stored as plain per-rank values (never replicated)."""

    def state_dict(self) -> dict[str, Any]:
        """The current generator states."""
        sd: dict[str, Any] = {"python": random.getstate(), "torch": bytes(torch.get_rng_state().numpy())}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            sd["cuda"] = [bytes(s.numpy()) for s in torch.cuda.get_rng_state_all()]
        return sd

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Restores the generator states."""
        random.setstate(sd["python"])
        torch.set_rng_state(torch.frombuffer(bytearray(sd["torch"]), dtype=torch.uint8))
        if "cuda" in sd and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in sd["cuda"]])


class Checkpointer:
    """Tiered checkpointing of a training state.

    Example::

        ckpt = hpresil.Checkpointer(state={"model": model, "optim": opt, "rng": RNGState()},
                                    durable="s3://bucket/run1", durable_every=50)
        start = ckpt.restore()
        for step in range(start, total):
            ...train...
            ckpt.save(step + 1)
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
        self.state = {**state, HANG_KEY: _HangCalibration(), SKIP_KEY: self._skip}
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
        #: Called with the step after every restore that loaded one (a rollback's
        #: too), e.g. to rebuild derived state; integrations set it.
        self.on_restored: Callable[[int], None] | None = None
        self._compared: tuple[tuple[str, ...], frozenset[str]] = ((), frozenset())
        self.last_restore: RestoreResult | None = None

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
                            on_rollback=self._abandon_durable)
        self._guard.skip = self._skip
        try:
            self._ram = RamWriter(self.shm_dir, self.rank, slots=self.config.slots, run_id=self.run_id,
                                  slot_wait=self.config.slot_wait.total_seconds(),
                                  upload_timeout=self.config.upload_timeout.total_seconds())
        except OSError as exc:
            self._degrade(exc)
            return
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
    def save(self, step: int, *, loss: Any = None) -> bool:
        """Snapshots the state as of ``step`` (no-op unless ``step % every == 0``).

        Returns after the copy into shared memory; sealing and the durable
        upload happen in the background. Must be called on every rank.

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

    def steps(self, start: int, stop: int) -> Iterator[int]:
        """The training loop's steps, ``start`` up to ``stop`` (exclusive),
        rewound when a rollback restores an older step.

        Example::

            start = ckpt.restore()
            for step in ckpt.steps(start + 1, total + 1):
                loss = train_step(batch(step))
                ckpt.save(step, loss=loss)

        With ``skip_spike_data`` the steps whose data produced a loss spike
        are left out.
        """
        self._start()
        assert self._guard is not None
        self._guard.iterating = True
        return iterate(start, stop, self._guard.cursor, self._skip)

    def rollback(self, before: int | None = None) -> int:
        """Restores the newest healthy snapshot older than ``before`` (default:
        the newest snapshot taken) and returns its step; :meth:`steps` goes
        on after it. Collective: every rank must call it.

        Raises:
            UnhealthyStateError: there is no such snapshot.
        """
        self._start()
        assert self._guard is not None
        step = self._last_step or 0
        bound = before if before is not None else (self._last_snapshot[0] if self._last_snapshot else step + 1)
        t0 = time.perf_counter()
        result = self._restore(bound)
        if result is None:
            raise UnhealthyStateError(f"rollback: no healthy snapshot before step {bound} in any tier")
        self._guard.cursor[0] = result.step + 1
        self.events.emit("rollback", from_step=step, to_step=result.step, cause="manual", bad_step=bound,
                         tier=result.tier, attempt=1, duration_s=round(time.perf_counter() - t0, 6))
        return result.step

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
            )
        except StorageError as exc:
            self._degrade(exc)
            return self._save(step, final, loss) if self._staging is not None and durable else False
        tier = "ram" if writer is self._ram else "durable"  # durable: staged on disk (RAM tier degraded)
        if nbytes is None:
            self.events.emit("checkpoint_skipped", step=step, tier=tier, reason="slots_busy",
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

    # -- restoring -------------------------------------------------------
    def restore(self) -> int:
        """Restores the state in place from the newest healthy snapshot every
        rank can load (RAM, then peer replicas, then durable) and returns its
        step; 0 when there is none.

        Collective: every rank must call it.

        Raises:
            StateMismatchError: the snapshot does not fit the state (names the keys).
            CheckpointError: restoring failed on some rank.
            NoCheckpointError: nothing to restore in RAM or peers while the durable
                store is unreachable (after a restart); a :class:`StorageError`.
        """
        result = self._restore(None)
        return 0 if result is None else result.step

    def _restore(self, before: int | None) -> RestoreResult | None:
        self._start()
        for w in (self._ram, self._staging):
            if w is not None:
                w.wait()
        sources: list[SnapshotSource] = [RamSource(self.shm_dir, verify=self.config.verify_on_restore)]
        if _env.get(_env.SHM_DIR) is not None:
            # Under hpresil-run every rank has a node runtime with a peer
            # server: the same condition on every rank (the tier is pooled collectively).
            sources.append(PeerSource(self.shm_dir, rank=self.rank, world_size=self.world_size))
        if self._store is not None:
            sources.append(DurableSource(self._store))
        result = restore_state(self.state, sources, events=self.events, before=before)
        if result is None and before is not None:
            return None  # a rollback found nothing older: the caller reports it, the state is untouched
        if result is None and self._durable_down is not None:
            # The durable tier may hold what RAM and peers lack: never start over without asking it.
            raise NoCheckpointError(f"no RAM or peer snapshot to restore and the durable tier is unreachable "
                                    f"({self._durable_down}); not starting from scratch: fix the durable store "
                                    f"and restart, or pass durable_every=0 to start over")
        self.last_restore = result
        self.state[HANG_KEY].agree()
        timeline = _agree_timeline()
        self._check_durable_shared(timeline)
        for w in (self._ram, self._staging):
            if w is not None:
                w.timeline = timeline
        step = 0 if result is None else result.step
        # Newer snapshots belong to a timeline the job just abandoned: a later
        # restore must never mix them with the new one.
        dropped = self._ram.invalidate_after(step) if self._ram is not None else []
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if local_rank == 0:
            # Directories of ranks that no worker on this node owns any more
            # (a smaller world, or ranks moved to other nodes) are cleaned by
            # the node's first worker; torchrun numbers a node's ranks
            # contiguously. Without torchrun's variables only ranks beyond the
            # world size are known to be nobody's.
            if "LOCAL_RANK" in os.environ:
                first = self.rank - local_rank
                mine = range(first, first + int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
            else:
                mine = range(self.world_size)
            for r in _rank_dirs(self.shm_dir):
                if r not in mine:
                    dropped += drop_newer(self.shm_dir, r, step)
        if dropped:
            log.info("rank %d: dropped RAM snapshots of abandoned steps %s", self.rank, dropped)
        self._last_snapshot = None
        if before is not None:
            self._last_step = step  # a rollback: close() makes this step durable, not the abandoned one
        if result is not None and self.on_restored is not None:
            self.on_restored(step)
        assert self._guard is not None
        self._guard.reset()
        return result

    def _abandon_durable(self, target: int, cause: str) -> None:
        """After a rollback to ``target``: rank 0 marks the newer durable steps
        unhealthy, on a thread, so that the round trips to an object store do
        not delay training (a crash within that moment may still restore one
        of them: they are as fresh as the abandoned timeline)."""
        if self.rank != 0 or self._store is None:
            return
        store, timeline = self._store, self._ram.timeline if self._ram is not None else ""

        def mark() -> None:
            try:
                mark_unhealthy(store, target, cause, timeline)
            except (StorageError, OSError) as exc:
                log.warning("rank 0: cannot mark the durable steps after %d unhealthy: %s", target, exc)

        threading.Thread(target=mark, name="hpresil-mark-unhealthy", daemon=True).start()

    def _check_durable_shared(self, token: str) -> None:
        """Warns once, on every rank, when the nodes write to different durable
        stores: no durable step could ever commit (see
        :mod:`~hpresil.checkpoint.durable.shared`)."""
        import torch.distributed as dist

        # The same decision on every rank: the check is collective.
        if self.durable_url is None or self._shared_checked or self.world_size < 2:
            return
        if not (dist.is_available() and dist.is_initialized()):
            return
        self._shared_checked = True
        if shared_by_all_nodes(self._store, rank=self.rank, node_leader=int(os.environ.get("LOCAL_RANK", 0)) == 0,
                               token=token, any_rank=stop.agree):
            return
        default = "" if self.config.durable else (" (the default: a directory in each node's own log dir; "
                                                  "set HPRESIL_DURABLE or Checkpointer(durable=...))")
        message = (f"durable URL {redact(self.durable_url)}{default} is not shared by all nodes: some node cannot see "
                   f"rank 0's files there, so no durable step can ever commit (each node holds only its own "
                   f"ranks). Use storage every node reaches: durable='s3://bucket/prefix' or a shared file system")
        log.warning("rank %d: %s", self.rank, message)
        self.events.emit("tier_degraded", tier="durable", reason="not_shared", error=message)

    # -- shutdown --------------------------------------------------------
    def wait(self, timeout: timedelta = timedelta(seconds=60)) -> None:
        """Waits until the snapshots taken so far are committed and sealed (and,
        with in-process services, drained)."""
        for w in (self._ram, self._staging):
            if w is not None:
                w.wait()
        for sealer, drainer in self._services:
            sealer.flush(timeout)
            if drainer is not None:
                drainer.drain_once()

    def close(self, *, keep_ram: bool | None = None, final_durable: bool | None = None) -> None:
        """Makes the final state durable, finishes background work and releases the RAM tier.

        Call it on every rank once training is done.

        Args:
            keep_ram: leave this rank's snapshots in shared memory. Default:
                kept under ``hpresil-run`` (its runtime removes them at job
                end), removed otherwise, since nothing else would free them.
            final_durable: snapshot the step of the last :meth:`save` call for
                the durable tier (unless its snapshot already is) and wait until
                that step is committed there, at most ``close_timeout``; a
                rerun then resumes from the end, not from the last
                ``durable_every`` step. Default: ``CheckpointConfig.final_durable``.
        """
        # Waiting for the last durable upload can outlast the step timeout:
        # tell the hang watchdog this is a phase of its own.
        with phase("ckpt-close", timeout=self.config.upload_timeout + timedelta(minutes=1)):
            if self.config.final_durable if final_durable is None else final_durable:
                self._make_final_durable()
            self._close(keep_ram)

    def _committed(self, step: int) -> bool:
        assert self._store is not None
        try:
            return is_committed(self._store, step)
        except StorageError as exc:  # an outage: the drainer reports it; close() goes on waiting, bounded
            log.debug("rank %d: cannot look for durable step %d: %s", self.rank, step, exc)
            return False

    def _make_final_durable(self) -> None:
        step = self._last_step
        if self.durable_url is None or step is None or (self._ram is None and self._staging is None):
            return
        if self._last_snapshot != (step, True) and not self._save(step, final=True):
            log.warning("rank %d: the final snapshot of step %d was skipped; it is not durable", self.rank, step)
            return
        deadline = time.monotonic() + self.config.close_timeout.total_seconds()
        self.wait(timedelta(seconds=30))  # committed and sealed; in-process, drained too
        while self._store is not None and not self._committed(step):
            if time.monotonic() >= deadline:
                log.warning("rank %d: step %d is not committed to the durable tier %s after %.0fs (close_timeout); "
                            "a rerun resumes from an older durable step unless the upload finishes", self.rank, step,
                            redact(self.durable_url), self.config.close_timeout.total_seconds())
                return
            for _, drainer in self._services:  # in-process: the other ranks' markers may complete the step
                if drainer is not None:
                    drainer.drain_once()
            time.sleep(0.1)
        log.info("rank %d: final step %d is durable in %s", self.rank, step, redact(self.durable_url))

    def _close(self, keep_ram: bool | None) -> None:
        try:
            self.wait(timedelta(seconds=30))
        finally:
            for sealer, drainer in self._services:
                sealer.stop(timedelta(seconds=5))
                if drainer is not None:
                    drainer.stop(self.config.upload_timeout)
            self._services = []
            for w in (self._ram, self._staging):
                if w is not None:
                    w.close()
            keep = (not self.run_services) if keep_ram is None else keep_ram
            if self._ram is not None and not keep:
                shutil.rmtree(rank_dir(self.shm_dir, self.rank), ignore_errors=True)
                # and the per-job directories once the last rank of this node left them:
                # ckpt/, the shm dir, and (in the default layout) the run and root directories
                remove_empty_parents(rank_dir(self.shm_dir, self.rank), levels=4 if self._own_layout else 3)
            if self._staging_dir is not None:
                shutil.rmtree(self._staging_dir, ignore_errors=True)
                remove_empty_parents(self._staging_dir, levels=2)  # <run>/ and hpresil-staging/ once empty
            self._ram = self._staging = None
            if self._store is not None:
                self._store.close()
                self._store = None

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # After an exception the state may be half-updated: never make it the final durable step.
        self.close(final_durable=None if exc_type is None else False)


def _rank_dirs(shm_dir: str) -> list[int]:
    try:
        names = os.listdir(os.path.join(shm_dir, "ckpt"))
    except FileNotFoundError:
        return []
    return [int(n[4:]) for n in names if n.startswith("rank") and n[4:].isdigit()]


def _restart_count() -> int:
    """How many times the launcher restarted this worker group (0: the first start)."""
    raw = os.environ.get("TORCHELASTIC_RESTART_COUNT") or _env.get(_env.ATTEMPT) or "0"
    return int(raw) if raw.isdigit() else 0
