"""Node service that records the ``--net-env`` plan in ``events.jsonl`` and
gives the workers their variables.

The launcher's changes are applied by :mod:`hpresil.netenv.env` before the
runtime starts and reported there as ``env_change`` events; this service adds
what the changes alone do not show: what was detected (``net_env``) and every
warning about a value hpresil kept or about the host (``env_warning``). It
also decides the ``workers`` variables (the flight recorder the hang watchdog
dumps, NCCL's dump on timeout into the log directory), which the runtime puts
in every worker's environment.
"""

from __future__ import annotations

import logging

from hpresil.netenv.api import Plan
from hpresil.netenv.env import worker_defaults
from hpresil.runtime.api import NodeService, RuntimeContext

__all__ = ["NetEnvReport"]

log = logging.getLogger(__name__)


class NetEnvReport(NodeService):
    """Emits the plan's summary and findings once, at runtime start.

    Args:
        plan: the plan ``hpresil-run`` applied.
    """

    name = "netenv"

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._worker_env: dict[str, str] = {}

    def start(self, ctx: RuntimeContext) -> None:
        self._worker_env, changes = worker_defaults(ctx.log_dir)
        for change in changes:
            log.info("worker env %s: unset -> %s (%s)", change.name, change.new, change.reason)
            ctx.events.emit("env_change", scope="workers", name=change.name, old=change.old, new=change.new,
                            reason=change.reason)
        plan, facts = self.plan, self.plan.facts
        counts: dict[str, int] = {}
        for d in plan.decisions:
            counts[d.action] = counts.get(d.action, 0) + 1
        ctx.events.emit(
            "net_env",
            mode=plan.mode,
            facts=None if facts is None else facts.to_json_obj(),
            decisions=counts,
            warnings=len(plan.warnings),
            errors=len(plan.errors),
        )
        for d in plan.warnings:
            ctx.events.emit("env_warning", rule=d.rule, name=d.variable, value=d.current, severity=d.severity,
                            reason=d.reason, source=d.source)

    def worker_env(self) -> dict[str, str]:
        """The ``workers`` variables the user left unset."""
        return dict(self._worker_env)
