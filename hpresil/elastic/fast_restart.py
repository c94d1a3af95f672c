"""Fast restart: a failed worker group restarts without a new rendezvous round.

torch's agent answers every worker failure with stop -> rendezvous -> start.
When the nodes are the same before and after (a worker crashed or hung, no
node lost, none waiting to join), the rendezvous only re-derives what every
agent already knows, and costs seconds: torch's dynamic rendezvous polls its
state once a second, and each restarting agent first waits to learn whether a
peer was lost (:meth:`~hpresil.elastic.membership.Liveness.wait_for_loss`).

This module is the agents' agreement instead, in the round's store, scoped by
a per-round generation ``gen`` (0 after each rendezvous, +1 per fast restart,
the same on every agent because every agent follows the same decisions):

1. an agent whose workers failed, or which sees that a peer's did, marks
   itself failed (``failed_n`` += 1, once per generation); the failed agents
   stop waiting for a loss verdict as soon as every node has marked;
2. after stopping its workers, each agent counts itself ready (``ready_n``);
3. the agent hosting global rank 0 (the coordinator: its worker serves the
   workers' store) writes ``go`` with a fresh master port once all nodes are
   ready, or ``slow`` when a peer is lost, a node waits to join, or the nodes
   are not all ready within ``timeout``; the others wait for that decision and
   write ``slow`` themselves if none comes in time. The decision is one
   ``compare_set``: the first value written wins and every agent follows it;
4. ``go``: start the workers with the same ranks, the new port and
   generation + 1; ``slow``: torch's rendezvous, as without this module.

Off with ``hpresil-run --fast-restart off`` (``HPRESIL_FAST_RESTART=off``), and
never used when the workers share the agents' store
(``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=0``: a new round is what gives them
fresh keys) or on a membership change.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from typing import Any, Callable

from hpresil.runtime.store_ops import read_counter, set_if_absent, writes_to_add

__all__ = ["FastRestart", "free_port", "poll_interval", "PREFIX"]

log = logging.getLogger(__name__)

#: Store key prefix of generation ``gen`` (under the round's own prefix).
PREFIX = "hpresil/fast/{gen}/"


#: Store requests per second all agents together may spend watching for a peer's
#: failure mark (steady state) and polling for the decision (during a restart).
WATCH_BUDGET = 1000.0
AGREE_BUDGET = 10000.0


def poll_interval(nodes: int, floor: float, budget: float) -> float:
    """How often each of ``nodes`` agents may poll the store so that together
    they send at most ``budget`` requests a second, and never more often than
    ``floor``: 0.1 s up to 100 nodes for the failure watch, 2 s at 2,048."""
    return max(floor, nodes / budget)


def free_port(host: str = "") -> int:
    """A TCP port free on this host now (the way torch picks a master port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class FastRestart:
    """One agent's side of the fast-restart agreement for one rendezvous round.

    Args:
        store: the round's store (``worker_group.store``).
        group_rank: this node's rank in the round.
        group_world_size: nodes in the round.
        timeout: how long the nodes may take to become ready before the restart
            falls back to a rendezvous.
        poll: store polling interval while agreeing (s; default by
            :func:`poll_interval`, 20 ms up to 200 nodes).
    """

    def __init__(self, store: Any, group_rank: int, group_world_size: int, *, timeout: float,
                 poll: float | None = None) -> None:
        self.store = store
        self.group_rank = group_rank
        self.group_world_size = group_world_size
        self.timeout = timeout
        self.poll = poll_interval(group_world_size, 0.02, AGREE_BUDGET) if poll is None else poll
        #: how often the agent looks for another node's failure mark (one store request)
        self.watch_interval = poll_interval(group_world_size, 0.1, WATCH_BUDGET)
        self.gen = 0
        self._marked = -1  # the generation this agent last marked itself failed in
        self._write_free = writes_to_add(store)  # etcd: read counters with check/get, not add(key, 0)

    def _key(self, name: str) -> str:
        return PREFIX.format(gen=self.gen) + name

    def mark_failed(self) -> None:
        """Counts this node as failed in the current generation (idempotent;
        an unreachable store only costs the fast path)."""
        if self._marked == self.gen or self.group_world_size <= 1:
            return
        try:
            self.store.add(self._key("failed_n"), 1)
        except Exception as exc:  # the store host is gone: torch's rendezvous sorts it out
            log.debug("fast restart: cannot mark this node failed: %s", exc)
            return
        self._marked = self.gen

    def failed_count(self) -> int:
        """Nodes that marked themselves failed in the current generation (one store
        round trip; 0 when the store cannot be reached)."""
        if self.group_world_size <= 1:
            return 0
        try:
            return read_counter(self.store, self._key("failed_n"), self._write_free)
        except Exception as exc:  # the store host is gone: the liveness watch decides
            log.debug("fast restart: store unreachable: %s", exc)
            return 0

    def all_failed(self) -> bool:
        """Every node of the round has marked itself failed."""
        return self.failed_count() >= self.group_world_size

    def agree(self, *, coordinator: bool, port: int | None, give_up: Callable[[], bool]) -> int | None:
        """Steps 2-3 after this agent stopped its workers: returns the master port
        to restart with (``go``; the caller's own ``port`` when it is the
        coordinator), or ``None`` to fall back to a rendezvous (``slow``).

        ``give_up()`` (a peer lost, a node waiting to join) turns the decision to
        ``slow``. A single-node round needs no agreement.
        """
        if self.group_world_size <= 1:
            if give_up():
                return None
            self.gen += 1
            return port
        decision_key = self._key("decision")
        try:
            self.store.add(self._key("ready_n"), 1)
            deadline = time.monotonic() + self.timeout + (0.0 if coordinator else 2.0)
            decision: dict[str, Any] | None = None
            while decision is None:
                if self.store.check([decision_key]):
                    decision = json.loads(bytes(self.store.get(decision_key)).decode())
                elif give_up() or time.monotonic() >= deadline:
                    decision = self._decide({"go": False})
                elif coordinator and read_counter(self.store, self._key("ready_n"), self._write_free) >= self.group_world_size:
                    decision = self._decide({"go": True, "port": port})
                else:
                    time.sleep(self.poll)
        except Exception as exc:  # the store is gone (its host died): torch's rendezvous sorts it out
            log.warning("fast restart: no agreement through the store (%s); falling back to a rendezvous", exc)
            return None
        if not decision.get("go"):
            return None
        self.gen += 1
        return int(decision["port"])

    def _decide(self, value: dict[str, Any]) -> dict[str, Any]:
        """Writes ``value`` unless a decision exists; returns the one that stands."""
        raw = set_if_absent(self.store, self._key("decision"), json.dumps(value))
        return json.loads(raw.decode())
