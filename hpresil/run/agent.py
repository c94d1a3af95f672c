"""``LocalElasticAgent`` subclass that reports to the node runtime.

It overrides only the agent's lifecycle hooks (rendezvous, start, monitor,
restart, stop) to emit events and tell the runtime's services what happened,
to restart on a lost node (:mod:`hpresil.elastic.membership`) and to restart
a failed group without a new rendezvous round when the nodes stay the same
(:mod:`hpresil.elastic.fast_restart`). The restart budget, process management
and signals stay torch's.
"""

from __future__ import annotations

import json
import logging
import time
from string import Template
from typing import Any, Callable

from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup, WorkerSpec, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

from hpresil.elastic.api import RUNNING_KEY, ElasticConfig
from hpresil.elastic.fast_restart import FastRestart, free_port
from hpresil.elastic.membership import restart_cause
from hpresil.run.console import WorkerConsole
from hpresil.run.failure import failure_summary, guard_error_files
from hpresil.run.peers import Peers, nodes_waiting
from hpresil.runtime.api import WorkerGroupInfo
from hpresil.runtime.node import NodeRuntime
from hpresil.topology.service import TopologyService

__all__ = ["HpresilAgent"]

log = logging.getLogger(__name__)

#: Polls retried (50 ms apart) when one trips on a failed worker's error file.
_ERROR_FILE_RETRIES = 10


