"""What an ``hpresil-run`` agent knows about the other nodes of its round.

One :class:`Peers` per agent: it starts the liveness ring of each new round
(:class:`~hpresil.elastic.membership.Liveness`), reports a rescale, turns a
loss verdict into an eviction from torch's rendezvous and a re-join delay
(:mod:`hpresil.elastic.evict`), and tells a restart caused by a lost node from
one caused by a node joining. The agent (:mod:`hpresil.run.agent`) decides
what to do with the answers.
"""

from __future__ import annotations

import logging
import time
from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup, WorkerState

from hpresil.elastic.api import ElasticConfig
from hpresil.elastic.evict import evict, rejoin_delay, round_of
from hpresil.elastic.fast_restart import FastRestart
from hpresil.elastic.membership import Liveness
from hpresil.events.api import EventSink

__all__ = ["Peers", "nodes_waiting"]

log = logging.getLogger(__name__)


def nodes_waiting(worker_group: WorkerGroup) -> int:
    """Nodes waiting in torch's rendezvous to join (0 when the store is gone:
    torch's own loop reports that)."""
    try:
        return worker_group.spec.rdzv_handler.num_nodes_waiting()
    except Exception:  # noqa: BLE001
        return 0


class Peers:
    """The liveness ring and rendezvous membership of one agent.

    Args:
        elastic: how peers are watched for loss.
        events: where ``rescale`` and ``rdzv_evicted`` go.
    """

    def __init__(self, elastic: ElasticConfig, events: EventSink) -> None:
        self._elastic = elastic
        self._events = events
        self.liveness: Liveness | None = None
        self.round: int | None = None  # the rendezvous round this agent last joined
        self._nodes: int | None = None
        self._rejoin_delay = 0.0  # seconds to wait before re-joining after a loss

    def before_join(self) -> None:
        """Survivors of a loss take turns at torch's compare-and-set
        (:func:`~hpresil.elastic.evict.rejoin_delay`): waits this node's turn."""
        if self._rejoin_delay:
            time.sleep(self._rejoin_delay)
            self._rejoin_delay = 0.0

    def joined(self, worker_group: WorkerGroup) -> None:
        """Starts watching the round just joined (replacing the previous round's watch)."""
        self.round = round_of(worker_group.spec.rdzv_handler)
        self.stop()
        nodes = worker_group.group_world_size or 1
        if self._nodes is not None and nodes != self._nodes:
            self._events.emit("rescale", from_nodes=self._nodes, to_nodes=nodes,
                              world_size=worker_group.workers[0].world_size if worker_group.workers else None)
            log.warning("rescaled from %d to %d nodes", self._nodes, nodes)
        self._nodes = nodes
        if self._elastic.enabled and nodes > 1 and worker_group.store is not None:
            self.liveness = Liveness(worker_group.store, worker_group.group_rank or 0, nodes, self._elastic).start()

    def evict(self, worker_group: WorkerGroup, lost: frozenset[int]) -> None:
        """Takes the lost nodes out of torch's rendezvous now and ends the round
        for the survivors (:mod:`hpresil.elastic.evict`; every survivor tries,
        the first wins), and sets this node's re-join delay."""
        nodes = evict(worker_group.spec.rdzv_handler, self.round, lost)
        if nodes:
            self._events.emit("rdzv_evicted", round=self.round, group_ranks=sorted(lost), nodes=nodes)
        self._rejoin_delay = rejoin_delay(worker_group.group_world_size or 1)

    def lost(self, worker_group: WorkerGroup, result: RunResult, fast: FastRestart | None,
             peer_failed: bool = False) -> frozenset[int]:
        """The peers declared lost, waiting (at most ``lost_after``) for a verdict
        when this node's workers or a peer's just failed: broken collectives make
        the survivors of a lost node fail within milliseconds, before the loss
        can be declared. This node's failure is marked for the fast restart
        first; the wait ends early when a node already waits to join or every
        node reported a failure of its own (a plain failure)."""
        liveness = self.liveness
        if liveness is None:
            return frozenset()
        if result.state == WorkerState.SUCCEEDED:
            liveness.finish()
            return frozenset()
        lost = liveness.view().lost
        if not lost and (peer_failed or result.state in (WorkerState.FAILED, WorkerState.UNHEALTHY)):
            if fast is not None:
                fast.mark_failed()
            wait = (self._elastic.lost_after + self._elastic.refresh_interval).total_seconds()
            lost = liveness.wait_for_loss(
                wait, give_up=lambda: nodes_waiting(worker_group) > 0 or (fast is not None and fast.all_failed()),
                poll=None if fast is None else fast.watch_interval)
        return lost

    def round_ended(self, worker_group: WorkerGroup) -> bool:
        """Whether the rendezvous round this node joined is over (as last read by
        torch's handler): a survivor evicted it, or every node left it. A node
        joining waits on the same round, so this tells a loss from a join."""
        now = round_of(worker_group.spec.rdzv_handler)
        return self.round is not None and now is not None and now != self.round

    def lost_now(self) -> list[int]:
        """The peers declared lost so far (sorted)."""
        return sorted(self.liveness.view().lost) if self.liveness is not None else []

    def stop(self) -> None:
        """Stops the liveness thread of the current round."""
        if self.liveness is not None:
            self.liveness.stop()
            self.liveness = None
