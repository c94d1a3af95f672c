"""Node service ``recovery``: one console line when the workers train again after a failure.

The agent logs one line per failed worker (``worker rank 1 ... was killed by
SIGKILL``); this service closes the story with one line per recovery, from the
node's event stream: which failure, which ranks restored which step from which
tier, and how long after the failure they were training again::

    recovered from rank 1 killed by SIGKILL: ranks 0-1 restored step 25 from ram (0.09 s); training again 0.84 s after the failure (attempt 1)

It reads ``events.jsonl`` from the runtime's thread (workers write their
``checkpoint_restored`` events there) and costs training nothing. A group that
restarts without restoring (no Checkpointer, or nothing saved yet) gets no line:
the agent's restart line says what happened.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from hpresil.events.jsonl import EventTail
from hpresil.runtime.api import NodeService, RuntimeContext

__all__ = ["RecoveryReport", "describe_exit", "rank_ranges"]

log = logging.getLogger(__name__)

#: Seconds between reads of the event stream.
_READ_EVERY = 0.2


def rank_ranges(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2, 5``."""
    spans: list[list[int]] = []
    for r in sorted(set(ranks)):
        if spans and spans[-1][1] == r - 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def describe_exit(event: dict[str, Any]) -> str:
    """A ``worker_exit`` or ``workers_restart`` event in a few words."""
    if event.get("event") == "worker_exit":
        how = f"killed by {event['signal']}" if event.get("signal") else f"exited with code {event.get('exitcode')}"
        return f"rank {event.get('rank')} {how}"
    lost = event.get("lost_nodes") or []
    return f"{event.get('reason', 'a failure')}" + (f" (nodes {rank_ranges(lost)})" if lost else "")


class RecoveryReport(NodeService):
    """Logs one line per recovery (module doc). No configuration."""

    name = "recovery"

    def __init__(self, config: None = None) -> None:
        self._tail: EventTail | None = None
        self._next_read = 0.0
        self._failure: tuple[float, str] | None = None  # (ts, what) of the first failure not yet recovered
        self._attempt: int | None = None  # the restarted attempt whose restores are awaited
        self._ranks: set[int] = set()
        self._restored: dict[int, dict[str, Any]] = {}

    def start(self, ctx: RuntimeContext) -> None:
        path = getattr(ctx.events, "path", None) or os.path.join(ctx.log_dir, "events.jsonl")
        self._tail = EventTail(path, from_end=True)

    def tick(self) -> None:
        now = time.monotonic()
        if self._tail is None or now < self._next_read:
            return
        self._next_read = now + _READ_EVERY
        for event in self._tail.read():
            self.observe(event)

    def observe(self, event: dict[str, Any]) -> None:
        """Advances the story by one event of the node's stream."""
        name = event.get("event")
        if name in ("worker_exit", "workers_restart") and self._failure is None:
            self._failure = (float(event.get("ts", time.time())), describe_exit(event))
        elif name == "workers_start" and self._failure is not None:
            self._attempt = event.get("attempt")
            self._ranks = set(event.get("ranks") or [])
            self._restored = {}
        elif name == "checkpoint_restored" and self._attempt is not None and event.get("attempt") == self._attempt:
            rank = event.get("rank")
            if rank in self._ranks:
                self._restored[rank] = event
            if self._ranks and self._ranks <= set(self._restored):
                self._report()

    def _report(self) -> None:
        assert self._failure is not None
        failed_at, what = self._failure
        restores = list(self._restored.values())
        steps = sorted({e.get("step") for e in restores}, key=str)
        tiers = sorted({str(e.get("tier")) for e in restores})
        slowest = max(float(e.get("duration_s") or 0.0) for e in restores)
        back = max(float(e.get("ts") or failed_at) for e in restores) - failed_at
        log.info("recovered from %s: ranks %s restored step %s from %s (%.2f s); training again %.2f s after the "
                 "failure (attempt %s)", what, rank_ranges(list(self._ranks)), "/".join(map(str, steps)),
                 "+".join(tiers), slowest, back, self._attempt)
        self._failure, self._attempt, self._ranks, self._restored = None, None, set(), {}