class HpresilAgent(LocalElasticAgent):
    """The elastic agent of ``hpresil-run``.

    Args:
        spec: the worker spec (as torchrun builds it).
        runtime: the node runtime that receives lifecycle callbacks.
        elastic: how peers are watched for loss (see :mod:`hpresil.elastic`).
        fast_restart: restart failed workers without a new rendezvous round when
            the nodes stay the same (:mod:`hpresil.elastic.fast_restart`).
        before_join: called once before this agent's first rendezvous (see
            :func:`hpresil.run.launch.join_when_ready`).
        console: copies the workers' stderr logs to the console, folding the
            tracebacks of a recovered failure (:mod:`hpresil.run.console`).
        **kwargs: passed to ``LocalElasticAgent``.
    """

    def __init__(self, spec: WorkerSpec, runtime: NodeRuntime, elastic: ElasticConfig | None = None,
                 fast_restart: bool = True, before_join: Callable[[], None] | None = None,
                 console: WorkerConsole | None = None, **kwargs: Any) -> None:
        super().__init__(spec, **kwargs)
        self._runtime = runtime
        self._elastic = elastic or ElasticConfig()
        self._peers = Peers(self._elastic, runtime.events)
        self._restart_reason: tuple[str, str, list[int]] | None = None  # set by a membership verdict
        self._settle_pending = False
        self._attempt = -1
        self._last_state = WorkerState.INIT
        self._group_info: WorkerGroupInfo | None = None
        self._before_join = before_join
        self._console = console
        self._restarting = False  # inside _restart_workers: the stopped attempt's outcome is a restart
        self._fast_enabled = fast_restart
        self._fast: FastRestart | None = None  # this round's agreement (None: off or not possible)
        self._fast_checked = 0.0  # when _monitor_workers last looked for failed peers
        self._checked_error_files: set[str] = set()  # error files found valid (or repaired)
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
        if self._before_join is not None:
            before, self._before_join = self._before_join, None
            before()
        self._peers.before_join()
        start = time.monotonic()
        super()._rendezvous(worker_group)
        self._peers.joined(worker_group)
        _mark_running(worker_group)
        self._fast = None
        if self._fast_enabled and worker_group.store is not None and not worker_group.spec.rdzv_handler.use_agent_store:
            wait = (self._elastic.lost_after + self._elastic.refresh_interval).total_seconds()
            self._fast = FastRestart(worker_group.store, worker_group.group_rank or 0,
                                     worker_group.group_world_size or 1, timeout=wait)
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
            if isinstance(service, TopologyService):
                workers = service.assign(store, group_rank, group_world_size, workers)
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
            store=self._services_store(worker_group),
        )
        self._group_info = info
        self._last_state = WorkerState.HEALTHY
        self._follow_stderr(worker_group, workers)
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
        result = self._poll_workers(worker_group)
        if result.state != self._last_state:
            self._on_state_change(result)
            self._last_state = result.state
        # A peer's workers failed: ours sit in (or will reach) a broken collective.
        # With no restart left, let them fail on their own: torch's loop then ends the job.
        peer_failed = result.state == WorkerState.HEALTHY and self._remaining_restarts > 0 and self._peer_failed()
        lost = self._peers.lost(worker_group, result, self._fast, peer_failed)
        if peer_failed and not lost:
            # Join the restart now instead of waiting for our workers to fail too; it
            # is the same failure, so it costs this node a restart like the others.
            self._remaining_restarts -= 1
            self._restart_reason = ("failure", "peer_failed", [])
            self._restart_workers(worker_group)
            return RunResult(state=worker_group.state)
        if lost:
            # A lost node: restart at once (the workers may sit in a collective
            # with it until its timeout), without consuming --max-restarts.
            self._peers.evict(worker_group, lost)
            self._restart_reason = ("membership", "node_lost", sorted(lost))
            self._restart_workers(worker_group)
            return RunResult(state=worker_group.state)
        if result.state in (WorkerState.FAILED, WorkerState.UNHEALTHY) and self._peers.liveness is not None:
            cause, reason = restart_cause(True, (), nodes_waiting(worker_group))
            if cause == "membership":  # a node waits to join: the join's restart, not a failure
                self._restart_reason = (cause, reason, [])
                self._restart_workers(worker_group)
                return RunResult(state=worker_group.state)
        return result

    def _poll_workers(self, worker_group: WorkerGroup) -> RunResult:
        """torch's poll, surviving a worker's half-written error file.

        torch parses a failed worker's ``error.json`` as soon as the process is
        gone and lets a JSON error end the agent (the job): a worker killed while
        writing it (OOM killer, SIGKILL, a full disk) would take the node down.
        Before each poll, an error file that appeared is checked once; when it is
        not valid JSON and its writer is gone, it is replaced by a valid one that
        says so (:func:`~hpresil.run.failure.guard_error_files`). A poll that
        still trips on one is retried after the repair.
        """
        for attempt in range(_ERROR_FILE_RETRIES + 1):
            self._check_error_files()
            try:
                return super()._monitor_workers(worker_group)
            except json.JSONDecodeError:
                if attempt == _ERROR_FILE_RETRIES:
                    raise
                time.sleep(0.05)
        raise AssertionError("unreachable")

    def _check_error_files(self) -> None:
        pcontext = self._pcontext
        files = getattr(pcontext, "error_files", None) or {}
        for path in guard_error_files(files, lambda: pcontext.pids(), self._checked_error_files):  # type: ignore[union-attr]
            log.warning("worker error file %s was not valid JSON (its writer died mid-write); replaced by a note", path)

    def _peer_failed(self) -> bool:
        """Another node marked a failure in this generation (looked up at most every
        ``FastRestart.watch_interval``: one store round trip, 0.1 s up to 100 nodes)."""
        fast = self._fast
        now = time.monotonic()
        if fast is None or fast.group_world_size <= 1 or now - self._fast_checked < fast.watch_interval:
            return False
        self._fast_checked = now
        return fast.failed_count() > 0

    def _services_store(self, worker_group: WorkerGroup) -> Any:
        """The round's store for the node services, under a per-generation prefix
        after a fast restart (their keys, e.g. hang diagnostics, are per attempt)."""
        if self._fast is None or self._fast.gen == 0 or worker_group.store is None:
            return worker_group.store
        from torch.distributed import PrefixStore

        return PrefixStore(f"hpresil/gen{self._fast.gen}/", worker_group.store)

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
                log.warning("worker rank %d (local %d, pid %d) %s (attempt %d)", rank, failure.local_rank,
                            failure.pid, failure_summary(failure, stderrs.get(failure.local_rank)), self._attempt)
        elif result.state == WorkerState.SUCCEEDED:
            self._runtime.events.emit("workers_succeeded", attempt=self._attempt)

    def _restart_workers(self, worker_group: WorkerGroup) -> None:
        self._restarting = True
        try:
            self._restart(worker_group)
        finally:
            self._restarting = False

    def _restart(self, worker_group: WorkerGroup) -> None:
        # torch's loop decrements the restart budget before calling us on a
        # failure and leaves it alone on a membership change (a waiting node);
        # a lost node restarts from _monitor_workers, outside the budget.
        if self._restart_reason is not None:
            cause, reason, lost = self._restart_reason
            self._restart_reason = None
        else:  # torch's loop: the workers failed, or a node waits in the rendezvous
            failed = self._last_state in (WorkerState.FAILED, WorkerState.UNHEALTHY)
            if not failed and self._peers.round_ended(worker_group):
                # Not a join: a survivor of a loss this node has not heard of yet
                # ended the round (hpresil.elastic.evict) and waits for the next.
                cause, reason, lost = "membership", "node_lost", self._peers.lost_now()
            else:
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
        if self._fast is None or cause != "failure":
            super()._restart_workers(worker_group)
            return
        self._fast.mark_failed()
        self._stop_workers(worker_group)
        worker_group.state = WorkerState.STOPPED
        if not self._fast_restart(worker_group):
            self._initialize_workers(worker_group)

    def _fast_restart(self, worker_group: WorkerGroup) -> bool:
        """Starts the stopped group again with the same ranks when every node agrees
        (:mod:`hpresil.elastic.fast_restart`); ``False``: rendezvous instead."""
        fast = self._fast
        assert fast is not None
        start = time.monotonic()
        coordinator = fast.group_rank == 0
        port = (worker_group.spec.master_port or free_port()) if coordinator else None
        def give_up() -> bool:
            return nodes_waiting(worker_group) > 0 or bool(self._peers.lost_now())

        gen = fast.gen
        agreed = fast.agree(coordinator=coordinator, port=port, give_up=give_up)
        self._runtime.events.emit("fast_restart", gen=gen, go=agreed is not None,
                                  duration_s=round(time.monotonic() - start, 4))
        if agreed is None:
            log.info("fast restart not agreed (generation %d): re-rendezvous", gen)
            return False
        worker_group.master_port = agreed
        log.info("fast restart: same %d node(s), master port %d, generation %d", fast.group_world_size, agreed, fast.gen)
        for local_rank, worker_id in self._start_workers(worker_group).items():
            worker_group.workers[local_rank].id = worker_id
        worker_group.state = WorkerState.HEALTHY
        return True

    def run(self, role: str = "default") -> RunResult:
        try:
            return super().run(role)
        finally:
            self._peers.stop()

    def _stop_workers(self, worker_group: WorkerGroup) -> None:
        super()._stop_workers(worker_group)
        if self._console is not None:
            self._console.end_attempt(restarting=self._restarting)
        if self._group_info is not None:
            self._runtime.on_workers_stopped(self._group_info)

    def _follow_stderr(self, worker_group: WorkerGroup, workers: list[Any]) -> None:
        """Hands the new attempt's stderr logs to the console, with torch's line prefixes."""
        stderrs = getattr(self._pcontext, "stderrs", None) or {}
        if self._console is None or not stderrs:
            return
        role = worker_group.spec.role
        template = self._log_line_prefix_template
        prefixes = {
            w.local_rank: (Template(template).safe_substitute(role_name=role, rank=w.global_rank, local_rank=w.local_rank)
                           if template else f"[{role}{w.local_rank}]:")
            for w in workers
        }
        shown = getattr(self._logs_specs, "_local_ranks_filter", None)  # --local-ranks-filter, as torch's tee
        self._console.start_attempt(
            {w.local_rank: stderrs[w.local_rank] for w in workers
             if stderrs.get(w.local_rank) and (not shown or w.local_rank in shown)},
            prefixes, {w.local_rank: w.global_rank for w in workers})


def _mark_running(worker_group: WorkerGroup) -> None:
    """Tells agents that start later that this job already trains (``RUNNING_KEY``
    in the rendezvous backend's store, shared by all rounds)."""
    base = getattr(worker_group.store, "underlying_store", None)
    if base is None:
        return
    try:
        base.set(RUNNING_KEY.format(run_id=worker_group.spec.rdzv_handler.get_run_id()), "1")
    except Exception as exc:  # noqa: BLE001 - an optimisation for joiners only
        log.debug("cannot mark the job running: %s", exc)


def _short(message: str, limit: int = 500) -> str:
    message = message or ""
    return message if len(message) <= limit else message[:limit] + "..."
