"""Node service that records the ``--net-env`` plan in ``events.jsonl``.

The changes themselves are applied by :mod:`hpresil.runtime.env` before the
runtime starts and reported there as ``env_change`` events; this service adds
what the changes alone do not show: what was detected (``net_env``) and every
warning about a value hpresil kept or about the host (``env_warning``).
"""

from __future__ import annotations

from datetime import timedelta

from hpresil.netenv.api import Plan
from hpresil.runtime.api import RuntimeContext, WorkerGroupInfo

__all__ = ["NetEnvReport"]


class NetEnvReport:
    """Emits the plan's summary and findings once, at runtime start.

    Args:
        plan: the plan ``hpresil-run`` applied.
    """

    name = "netenv"

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def start(self, ctx: RuntimeContext) -> None:
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

    def on_workers_started(self, group: WorkerGroupInfo) -> None:
        """Nothing to do: the environment is fixed for the job."""

    def on_workers_stopped(self, group: WorkerGroupInfo) -> None:
        """Nothing to do."""

    def tick(self) -> None:
        """Nothing to do."""

    def stop(self, timeout: timedelta) -> None:
        """Nothing to do."""
