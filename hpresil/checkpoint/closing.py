"""The Checkpointer's shutdown: waiting for background work, the final
durable snapshot, and releasing the RAM tier.

A mixin of :class:`~hpresil.checkpoint.checkpointer.Checkpointer` (it uses
the attributes that class sets up).
"""

from __future__ import annotations

import logging
import shutil
import time
from datetime import timedelta
from typing import Any

from hpresil.checkpoint.api import rank_dir
from hpresil.checkpoint.durable.stores.api import redact
from hpresil.checkpoint.durable.writer import is_committed
from hpresil.errors import StorageError
from hpresil.hang.heartbeat import phase
from hpresil.runtime.shm import remove_empty_parents

__all__ = ["Closing"]

log = logging.getLogger(__name__)


class Closing:
    """``wait``, ``close`` and the context manager of the Checkpointer (a mixin)."""

    config: Any

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
            self.fence.close()
            if self._store is not None:
                self._store.close()
                self._store = None

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # After an exception the state may be half-updated: never make it the final durable step.
        self.close(final_durable=None if exc_type is None else False)
