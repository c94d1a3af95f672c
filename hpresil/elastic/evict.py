"""Take a lost node out of torch's rendezvous as soon as the liveness ring says so.

torch's ``DynamicRendezvousHandler`` forgets a node only once its keep-alive
expired (``keep_alive_interval x keep_alive_max_attempt``): until then the
dead node stays a participant of the completed round, the round cannot start
over, and the survivors' re-join waits. hpresil's liveness ring
(:class:`~hpresil.elastic.membership.Liveness`) already agreed the node is
lost, so :func:`evict` removes it from the shared rendezvous state at once,
the way torch's own sanitizer would (out of the participants, the heartbeats
and the lists).

It also ends the round for the survivors in the same write. In torch's
protocol every survivor, on re-joining, first leaves the completed round (the
last one out moves it on) and then puts itself on the wait list for the next:
2(N-1) compare-and-sets of one shared state, each one's success making every
other attempt in flight lose and retry. :func:`evict` writes the state those
operations would reach -- the survivors on the wait list with their heartbeats,
no participant, the round moved on by torch's own epilogue -- in one
compare-and-set, so each survivor's re-join is a single write: joining the new
round. A survivor that has not heard the verdict yet is nudged by torch's own
agent loop, which restarts when a node waits.

That takes the keep-alive expiry and most of the writes off the critical path
of a membership change, which also lets the keep-alive interval grow with the
job (:func:`~hpresil.elastic.membership.tuned_rdzv_configs`): every keep-alive
rewrites the whole rendezvous state, O(N) bytes, so N nodes beating every
second move O(N^2) bytes per second through the store.

Only torch's classes touch the state: a fresh ``_BackendRendezvousStateHolder``
over the handler's own backend reads it, and its compare-and-set writes it
back (torch's private API, hence the guard: with another handler or another
torch layout nothing is evicted and the keep-alive expiry applies, as before).
"""

from __future__ import annotations

import logging
import random
from typing import Any, Iterable

__all__ = ["evict", "round_of", "rejoin_delay"]

log = logging.getLogger(__name__)

#: Compare-and-set attempts before giving up (each one re-reads the state).
_ATTEMPTS = 20
#: Survivors spread their re-join over N x this, at most :data:`REJOIN_SPREAD_MAX_S`.
REJOIN_SPREAD_PER_NODE_S = 0.01
#: Well inside hpresil-run's 2 s last call, so no survivor misses the smaller round.
REJOIN_SPREAD_MAX_S = 1.0


def rejoin_delay(nodes: int, rng: random.Random | None = None) -> float:
    """How long a survivor of a round of ``nodes`` waits before re-joining:
    uniform in ``[0, min(REJOIN_SPREAD_MAX_S, nodes x REJOIN_SPREAD_PER_NODE_S)]``.

    torch's join is a compare-and-set of one shared state; survivors that all
    heard the verdict at the same moment would re-join together, and each
    success makes every other attempt in flight lose (N^2 attempts; on a
    loaded etcd this collapses: ``bench/control_plane.py``,
    ``change_failed_sets``). Spread out, they mostly take turns; the losers
    back off (:class:`~hpresil.elastic.torch_rdzv.BackoffBackend`).
    """
    window = min(REJOIN_SPREAD_MAX_S, max(0, nodes) * REJOIN_SPREAD_PER_NODE_S)
    return (rng or random).uniform(0.0, window)


def _torch_parts() -> tuple[Any, Any] | None:
    try:
        from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
            _BackendRendezvousStateHolder,
            _remove_participant_epilogue,
        )
    except ImportError:
        return None
    return _BackendRendezvousStateHolder, _remove_participant_epilogue


def round_of(handler: Any) -> int | None:
    """The rendezvous round ``handler`` last saw (right after ``next_rendezvous``:
    the round it joined); ``None`` for a handler without torch's dynamic state."""
    state = getattr(getattr(handler, "_state_holder", None), "state", None)
    value = getattr(state, "round", None)
    return value if isinstance(value, int) else None


def evict(handler: Any, joined_round: int | None, lost_ranks: Iterable[int]) -> list[str]:
    """Removes the nodes of ``lost_ranks`` (group ranks of round ``joined_round``)
    from the shared rendezvous state and moves the survivors to the next
    round's wait list, if that round is still the current, completed one.

    Safe to call from every survivor: the first compare-and-set that wins
    removes them, the others find nothing left to do. Never raises: a failure
    leaves the state to torch's keep-alive expiry.

    Returns:
        The evicted nodes (torch's descriptions), empty when nothing was done.
    """
    lost = set(lost_ranks)
    parts = _torch_parts()
    holder_of = getattr(handler, "_state_holder", None)
    backend = getattr(holder_of, "_backend", None)
    settings = getattr(handler, "_settings", None)
    if not lost or joined_round is None or parts is None or backend is None or settings is None:
        return []
    holder_cls, epilogue = parts
    try:
        holder = holder_cls(backend, settings, cache_duration=0)
        for _ in range(_ATTEMPTS):
            holder.sync()
            state = holder.state
            if state.round != joined_round or not state.complete or state.closed:
                return []  # the round moved on (or the job is closing): nothing of ours to remove
            dead = [node for node, rank in state.participants.items() if rank in lost]
            if not dead:
                return []
            for node in dead:
                del state.participants[node]
                state.last_heartbeats.pop(node, None)
                state.wait_list.discard(node)
                state.redundancy_list.discard(node)
            # The survivors' exit and wait-list operations, done for them: they
            # wait for the next round with their heartbeats kept (so one that
            # dies before re-joining is still swept out by torch's expiry).
            state.wait_list.update(state.participants)
            state.participants.clear()
            epilogue(state, settings)  # no participant left: torch moves the round on
            holder.mark_dirty()
            if holder.sync():
                names = sorted(str(node) for node in dead)
                log.info("evicted lost node(s) %s from rendezvous round %d without waiting for their keep-alive "
                         "to expire; %d survivor(s) wait for round %d", ", ".join(names), joined_round,
                         len(state.wait_list), state.round)
                return names
        log.warning("could not evict lost group rank(s) %s from the rendezvous after %d attempts; torch drops them "
                    "when their keep-alive expires", sorted(lost), _ATTEMPTS)
    except Exception as exc:  # noqa: BLE001 - a failed eviction falls back to torch's expiry
        log.warning("could not evict lost group rank(s) %s from the rendezvous (%s: %s); torch drops them when "
                    "their keep-alive expires", sorted(lost), type(exc).__name__, exc)
    return []
