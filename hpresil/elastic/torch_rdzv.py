"""torch's dynamic rendezvous, made cheaper at scale without changing what it does.

torch's ``DynamicRendezvousHandler`` keeps the whole rendezvous in one shared
state that every node rewrites with a compare-and-set. Two things make that
collapse when hundreds of nodes write at once, and both are fixed here around
torch's classes, not in a copy of them.

**The event names.** Every state change (a join, a wait-list entry, each
keep-alive) records an event named after the calling method, and torch finds
that name with ``inspect.stack()``: it builds a frame record for every frame of
the thread, reading and stat-ing each frame's source file, twice per event.
That costs about a millisecond on an idle core and far more on a busy one, and
it runs *between* reading the shared state and writing it back with a
compare-and-set. So it widens the window in which another node's write makes
this one lose and retry: with N nodes joining at once each join needs more
attempts, and 256 simulated agents on a 2-core host never completed their first
round (``bench/control_plane.py``, profiled with py-spy: the agents' threads sat
in ``inspect.getframeinfo``).

:func:`install` replaces that one helper with a frame walk that returns the
same name (``sys._getframe(depth).f_code.co_name`` is the frame
``inspect.stack()[depth]`` describes) in well under a microsecond. Nothing else
in torch is touched: the state, the protocol and the recorded events stay
torch's.

**Retries at once.** A node whose compare-and-set lost re-reads the state it
got back and writes again immediately, so k nodes in contention make k-1
failed writes for each one that lands, every one moving the whole O(N) state
both ways. :class:`BackoffBackend` wraps torch's backend (the c10d or etcd-v2
one) and, after a lost write, waits a random time from a window that doubles
with each consecutive loss ("full jitter"), then reads the state afresh and
returns that as the loser's answer. The window starts at the store's own
write time (a running average of this backend's compare-and-sets; at least
:data:`BACKOFF_BASE_S`): on etcd every compare-and-set, lost or not, is a raft
round with an fsync, so its contention window is wider than a TCPStore's. A
write that does not lose costs nothing more.

``hpresil-run`` builds its handlers with both (:func:`c10d_handler`,
:func:`hpresil.elastic.etcd.create_etcd_v2_handler`).
"""

from __future__ import annotations

import logging
import random
import sys
import threading
import time
from typing import Any

__all__ = ["BACKOFF_BASE_S", "BACKOFF_CAP_S", "BackoffBackend", "c10d_handler", "install", "method_name"]

log = logging.getLogger(__name__)

#: What torch returns when the stack is shallower than asked.
_NO_NAME = "no_method_name"
#: The smallest backoff window after a first lost compare-and-set (the store's write time when
#: longer); it doubles with each further loss.
BACKOFF_BASE_S = 0.002
#: Weight of the newest compare-and-set in the running average of the write time.
_RTT_WEIGHT = 0.2
#: The largest backoff window (reached after about 9 losses in a row).
BACKOFF_CAP_S = 1.0


def method_name(depth: int = 2) -> str:
    """The name of the function ``depth`` frames up from this call (0: this
    function), as torch's ``get_method_name`` returns it, without building the
    stack's frame records."""
    try:
        return sys._getframe(depth).f_code.co_name
    except ValueError:  # the stack is shallower than depth
        return _NO_NAME


def _module() -> Any | None:
    try:
        from torch.distributed.elastic.rendezvous import dynamic_rendezvous
    except ImportError:
        return None
    return dynamic_rendezvous


def install() -> bool:
    """Points torch's dynamic rendezvous at :func:`method_name` (idempotent).

    Returns:
        ``True`` when torch's helper is (now) the fast one; ``False`` when this
        torch has no such helper, in which case nothing is changed.
    """
    module = _module()
    current = getattr(module, "get_method_name", None)
    if module is None or not callable(current):
        return False
    if current is not method_name:
        module.get_method_name = method_name
        log.debug("torch's rendezvous event names now come from a frame walk instead of inspect.stack()")
    return True


class BackoffBackend:
    """torch's rendezvous backend with a jittered exponential backoff after a
    compare-and-set that lost (see the module doc).

    It is a ``RendezvousBackend`` by delegation: ``name``, ``get_state`` and a
    winning ``set_state`` are the inner backend's own calls.

    Args:
        inner: torch's backend (``C10dRendezvousBackend``, ``EtcdRendezvousBackend``).
        base_s: the first backoff window.
        cap_s: the largest window.
        rng: the randomness of the wait (tests pass a seeded one).
    """

    def __init__(self, inner: Any, base_s: float = BACKOFF_BASE_S, cap_s: float = BACKOFF_CAP_S,
                 rng: random.Random | None = None) -> None:
        if base_s <= 0 or cap_s < base_s:
            raise ValueError(f"backoff needs 0 < base_s <= cap_s, got base_s={base_s}, cap_s={cap_s}")
        self.inner = inner
        self.base_s, self.cap_s = base_s, cap_s
        self._rng = rng or random.Random()
        self._lock = threading.Lock()  # the handler's main and keep-alive threads share this backend
        self._losses = 0  # compare-and-sets lost in a row
        #: Running average of this backend's compare-and-set time (s).
        self.write_s = 0.0
        #: Compare-and-sets that lost, and the seconds waited after them, since creation.
        self.lost = 0
        self.waited_s = 0.0

    @property
    def name(self) -> str:
        """The inner backend's name (torch logs and records it)."""
        return self.inner.name

    def get_state(self) -> tuple[bytes, Any] | None:
        """The inner backend's state and fencing token."""
        return self.inner.get_state()

    def window(self, losses: int) -> float:
        """The backoff window after ``losses`` compare-and-sets lost in a row:
        the write time (at least ``base_s``) doubled per further loss, at most ``cap_s``."""
        return min(self.cap_s, max(self.base_s, self.write_s) * (2.0 ** max(0, min(losses, 30) - 1)))

    def set_state(self, state: bytes, token: Any = None) -> tuple[bytes, Any, bool] | None:
        """The inner compare-and-set; when it loses, waits, then answers with the
        state as it is after the wait (still a loss: the caller decides again)."""
        start = time.monotonic()
        got = self.inner.set_state(state, token)
        took = time.monotonic() - start
        with self._lock:
            self.write_s = took if not self.write_s else (1 - _RTT_WEIGHT) * self.write_s + _RTT_WEIGHT * took
            if got is None or got[2]:
                self._losses = 0
                return got
            self._losses += 1
            self.lost += 1
            wait = self._rng.uniform(0.0, self.window(self._losses))
            self.waited_s += wait
        time.sleep(wait)
        fresh = self.inner.get_state()
        if fresh is None:  # the state vanished meanwhile: the loser's answer stays what the write returned
            return got
        return fresh[0], fresh[1], False


def c10d_handler(params: Any) -> Any:
    """torch's c10d rendezvous handler, built as torch's registry builds it
    (``c10d_rendezvous_backend.create_backend``, ``dynamic_rendezvous.create_handler``)
    but with its backend in a :class:`BackoffBackend`."""
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import create_backend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

    backend, store = create_backend(params)
    return create_handler(store, BackoffBackend(backend), params)
