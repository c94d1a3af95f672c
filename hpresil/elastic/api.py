"""Contract of elastic training: membership, rescale and the data order.

``hpresil-run --nnodes MIN:MAX`` keeps training when nodes come and go:

* **node loss** — every agent refreshes a liveness counter in the round's
  rendezvous store (:class:`~hpresil.elastic.membership.Liveness`); a peer whose
  counter stops moving for :attr:`ElasticConfig.lost_after` is declared lost,
  the survivors stop their workers (even when they sit in a collective that
  would otherwise wait for its timeout) and restart with cause ``membership``;
  the survivors evict it from torch's rendezvous at once
  (:mod:`hpresil.elastic.evict`; torch alone would wait for its keep-alive to
  expire), which then completes a round at the smaller size, and the workers
  restore the newest checkpoint every rank can load (resharded).
* **node join** — torch's own path: a new agent waits in the rendezvous's wait
  list, ``num_nodes_waiting()`` turns positive, the agents restart their
  workers (cause ``membership``). Before re-joining, each agent lets its
  sealer and drainer finish (:meth:`~hpresil.runtime.node.NodeRuntime.settle`)
  so the newest snapshot flagged for the durable tier is committed and the
  larger group resumes from it.
* **data** — :class:`~hpresil.elastic.sampler.ElasticSampler` walks one global
  sample order by a global position saved with the checkpoint, and
  :func:`~hpresil.elastic.batch.plan_batch` keeps the global batch constant
  through gradient accumulation.

Restart accounting: membership restarts never consume ``--max-restarts``;
failures do. Both are logged and reported as ``workers_restart`` events
(``cause``: ``failure`` or ``membership``; ``reason``: ``node_lost``,
``node_joined``); a change of the number of nodes is a ``rescale`` event.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from hpresil.errors import ConfigError

__all__ = [
    "ElasticConfig",
    "MembershipView",
    "RDZV_TUNED_DEFAULTS",
    "KEEPALIVES_PER_S",
    "MAX_KEEP_ALIVE_S",
    "LOST_AFTER",
    "DYNAMIC_BACKENDS",
    "ALIVE_KEY",
    "DONE_MARK",
    "LOST_KEY",
    "LOST_EPOCH_KEY",
    "WATCHERS",
    "RUNNING_KEY",
]

#: Rendezvous backends built on torch's ``DynamicRendezvousHandler`` (keep-alive, wait list).
DYNAMIC_BACKENDS: frozenset[str] = frozenset({"c10d", "etcd-v2"})

#: ``--rdzv-conf`` values hpresil-run uses when the user did not set them:
#: (key, value, reason). torch's defaults (5 s x 3 keep-alive, 30 s last call)
#: make a node loss cost ~45 s before the smaller round even completes.
#: ``keep_alive_interval`` is the value for the smallest jobs; larger ones get
#: ``ceil(max_nodes / KEEPALIVES_PER_S[backend])`` seconds.
RDZV_TUNED_DEFAULTS: tuple[tuple[str, str, str], ...] = (
    ("keep_alive_interval", "1", "torch forgets a dead node after keep_alive_interval x keep_alive_max_attempt "
     "(torch: 5 s x 3); hpresil's liveness ring declares it lost after 3 s and evicts it from the rendezvous at "
     "once, so the interval only bounds the store load: every keep-alive rewrites the whole rendezvous state, "
     "and the interval grows with the job to keep them at 64 per second on a TCPStore, 16 on etcd (at most 30 s)"),
    ("keep_alive_max_attempt", "3", "three missed keep-alives make a node dead (torch's default)"),
    ("last_call_timeout", "2", "wait 2 s for more nodes once MIN have joined (torch: 30 s), "
     "so a shrink or grow completes in seconds"),
)

#: Keep-alives per second, in all, the tuned ``keep_alive_interval`` aims at whatever the job size, per
#: backend (bench/control_plane.py, docs/benchmarks.md): a TCPStore served 64 agents at 1 s with the
#: membership change at 1.4x its 3-agent time; etcd writes each one through raft, and 64 agents at 1 s
#: collapsed into retried compare-and-sets there, while at 4 s (16 per second) they did not.
KEEPALIVES_PER_S: dict[str, int] = {"c10d": 64, "etcd-v2": 16}
#: The longest tuned keep-alive interval (seconds): a node that dies outside a round is forgotten in 3x this.
MAX_KEEP_ALIVE_S = 30
#: How long the liveness ring waits before declaring a peer lost when hpresil chose the keep-alive.
LOST_AFTER = timedelta(seconds=3)

#: Store key (under the round's prefix) of each agent's liveness counter.
ALIVE_KEY = "hpresil/elastic/alive/{group_rank}"
#: Added to a node's liveness counter once its workers are done: one read tells a watcher both.
DONE_MARK = 1 << 40
#: Loss verdicts: the watcher that declares one bumps ``LOST_EPOCH_KEY`` to ``i`` and sets
#: ``LOST_KEY`` ``i`` to the lost group rank; every agent reads the counter each beat and
#: the new keys when it moved.
LOST_KEY = "hpresil/elastic/lost/{index}"
LOST_EPOCH_KEY = "hpresil/elastic/lost_epoch"
#: How many ring successors each agent watches (each node has this many watchers).
WATCHERS = 2
#: Key in the rendezvous backend's store (all rounds) set once a round of job ``run_id`` completed.
RUNNING_KEY = "hpresil/running/{run_id}"


@dataclasses.dataclass(kw_only=True, slots=True)
class ElasticConfig:
    """How an agent watches the other nodes of its round.

    Attributes:
        refresh_interval: how often an agent bumps its liveness counter and
            reads the others'.
        lost_after: a peer whose counter did not move for this long (on the
            observer's own monotonic clock: no clock sync needed) is lost. Match
            it to the rendezvous keep-alive (``keep_alive_interval x
            keep_alive_max_attempt``) so torch agrees the node is dead by the
            time the survivors re-join.
        settle_timeout: on growth, how long an agent waits for its sealer and
            drainer to commit the newest snapshot before re-joining.
        enabled: watch peers at all (off: torch's behaviour, survivors wait
            for their collectives to fail).

    Raises:
        ConfigError: ``lost_after <= refresh_interval`` or a non-positive value.
    """

    refresh_interval: timedelta = timedelta(milliseconds=500)
    lost_after: timedelta = timedelta(seconds=3)
    settle_timeout: timedelta = timedelta(seconds=10)
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.refresh_interval <= timedelta(0):
            raise ConfigError(f"refresh_interval={self.refresh_interval} must be > 0")
        if self.lost_after <= self.refresh_interval:
            raise ConfigError(
                f"lost_after={self.lost_after} must be > refresh_interval={self.refresh_interval}: "
                "a live peer refreshes at least once within lost_after"
            )
        if self.settle_timeout < timedelta(0):
            raise ConfigError(f"settle_timeout={self.settle_timeout} must be >= 0")


@dataclasses.dataclass(frozen=True, slots=True)
class MembershipView:
    """What one agent knows about the other nodes of its round.

    Attributes:
        group_rank: this node's rank among nodes.
        group_world_size: nodes in the round.
        lost: group ranks declared lost.
        done: group ranks whose workers finished successfully (never lost).
        store_ok: the last store operation succeeded (``False``: the store host
            is unreachable, so nothing can be said about the peers).
    """

    group_rank: int
    group_world_size: int
    lost: frozenset[int] = frozenset()
    done: frozenset[int] = frozenset()
    store_ok: bool = True
