"""The Checkpointer's guard: at each snapshot it reads the job's health vote,
acts on it (rollback, stop or warn, per :class:`~hpresil.checkpoint.rollback.RollbackPolicy`),
and starts the next vote with this rank's verdicts and its replica digest.

Timeline of one fault: the state goes bad before the snapshot of step ``S``;
the sealer marks that snapshot (or, for a divergence, its replica digest
differs); the vote started at the save of ``S`` or ``S + 1`` carries it; at the
next save every rank reads the same result and rolls back together to the
newest healthy snapshot before ``S`` (before the last step the replicas
agreed on, for a divergence). The training loop goes on from there:
:meth:`~hpresil.Checkpointer.steps` rewinds its step counter.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from typing import Any, Callable

from hpresil.checkpoint.divergence import DEPTH, DivergenceCheck, Verdict, parse_replica
from hpresil.checkpoint.ram.files import SlotInfo, scan, write_atomic
from hpresil.checkpoint.restore import RestoreResult
from hpresil.checkpoint.graceful_stop import agree, cpu_group
from hpresil.checkpoint.rollback import HealthVote, RollbackPolicy, SkipList, local_verdicts
from hpresil.errors import UnhealthyStateError

__all__ = ["Guard", "DIVERGENCE_FILE"]

log = logging.getLogger(__name__)

#: Per node, in the RAM tier's directory: how often ranks of this node diverged
#: (read by :class:`~hpresil.checkpoint.divergence_watch.DivergenceWatch`).
DIVERGENCE_FILE = "divergence.json"

Restore = Callable[[int], "RestoreResult | None"]
#: The longest a rollback waits for an older snapshot still being sealed or uploaded.
_SETTLE_S = 30.0


class Guard:
    """Rollback and divergence for one rank.

    Args:
        policy: what to do per cause.
        shm_dir: the RAM tier directory holding this rank's seals.
        rank: this rank.
        world: the world size.
        distributed: whether to vote with the other ranks.
        events: where ``rollback`` and ``replica_divergence`` go.
        on_rollback: called with ``(restored step, cause)`` after each rollback
            (the Checkpointer marks the abandoned durable steps).
        on_agreed: called with the newest step every replica group agreed on
            (the RAM writer keeps that snapshot).
    """

    def __init__(self, policy: RollbackPolicy, shm_dir: str, rank: int, world: int, distributed: bool,
                 events: Any, on_rollback: Callable[[int, str], None] | None = None,
                 on_agreed: Callable[[int], None] | None = None) -> None:
        self.policy = policy
        self.shm_dir = shm_dir
        self.rank = rank
        self.events = events
        self.on_rollback = on_rollback
        self.on_agreed = on_agreed
        self.cursor = [0]  # the next step steps() yields
        self.skip = SkipList()
        self.iterating = False
        self._distributed = distributed
        self._world = world
        self._vote: HealthVote | None = None
        self._div: DivergenceCheck | None = None
        self._since = time.time()  # seals of commits made before this are settled (wall time: records carry it)
        self._cache: dict[str, Any] = {}
        self._warned: set[tuple[str, int]] = set()
        self._last: tuple[str, int, int] | None = None  # (cause, bad step, target) of the last rollback
        self._tries = 0
        self._prev: list[int | None] = [None] * DEPTH  # the snapshots the next vote compares, newest first
        self._pending: tuple[list[int | None], list[tuple[int, int] | None]] = ([], [])  # compared, our digests
        self._layout: int | None = None
        self._agreed: int | None = None  # the newest step every replica group agreed on

    def reset(self) -> None:
        """After a restore: verdicts about commits made before now are settled."""
        self._since = time.time()
        self._prev = [None] * DEPTH
        self._pending = ([], [])
        if self._vote is not None:
            self._vote.result()  # a vote in flight is read and dropped (every rank restores together)

    # -- the vote ------------------------------------------------------------
    def vote(self, step: int) -> None:
        """Starts this snapshot's vote with this rank's verdicts (after the save of ``step``)."""
        if self._vote is None:
            group = None
            if self._distributed:
                group = cpu_group()
                self._div = DivergenceCheck(self.rank, self._world, group)
            self._vote = HealthVote(group, self._distributed)
        extra = None
        compared, summaries = list(self._prev), []
        infos = scan(self.shm_dir, [self.rank], self._cache)  # this rank's slots: a few stats, parses only new files
        if self._div is not None:
            summaries = self._summaries(infos, compared)
            extra = self._div.contribute(self._layout, summaries)
        self._vote.start(local_verdicts(infos, self._since), extra)
        self._pending = (compared, summaries)
        self._prev = [step, *self._prev[:-1]]

    def _summaries(self, infos: list[SlotInfo], steps: list[int | None]) -> list[tuple[int, int] | None]:
        """Our replica digests of ``steps`` (from their seals among ``infos``;
        ``None`` where there is none yet), and the newest layout seen."""
        found: list[tuple[int, int] | None] = [None] * len(steps)
        newest = -1
        for info in infos:
            seal = info.seal
            if seal is None or not seal.replica or info.record.created <= self._since:
                continue
            parsed = parse_replica(seal.replica)
            if parsed is None:
                continue
            if info.record.step > newest:
                newest, self._layout = info.record.step, parsed[0]
            if info.record.step in steps and seal.health == "ok":
                found[steps.index(info.record.step)] = parsed
        return found

    # -- acting ----------------------------------------------------------------
    def check(self, step: int, restore: Restore) -> bool:
        """Reads the last vote and acts on it before the snapshot of ``step``.

        Args:
            restore: ``restore(before) -> RestoreResult | None``, collective.

        Returns:
            Whether the state was rolled back (no snapshot is taken at ``step`` then).

        Raises:
            UnhealthyStateError: the policy says stop, no healthy snapshot is
                left, or ``max_tries`` rollbacks did not help.
        """
        got = self._vote.result() if self._vote is not None else None
        if got is None:
            return False
        decision, extra = got
        bad = dict(decision.bad)
        if self._div is not None:
            compared, summaries = self._pending
            verdict = self._div.judge(compared, extra, self._summary_now)
            if verdict.regroup:
                # learned from the newest compared snapshot every rank may have sealed by now
                self._div.regroup(summaries[-1] if summaries else None, self._layout)
            if verdict.ranks and verdict.step is not None:
                bad["divergence"] = verdict.step
                self._report_divergence(verdict)
            elif verdict.agreed is not None:
                self._agreed = max(verdict.agreed, self._agreed or -1)
                if self.on_agreed is not None:
                    self.on_agreed(self._agreed)
        ranked = sorted(bad.items(), key=lambda kv: (self.policy.action(kv[0]) == "warn", kv[1]))
        if not ranked:
            return False
        cause, bad_step = ranked[0]
        action = self.policy.action(cause)
        flag = f"--on-{cause}"
        if action == "warn":
            if (cause, bad_step) not in self._warned:
                self._warned.add((cause, bad_step))
                log.warning("rank %d: snapshot of step %d is unhealthy (%s); %s warn: training on", self.rank,
                            bad_step, cause, flag)
            return False
        if action == "stop":
            raise UnhealthyStateError(f"step {bad_step}: the training state is unhealthy ({cause}); stopping "
                                      f"({flag} stop; {flag} rollback restores the newest healthy snapshot instead)")
        before = bad_step
        if cause == "divergence" and self._agreed is not None and self._agreed < bad_step:
            before = self._agreed + 1  # back to what every replica agreed on
        return self._rollback(step, cause, bad_step, before, restore)

    def _rollback(self, step: int, cause: str, bad: int, before: int, restore: Restore) -> bool:
        last = self._last
        if last is not None and last[0] == cause and bad <= last[1]:
            # It came back at (or before) the step it came at: go one snapshot further back.
            self._tries += 1
            before = min(before, last[2])
        else:
            self._tries = 1
        if self._tries > self.policy.max_tries:
            raise UnhealthyStateError(
                f"step {bad}: the training state went bad ({cause}) again after {self.policy.max_tries} rollbacks "
                f"(each one snapshot further back); look at the data and the code of step {bad}, or raise "
                f"--rollback-tries")
        t0 = time.perf_counter()
        result = restore(before)
        deadline = time.monotonic() + _SETTLE_S
        # Nothing healthy to restore yet, while some rank still has older snapshots on their
        # way (a seal the busy sealer has not reached, an upload in flight): every rank
        # agrees to wait and try again, so the ranks never leave the collective restore apart.
        while result is None and time.monotonic() < deadline and agree(self._pending_older(before)):
            time.sleep(0.2)
            result = restore(before)
        if result is None:
            raise UnhealthyStateError(f"step {bad}: the training state went bad ({cause}) and no healthy snapshot "
                                      f"before step {before} is left in any tier")
        self._last = (cause, bad, result.step)
        self._rolled_back(step, cause, bad, self._tries, result, t0)
        return True

    def rollback_by_hand(self, step: int, before: int, restore: Restore) -> RestoreResult:
        """``Checkpointer.rollback()``: restores the newest healthy snapshot
        before ``before`` like a rollback the vote decided (cause ``manual``).

        Raises:
            UnhealthyStateError: there is no such snapshot.
        """
        t0 = time.perf_counter()
        result = restore(before)
        if result is None:
            raise UnhealthyStateError(f"rollback: no healthy snapshot before step {before} in any tier")
        self._rolled_back(step, "manual", before, 1, result, t0)
        return result

    def _rolled_back(self, step: int, cause: str, bad: int, attempt: int, result: RestoreResult, t0: float) -> None:
        """After a rollback to ``result``: the loop, the kept snapshot, the log,
        the event and the abandoned durable steps."""
        target = result.step
        self.cursor[0] = target + 1
        if self._agreed is not None and self._agreed > target:
            self._agreed = target
            if self.on_agreed is not None:
                self.on_agreed(target)
        if cause == "spike" and self.policy.skip_spike_data:
            self.skip.steps.add(bad)
        duration = time.perf_counter() - t0
        # Every rank rolls back together: rank 0 says so on the console.
        log.log(logging.WARNING if self.rank == 0 else logging.DEBUG,
                "rank %d: rolled back from step %d to step %d (%s at step %d, try %d of %d) in %.3fs%s",
                self.rank, step, target, cause, bad, attempt, self.policy.max_tries, duration,
                "" if self.iterating else "; the loop does not use ckpt.steps(), so its step counter "
                "does not rewind")
        self.events.emit("rollback", from_step=step, to_step=target, cause=cause, bad_step=bad, tier=result.tier,
                         attempt=attempt, duration_s=round(duration, 6))
        if self.on_rollback is not None:
            self.on_rollback(target, cause)

    def _summary_now(self, step: int, wait: float = 2.0) -> tuple[int, int] | None:
        """Our digest of ``step`` for naming the ranks of a split, waiting a
        little for its seal (every rank names together: an abstention there
        would leave a group of three without a majority)."""
        deadline = time.monotonic() + wait
        while True:
            (found,) = self._summaries(scan(self.shm_dir, [self.rank], self._cache), [step])
            if found is not None or time.monotonic() >= deadline:
                return found
            time.sleep(0.01)

    def _pending_older(self, before: int) -> bool:
        """Whether this rank has a snapshot older than ``before`` that may yet
        become restorable: not sealed yet, or sealed healthy and flagged for the
        durable tier (its upload may be in flight)."""
        for info in scan(self.shm_dir, [self.rank], self._cache):
            if info.record.step >= before:
                continue
            if info.seal is None or (info.record.durable and info.seal.health == "ok"):
                return True
        return False

    def _report_divergence(self, verdict: Verdict) -> None:
        log.log(logging.ERROR if self.rank == 0 else logging.DEBUG,
                "rank %d: replicas diverged at step %s: ranks %s hold different bytes than their replicas",
                self.rank, verdict.step, verdict.ranks)
        if self.rank not in verdict.ranks:
            return
        node = os.environ.get("HPRESIL_NODE_ID") or socket.gethostname()
        self.events.emit("replica_divergence", step=verdict.step, ranks=verdict.ranks, node=node)
        path = os.path.join(self.shm_dir, DIVERGENCE_FILE)
        try:
            # The node's ranks update one file: read, merge and replace it under a lock.
            with open(path + ".lock", "a") as lock:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                try:
                    with open(path, encoding="utf-8") as f:
                        seen = json.load(f)
                except (OSError, ValueError):
                    seen = {}
                steps = sorted({*seen.get("steps", []), verdict.step})
                write_atomic(path, json.dumps({"node": node, "steps": steps, "count": len(steps),
                                               "policy": self.policy.on_divergence,
                                               "ranks": sorted({*seen.get("ranks", []), self.rank})}))
        except OSError as exc:
            log.warning("cannot record the divergence in %s: %s", path, exc)
