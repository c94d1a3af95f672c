"""The ``divergence`` node service: a node whose ranks' replicas diverged
twice leaves the job, like a node with an unhealthy GPU.

Silent data corruption is a property of the hardware: a GPU or memory that
computed a wrong value once will likely do it again. A rank that the
divergence check (:mod:`hpresil.checkpoint.divergence`) names records the
step in its node's ``<shm_dir>/divergence.json``; with ``--on-divergence
leave``, once that file counts two divergences this service gives the agent a
verdict: the agent leaves the job (exit code
:data:`~hpresil.health.api.EXIT_UNHEALTHY`, event ``node_leave``) and the
other nodes go on without it, restoring the newest healthy snapshot.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import timedelta
from typing import Any

from hpresil.checkpoint.guard import DIVERGENCE_FILE
from hpresil.health.api import Finding, Verdict
from hpresil.runtime.api import NodeService, RuntimeContext, WorkerGroupInfo

__all__ = ["DivergenceWatch", "LEAVE_AFTER"]

log = logging.getLogger(__name__)

#: Divergences on one node before it leaves (with ``--on-divergence leave``).
LEAVE_AFTER = 2


class DivergenceWatch(NodeService):
    """Turns repeated replica divergence on this node into a leave verdict.

    Args:
        config: unused (the policy travels in the file, from the workers' own policy).
        shm_dir: the node's RAM tier directory (as a node service: from :meth:`start`).
    """

    name = "divergence"

    def __init__(self, config: Any = None, *, shm_dir: str | None = None) -> None:
        self.shm_dir = shm_dir
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of the file last read
        self._verdict: Verdict | None = None

    def start(self, ctx: RuntimeContext) -> None:
        """Node-service hook: watches the job's shared-memory directory."""
        self.shm_dir = ctx.shm_dir

    def on_workers_started(self, group: WorkerGroupInfo) -> None:
        """Node-service hook (nothing to do)."""

    def on_workers_stopped(self, group: WorkerGroupInfo) -> None:
        """Node-service hook: a verdict written just before the workers stopped counts."""
        self.tick()

    def tick(self) -> None:
        """Node-service hook: re-reads the file when it changed."""
        if self.shm_dir is None or self._verdict is not None:
            return
        path = os.path.join(self.shm_dir, DIVERGENCE_FILE)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return
        if self._seen == (st.st_mtime_ns, st.st_size):
            return
        self._seen = (st.st_mtime_ns, st.st_size)
        try:
            with open(path, encoding="utf-8") as f:
                seen = json.load(f)
            count, policy = int(seen.get("count", 0)), str(seen.get("policy", ""))
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            return
        if policy != "leave" or count < LEAVE_AFTER:
            return
        detail = (f"ranks {seen.get('ranks')} of this node diverged from their replicas {count} times (steps "
                  f"{seen.get('steps')}): silent data corruption; --on-divergence leave")
        log.error("%s", detail)
        finding = Finding(device=None, check="replica_divergence", severity="fatal", detail=detail,
                          source="hpresil:divergence")
        self._verdict = Verdict(findings=(finding,), path=path)

    def stop(self, timeout: timedelta) -> None:
        """Node-service hook (nothing to do)."""

    def verdict(self) -> Verdict | None:
        """Why this node must leave (repeated divergence under ``leave``), or ``None``."""
        return self._verdict
