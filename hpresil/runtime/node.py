"""The node runtime: per-node state that outlives worker-group restarts.

Started by ``hpresil-run`` before the first worker and stopped when the job
ends. It owns the job's shared-memory directory and the event log, exports
their locations to the workers' environment, and drives :class:`NodeService`
plugins from one service thread, so one slow service cannot stall the
elastic agent's monitor loop.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import timedelta
from typing import Sequence

from hpresil import _env
from hpresil.events.jsonl import JsonlEventLog
from hpresil.runtime.api import NodeService, RuntimeConfig, RuntimeContext, WorkerGroupInfo
from hpresil.runtime.shm import JobShmDir

__all__ = ["NodeRuntime"]

log = logging.getLogger(__name__)


class NodeRuntime:
    """One node's runtime.

    Args:
        config: runtime settings.
        run_id: the rendezvous run id.
        log_dir: the job's log directory on this node (``events.jsonl`` goes here).
        services: plugins to drive, in start order.
    """

    def __init__(
        self,
        config: RuntimeConfig,
        run_id: str,
        log_dir: str,
        services: Sequence[NodeService] = (),
    ) -> None:
        self.config = config
        self.run_id = run_id
        self.node_id = config.node_id or socket.gethostname()
        self.log_dir = os.path.abspath(log_dir)
        self.shm = JobShmDir(config.shm_root, run_id, self.node_id)
        self.events = JsonlEventLog(os.path.join(self.log_dir, "events.jsonl"), node=self.node_id)
        self.services = list(services)
        self._started: list[NodeService] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.group: WorkerGroupInfo | None = None
        self._failures: dict[tuple[str, str], int] = {}
        self._worker_defaults: dict[str, str] = {}

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` ran: the services and their threads are gone."""
        return self._stop.is_set()

    @property
    def context(self) -> RuntimeContext:
        """What services get: ids, paths and the event sink."""
        return RuntimeContext(
            run_id=self.run_id,
            node_id=self.node_id,
            shm_dir=self.shm.path,
            log_dir=self.log_dir,
            events=self.events,
        )

    def start(self) -> None:
        """Creates the shared-memory directory, starts services and the service thread.

        Raises:
            ConfigError: the shared-memory directory is unusable.
        """
        os.makedirs(self.log_dir, exist_ok=True)
        self.shm.create()
        self.events.emit(
            "runtime_start",
            run_id=self.run_id,
            pid=os.getpid(),
            shm_dir=self.shm.path,
            shm_free_bytes=self.shm.free_bytes(),
            log_dir=self.log_dir,
            services=[s.name for s in self.services],
        )
        ctx = self.context
        for service in self.services:
            try:
                service.start(ctx)
                self._started.append(service)
            except Exception:  # a broken optional service must not stop the job
                log.exception("service %s failed to start; continuing without it", service.name)
                self.events.emit("service_failed", service=service.name, phase="start")
        for service in self._started:
            self._worker_defaults.update(service.worker_env())
        self._thread = threading.Thread(target=self._loop, name="hpresil-runtime", daemon=True)
        self._thread.start()

    def worker_env(self, attempt: int) -> dict[str, str]:
        """Environment variables every worker gets (see :mod:`hpresil._env`)."""
        return {
            **self._worker_defaults,
            _env.SHM_DIR: self.shm.path,
            _env.LOG_DIR: self.log_dir,
            _env.NODE_ID: self.node_id,
            _env.EVENTS_FILE: self.events.path,
            _env.RUN_ID: self.run_id,
            _env.ATTEMPT: str(attempt),
        }

    def on_workers_started(self, group: WorkerGroupInfo) -> None:
        """Tells every service that the local worker group (re)started."""
        self.group = group
        self._each("on_workers_started", group)

    def on_workers_stopped(self, group: WorkerGroupInfo) -> None:
        """Tells every service that the local worker group stopped."""
        self._each("on_workers_stopped", group)

    def settle(self, timeout: timedelta) -> None:
        """Lets services finish work on the snapshots the stopped workers left:
        ``flush(timeout)`` (sealing), then ``drain_once()`` until nothing is left
        (durable uploads and commits), within ``timeout`` in all. The agent calls
        it between stopping the workers for growth and re-joining, so the larger
        group resumes from the newest snapshot flagged for the durable tier."""
        deadline = time.monotonic() + timeout.total_seconds()
        with self._lock:
            services = list(self._started)
        for service in services:
            try:
                service.flush(timedelta(seconds=max(0.0, deadline - time.monotonic())))
            except Exception:
                log.exception("service %s failed to settle", service.name)
        for service in services:
            try:
                while service.drain_once() and time.monotonic() < deadline:
                    pass
            except Exception:
                log.exception("service %s failed to settle", service.name)

    def leave_verdict(self) -> object | None:
        """The first verdict a service gives that this node must leave the job
        (e.g. a fatal GPU finding), or ``None``. A verdict has ``message``,
        ``exit_code``, ``findings`` and ``error()``."""
        for service in list(self._started):
            result = service.verdict()
            if result is not None:
                return result
        return None

    def _each(self, hook: str, *args: object) -> None:
        with self._lock:
            services = list(self._started)
        for service in services:
            try:
                getattr(service, hook)(*args)
            except Exception as exc:
                # Report the first failure of each (service, hook) fully, then
                # only every 1000th: a broken tick must not flood the logs.
                key = (service.name, hook)
                count = self._failures[key] = self._failures.get(key, 0) + 1
                if count == 1:
                    log.exception("service %s failed in %s", service.name, hook)
                if count == 1 or count % 1000 == 0:
                    self.events.emit("service_failed", service=service.name, phase=hook, error=repr(exc), count=count)

    def _loop(self) -> None:
        interval = self.config.service_interval.total_seconds()
        while not self._stop.wait(interval):
            self._each("tick")

    def stop(self, succeeded: bool, timeout: timedelta = timedelta(seconds=60)) -> None:
        """Stops services (letting them finish pending work within ``timeout``),
        then removes the shared-memory directory unless ``keep_shm`` or a service
        reports work only the shared memory still holds (``unsaved()``: e.g. a
        final snapshot the durable tier could not take)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        deadline = time.monotonic() + timeout.total_seconds()
        # Start order is pipeline order: the sealer seals the last snapshot
        # before the replicator and the drainer make their final passes.
        unsaved: list[str] = []
        for service in list(self._started):
            left = max(0.0, deadline - time.monotonic())
            try:
                service.stop(timedelta(seconds=left))
                # What only the shared memory still holds (e.g. the drainer's final
                # snapshot when the durable tier was down at job end).
                reason = service.unsaved()
                if reason:
                    unsaved.append(f"{service.name}: {reason}")
            except Exception:
                log.exception("service %s failed to stop cleanly", service.name)
        self._started.clear()
        self.group = None  # holds the round's store: see hpresil.run.cli.main
        keep = self.config.keep_shm or bool(unsaved)
        if unsaved and not self.config.keep_shm:
            log.warning("keeping %s: it holds the only copy of %s; run the job again with the same --rdzv-id on "
                        "this node to resume from it (and drain it), or delete the directory",
                        self.shm.path, "; ".join(unsaved))
        if not keep:
            self.shm.remove()
        self.events.emit("runtime_stop", succeeded=succeeded, shm_kept=keep, **({"unsaved": unsaved} if unsaved else {}))
        self.events.close()
