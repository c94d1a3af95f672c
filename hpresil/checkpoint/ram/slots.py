"""Which RAM slot a save overwrites, and how long it may wait for one.

Slot choice (double buffering): never the newest commit; never the last
known good one while another slot exists (the newest sealed and healthy: it
survives a crash while a newer one is still unsealed, and it is what a rollback
restores when newer ones turn out poisoned, :mod:`hpresil.checkpoint.health`;
the snapshot is skipped instead); otherwise the oldest, keeping two slots for
last:

* the newest step the replicas agreed on (``keep_step``, set by the divergence
  check: what a divergence rollback restores). While an older healthy snapshot
  stays in another slot, it is taken before the durable one and without
  waiting: the agreement moves on only at the next save's vote, and losing it
  only sends a rare divergence rollback one snapshot further back, where a
  skipped snapshot costs every fault in that window a step. Without one it is
  kept like the last known good one;
* the newest snapshot flagged for the durable tier, until a newer one is
  flagged (the save choosing the slot may be that one): the sealer and the
  drainer reach it after newer snapshots under load, and it must not be
  overwritten before they do, else ``durable_every`` is silently skipped. It
  is taken only after the wait below, when nothing else could be locked.

With 3 slots that leaves two alternating slots and the durable one.

A slot locked by a reader (sealer, drainer, peer send) is skipped. When every
slot the writer may take is locked, it waits for the first to be released, up
to ``slot_wait`` per save and, over time, :data:`WAIT_SHARE` of the wall clock
(a token bucket that starts full): a sealer slowed down for a moment by a busy
host costs one short wait instead of a snapshot, and a sealer that is slower
than the saves themselves skips snapshots instead of slowing every step. Only
then is the snapshot skipped. A save flagged for the durable tier may always
wait its whole ``slot_wait`` (its skip would drop a ``durable_every`` step; the
wait still counts against the budget). While it waits it asks for slots back whose
commit is older than a sealed one (``slot<K>.reclaim``): sealing those cannot
give a restore anything newer, and the sealer abandons such a seal between two
chunks. It never asks for a slot whose seal would be the newest: if yielding
were the rule, a sealer slower than two saves would never finish a seal.
"""

from __future__ import annotations

import fcntl
import os
import time
from typing import Callable, NamedTuple, Sequence

from hpresil.checkpoint.api import slot_path
from hpresil.checkpoint.ram.files import ScanCache, cached_parse, read_seal, unlink

__all__ = ["SlotTable", "WAIT_SHARE"]

#: The most of the wall clock that saves spend waiting for readers, over time.
WAIT_SHARE = 0.01


class _Choice(NamedTuple):
    candidates: list[int]  # every slot but the newest, in the order they are given up
    allowed: list[int]  # those that may be overwritten (not the ones a rollback needs, unless alone)
    preferred: list[int]  # those taken before the agreed and the durable one
    kept: int | None  # the agreed one (``keep_step``), when it may be taken
    newest: int | None
    newest_durable: int | None
    good: int | None

    @property
    def before_durable(self) -> list[int]:
        """The slots given up before the durable one."""
        return self.preferred + ([self.kept] if self.kept is not None else [])


