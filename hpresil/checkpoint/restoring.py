"""The Checkpointer's restore side: restore, rollback and the loop's steps.

A mixin of :class:`~hpresil.checkpoint.checkpointer.Checkpointer` (it uses
the attributes that class sets up): after every restore the ranks agree on a
new timeline, drop the snapshots of the abandoned one, and reset the health
guard; a rollback (:mod:`hpresil.checkpoint.guard`) is a restore bounded by
``before`` that also marks the newer durable steps unhealthy.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Iterator

from hpresil import _env
from hpresil.checkpoint.api import SnapshotSource
from hpresil.checkpoint.durable.shared import shared_by_all_nodes
from hpresil.checkpoint.durable.source import DurableSource
from hpresil.checkpoint.durable.stores.api import redact
from hpresil.checkpoint.durable.writer import mark_unhealthy
from hpresil.checkpoint.peer.source import PeerSource
from hpresil.checkpoint.ram.files import drop_newer
from hpresil.checkpoint.ram.source import RamSource
from hpresil.checkpoint.restore import RestoreResult, restore_state
from hpresil.checkpoint.rollback import iterate
from hpresil.checkpoint.stateful import HANG_KEY, agree_timeline
from hpresil.checkpoint import graceful_stop as stop
from hpresil.errors import NoCheckpointError, StorageError

__all__ = ["Restoring"]

log = logging.getLogger(__name__)


class Restoring:
    """Restore, rollback and :meth:`steps` of the Checkpointer (a mixin)."""

    state: Any
    events: Any
    config: Any

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
        return self._guard.rollback_by_hand(step, bound, self._restore).step

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
        timeline = agree_timeline()
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


def _rank_dirs(shm_dir: str) -> list[int]:
    try:
        names = os.listdir(os.path.join(shm_dir, "ckpt"))
    except FileNotFoundError:
        return []
    return [int(n[4:]) for n in names if n.startswith("rank") and n[4:].isdigit()]
