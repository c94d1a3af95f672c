"""Contract of the node runtime.

One node runtime runs inside each ``hpresil-run`` process, starts before the
first worker and lives until the job ends, across worker-group restarts. It
owns the job's shared-memory directory and the event log, and hosts
:class:`NodeService` plugins (RAM-tier sealer, durable drain, later the hang
watchdog, health checks, peer replication). Services hook in here instead of
``if feature:`` branches in the agent.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any, Protocol

from hpresil.errors import ConfigError
from hpresil.events.api import EventSink

__all__ = ["RuntimeConfig", "RuntimeContext", "WorkerGroupInfo", "NodeService"]


@dataclasses.dataclass(kw_only=True, slots=True)
class RuntimeConfig:
    """Settings of the node runtime.

    Attributes:
        shm_root: parent of per-job shared-memory directories.
        node_id: this node's id (default: the host name).
        keep_shm: leave the job's shared-memory directory at job end.
        service_interval: how often services get a ``tick``.
    """

    shm_root: str = "/dev/shm/hpresil"
    node_id: str | None = None
    keep_shm: bool = False
    service_interval: timedelta = timedelta(milliseconds=50)

    def __post_init__(self) -> None:
        if not self.shm_root:
            raise ConfigError("shm_root is empty: pass --shm-root DIR (e.g. /dev/shm/hpresil)")
        if self.service_interval <= timedelta(0):
            raise ConfigError(f"service_interval={self.service_interval} must be > 0")


@dataclasses.dataclass(frozen=True, slots=True)
class RuntimeContext:
    """What a service may use: paths, identity and the event sink.

    Attributes:
        run_id: the rendezvous run id.
        node_id: this node's id.
        shm_dir: the job's shared-memory directory on this node.
        log_dir: the job's log directory on this node.
        events: the node's event sink.
    """

    run_id: str
    node_id: str
    shm_dir: str
    log_dir: str
    events: EventSink


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerGroupInfo:
    """The worker group as of its latest (re)start.

    Attributes:
        attempt: 0 for the first start, +1 for every restart.
        group_rank: this node's rank among nodes.
        group_world_size: number of nodes.
        world_size: number of workers in the job.
        global_ranks: global rank of each local worker (index = local rank).
        pids: process id of each local worker (index = local rank).
        master_addr: host of the store the workers use (the rendezvous store for c10d).
        master_port: its port.
        started: Unix time the group was started.
        store: the agent's rendezvous store for this round (keys are private to
            the round), for services that exchange data between nodes; it lives
            in the agents, so it outlives hung or stopped workers.
    """

    attempt: int
    group_rank: int
    group_world_size: int
    world_size: int
    global_ranks: tuple[int, ...]
    pids: tuple[int, ...]
    master_addr: str | None = None
    master_port: int | None = None
    started: float = 0.0
    store: Any = dataclasses.field(default=None, compare=False, repr=False)


class NodeService(Protocol):
    """A plugin of the node runtime. Every hook must return quickly and never raise
    for expected faults (log, emit an event, degrade instead).

    Services subclass this Protocol, so the optional hooks below it inherit
    their no-op defaults; a service overrides what it takes part in. The
    runtime builds each default service as ``cls(config)`` or ``cls()``
    (:mod:`hpresil.run.services`): a service's constructor takes its own
    config dataclass first, then keyword-only arguments for use outside the
    runtime.
    """

    name: str

    def start(self, ctx: RuntimeContext) -> None:
        """Called once before the first worker starts."""

    def on_workers_started(self, group: WorkerGroupInfo) -> None:
        """Called after each (re)start of the local worker group."""

    def on_workers_stopped(self, group: WorkerGroupInfo) -> None:
        """Called after the local worker group stopped (failure, restart or end)."""

    def tick(self) -> None:
        """Called every ``service_interval`` from the runtime's service thread."""

    def stop(self, timeout: timedelta) -> None:
        """Called once at job end; finish or abandon pending work within ``timeout``."""

    # -- optional hooks: the defaults take no part --------------------------
    def flush(self, timeout: timedelta) -> bool:
        """Finishes work on the snapshots stopped workers left, within ``timeout``
        (the sealer seals them); returns whether nothing is left."""
        return True

    def drain_once(self) -> bool:
        """One pass of copying snapshots onward (the durable drain); returns
        whether it did something, so the runtime calls it until it does not."""
        return False

    def verdict(self) -> Any | None:
        """Why this node must leave the job (a fatal GPU finding: it has
        ``message``, ``exit_code``, ``findings`` and ``error()``), or ``None``."""
        return None

    def worker_env(self) -> dict[str, str]:
        """Variables every worker of every attempt gets (asked once, after
        :meth:`start`); the user's own values win."""
        return {}

    def unsaved(self) -> str | None:
        """After :meth:`stop`: what only this node's shared memory still holds
        (the runtime then keeps it), or ``None``."""
        return None