class SlotTable:
    """The writer's view of its slots: their commits, and the choice of one.

    Args:
        shm_dir: the job's shared-memory directory on this node.
        rank: global rank.
        fds: one open descriptor per slot file (also the ``flock`` handles).
        slot_wait: the longest one save waits for a reader (seconds).
    """

    def __init__(self, shm_dir: str, rank: int, fds: Sequence[int], slot_wait: float) -> None:
        self.shm_dir = shm_dir
        self.rank = rank
        self.fds = list(fds)
        self.slot_wait = slot_wait
        #: slot -> (step, created, commit_id) of its current record
        self.commits: dict[int, tuple[int, float, str]] = {}
        #: slot -> commit_id of a commit flagged for the durable tier
        self.durable: dict[int, str] = {}
        #: slots that could not be allocated
        self.unusable: set[int] = set()
        #: a step whose slot is kept like the last known good one (set by the divergence check)
        self.keep_step: int | None = None
        self._seal_cache: ScanCache = {}
        self._budget = slot_wait
        self._budget_at = time.monotonic()

    def newest(self, slots: Sequence[int]) -> int | None:
        """The slot among ``slots`` holding the newest commit, if any."""
        have = [k for k in slots if k in self.commits]
        return max(have, key=lambda k: self.commits[k][:2]) if have else None

    def sealed(self, k: int, *, healthy: bool = False) -> bool:
        """Whether slot ``k``'s current commit has its seal (and, with
        ``healthy``, the seal found it healthy)."""
        commit = self.commits.get(k)
        if commit is None:
            return False
        path = slot_path(self.shm_dir, self.rank, k, "seal.json")
        seal = cached_parse(path, self._seal_cache, lambda: read_seal(path, None, header_only=True))
        return seal is not None and seal.commit_id == commit[2] and (not healthy or seal.health == "ok")

    def _choice(self, durable: bool) -> _Choice:
        """The slots as they stand now for a save flagged ``durable`` or not (see the module doc)."""
        usable = [k for k in range(len(self.fds)) if k not in self.unusable]
        newest = self.newest(usable)
        # A save flagged for the durable tier supersedes the older flagged snapshot: that one is then kept no longer.
        newest_durable = None if durable else self.newest(
            [k for k in usable if k in self.durable and self.durable[k] == self.commits.get(k, (0, 0.0, ""))[2]])
        candidates = [k for k in usable if k != newest]
        healthy = [k for k in usable if self.sealed(k, healthy=True)]
        # The last known good: the newest commit itself once sealed healthy (never overwritten anyway).
        good = newest if newest in healthy else self.newest(healthy)
        kept = next((k for k in candidates if k != good and k != newest_durable and k in self.commits
                     and self.commits[k][0] == self.keep_step), None)
        # The agreed one may go only while an older healthy snapshot stays for a divergence rollback.
        spare = kept is not None and any(self.commits[j][0] < self.commits[kept][0] for j in healthy)
        protected = {good} if spare or kept is None else {good, kept}
        # Empty slots first, then oldest commit first; the agreed one, the durable one, the protected ones last.
        candidates.sort(key=lambda k: (k in protected, k == newest_durable, k == kept, k in self.commits,
                                       self.commits.get(k, (0, 0.0))[:2]))
        # The protected slots are never taken while there is another (a snapshot is skipped
        # instead): a rollback needs them. With two slots the only other one must do.
        allowed = [k for k in candidates if k not in protected] or (candidates if len(candidates) == 1 else [])
        preferred = [k for k in allowed if k != newest_durable and k != kept]
        return _Choice(candidates, allowed, preferred, kept if spare else None, newest, newest_durable, good)

    def pick_and_lock(self, durable: bool = False) -> int | None:
        """Takes ``LOCK_EX`` on the slot to overwrite and returns it; ``None``
        when readers held every candidate for as long as this save may wait.
        ``durable``: the snapshot to write is flagged for the durable tier."""
        c = self._choice(durable)
        k = self._try_lock(c.preferred)
        # A snapshot flagged for the durable tier may wait its whole slot_wait whatever the
        # budget: one wait per durable_every steps, where a skip would drop a durable step.
        wait = max(self._refill(), self.slot_wait if durable else 0.0)
        if k is not None or not c.candidates:
            return k
        if wait > 0 and c.preferred:  # readers hold them
            k = self._wait_for(c, durable, wait)
        if k is None and c.kept is not None:
            k = self._try_lock([c.kept])
        if k is None and wait > 0 and not c.preferred:
            # Only the durable slot is left, or none: the others are the newest and the
            # ones a rollback needs. A seal landing moves the last known good on and frees one.
            k = self._poll(wait, lambda: self._choice(durable).before_durable)
        return k if k is not None else self._try_lock(self._choice(durable).allowed)

    def _wait_for(self, c: _Choice, durable: bool, wait: float) -> int | None:
        """Waits up to ``wait`` seconds for a preferred slot (those of ``c``, or
        one that a seal landing meanwhile frees), asking the readers of the
        older ones to let go."""
        # The sealed commit every request is compared to.
        top = c.newest if c.newest is not None and self.sealed(c.newest) else c.good
        asked = [k for k in c.preferred if top is not None and k in self.commits and k != c.newest_durable
                 and self.commits[k][:2] < self.commits[top][:2]]
        requests = [slot_path(self.shm_dir, self.rank, k, "reclaim") for k in asked]
        try:
            for path in requests:
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            return self._poll(wait, lambda: self._choice(durable).preferred)
        finally:
            for path in requests:
                unlink(path)

    def _poll(self, wait: float, slots: Callable[[], Sequence[int]]) -> int | None:
        """Tries to lock one of ``slots()`` every millisecond for up to ``wait``
        seconds, spending the time from the budget; the slot, or ``None``."""
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < wait:
                time.sleep(0.001)
                k = self._try_lock(slots())
                if k is not None:
                    return k
            return None
        finally:
            self._budget -= time.monotonic() - t0

    def budget(self) -> float:
        """The wait this save may still spend (seconds)."""
        return self._refill()

    def spend(self, seconds: float) -> None:
        """Takes ``seconds`` of waiting out of the budget."""
        self._budget -= seconds

    def _refill(self) -> float:
        """The wait this save may spend (the token bucket, refilled)."""
        now = time.monotonic()
        self._budget = min(self.slot_wait, self._budget + (now - self._budget_at) * WAIT_SHARE)
        self._budget_at = now
        return self._budget

    def _try_lock(self, candidates: Sequence[int]) -> int | None:
        for k in candidates:
            try:
                fcntl.flock(self.fds[k], fcntl.LOCK_EX | fcntl.LOCK_NB)
                return k
            except BlockingIOError:
                continue  # a reader (sealer, drainer, peer send) holds it
        return None
