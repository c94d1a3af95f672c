"""``LocalElasticAgent`` subclass that reports to the node runtime.

It overrides only the agent's lifecycle hooks (rendezvous, start, monitor,
restart, stop) to emit events and tell the runtime's services what happened;
scheduling, restarts and process management stay torch's.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup, WorkerSpec, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

from hpresil.elastic.api import ElasticConfig
from hpresil.elastic.membership import Liveness, restart_cause
from hpresil.runtime.api import WorkerGroupInfo
from hpresil.runtime.node import NodeRuntime

__all__ = ["HpresilAgent"]

log = logging.getLogger(__name__)


class HpresilAgent(LocalElasticAgent):
    """The elastic agent of ``hpresil-run``.

    Args:
        spec: the worker spec (as torchrun builds it).
        runtime: the node runtime that receives lifecycle callbacks.
        elastic: how peers are watched for loss (see :mod:`hpresil.elastic`).
        **kwargs: passed to ``LocalElasticAgent``.
    """

    def __init__(self, spec: WorkerSpec, runtime: NodeRuntime, elastic: ElasticConfig | None = None,
                 **kwargs: Any) -> None:
        super().__init__(spec, **kwargs)
        self._runtime = runtime
        self._elastic = elastic or ElasticConfig()
        self._liveness: Liveness | None = None
        self._restart_reason: tuple[str, str, list[int]] | None = None  # set by a membership verdict
        self._settle_pending = False
        self._nodes: int | None = None
        self._attempt = -1
        self._last_state = WorkerState.INIT
        self._group_info: WorkerGroupInfo | None = None
        #: stderr log of each failed global rank (when captured), for the failure report.
        self.stderr_paths: dict[int, str] = {}

    @property
    def remaining_restarts(self) -> int:
        """Restarts left before a failure ends the job."""
        return self._remaining_restarts

    def _leave_if_unhealthy(self) -> None:
        """Leaves the job when a service found this node unfit (e.g. a fatal GPU
        finding): rejoining would only crash every restart. The workers are
        stopped by ``agent.run()``'s cleanup; the other nodes re-rendezvous."""
        verdict = self._runtime.leave_verdict()
        if verdict is not None:
            self._runtime.events.emit(
                "node_leave",
                reason=verdict.message,  # type: ignore[attr-defined]
                exit_code=verdict.exit_code,  # type: ignore[attr-defined]
                findings=[f.to_json_obj() for f in verdict.findings],  # type: ignore[attr-defined]
            )
            raise verdict.error()  # type: ignore[attr-defined]

    def _rendezvous(self, worker_group: WorkerGroup) -> None:
        self._leave_if_unhealthy()  # never join with a node known to be bad
        if self._settle_pending:  # growth: commit the newest snapshot before the larger group restores
            self._settle_pending = False
            self._runtime.settle(self._elastic.settle_timeout)
        start = time.monotonic()
        super()._rendezvous(worker_group)
        self._watch_peers(worker_group)
        self._runtime.events.emit(
            "rendezvous",
            group_rank=worker_group.group_rank,
            group_world_size=worker_group.group_world_size,
            world_size=worker_group.workers[0].world_size if worker_group.workers else None,
            duration_s=round(time.monotonic() - start, 4),
        )

    def _assign_worker_ranks(self, store: Any, group_rank: int, group_world_size: int,
                             spec: WorkerSpec) -> list[Any]:
        workers = super()._assign_worker_ranks(store, group_rank, group_world_size, spec)
        # Topology-aware ranks: nodes of one NVLink domain get contiguous global
        # ranks (hpresil.topology.service); torch's order when the service is off.
        for service in self._runtime.services:
            if service.name == "topology":
                workers = service.assign(store, group_rank, group_world_size, workers)  # type: ignore[attr-defined]
        return workers

    def _set_local_rank_env(self, worker_env: dict[str, str | None], local_rank: int, spec: WorkerSpec) -> None:
        super()._set_local_rank_env(worker_env, local_rank, spec)
        worker_env.update(self._runtime.worker_env(attempt=self._attempt + 1))

    def _start_workers(self, worker_group: WorkerGroup) -> dict[int, Any]:
        pids = super()._start_workers(worker_group)
        self._attempt += 1
        workers = sorted(worker_group.workers, key=lambda w: w.local_rank)
        info = WorkerGroupInfo(
            attempt=self._attempt,
            group_rank=worker_group.group_rank or 0,
            group_world_size=worker_group.group_world_size or 1,
            world_size=workers[0].world_size if workers else 0,
            global_ranks=tuple(w.global_rank for w in workers),
            pids=tuple(int(pids[w.local_rank]) for w in workers),
            master_addr=worker_group.master_addr,
            master_port=worker_group.master_port,
            started=time.time(),
            store=worker_group.store,
        )
        self._group_info = info
        self._last_state = WorkerState.HEALTHY
        self._runtime.events.emit(
            "workers_start",
            attempt=info.attempt,
            group_rank=info.group_rank,
            group_world_size=info.group_world_size,
            world_size=info.world_size,
            ranks=list(info.global_ranks),
            pids=list(info.pids),
        )
        self._runtime.on_workers_started(info)
        return pids

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        self._leave_if_unhealthy()
        result = super()._monitor_workers(worker_group)
        if result.state != self._last_state:
            self._on_state_change(result)
            self._last_state = result.state
        lost = self._lost_peers(worker_group, result)
        if lost:
            # A lost node: restart at once (the workers may sit in a collective
            # with it until its timeout), without consuming --max-restarts.
            self._restart_reason = ("membership", "node_lost", sorted(lost))
            self._restart_workers(worker_group)
            return RunResult(state=worker_group.state)
        return result

    def _watch_peers(self, worker_group: WorkerGroup) -> None:
        """Starts watching the new round's nodes (replacing the previous round's watch)."""
        if self._liveness is not None:
            self._liveness.stop()
            self._liveness = None
        nodes = worker_group.group_world_size or 1
        if self._nodes is not None and nodes != self._nodes:
            self._runtime.events.emit("rescale", from_nodes=self._nodes, to_nodes=nodes,
                                      world_size=worker_group.workers[0].world_size if worker_group.workers else None)
            log.warning("rescaled from %d to %d nodes", self._nodes, nodes)
        self._nodes = nodes
        if self._elastic.enabled and nodes > 1 and worker_group.store is not None:
            self._liveness = Liveness(worker_group.store, worker_group.group_rank or 0, nodes, self._elastic).start()

    def _lost_peers(self, worker_group: WorkerGroup, result: RunResult) -> frozenset[int]:
        liveness = self._liveness
        if liveness is None:
            return frozenset()
        if result.state == WorkerState.SUCCEEDED:
            liveness.finish()
            return frozenset()
        lost = liveness.view().lost
        if not lost and result.state in (WorkerState.FAILED, WorkerState.UNHEALTHY):
            # Broken collectives make the survivors of a lost node fail within
            # milliseconds, before the loss can be declared: wait for the verdict
            # (at most lost_after) unless a peer already re-joins (a plain failure).
            wait = (self._elastic.lost_after + self._elastic.refresh_interval).total_seconds()
            lost = liveness.wait_for_loss(wait, give_up=lambda: _nodes_waiting(worker_group) > 0)
        return lost

    def _on_state_change(self, result: RunResult) -> None:
        if result.state in (WorkerState.FAILED, WorkerState.UNHEALTHY):
            stderrs = getattr(self._pcontext, "stderrs", {}) or {}
            for rank, failure in sorted(result.failures.items()):
                if stderrs.get(failure.local_rank):
                    self.stderr_paths[rank] = stderrs[failure.local_rank]
                sig = failure.signal_name() if failure.exitcode < 0 else None
                self._runtime.events.emit(
                    "worker_exit",
                    rank=rank,
                    local_rank=failure.local_rank,
                    pid=failure.pid,
                    exitcode=failure.exitcode,
                    signal=sig,
                    state=result.state.name,
                    attempt=self._attempt,
                    message=_short(failure.message),
                )
                log.warning(
                    "worker rank %d (local %d, pid %d) exited with %s (attempt %d)",
                    rank,
                    failure.local_rank,
                    failure.pid,
                    sig or f"code {failure.exitcode}",
                    self._attempt,
                )
        elif result.state == WorkerState.SUCCEEDED:
            self._runtime.events.emit("workers_succeeded", attempt=self._attempt)

    def _restart_workers(self, worker_group: WorkerGroup) -> None:
        # torch's loop decrements the restart budget before calling us on a
        # failure and leaves it alone on a membership change (a waiting node);
        # a lost node restarts from _monitor_workers, outside the budget.
        if self._restart_reason is not None:
            cause, reason, lost = self._restart_reason
            self._restart_reason = None
        else:
            failed = self._last_state in (WorkerState.FAILED, WorkerState.UNHEALTHY)
            cause, reason = restart_cause(failed, (), 0 if failed else 1)
            lost = []
        self._settle_pending = reason == "node_joined"
        self._runtime.events.emit(
            "workers_restart",
            cause=cause,
            reason=reason,
            lost_nodes=lost,
            attempt=self._attempt,
            remaining_restarts=self._remaining_restarts,
            max_restarts=worker_group.spec.max_restarts,
        )
        log.info("restarting worker group (cause: %s, reason: %s%s, %d restarts left)", cause, reason,
                 f", lost nodes {lost}" if lost else "", self._remaining_restarts)
        super()._restart_workers(worker_group)

    def run(self, role: str = "default") -> RunResult:
        try:
            return super().run(role)
        finally:
            if self._liveness is not None:
                self._liveness.stop()

    def _stop_workers(self, worker_group: WorkerGroup) -> None:
        super()._stop_workers(worker_group)
        if self._group_info is not None:
            self._runtime.on_workers_stopped(self._group_info)


def _nodes_waiting(worker_group: WorkerGroup) -> int:
    try:
        return worker_group.spec.rdzv_handler.num_nodes_waiting()
    except Exception:  # the store is gone: torch's own loop reports it
        return 0


def _short(message: str, limit: int = 500) -> str:
    message = message or ""
    return message if len(message) <= limit else message[:limit] + "..."
