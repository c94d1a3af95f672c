"""Detecting lost nodes: liveness counters in the rendezvous store.

Each agent bumps its own counter in the round's rendezvous store every
``refresh_interval`` and reads those of its next :data:`~hpresil.elastic.api.WATCHERS`
nodes in group-rank order (a ring: every node has that many watchers). A peer
whose counter has not moved for ``lost_after`` — measured on the *observer's*
monotonic clock, so no clock synchronisation is assumed — is lost; the watcher
publishes the verdict as the next numbered key after bumping one epoch counter,
which every agent reads each beat. A beat costs a constant number of store requests at any
job size (reading every peer's counter would be n-1 requests per agent,
~4 million per beat at the store at 2,048 nodes). A block of dead nodes is still seen by the
live node just before it. The decision logic
(:class:`LivenessTracker`, :func:`restart_cause`, :func:`tuned_rdzv_configs`)
is pure and unit-tested; :class:`Liveness` runs it on a thread against a real
``torch.distributed.Store``.

Why not wait for the collective: the survivors' workers may sit in a gloo or
NCCL collective with the dead node until its timeout (30 min for gloo by
default), and torch's agent only re-rendezvouses on a failure or a *waiting*
node, never on a dead one.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Iterable, Mapping

from hpresil.elastic.api import (
    ALIVE_KEY, DONE_MARK, DYNAMIC_BACKENDS, KEEPALIVES_PER_S, LOST_AFTER, LOST_EPOCH_KEY, LOST_KEY, MAX_KEEP_ALIVE_S,
    RDZV_TUNED_DEFAULTS, WATCHERS, ElasticConfig, MembershipView,
)
from hpresil.runtime.store_ops import read_counter, writes_to_add

__all__ = ["LivenessTracker", "Liveness", "restart_cause", "keep_alive_interval", "tuned_rdzv_configs",
           "lost_after_from_rdzv"]

log = logging.getLogger(__name__)


class LivenessTracker:
    """Pure bookkeeping: which peers' counters stopped moving.

    Args:
        group_rank: this node (never lost to itself).
        group_world_size: nodes in the round.
        lost_after: seconds without progress after which a peer is lost.
        now: the time of creation (a peer that never writes is lost
            ``lost_after`` after this).
        watch: how many ring successors to watch (``None``: every peer).
    """

    def __init__(self, group_rank: int, group_world_size: int, lost_after: float, now: float,
                 watch: int | None = WATCHERS) -> None:
        self.group_rank = group_rank
        self.group_world_size = group_world_size
        self.lost_after = lost_after
        n = group_world_size
        k = n - 1 if watch is None else max(1, min(watch, n - 1))
        self._watched = sorted({(group_rank + i) % n for i in range(1, k + 1)}) if n > 1 else []
        self._last: dict[int, tuple[int, float]] = {r: (-1, now) for r in self.peers}
        self.done: set[int] = set()
        self.lost: set[int] = set()

    @property
    def peers(self) -> list[int]:
        """The group ranks this node watches (its ring successors)."""
        return list(self._watched)

    def adopt(self, lost: Iterable[int]) -> frozenset[int]:
        """Takes other watchers' verdicts (peers outside the round, this node and
        peers known to be done are ignored); returns the peers lost so far."""
        for r in lost:
            if 0 <= r < self.group_world_size and r != self.group_rank and r not in self.done:
                self.lost.add(r)
        return frozenset(self.lost)

    def observe(self, now: float, counters: Mapping[int, int], done: Iterable[int] = ()) -> frozenset[int]:
        """Records the counters read at ``now``; returns the peers lost so far.

        A lost peer stays lost for the round, even if its counter moves again
        (a partitioned node that comes back must re-join through the rendezvous).
        """
        self.done.update(r for r in done if r != self.group_rank)
        for peer in self.peers:
            if peer in self.done or peer in self.lost:
                continue
            value = int(counters.get(peer, -1))
            last_value, since = self._last[peer]
            if value != last_value:
                self._last[peer] = (value, now)
            elif now - since >= self.lost_after:
                self.lost.add(peer)
        return frozenset(self.lost)


def _rank(raw: bytes) -> list[int]:
    """The group rank in a verdict value (``b"3"``), or none when it holds anything else."""
    item = bytes(raw).strip()
    return [int(item)] if item.isdigit() and len(item) < 10 else []


def restart_cause(failed: bool, lost: Iterable[int], waiting: int) -> tuple[str, str]:
    """Why the worker group restarts: ``(cause, reason)``.

    ``cause`` is ``membership`` (does not consume ``--max-restarts``) or
    ``failure`` (does). A local failure while a peer is lost is the loss's
    consequence (its collectives broke), so it counts as membership; so is
    one while a node waits to join (the other agents are stopping their
    workers for the join, which breaks ours' collectives).

    Args:
        failed: the local workers failed or are unhealthy.
        lost: peers declared lost.
        waiting: nodes waiting in the rendezvous to join.
    """
    if any(True for _ in lost):
        return "membership", "node_lost"
    if waiting > 0:
        return "membership", "node_joined"
    if failed:
        return "failure", "worker_failed"
    return "membership", "requested"


def keep_alive_interval(max_nodes: int, backend: str = "c10d") -> int:
    """The tuned keep-alive interval (seconds) of a job of up to ``max_nodes``
    nodes on ``backend``: :data:`~hpresil.elastic.api.KEEPALIVES_PER_S`
    keep-alives per second in all, between one per node per second and one
    per :data:`~hpresil.elastic.api.MAX_KEEP_ALIVE_S` (torch still forgets a
    node that dies outside a round, such as a waiter, only by its expiry)."""
    rate = KEEPALIVES_PER_S.get(backend, min(KEEPALIVES_PER_S.values()))
    return min(MAX_KEEP_ALIVE_S, max(1, math.ceil(max(1, max_nodes) / rate)))


def tuned_rdzv_configs(backend: str, configs: Mapping[str, Any], max_nodes: int = 1
                       ) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    """``configs`` with :data:`~hpresil.elastic.api.RDZV_TUNED_DEFAULTS` added
    where the user set nothing (dynamic backends only); the keep-alive interval
    grows with ``max_nodes`` (:func:`keep_alive_interval`).

    Returns:
        The new configs and the ``(key, value, reason)`` added.
    """
    out = dict(configs)
    added: list[tuple[str, str, str]] = []
    if backend not in DYNAMIC_BACKENDS:
        return out, added
    for key, value, reason in RDZV_TUNED_DEFAULTS:
        if key not in out:
            if key == "keep_alive_interval":
                value = str(keep_alive_interval(max_nodes, backend))
            out[key] = value
            added.append((key, value, reason))
    return out, added


def lost_after_from_rdzv(configs: Mapping[str, Any], tuned: Iterable[str] = ()) -> timedelta:
    """When the liveness ring declares a peer lost.

    With a keep-alive the user chose, torch's own definition of a dead node,
    ``keep_alive_interval x keep_alive_max_attempt`` (torch's defaults 5 s and
    3 when unset): their tolerance is kept. With the one hpresil chose (its key
    in ``tuned``), :data:`~hpresil.elastic.api.LOST_AFTER` or that product if
    shorter: the lost node is evicted from the rendezvous, so the keep-alive
    need not have expired.
    """
    interval = int(configs.get("keep_alive_interval", 5))
    attempts = int(configs.get("keep_alive_max_attempt", 3))
    expiry = timedelta(seconds=max(1, interval * attempts))
    return min(expiry, LOST_AFTER) if "keep_alive_interval" in set(tuned) else expiry


class Liveness:
    """An agent's liveness thread for one rendezvous round.

    Args:
        store: the round's rendezvous store (keys are private to the round).
        group_rank: this node's rank among nodes.
        group_world_size: nodes in the round.
        config: intervals.
        on_lost: called once (from the thread) when the first peers are lost.
        clock: monotonic clock (tests pass their own).
    """

    def __init__(
        self,
        store: Any,
        group_rank: int,
        group_world_size: int,
        config: ElasticConfig,
        on_lost: Callable[[frozenset[int]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self.tracker = LivenessTracker(group_rank, group_world_size, config.lost_after.total_seconds(), clock())
        self._on_lost = on_lost
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._store_ok = True
        self._finished = False
        self._adopted = 0  # verdicts 1.._adopted have been read
        self._adopting = threading.Lock()
        self._thread: threading.Thread | None = None
        # Counters are read with add(key, 0) (one round trip), or with check/get where
        # add is a consensus write (etcd): the peers' reads then cost no write.
        self._write_free = writes_to_add(store)

    def start(self) -> "Liveness":
        """Writes the first beat and starts the thread (no-op for a single node)."""
        if self.tracker.group_world_size <= 1:
            return self
        self.beat()
        self._thread = threading.Thread(target=self._loop, name="hpresil-liveness", daemon=True)
        self._thread.start()
        return self

    def beat(self) -> None:
        """Bumps this node's counter, reads its watched peers' and the shared loss
        epoch (a constant number of store round trips), publishes its own new
        verdicts and adopts the other watchers'."""
        tr = self.tracker
        before = set(tr.lost)
        try:
            if not self._finished:
                self.store.add(ALIVE_KEY.format(group_rank=tr.group_rank), 1)
            counters, done = {}, []
            for peer in tr.peers:
                if peer in tr.lost or peer in tr.done:
                    continue
                counters[peer] = read_counter(self.store, ALIVE_KEY.format(group_rank=peer), self._write_free)
                if counters[peer] >= DONE_MARK:  # its workers are done: its silence is no loss
                    done.append(peer)
            for peer in sorted(tr.observe(self.clock(), counters, done) - before):
                # Verdict i is key LOST_KEY/i; add/set/check/get only, which every torch Store has.
                self.store.set(LOST_KEY.format(index=self.store.add(LOST_EPOCH_KEY, 1)), str(peer))
            self._adopt_verdicts()
            self._store_ok = True
        except Exception as exc:  # the store host is gone or unreachable: no verdict on peers
            if self._store_ok:
                log.warning("liveness: rendezvous store unreachable (%s); not judging peers", exc)
            self._store_ok = False
            return
        lost = frozenset(tr.lost)
        if lost - before:
            log.warning("liveness: node(s) %s declared lost (no refresh for %.1fs; this node watches %s)",
                        sorted(lost - before), tr.lost_after, tr.peers)
            with self._changed:
                self._changed.notify_all()
            if self._on_lost is not None:
                self._on_lost(lost)

    def _adopt_verdicts(self) -> None:
        """Reads the verdicts published since the last beat (one counter read when
        there are none); one not written yet (its watcher is between the two
        requests) is read next beat."""
        with self._adopting:  # the beat thread and a waiting agent may both read them
            epoch = read_counter(self.store, LOST_EPOCH_KEY, self._write_free)
            while self._adopted < epoch:
                key = LOST_KEY.format(index=self._adopted + 1)
                if not self.store.check([key]):
                    return
                self.tracker.adopt(_rank(self.store.get(key)))
                self._adopted += 1

    def finish(self) -> None:
        """Marks this node's workers done, so peers never take its silence for a loss."""
        self._finished = True
        try:
            self.store.add(ALIVE_KEY.format(group_rank=self.tracker.group_rank), DONE_MARK)
        except Exception as exc:
            log.debug("liveness: cannot mark done: %s", exc)

    def view(self) -> MembershipView:
        """A snapshot of what this agent knows."""
        tr = self.tracker
        return MembershipView(group_rank=tr.group_rank, group_world_size=tr.group_world_size,
                              lost=frozenset(tr.lost), done=frozenset(tr.done), store_ok=self._store_ok)

    def wait_for_loss(self, timeout: float, give_up: Callable[[], bool] = lambda: False,
                      poll: float | None = None) -> frozenset[int]:
        """Waits up to ``timeout`` s for a peer to be declared lost; returns the lost
        peers (empty when none). ``give_up()`` ends the wait early (checked every
        ``poll`` s, default each refresh)."""
        deadline = self.clock() + timeout
        step = self.config.refresh_interval.total_seconds() if poll is None else poll
        while self._thread is not None and not self.tracker.lost and self.clock() < deadline:
            if give_up():
                # A node re-joining may be the watcher that just declared a loss: its
                # verdict is published before it re-joins, so read it before giving up.
                try:
                    self._adopt_verdicts()
                except Exception as exc:
                    log.debug("liveness: cannot read the verdicts: %s", exc)
                break
            with self._changed:
                self._changed.wait(min(step, max(0.0, deadline - self.clock())))
        return frozenset(self.tracker.lost)

    def _loop(self) -> None:
        interval = self.config.refresh_interval.total_seconds()
        while not self._stop.wait(interval):
            self.beat()

    def stop(self) -> None:
        """Stops the thread (the counters stay in the round's store)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
